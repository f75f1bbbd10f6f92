"""The per-run report: like compared with like, NVIDIA's published points apart.

Input: result JSONs from ``gpunet bench`` (schema ``gpunet.bench/1``) and ``gpunet validate``
(``gpunet.validate/1``), and optionally the registry's view of the candidate
(:class:`RegistryHistory`, read by :func:`gpunet_core.steps.write_html_report`).

**Main panel.** With the registry: this run's candidate against the *champion history* of its
registered model on the same dataset and hardware: every version whose ``dataset_checksum``
(the validation set's manifest checksum) and ``latency_fingerprint`` (backend, batch, what was
timed, CPU/GPU model: :func:`~gpunet_core.inference.latency.latency_fingerprint`) equal the
candidate's and which was ever champion (its ``promotion`` tag starts with ``champion:``, or it
holds the ``champion`` / ``previous-champion`` alias), plus the candidate, highlighted. Without
the registry (no MLflow, or ``gpunet report`` on plain result files): the given results only,
each benchmark paired with a validation of the same graph; a benchmark without one has no
top-1 and is listed, not drawn. NVIDIA's figures are never borrowed for a missing top-1.

**Second panel.** NVIDIA's published GPUNet points (ImageNet-1k top-1; TensorRT 8, FP16, batch
1, GPU compute time on A100 and V100, :data:`~gpunet_core.models.spec.MODEL_INFO`), on axes of
their own. When this run's dataset is ImageNet-1k (:func:`dataset_info`: the prepared
dataset's manifest says ``source.type == "imagenet"``, its classifier has 1000 classes and the
split is ``val``), the candidate's top-1 is drawn there as a reference line (its latency,
measured elsewhere, is not); otherwise the panel is headed as a different task.

Every point, in either panel, states its dataset, resolution, backend, precision and hardware;
point labels are placed so that none overlaps another label or a marker (a label that fits
nowhere is shortened to the point's number, which the table repeats).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpunet_core.models.spec import MODEL_INFO, shipped_spec
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import (
    BENCH_SCHEMA,
    RESULTS_SCHEMA,
    atomic_path,
    write_json,
    write_text,
)

_logger = logging.getLogger(__name__)

REPORT_SCHEMA = "gpunet.report/2"
# The version tags gpunet_core.mlops.registry writes and promotion compares. This layer sits
# below mlops and cannot import its constants; tests/test_report.py checks that they agree.
DATASET_TAG = "dataset_checksum"
LATENCY_FP_TAG = "latency_fingerprint"
PRECISION_TAG = "precision"
PROMOTION_TAG = "promotion"
CHAMPION, PREVIOUS = "champion", "previous-champion"

PUBLISHED = (("a100", "NVIDIA A100"), ("v100", "NVIDIA V100"))
PUBLISHED_BACKEND = "TensorRT 8"
PUBLISHED_DATASET = "ImageNet-1k (ILSVRC2012) val, 50,000 images (published)"
IMAGENET_CLASSES = 1000
GPU_BACKENDS = ("tensorrt", "trtexec")

# table columns: (key, heading)
COLUMNS = (("n", "#"), ("version", "version"), ("role", "role"), ("display", "model"),
           ("top1", "top-1 %"), ("top5", "top-5 %"), ("latency_ms", "latency ms (median)"),
           ("latency_p99_ms", "p99 ms"), ("pareto", "Pareto front"),
           ("img_size", "resolution px"), ("precision", "precision"), ("backend", "backend"),
           ("hardware", "hardware"), ("timing", "batch, timing"), ("dataset", "dataset"),
           ("note", "note"))


@dataclass
class RegistryHistory:
    """The registry's view of the candidate: version ``candidate`` of registered model ``name``,
    every version of it (``{"version": "3", "tags": {...}}``) and its aliases
    (``{alias: version}``); ``error``: why the registry could not be read."""

    name: str
    candidate: str
    versions: list[dict[str, Any]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------- inputs


def load_results(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """``(bench results, validation results)`` from files and directories of ``*.json``."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise GpunetError(f"result file not found: {path}")
    bench, validations = [], []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GpunetError(f"cannot read result file {file}: {exc}") from None
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema == BENCH_SCHEMA:
            bench.append({**data, "_file": str(file)})
        elif schema == RESULTS_SCHEMA:
            if not data.get("model"):
                raise GpunetError(f"validation result {file} does not say which model it is "
                                  "for (no 'model' key); write it with `gpunet validate`")
            validations.append({**data, "_file": str(file)})
        else:
            _logger.info("skipping %s: not a bench or validate result", file)
    if not bench and not validations:
        raise GpunetError("no bench or validate results among the given files "
                          f"({len(files)} JSON files read)")
    return bench, validations


