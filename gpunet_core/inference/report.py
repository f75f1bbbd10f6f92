"""Latency-vs-accuracy report: a table and a Pareto plot in the style of NVIDIA's GPUNet figure.

Input: result JSONs from ``gpunet bench`` (schema ``gpunet.bench/1``) and ``gpunet validate``
(``gpunet.validate/1``). Each benchmark becomes a measured point: its median latency, and the
top-1 of a validation result of the same model when there is one (else NVIDIA's published
ImageNet top-1, marked as such). NVIDIA's published points (TensorRT 8 FP16, batch 1, A100 and
V100, from :data:`gpunet_core.models.spec.MODEL_INFO`) are always drawn.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpunet_core.models.spec import MODEL_INFO
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import (
    BENCH_SCHEMA,
    RESULTS_SCHEMA,
    atomic_path,
    write_json,
    write_text,
)

_logger = logging.getLogger(__name__)

PUBLISHED = (("a100", "NVIDIA A100, TensorRT 8 FP16 (published)"),
             ("v100", "NVIDIA V100, TensorRT 8 FP16 (published)"))


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


def _device_label(result: dict[str, Any]) -> str:
    fp = result.get("fingerprint", {})
    gpu = fp.get("gpu")
    uses_gpu = result.get("latency_kind") == "gpu_compute" or result.get("backend") in (
        "tensorrt", "trtexec")
    return gpu["name"] if gpu and uses_gpu else f"CPU: {fp.get('cpu', '?')}"


def published_rows() -> list[dict[str, Any]]:
    rows = []
    for name, info in MODEL_INFO.items():
        for key, source in PUBLISHED:
            rows.append({"model": name, "display": info["display"], "source": source,
                         "latency_ms": info[f"latency_ms_{key}"], "top1": info["top1"],
                         "top1_source": "ImageNet (published)", "measured": False})
    return rows


def measured_rows(bench: Sequence[dict], validations: Sequence[dict]) -> list[dict[str, Any]]:
    best_top1: dict[str, dict] = {}
    for v in validations:
        if v["model"] not in best_top1 or v["top1"] > best_top1[v["model"]]["top1"]:
            best_top1[v["model"]] = v
    rows = []
    for b in bench:
        model = b["model"]
        val = best_top1.get(model)
        published = MODEL_INFO.get(model, {}).get("top1")
        top1, top1_source = ((val["top1"], f"measured on {val.get('data', '?')}") if val
                             else (published, "ImageNet (published)"))
        rows.append({
            "model": model, "display": MODEL_INFO.get(model, {}).get("display", model),
            "source": f"{_device_label(b)}, {b['backend']} {b['precision']}",
            "backend": b["backend"], "precision": b["precision"], "batch": b["batch"],
            "img_size": b.get("img_size"), "latency_ms": b["latency_ms"]["median"],
            "latency_p99_ms": b["latency_ms"]["p99"], "latency_kind": b.get("latency_kind"),
            "throughput_ips": b.get("throughput_ips"), "top1": top1, "top1_source": top1_source,
            "measured": True, "file": b["_file"]})
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


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one row per point, sorted by source then latency."""
    lines = ["| model | source | batch | img | latency ms (median) | p99 ms | img/s | top-1 % "
             "| top-1 from |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["measured"], r["source"], r["latency_ms"])):
        def num(value, fmt):
            return "-" if value is None else format(value, fmt)
        lines.append(f"| {r['display']} | {r['source']} | {r.get('batch', 1)} | "
                     f"{num(r.get('img_size'), 'd')} | {r['latency_ms']:.3f} | "
                     f"{num(r.get('latency_p99_ms'), '.3f')} | "
                     f"{num(r.get('throughput_ips'), '.1f')} | {num(r['top1'], '.2f')} | "
                     f"{r['top1_source']} |")
    return "\n".join(lines)


def plot_pareto(rows: Sequence[dict[str, Any]], output: str | Path,
                title: str = "GPUNet: latency vs accuracy") -> Path:
    """Scatter of top-1 vs latency per source with each source's Pareto front; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["top1"] is not None:
            groups.setdefault(r["source"], []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    markers = "os^Dv<>pP*Xh"
    for k, (source, group) in enumerate(groups.items()):
        pts = [(r["latency_ms"], r["top1"]) for r in group]
        front = [pts[i] for i in pareto_front(pts)]
        measured = group[0]["measured"]
        line = ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="-" if measured
                       else "--", marker=markers[k % len(markers)], markersize=7,
                       label=source)[0]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)],
                   color=line.get_color(), s=40, zorder=3,
                   facecolors=line.get_color() if measured else "none")
        for r in group:
            ax.annotate(r["display"], (r["latency_ms"], r["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_xlabel("latency, ms (batch 1 median; published: TensorRT 8 FP16 GPU compute)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_xscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return output


def write_report(result_paths: Iterable[str | Path], output_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``pareto.png`` into ``output_dir``."""
    bench, validations = load_results(result_paths)
    rows = published_rows() + measured_rows(bench, validations)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    write_text(out / "report.md", f"# GPUNet latency vs accuracy\n\n{table}\n")
    write_json({"rows": rows, "validations": [
        {k: v.get(k) for k in ("model", "top1", "top5", "loss", "data", "_file")}
        for v in validations]}, out / "report.json")
    plot = plot_pareto(rows, out / "pareto.png")
    return {"table": table, "markdown": str(out / "report.md"), "json": str(out / "report.json"),
            "plot": str(plot), "measured_points": len(rows) - len(published_rows())}


def write_html_report(result_paths: Iterable[str | Path], html_path: str | Path) -> Path:
    """One self-contained HTML page (table + embedded Pareto PNG), e.g. a KFP visualization."""
    with tempfile.TemporaryDirectory() as tmp:
        result = write_report(result_paths, tmp)
        png = base64.b64encode(Path(result["plot"]).read_bytes()).decode("ascii")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>GPUNet report</title>"
            "</head><body><h1>GPUNet latency vs accuracy</h1>"
            f"<pre>{html.escape(result['table'])}</pre>"
            f"<img alt='Pareto plot' src='data:image/png;base64,{png}'></body></html>")
    return write_text(html_path, page)
