"""report: the main panel compares like with like (the given results, or the candidate against
the champion history of its registered model on the same dataset and hardware), NVIDIA's
published points on a panel of their own; the page has real tables, embedded plots, the
dataset/backend/precision/hardware of every point, and labels that do not overlap."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from gpunet_core import steps
from gpunet_core.cli import main as cli_main
from gpunet_core.inference import report
from gpunet_core.inference.report import (
    RegistryHistory,
    champion_history,
    dataset_info,
    pareto_front,
    write_html_report,
    write_report,
)
from gpunet_core.models.spec import MODEL_INFO
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import BENCH_SCHEMA, RESULTS_SCHEMA

DIGITS = "d1g175" * 10  # a manifest checksum
FP = "cpu0fingerprint0"  # a latency fingerprint
PUBLISHED_TOP1 = {info["top1"] for info in MODEL_INFO.values()}


def bench_result(model, median, backend="onnxruntime", cpu="Test CPU", *, sha=None, fp=FP,
                 precision="fp32", img_size=64):
    result = {"schema": BENCH_SCHEMA, "model": model, "backend": backend,
              "precision": precision, "batch": 1, "img_size": img_size,
              "latency_kind": "host_wall", "latency_fingerprint": fp,
              "latency_ms": {"median": median, "p99": median * 1.5},
              "throughput_ips": 1000 / median, "fingerprint": {"cpu": cpu, "gpu": None}}
    if sha:
        result["onnx_sha256"] = sha
    return result


def validation_result(model, top1, *, sha=None, checksum=DIGITS, source=None, classes=10,
                      split="val", img_size=64):
    source = source or {"type": "digits", "origin": "sklearn.datasets.load_digits",
                        "img_size": 32, "per_class": 20}
    result = {"schema": RESULTS_SCHEMA, "model": model, "top1": top1, "top5": 99.0,
              "loss": 0.3, "num_classes": classes, "img_size": img_size, "precision": "fp32",
              "dataset": {"checksum": checksum, "split": split, "images": 40,
                          "source": source}}
    if sha:
        result["onnx_sha256"] = sha
    return result


def write(path, data):
    path.write_text(json.dumps(data))
    return path


class Page(HTMLParser):
    """The parts of the report page the tests look at: tables (headers, rows of cells by
    ``data-col``), images, sections (attributes, heading, text)."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.images: list[dict] = []
        self.sections: dict[str, dict] = {}
        self.tags: set[str] = set()
        self._table = self._row = self._cell = self._section = None
        self._heading = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = self.sections.setdefault(attrs.get("id"), {**attrs, "h2": "",
                                                                        "text": ""})
        elif tag == "h2":
            self._heading = True
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), {"headers": [], "rows": []})
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": attrs, "cells": {}}
        elif tag == "th" and self._table is not None:
            self._table["headers"].append("")
            self._cell = ("th", None)
        elif tag == "td" and self._row is not None:
            self._row["cells"][attrs["data-col"]] = ""
            self._cell = ("td", attrs["data-col"])
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "h2":
            self._heading = False
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section is not None:
            self._section["text"] += data
            if self._heading:
                self._section["h2"] += data
        if self._cell is not None:
            kind, col = self._cell
            if kind == "th":
                self._table["headers"][-1] += data
            else:
                self._row["cells"][col] += data


def assert_every_point_says_what_it_is(page: Page):
    for table in page.tables.values():
        assert {"dataset", "resolution px", "backend", "precision", "hardware",
                "top-1 %", "latency ms (median)", "Pareto front"} <= set(table["headers"])
        for row in table["rows"]:
            for col in ("dataset", "img_size", "backend", "precision", "hardware", "timing"):
                assert row["cells"][col] not in ("", "-", "?", "None"), (col, row)


def embedded_pngs(page: Page) -> list[np.ndarray]:
    images = []
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(img["src"].split(",", 1)[1])
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for name, median in (("gpunet_0", 8.0), ("gpunet_d1", 12.0), ("gpunet_2", 20.0)):
        write(d / f"bench_{name}.json", bench_result(name, median))
    write(d / "val_gpunet_0.json", {"schema": RESULTS_SCHEMA, "model": "gpunet_0",
                                    "top1": 91.5, "top5": 99.0, "loss": 0.3,
                                    "data": "digits/val"})
    write(d / "val_gpunet_2.json", validation_result("gpunet_2", 55.0))
    write(d / "unrelated.json", {"hello": 1})
    return d


def test_pareto_front():
    pts = [(1.0, 80.0), (0.5, 78.0), (2.0, 79.0), (3.0, 83.0), (0.5, 77.0)]
    assert pareto_front(pts) == [1, 0, 3]
    assert pareto_front([]) == []