def dataset_info(validation: dict[str, Any] | None) -> dict[str, Any]:
    """What a validation result was measured on: ``name`` (short), ``label`` (with split,
    image count and manifest checksum), ``checksum`` and ``imagenet`` (ImageNet-1k val).

    ImageNet-1k is recognised from the prepared dataset's manifest as the validation result
    records it (``dataset.source.type == "imagenet"``, written by ``gpunet prepare imagenet``
    only), with 1000 classes and the ``val`` split: a folder of ImageNet images prepared as
    ``folder``, a class subset or the train split is not what NVIDIA's figures measure, so it
    is treated as another task.
    """
    if validation is None:
        return {"name": "no validation result", "label": "no validation result",
                "checksum": None, "imagenet": False}
    ds = validation.get("dataset") or {}
    source = ds.get("source") or {}
    kind = source.get("type")
    classes = validation.get("num_classes") or len(validation.get("classes") or ()) or None
    split, images, checksum = ds.get("split"), ds.get("images"), ds.get("checksum")
    if kind == "imagenet":
        name = ("ImageNet-1k (ILSVRC2012)" if classes == IMAGENET_CLASSES
                else f"ImageNet subset ({classes or '?'} classes)")
    elif kind == "digits":
        per_class = source.get("per_class")
        name = (f"digits (scikit-learn 8x8, rendered at {source.get('img_size', '?')} px"
                + (f", {per_class} per class" if per_class else "") + ")")
    elif kind == "folder":
        src = str(source.get("src") or "?").rstrip("/")
        name = f"folder {src.rsplit('/', 1)[-1]!r}" + (f" ({classes} classes)" if classes else "")
    elif kind:
        name = str(kind)
    elif validation.get("data"):
        name = f"{validation['data']} (no dataset manifest)"
    else:
        name = "unknown dataset (no manifest)"
    parts = [name] + [text for text in (
        split and f"{split} split", images and f"{images} images",
        checksum and f"manifest {checksum[:12]}") if text]
    return {"name": name, "label": ", ".join(parts), "checksum": checksum, "kind": kind,
            "imagenet": kind == "imagenet" and classes == IMAGENET_CLASSES and split == "val"}


def _on_gpu(bench: dict[str, Any]) -> bool:
    details = bench.get("details") or {}
    providers = details.get("providers") or [""]
    return (bench.get("latency_kind") == "gpu_compute" or bench.get("backend") in GPU_BACKENDS
            or providers[0] == "CUDAExecutionProvider"
            or str(details.get("device", "")).startswith("cuda"))


def hardware_label(bench: dict[str, Any]) -> str:
    """The device a benchmark timed: the GPU's name, else the CPU model and its cores."""
    fp = bench.get("fingerprint") or {}
    gpu = fp.get("gpu") or {}
    if _on_gpu(bench) and gpu.get("name"):
        return f"GPU: {gpu['name']}"
    cores = fp.get("cpu_affinity") or fp.get("cpu_count")
    return f"CPU: {fp.get('cpu') or 'unknown'}" + (f", {cores} cores" if cores else "")


def _timing(batch: Any, kind: Any) -> str:
    what = {"gpu_compute": "GPU compute time", "host_wall": "host wall clock"}.get(kind, kind)
    return f"batch {batch if batch is not None else '?'}, {what or 'timing unknown'}"


def _display(model: str | None) -> str:
    return MODEL_INFO.get(model or "", {}).get("display", model or "?")


# --------------------------------------------------------------------------- rows


def _row(bench: dict[str, Any], validation: dict[str, Any] | None, **extra) -> dict[str, Any]:
    """A measured point: ``bench``'s latency, ``validation``'s accuracy (None without one)."""
    ds = dataset_info(validation)
    lat = bench.get("latency_ms") or {}
    row = {
        "panel": "main", "measured": True, "version": None, "role": "given result",
        "model": bench.get("model"), "display": _display(bench.get("model")),
        "img_size": bench.get("img_size"), "precision": bench.get("precision"),
        "backend": bench.get("backend"), "hardware": hardware_label(bench),
        "batch": bench.get("batch"), "latency_kind": bench.get("latency_kind"),
        "timing": _timing(bench.get("batch"), bench.get("latency_kind")),
        "dataset": ds["label"], "dataset_name": ds["name"], "dataset_checksum": ds["checksum"],
        "imagenet": ds["imagenet"], "latency_fingerprint": bench.get("latency_fingerprint"),
        "top1": validation.get("top1") if validation else None,
        "top5": validation.get("top5") if validation else None,
        "latency_ms": lat.get("median"), "latency_p99_ms": lat.get("p99"),
        "throughput_ips": bench.get("throughput_ips"), "promotion": None,
        "note": "" if validation else "no validation result for this graph: top-1 unknown",
        "file": bench.get("_file"), "validation_file": validation.get("_file") if validation
        else None, "candidate": False, "pareto": False}
    row.update(extra)
    return row


