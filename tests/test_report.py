"""report: table rows, Pareto front, and a non-trivial plot PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gpunet_core.cli import main as cli_main
from gpunet_core.inference.report import pareto_front, write_report
from gpunet_core.models.spec import MODEL_INFO
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import BENCH_SCHEMA, RESULTS_SCHEMA


def bench_result(model, median, backend="onnxruntime", cpu="Test CPU"):
    return {"schema": BENCH_SCHEMA, "model": model, "backend": backend, "precision": "fp32",
            "batch": 1, "img_size": 64, "latency_kind": "host_wall",
            "latency_ms": {"median": median, "p99": median * 1.5}, "throughput_ips": 1000 / median,
            "fingerprint": {"cpu": cpu, "gpu": None}}


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for name, median in (("gpunet_0", 8.0), ("gpunet_d1", 12.0), ("gpunet_2", 20.0)):
        (d / f"bench_{name}.json").write_text(json.dumps(bench_result(name, median)))
    (d / "val_gpunet_0.json").write_text(json.dumps(
        {"schema": RESULTS_SCHEMA, "model": "gpunet_0", "top1": 91.5, "top5": 99.0, "loss": 0.3,
         "data": "digits/val"}))
    (d / "unrelated.json").write_text(json.dumps({"hello": 1}))
    return d


def test_pareto_front():
    pts = [(1.0, 80.0), (0.5, 78.0), (2.0, 79.0), (3.0, 83.0), (0.5, 77.0)]
    assert pareto_front(pts) == [1, 0, 3]
    assert pareto_front([]) == []


def test_report_table_json_and_plot(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", str(results_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())["rows"]
    published = [r for r in rows if not r["measured"]]
    measured = {r["model"]: r for r in rows if r["measured"]}
    assert len(published) == 2 * len(MODEL_INFO)
    a100 = {r["model"]: r for r in published if "A100" in r["source"]}
    assert a100["gpunet_d2"]["latency_ms"] == 1.40 and a100["gpunet_d2"]["top1"] == 83.6
    assert set(measured) == {"gpunet_0", "gpunet_d1", "gpunet_2"}
    assert measured["gpunet_0"]["top1"] == 91.5
    assert measured["gpunet_0"]["top1_source"] == "measured on digits/val"
    assert measured["gpunet_d1"]["top1"] == 82.5  # no validation: NVIDIA's published top-1
    assert measured["gpunet_2"]["latency_ms"] == 20.0
    assert "Test CPU, onnxruntime fp32" in measured["gpunet_2"]["source"]
    table = (out / "report.md").read_text()
    assert "| GPUNet-D1 | CPU: Test CPU, onnxruntime fp32 | 1 | 64 | 12.000 | 18.000 |" in table
    assert table.count("\n| GPUNet-") == 2 * len(MODEL_INFO) + 3 and "GPUNet-D1" in printed

    png = out / "pareto.png"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] >= 600 and image.shape[1] >= 900
    assert png.stat().st_size > 20_000
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 100  # text, markers, lines, grid: not a blank canvas
    assert (image < 250).any(axis=2).mean() > 0.02  # a few percent of the pixels are drawn


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