def test_cli_report_shows_the_given_results_only(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", str(results_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    main = {r["model"]: r for r in data["main"]}
    assert set(main) == {"gpunet_0", "gpunet_d1", "gpunet_2"}
    assert all(r["panel"] == "main" and r["measured"] for r in main.values())
    assert main["gpunet_0"]["top1"] == 91.5
    assert main["gpunet_0"]["dataset"] == "digits/val (no dataset manifest)"
    # no validation of its graph: no top-1, and never NVIDIA's ImageNet figure instead
    assert main["gpunet_d1"]["top1"] is None and "no validation" in main["gpunet_d1"]["note"]
    assert main["gpunet_2"]["top1"] == 55.0 and main["gpunet_2"]["latency_ms"] == 20.0
    assert main["gpunet_2"]["dataset"].startswith("digits (scikit-learn 8x8, rendered at 32 "
                                                  "px, 20 per class), val split, 40 images")
    assert main["gpunet_2"]["hardware"] == "CPU: Test CPU"
    assert data["mode"] == "results" and not data["imagenet"]
    assert "No registry" in data["notes"][0]
    published = data["published"]
    assert len(published) == 2 * len(MODEL_INFO)
    a100 = {r["model"]: r for r in published if r["hardware"] == "GPU: NVIDIA A100"}
    assert a100["gpunet_d2"]["latency_ms"] == 1.40 and a100["gpunet_d2"]["top1"] == 83.6
    assert a100["gpunet_d2"]["img_size"] == 528 and a100["gpunet_0"]["img_size"] == 320
    assert {(r["backend"], r["precision"]) for r in published} == {("TensorRT 8", "fp16")}
    assert len(data["rows"]) == len(main) + len(published)

    table = (out / "report.md").read_text()
    assert ("| 3 | - | given result | GPUNet-D1 | - | - | 12.000 | 18.000 |  | 64 | fp32 | "
            "onnxruntime | CPU: Test CPU | batch 1, host wall clock | no validation result |"
            in table)
    assert "GPUNet-D1" in printed and "report.html" in printed
    for name in ("pareto.png", "published.png"):
        png = out / name
        image = np.asarray(Image.open(png).convert("RGB"))
        assert image.shape[0] >= 600 and image.shape[1] >= 900
        assert png.stat().st_size > 20_000
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # not a blank canvas
        assert (image < 250).any(axis=2).mean() > 0.02  # a few percent of the pixels drawn
    page = Page((out / "report.html").read_text())
    assert set(page.tables) == {"main-table", "published-table"}
    assert len(page.tables["main-table"]["rows"]) == 3
    assert_every_point_says_what_it_is(page)


def history(candidate="6", **overrides):
    def tags(top1, latency, promotion, *, checksum=DIGITS, fp=FP, precision="fp32"):
        return {"top1": str(top1), "top5": "98", "latency_ms": str(latency),
                "latency_backend": "onnxruntime", "model": "gpunet_0", "img_size": "64",
                "precision": precision, "dataset_checksum": checksum,
                "latency_fingerprint": fp, "promotion": promotion}

    versions = [
        {"version": "1", "tags": tags(40, 7.5, "champion: first champion")},
        {"version": "2", "tags": tags(48, 7.9, "champion: beats champion v1 by 8.00 points")},
        {"version": "3", "tags": tags(30, 7.0, "challenger: top-1 30.00 does not beat ...")},
        {"version": "4", "tags": tags(52, 6.1, "champion: beats champion v2", precision="int8")},
        {"version": "5", "tags": tags(97, 0.4, "champion: other data", checksum="other")},
        {"version": "7", "tags": tags(90, 0.3, "champion: other hardware", fp="gpu0")},
        {"version": "6", "tags": tags(55, 8.0, "champion: beats champion v4 by 3.00 points")},
    ]
    return RegistryHistory(overrides.get("name", "gpunet"), candidate, versions,
                           overrides.get("aliases", {"champion": "6",
                                                     "previous-champion": "4"}))


@pytest.fixture
def run_results(tmp_path):
    """A digits run's artifacts as the pipeline passes them: the deployed graph's validation
    and its benchmark (55 % top-1, CPU, ONNX Runtime, as the user's report)."""
    return [write(tmp_path / "validation.json", validation_result("gpunet_0", 55.0, sha="g")),
            write(tmp_path / "bench.json", bench_result("gpunet_0", 8.0, sha="g"))]


def test_digits_run_page_compares_the_candidate_with_its_champion_history(run_results,
                                                                           tmp_path):
    html_path = write_html_report(run_results, tmp_path / "page" / "report.html",
                                  history=history())
    text = html_path.read_text()
    page = Page(text)
    assert "pre" not in page.tags and "|---" not in text  # tables, not Markdown
    assert set(page.tables) == {"main-table", "published-table"}
    main = page.tables["main-table"]["rows"]
    # ever-champions on the same dataset and fingerprint, then the candidate; not v3 (never
    # champion), v5 (another dataset) or v7 (another fingerprint)
    assert [r["cells"]["version"] for r in main] == ["1", "2", "4", "6"]
    assert [r["cells"]["role"] for r in main] == [
        "former champion", "former champion", "previous champion",
        "candidate (this run), promoted to champion"]
    assert main[-1]["attrs"].get("class") == "candidate"
    assert main[2]["cells"]["precision"] == "int8" and main[-1]["cells"]["top1"] == "55.00"
    assert [r["cells"]["pareto"] for r in main] == ["", "", "yes", "yes"]
    for row in main:  # nothing of NVIDIA's in the main panel of a digits run
        cells = row["cells"]
        assert row["attrs"]["data-panel"] == "main"
        assert cells["dataset"].startswith("digits (scikit-learn 8x8")
        assert "ImageNet" not in " ".join(cells.values())
        assert cells["backend"] == "onnxruntime" and cells["hardware"] == "CPU: Test CPU"
        assert "TensorRT" not in cells["backend"] and "A100" not in cells["hardware"]
        assert float(cells["top1"]) not in PUBLISHED_TOP1
    published = page.tables["published-table"]["rows"]
    assert len(published) == 2 * len(MODEL_INFO)
    assert all(r["cells"]["dataset"].startswith("ImageNet-1k") for r in published)
    assert {r["cells"]["hardware"] for r in published} == {"GPU: NVIDIA A100",
                                                           "GPU: NVIDIA V100"}
    assert_every_point_says_what_it_is(page)

    main_section = page.sections["main-panel"]
    assert main_section["h2"].startswith("Candidate vs. champion history")
    assert "left out: 2 another dataset or hardware, 1 never champion" in main_section["text"]
    other = page.sections["published-panel"]
    assert other["class"] == "other-task"
    assert "a different task from this run's dataset, digits" in other["h2"]
    assert "cannot be compared" in other["text"]
    assert "<h1>GPUNet run report: gpunet v6</h1>" in text
    plots = embedded_pngs(page)
    assert [img["id"] for img in page.images] == ["plot-main", "plot-published"]
    assert all(p.shape[0] >= 600 and p.shape[1] >= 900 for p in plots)
    assert all((p < 250).any(axis=2).mean() > 0.02 for p in plots)


def test_imagenet_run_shows_nvidias_points_as_the_same_task(tmp_path):
    imagenet = {"type": "imagenet", "val_tar": {"name": "ILSVRC2012_img_val.tar"}}
    results = [write(tmp_path / "v.json", validation_result("gpunet_0", 77.1, sha="g",
                                                            source=imagenet, classes=1000,
                                                            img_size=320)),
               write(tmp_path / "b.json", bench_result("gpunet_0", 9.0, sha="g",
                                                       img_size=320))]
    summary = write_report(results, tmp_path / "out")
    page = Page((tmp_path / "out" / "report.html").read_text())
    assert summary["report"]["imagenet"]
    main = page.tables["main-table"]["rows"]
    assert len(main) == 1 and main[0]["cells"]["dataset"].startswith("ImageNet-1k (ILSVRC2012)")
    assert main[0]["cells"]["role"] == "given result"  # the main panel still holds no
    same = page.sections["published-panel"]  # published point, only the second one does
    assert same["class"] == "same-task" and "the dataset of this run" in same["h2"]
    assert "dotted line" in same["text"]
    assert_every_point_says_what_it_is(page)


def test_imagenet_is_recognised_from_the_prepared_manifest_only():
    imagenet = {"type": "imagenet"}
    assert dataset_info(validation_result("m", 1, source=imagenet, classes=1000))["imagenet"]
    for other in (validation_result("m", 1, source=imagenet, classes=100),  # a class subset
                  validation_result("m", 1, source=imagenet, classes=1000, split="train"),
                  validation_result("m", 1, source={"type": "folder", "src": "/d/imagenet"},
                                    classes=1000),
                  validation_result("m", 1), {"schema": RESULTS_SCHEMA, "model": "m"}):
        assert not dataset_info(other)["imagenet"]
    assert dataset_info(validation_result("m", 1, source=imagenet, classes=100))["name"] == \
        "ImageNet subset (100 classes)"
    assert dataset_info({"model": "m"})["label"] == "unknown dataset (no manifest)"


def test_champion_history_selection():
    h = history(aliases={"champion": "2", "challenger": "6"})
    chosen, skipped = champion_history(h, DIGITS, FP)
    assert [(c["version"], c["role"]) for c in chosen] == [
        ("1", "former champion"), ("2", "champion"), ("4", "former champion")]
    assert skipped == {"another dataset or hardware": 2, "never champion": 1}
    # an alias counts even without a promotion tag (set by hand, rolled back to)
    h.versions[2]["tags"]["promotion"] = ""
    h.aliases = {"champion": "3"}
    assert "3" in [c["version"] for c in champion_history(h, DIGITS, FP)[0]]
    # a candidate with no dataset checksum or fingerprint is compared with nothing
    assert champion_history(h, None, FP)[0] == [] and champion_history(h, DIGITS, None)[0] == []


def test_registry_tag_names_agree_with_the_registry():
    from gpunet_core.mlops import registry

    assert (report.DATASET_TAG, report.LATENCY_FP_TAG, report.PRECISION_TAG) == (
        registry.DATASET_TAG, registry.LATENCY_FP_TAG, registry.PRECISION_TAG)
    assert (report.CHAMPION, report.PREVIOUS) == (registry.CHAMPION, registry.PREVIOUS)


def test_labels_overlap_neither_each_other_nor_the_markers(tmp_path):
    # a crowded history: versions close together and two on the very same spot
    h = history(candidate="12")
    base = h.versions[0]["tags"]
    h.versions = [{"version": str(v), "tags": {**base, "top1": str(40 + v % 4),
                                               "latency_ms": str(7.5 + 0.02 * (v % 5)),
                                               "promotion": "champion: x"}}
                  for v in range(1, 12)]
    h.versions[1]["tags"] = dict(h.versions[0]["tags"])
    results = [write(tmp_path / "v.json", validation_result("gpunet_0", 42.0, sha="g")),
               write(tmp_path / "b.json", bench_result("gpunet_0", 7.54, sha="g"))]
    summary = write_report(results, tmp_path / "out", history=h)
    assert len(summary["report"]["main"]) == 12
    for panel, labels in summary["labels"].items():
        assert len(labels) == (12 if panel == "main" else 2 * len(MODEL_INFO))
        assert not any(label["overlaps"] for label in labels), panel
        boxes = [label["box"] for label in labels]
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, panel
    assert all(label["text"].startswith("GPUNet-") for label in summary["labels"]["published"])


def test_report_bad_inputs(tmp_path):
    with pytest.raises(GpunetError, match="result file not found"):
        write_report([tmp_path / "missing.json"], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GpunetError, match="cannot read result file"):
        write_report([bad], tmp_path / "out")
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(GpunetError, match="no bench or validate results"):
        write_report([other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_report_step_reads_the_champion_history_from_mlflow(run_results, tmp_path,
                                                            monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(uri)
    mlc.create_registered_model("gpunet")
    for entry in history().versions:
        number = mlc.create_model_version("gpunet", source=(tmp_path / "m").as_uri(),
                                          tags=entry["tags"]).version
        mlc.set_model_version_tag("gpunet", number, "order", entry["version"])
    # versions are numbered in creation order: the candidate (listed as "6") is version 7
    number = {v.tags["order"]: str(v.version)
              for v in mlc.search_model_versions("name = 'gpunet'")}
    mlc.set_registered_model_alias("gpunet", "champion", number["6"])
    mlc.set_registered_model_alias("gpunet", "previous-champion", number["4"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = steps.write_html_report(run_results, tmp_path / "html", registered_model="gpunet",
                                  promotion=f"champion:{number['6']}")
    main = Page(out.read_text()).tables["main-table"]["rows"]
    assert [r["cells"]["version"] for r in main] == [number[v] for v in ("1", "2", "4", "6")]
    assert main[-1]["cells"]["role"] == "candidate (this run), promoted to champion"
    assert main[-1]["cells"]["note"] == "-"

    # a registry that does not hold the model: this run's figures, and why there is no more
    out = steps.write_html_report(run_results, tmp_path / "html2", registered_model="nope",
                                  promotion="champion:1")
    page = Page(out.read_text())
    assert len(page.tables["main-table"]["rows"]) == 1
    assert "The registry could not be read" in page.sections["main-panel"]["text"]
    # without MLflow: the given results only, never NVIDIA's points mixed in
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    page = Page(steps.write_html_report(run_results, tmp_path / "html3",
                                        registered_model="gpunet",
                                        promotion="champion:7").read_text())
    assert [r["cells"]["role"] for r in page.tables["main-table"]["rows"]] == ["given result"]
    assert "No registry" in page.sections["main-panel"]["text"]