def _matches(bench: dict[str, Any], validation: dict[str, Any]) -> int:
    """How well ``validation`` measures ``bench``'s graph: 2 the same file (ONNX SHA-256), 1
    the same model, resolution and precision, 0 not at all."""
    sha = validation.get("onnx_sha256")
    if sha and bench.get("onnx_sha256"):
        return 2 if sha == bench["onnx_sha256"] else 0
    if validation.get("model") != bench.get("model"):
        return 0
    size = validation.get("img_size")
    if size is not None and bench.get("img_size") is not None and size != bench["img_size"]:
        return 0
    return int((validation.get("precision") or "fp32") == bench.get("precision", "fp32"))


def measured_rows(bench: Sequence[dict], validations: Sequence[dict]) -> list[dict[str, Any]]:
    """One point per benchmark and dataset it was validated on (the best-matching validation
    of its graph per dataset); a benchmark without a validation gets one point without top-1."""
    rows = []
    for b in bench:
        scored = [(_matches(b, v), v) for v in validations]
        best = max((score for score, _ in scored), default=0)
        by_dataset: dict[str, dict] = {}
        for score, v in scored:
            if score and score == best:
                by_dataset.setdefault(dataset_info(v)["label"], v)
        rows += [_row(b, v) for v in by_dataset.values()] or [_row(b, None)]
    return rows


def _tag_float(tags: dict[str, Any], key: str) -> float | None:
    try:
        return float(tags[key]) if tags.get(key) not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _role(version: str, tags: dict[str, Any], aliases: dict[str, str]) -> str | None:
    """``champion``, ``previous champion``, ``former champion``; None: never champion."""
    if aliases.get(CHAMPION) == version:
        return "champion"
    if aliases.get(PREVIOUS) == version:
        return "previous champion"
    if str(tags.get(PROMOTION_TAG) or "").startswith("champion:"):
        return "former champion"
    return None


def champion_history(history: RegistryHistory, dataset_checksum: str | None,
                     latency_fingerprint: str | None) -> tuple[list[dict], dict[str, int]]:
    """The versions of ``history`` (other than the candidate) validated on the same dataset and
    timed with the same fingerprint that were ever champion, oldest first, each with its
    ``role``; and how many versions were left out, by reason."""
    aliases = {alias: str(v) for alias, v in history.aliases.items()}
    chosen, skipped = [], {"another dataset or hardware": 0, "never champion": 0}
    for entry in sorted(history.versions, key=lambda e: int(e["version"])):
        version, tags = str(entry["version"]), entry.get("tags") or {}
        if version == str(history.candidate):
            continue
        if not dataset_checksum or not latency_fingerprint or \
                tags.get(DATASET_TAG) != dataset_checksum or \
                tags.get(LATENCY_FP_TAG) != latency_fingerprint:
            skipped["another dataset or hardware"] += 1
            continue
        role = _role(version, tags, aliases)
        if role is None:
            skipped["never champion"] += 1
            continue
        chosen.append({"version": version, "tags": tags, "role": role})
    return chosen, skipped


def history_rows(history: RegistryHistory, candidate: dict[str, Any]) -> tuple[list[dict], dict]:
    """Rows for the champion history of ``candidate`` (a :func:`_row`), which ends the list."""
    chosen, skipped = champion_history(history, candidate["dataset_checksum"],
                                       candidate["latency_fingerprint"])
    aliases = {alias: str(v) for alias, v in history.aliases.items()}
    rows = []
    for entry in chosen:
        tags = entry["tags"]
        model = tags.get("model")
        # the same fingerprint and dataset: the candidate's hardware, timing and dataset
        rows.append({**candidate, "version": entry["version"], "role": entry["role"],
                     "model": model, "display": _display(model),
                     "img_size": int(tags["img_size"]) if str(tags.get("img_size", "")).isdigit()
                     else tags.get("img_size"),
                     "precision": tags.get(PRECISION_TAG) or "fp32",
                     "backend": tags.get("latency_backend") or candidate["backend"],
                     "top1": _tag_float(tags, "top1"), "top5": _tag_float(tags, "top5"),
                     "latency_ms": _tag_float(tags, "latency_ms"), "latency_p99_ms": None,
                     "throughput_ips": None, "promotion": tags.get(PROMOTION_TAG),
                     "note": "from the registry's version tags", "file": None,
                     "validation_file": None, "candidate": False})
    own = next((e for e in history.versions if str(e["version"]) == str(history.candidate)),
               {"tags": {}})
    role = "candidate (this run)"
    now = _role(str(history.candidate), own.get("tags") or {}, aliases)
    if now in ("champion", "former champion"):
        role += ", promoted to champion" if now == "champion" else ", once champion"
    elif aliases.get("challenger") == str(history.candidate):
        role += ", challenger"
    rows.append({**candidate, "version": str(history.candidate), "role": role,
                 "promotion": (own.get("tags") or {}).get(PROMOTION_TAG), "candidate": True})
    return rows, skipped


def published_rows() -> list[dict[str, Any]]:
    """NVIDIA's published points: ImageNet-1k top-1, TensorRT 8 FP16 batch-1 latency."""
    rows = []
    for key, gpu in PUBLISHED:
        for name, info in MODEL_INFO.items():
            rows.append({
                "panel": "published", "measured": False, "version": None,
                "role": "published by NVIDIA", "model": name, "display": info["display"],
                "img_size": shipped_spec(name).img_resolution, "precision": "fp16",
                "backend": PUBLISHED_BACKEND, "hardware": f"GPU: {gpu}", "batch": 1,
                "latency_kind": "gpu_compute", "timing": _timing(1, "gpu_compute"),
                "dataset": PUBLISHED_DATASET, "dataset_name": "ImageNet-1k (published)",
                "source": f"{gpu}, {PUBLISHED_BACKEND} FP16 (published)",
                "top1": info["top1"], "top5": None, "latency_ms": info[f"latency_ms_{key}"],
                "latency_p99_ms": None, "throughput_ips": None, "promotion": None,
                "note": "", "candidate": False,
                "pareto": False})
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both lower latency and higher accuracy,
    sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _group(row: dict[str, Any]) -> tuple:
    """Points that may be compared: one dataset, one way of timing on one device."""
    if row["panel"] == "published":
        return ("published", row["hardware"])
    return (row.get("dataset_checksum") or row["dataset"],
            row.get("latency_fingerprint") or (row["hardware"], row["backend"], row["timing"]))


def mark_pareto(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``pareto`` on the rows on their comparison group's front; number the rows."""
    groups: dict[tuple, list[dict]] = {}
    for n, row in enumerate(rows, 1):
        row["n"] = n
        row["pareto"] = False
        if row["top1"] is not None and row["latency_ms"] is not None:
            groups.setdefault(_group(row), []).append(row)
    for group in groups.values():
        points = [(r["latency_ms"], r["top1"]) for r in group]
        front = {points[i] for i in pareto_front(points)}
        for row, point in zip(group, points, strict=True):  # equal to a front point: on it
            row["pareto"] = point in front


# --------------------------------------------------------------------------- the report


def _candidate_bench(bench: Sequence[dict], history: RegistryHistory) -> dict[str, Any]:
    own = next((e for e in history.versions if str(e["version"]) == str(history.candidate)),
               {"tags": {}})
    fp = (own.get("tags") or {}).get(LATENCY_FP_TAG)
    return next((b for b in bench if fp and b.get("latency_fingerprint") == fp), bench[0])


def build_report(bench: Sequence[dict], validations: Sequence[dict],
                 history: RegistryHistory | None = None) -> dict[str, Any]:
    """The report's content: ``main`` and ``published`` rows, what this run is (``context``),
    whether its dataset is ImageNet-1k, and notes on what was left out."""
    notes: list[str] = []
    context: dict[str, Any] = {}
    if history is not None and history.error is None and bench:
        cand_bench = _candidate_bench(bench, history)
        pairs = measured_rows([cand_bench], validations)
        main, skipped = history_rows(history, pairs[0])
        cand = main[-1]
        mode = "registry"
        context = {"registered model": history.name, "candidate version": history.candidate,
                   "promotion": cand.get("promotion") or "-"}
        left = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
        notes.append(
            f"Main panel: version {history.candidate} of {history.name!r} (this run) and every "
            f"version that was ever champion with the same validation set (manifest checksum "
            f"{(cand['dataset_checksum'] or 'none')[:12]}) and the same latency fingerprint "
            f"({cand['latency_fingerprint'] or 'none'}: backend, batch, timing, hardware)"
            + (f"; left out: {left}." if left else "."))
        if not cand["dataset_checksum"] or not cand["latency_fingerprint"]:
            notes.append("The candidate records no dataset checksum or latency fingerprint, so "
                         "no other version can be shown as measured alike.")
    else:
        mode = "results"
        main = measured_rows(bench, validations)
        if history is not None:
            notes.append(f"The registry could not be read ({history.error}): the main panel "
                         "shows the given results only.")
        else:
            notes.append("No registry (MLflow) was consulted: the main panel shows the given "
                         "result files only, each benchmark with a validation of the same "
                         "graph.")
        unpaired = sum(r["top1"] is None for r in main)
        if unpaired:
            notes.append(f"{unpaired} benchmark(s) have no validation result of their graph: "
                         "listed without top-1 and not drawn (NVIDIA's ImageNet top-1 is "
                         "never substituted).")
        cand = next((r for r in main if r["top1"] is not None), main[0] if main else None)
    if not bench:
        notes.append("No benchmark result was given: no measured point has a latency.")
    datasets = {r["dataset"] for r in main if r["top1"] is not None}
    drawn = [r for r in main if r["top1"] is not None]
    imagenet = bool(drawn) and all(r["imagenet"] for r in drawn)
    if cand is not None:
        context.update({"dataset": cand["dataset"], "model": cand["display"],
                        "resolution": f"{cand['img_size']} px", "precision": cand["precision"],
                        "backend": cand["backend"], "hardware": cand["hardware"],
                        "timing": cand["timing"]})
        if mode == "results" and len(main) > 1:
            context = {"results": f"{len(main)} measured point(s)",
                       "datasets": "; ".join(sorted(datasets)) or "none validated",
                       "hardware": "; ".join(sorted({r['hardware'] for r in main}))}
    published = published_rows()
    mark_pareto(main)
    mark_pareto(published)
    if imagenet:
        published_title = ("NVIDIA's published GPUNet points: ImageNet-1k, the dataset of this "
                           "run (their latency: TensorRT 8 FP16 on A100/V100)")
    else:
        theirs = "; ".join(sorted({r["dataset_name"] for r in drawn})) or "no validated dataset"
        published_title = ("NVIDIA's published GPUNet points: ImageNet-1k, a different task "
                           f"from this run's dataset, {theirs}")
    return {"schema": REPORT_SCHEMA, "mode": mode, "context": context, "main": main,
            "published": published, "imagenet": imagenet, "notes": notes,
            "main_title": ("Candidate vs. champion history: same registered model, dataset "
                           "and hardware fingerprint" if mode == "registry" else
                           "Measured points: the given results"),
            "published_title": published_title}


def _fmt(value: Any, fmt: str = "") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    return format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)


FORMATS = {"top1": ".2f", "top5": ".2f", "latency_ms": ".3f", "latency_p99_ms": ".3f"}


def _cells(row: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, _fmt(row.get(key), FORMATS.get(key, ""))) for key, _ in COLUMNS]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one row per point, in the numbering of the plot."""
    lines = ["| " + " | ".join(head for _, head in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(text.replace("|", "/") for _, text in _cells(row)) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _overlaps(box, boxes, pad: float = 2.0) -> bool:
    return any(box.x0 - pad < b.x1 and b.x0 < box.x1 + pad and box.y0 - pad < b.y1
               and b.y0 < box.y1 + pad for b in boxes)


def place_labels(ax, items: Sequence[dict[str, Any]], *, fontsize: float = 7.5,
                 lines: Sequence[Sequence[tuple[float, float]]] = ()) -> list[dict]:
    """Annotate each item (``x``, ``y``, ``long``, ``short``, ``color``, ``radius`` in points)
    where its label overlaps no placed label or leader line, no marker, none of ``lines``
    (polylines in data coordinates) and stays inside the axes: the long label first, then the
    short one, in eight directions around the point at growing distances (beyond the first
    with a leader line to it). A label that fits nowhere is put, short, beside its point and
    reported as overlapping. The figure's layout must be final. Returns, per item, the
    label's text, its display-space box and whether it overlaps."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)

    def _samples(segments) -> list:  # a polyline as small boxes every 3 px
        boxes = []
        for (x0, y0), (x1, y1) in segments:
            steps = max(1, int(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 / 3))
            for t in range(steps + 1):
                x, y = x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps
                boxes.append(Bbox.from_extents(x - 1, y - 1, x + 1, y + 1))
        return boxes

    taken, cx_cy = [], []
    for item in items:
        cx, cy = ax.transData.transform((item["x"], item["y"]))
        cx_cy.append((cx, cy))
        r = item.get("radius", 4.0) * px + 1
        taken.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))
    for line in lines:
        pts = [tuple(ax.transData.transform(p)) for p in line]
        taken += _samples(zip(pts, pts[1:], strict=False))
    leader = None
    directions = ((1, 1, "left", "bottom"), (1, -1, "left", "top"),
                  (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
                  (0, 1, "center", "bottom"), (0, -1, "center", "top"),
                  (1, 0, "left", "center"), (-1, 0, "right", "center"))
    placed = []
    for k, item in enumerate(items):
        own = taken[k]
        result = None
        for text in (item["long"], item["short"]):
            for dist in (1.0, 2.2, 3.6, 5.2):
                for dx, dy, ha, va in directions:
                    off = item.get("radius", 4.0) + 2 + 4 * (dist - 1)
                    ann = ax.annotate(text, (item["x"], item["y"]), xytext=(dx * off, dy * off),
                                      textcoords="offset points", ha=ha, va=va,
                                      fontsize=fontsize, color=item["color"], zorder=5,
                                      annotation_clip=False)
                    box = ann.get_window_extent(renderer)
                    inside = (box.x0 >= frame.x0 + 1 and box.x1 <= frame.x1 - 1
                              and box.y0 >= frame.y0 + 1 and box.y1 <= frame.y1 - 1)
                    others = [b for b in taken if b is not own]
                    if inside and not _overlaps(box, others):
                        if dist > 1.0:  # away from its point: a thin leader line to it
                            ann.remove()
                            leader = (cx_cy[k], ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
                            ann = ax.annotate(
                                text, (item["x"], item["y"]), xytext=(dx * off, dy * off),
                                textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                                color=item["color"], zorder=5, annotation_clip=False,
                                arrowprops={"arrowstyle": "-", "color": item["color"],
                                            "lw": 0.5, "alpha": 0.6, "shrinkA": 0,
                                            "shrinkB": item.get("radius", 4.0)})
                        result = {"text": text, "box": box, "overlaps": False}
                        break
                    ann.remove()
                if result:
                    break
            if result:
                break
        if result is None:
            ann = ax.annotate(item["short"], (item["x"], item["y"]), xytext=(4, 4),
                              textcoords="offset points", fontsize=fontsize,
                              color=item["color"], zorder=5)
            result = {"text": item["short"], "box": ann.get_window_extent(renderer),
                      "overlaps": True}
        taken.append(result["box"])
        if leader is not None:  # later labels keep off the leader line too
            taken += _samples([leader])
            leader = None
        placed.append({"text": result["text"], "box": tuple(result["box"].extents),
                       "overlaps": result["overlaps"]})
    return placed


ROLE_STYLE = {  # marker, size (points^2), label in the legend
    "candidate": ("*", 260, "candidate (this run)"),
    "champion": ("D", 70, "champion"),
    "previous champion": ("s", 60, "previous champion"),
    "former champion": ("o", 50, "former champion"),
    "given result": ("o", 50, "measured"),
    "published by NVIDIA": ("o", 40, "published"),
}


def _style(row: dict[str, Any]) -> tuple[str, float, str]:
    return ROLE_STYLE["candidate"] if row.get("candidate") else \
        ROLE_STYLE.get(row["role"], ROLE_STYLE["given result"])


def plot_panel(rows: Sequence[dict[str, Any]], output: str | Path, *, title: str,
               subtitle: str = "", references: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Top-1 against latency of ``rows`` (numbered by :func:`mark_pareto`), one colour per
    comparison group, its Pareto front joined; PNG at ``output``. ``references``: top-1 values
    drawn as horizontal lines (``top1``, ``label``). Returns the path and the placed labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    drawn = [r for r in rows if r["top1"] is not None and r["latency_ms"] is not None]
    groups: dict[tuple, list[dict]] = {}
    for r in drawn:
        groups.setdefault(_group(r), []).append(r)
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    items: list[dict[str, Any]] = []
    fronts: list[list[tuple[float, float]]] = []
    seen_roles: set[str | None] = {None}
    published = bool(drawn) and drawn[0]["panel"] == "published"
    for k, (_, group) in enumerate(groups.items()):
        colour = colours[k % len(colours)]
        first = group[0]
        name = (f"{first['hardware'].removeprefix('GPU: ')}, {first['backend']} "
                f"{first['precision'].upper()}, {first['timing']}" if published else
                f"{first['dataset_name']} | {first['hardware']} | {first['backend']} | "
                f"{first['timing']}")
        front = sorted((r for r in group if r["pareto"]), key=lambda r: r["latency_ms"])
        fronts.append([(r["latency_ms"], r["top1"]) for r in front])
        ax.plot([r["latency_ms"] for r in front], [r["top1"] for r in front],
                linestyle="--" if published else "-", color=colour, alpha=0.6, lw=1.2,
                marker="os"[k % 2] if published else None, markerfacecolor="none",
                markersize=6, label=f"Pareto front: {name}")
        for style in dict.fromkeys(_style(r) for r in group):
            marker, size, role_label = style
            if published:  # one marker per GPU
                marker, role_label = "os"[k % 2], None
            pts = [r for r in group if _style(r) == style]
            ax.scatter([r["latency_ms"] for r in pts], [r["top1"] for r in pts], marker=marker,
                       s=size, color=colour, edgecolors="black" if marker == "*" else colour,
                       linewidths=0.8, facecolors="none" if published else colour,
                       zorder=3.5 if marker == "*" else 4,  # a version under the star shows
                       label=None if role_label in seen_roles else role_label)
            seen_roles.add(role_label)
        ax.scatter([r["latency_ms"] for r in front], [r["top1"] for r in front], s=150,
                   facecolors="none", edgecolors=colour, linewidths=1.0, zorder=3)
        for r in group:
            marker, size, _ = _style(r)
            version = f"v{r['version']} " if r.get("version") else ""
            long = (f"{r['display']} {r['img_size']}px" if published else
                    f"#{r['n']} {version}{r['display']} {r['img_size']}px {r['precision']} "
                    f"{r['backend']}")
            items.append({"x": r["latency_ms"], "y": r["top1"], "long": long,
                          "short": f"#{r['n']}", "color": colour,  # the front's ring: s=150
                          "radius": max(size, 150 if r["pareto"] else 0) ** 0.5 / 2})
    for ref, style in zip(references, ("-", "--", "-.", ":") * len(references), strict=False):
        ax.axhline(ref["top1"], color="black", linestyle=":" if len(references) == 1 else style,
                   lw=1.0, alpha=0.8, label=ref["label"])
    if not drawn:
        ax.text(0.5, 0.5, "no point has both a latency and a top-1", transform=ax.transAxes,
                ha="center", va="center", fontsize=12, color="grey")
    lat = [r["latency_ms"] for r in drawn if r["latency_ms"] > 0]
    if lat and max(lat) / min(lat) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.18, y=0.15)
    ax.set_xlabel("latency, ms (median; published: TensorRT 8 FP16, batch 1, GPU compute)"
                  if published else "latency, ms (median of the benchmark)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2,
                  frameon=False)
    fig.tight_layout()
    x0, x1 = ax.get_xlim()
    fronts += [[(x0, ref["top1"]), (x1, ref["top1"])] for ref in references]
    placed = place_labels(ax, items, lines=fronts)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {"path": output, "labels": placed}


def _wrap(text: str, width: int = 110) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def render_plots(report: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """``pareto.png`` (the main panel) and ``published.png`` in ``out``."""
    out = Path(out)
    ctx = report["context"]
    sub = "; ".join(f"{k}: {ctx[k]}" for k in ("dataset", "hardware", "timing") if k in ctx)
    main = plot_panel(report["main"], out / "pareto.png", title=report["main_title"],
                      subtitle=_wrap(sub))
    references = []
    if report["imagenet"]:  # the candidate's top-1 (without a registry: every measured one)
        own = [r for r in report["main"] if r.get("candidate")] or report["main"]
        references = [{"top1": r["top1"], "label": _wrap(
            f"#{r['n']} {'this run' if r.get('candidate') else 'measured'}: top-1 "
            f"{r['top1']:.2f} % on ImageNet-1k val, {r['display']} at {r['img_size']} px, "
            f"{r['precision']} (its latency, {r['backend']} on {r['hardware']}, is not "
            "comparable and not drawn)", 70)} for r in own if r["top1"] is not None]
    subtitle = "" if report["imagenet"] else \
        "Not comparable with the main panel: another dataset, resolution, backend and hardware"
    pub = plot_panel(report["published"], out / "published.png",
                     title=_wrap(report["published_title"], 100), subtitle=subtitle,
                     references=references)
    return {"main": main, "published": pub}


# --------------------------------------------------------------------------- writers


def write_report(result_paths: Iterable[str | Path], output_dir: str | Path, *,
                 history: RegistryHistory | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.json``, ``pareto.png`` (main panel), ``published.png``
    and ``report.html`` (the two with the tables, self-contained) into ``output_dir``."""
    bench, validations = load_results(result_paths)
    report = build_report(bench, validations, history)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(report["main"])
    ctx = "\n".join(f"- {k}: {v}" for k, v in report["context"].items())
    notes = "\n".join(f"> {n}" for n in report["notes"])
    write_text(out / "report.md",
               f"# GPUNet run report\n\n{ctx}\n\n## {report['main_title']}\n\n{notes}\n\n"
               f"{table}\n\n## {report['published_title']}\n\n"
               f"{format_table(report['published'])}\n")
    plots = render_plots(report, out)
    write_json({**report, "rows": report["main"] + report["published"], "validations": [
                    {k: v.get(k) for k in ("model", "top1", "top5", "loss", "data", "_file")}
                    | {"dataset": dataset_info(v)["label"]} for v in validations]},
               out / "report.json")
    page = render_html(report, {k: Path(p["path"]).read_bytes() for k, p in plots.items()})
    write_text(out / "report.html", page)
    return {"table": table, "markdown": str(out / "report.md"), "json": str(out / "report.json"),
            "plot": str(plots["main"]["path"]), "published_plot": str(plots["published"]["path"]),
            "html": str(out / "report.html"), "measured_points": len(report["main"]),
            "labels": {k: p["labels"] for k, p in plots.items()}, "report": report}


def _html_table(rows: Sequence[dict[str, Any]], table_id: str, caption: str) -> str:
    esc = html.escape
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for _, h in COLUMNS)
    body = []
    for row in rows:
        cls = " class='candidate'" if row.get("candidate") else ""
        cells = "".join(f"<td data-col='{key}'>{esc(text)}</td>" for key, text in _cells(row))
        body.append(f"<tr data-panel='{row['panel']}' data-role='{esc(row['role'])}'{cls}>"
                    f"{cells}</tr>")
    return (f"<div class='scroll'><table id='{table_id}'><caption>{esc(caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .78em; margin: .6em 0; }
caption { text-align: left; font-style: italic; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: .2em .45em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td { white-space: nowrap; }
td[data-col=dataset], td[data-col=role], td[data-col=hardware], td[data-col=note],
td[data-col=timing] {
  white-space: normal; min-width: 9em; }
td[data-col=dataset] { min-width: 16em; }
tr.candidate td { background: #fff3c4; font-weight: 600; }
td[data-col=top1], td[data-col=top5], td[data-col=latency_ms], td[data-col=latency_p99_ms] {
  text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .5em 0; } img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #444; font-size: .9em; }
section.other-task { border-left: 4px solid #d9822b; padding-left: 1em; }
p.warning { color: #8a4b00; font-weight: 600; }
"""


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The self-contained page: context, main panel (plot + table), published panel."""
    esc = html.escape
    ctx = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>"
                  for k, v in report["context"].items())
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in report["notes"])

    def img(key: str, alt: str) -> str:
        data = base64.b64encode(pngs[key]).decode("ascii")
        return f"<img id='plot-{key}' alt='{esc(alt)}' src='data:image/png;base64,{data}'>"

    other = not report["imagenet"]
    warning = ("<p class='warning'>A different task: NVIDIA's points are ImageNet-1k top-1 at "
               "224-528 px, timed with TensorRT 8 in FP16 on A100/V100 GPUs. They cannot be "
               "compared with this run's points above (another dataset, resolution, backend "
               "and hardware) and are shown for orientation only.</p>" if other else
               "<p class='note'>This run was validated on ImageNet-1k val: its top-1 is the "
               "dotted line. Its latency is not comparable (NVIDIA: TensorRT 8 FP16 on "
               "A100/V100, GPU compute time), so it is not drawn as a point.</p>")
    title = "GPUNet run report"
    if report["mode"] == "registry":
        title += (f": {report['context']['registered model']} "
                  f"v{report['context']['candidate version']}")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f"<section id='context'><h2>This run</h2><dl>{ctx}</dl></section>"
        f"<section id='main-panel' data-panel='main'><h2>{esc(report['main_title'])}</h2>"
        f"{notes}<figure>{img('main', report['main_title'])}<figcaption>Top-1 against "
        "median latency; numbers refer to the table; the Pareto front (no other point both "
        "faster and more accurate) is joined and ringed.</figcaption></figure>"
        + _html_table(report["main"], "main-table",
                      "Main panel: every point with its dataset, resolution, backend, "
                      "precision and hardware")
        + f"</section><section id='published-panel' data-panel='published' "
        f"class='{'other-task' if other else 'same-task'}'>"
        f"<h2>{esc(report['published_title'])}</h2>{warning}"
        f"<figure>{img('published', report['published_title'])}<figcaption>NVIDIA's published "
        "GPUNet points, per GPU, with each GPU's Pareto front.</figcaption></figure>"
        + _html_table(report["published"], "published-table",
                      "NVIDIA's published points (DeepLearningExamples GPUNet README)")
        + "</section></body></html>")


def write_html_report(result_paths: Iterable[str | Path], html_path: str | Path, *,
                      history: RegistryHistory | None = None) -> Path:
    """The self-contained report page (:func:`write_report`'s ``report.html``) at
    ``html_path``, e.g. a KFP HTML visualization."""
    with tempfile.TemporaryDirectory() as tmp:
        result = write_report(result_paths, tmp, history=history)
        page = Path(result["html"]).read_text()
    return write_text(html_path, page)
