"""A study's result: the Pareto front of feasible trials, written as ``pareto.json``, one JSON
spec per front member and a plot with NVIDIA's published GPUNets measured the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from gpunet_core.utils.files import atomic_path, write_json

PARETO_SCHEMA = "gpunet.search.pareto/v1"
PARETO_FILE = "pareto.json"
PLOT_FILE = "pareto.png"
SPECS_DIR = "specs"


def finished_trials(study) -> list[dict[str, Any]]:
    """Every completed, trained trial within the budget, as plain dicts."""

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        if attrs.get("constraint", 1.0) > 0 or "skipped" in attrs:
            continue
        rows.append({"trial": t.number, "proxy_top1": t.values[0],
                     "latency_ms": attrs["latency_ms"], "params": attrs.get("params"),
                     "gmacs": attrs.get("gmacs"), "spec_hash": attrs.get("spec_hash"),
                     "epoch_top1": attrs.get("epoch_top1"), "spec": attrs["spec"]})
    return rows


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both top-1 (higher) and latency (lower), fastest
    first; of equal points the earliest trial."""
    front = []
    for r in rows:
        dominated = any(
            (o["proxy_top1"] >= r["proxy_top1"] and o["latency_ms"] <= r["latency_ms"])
            and (o["proxy_top1"] > r["proxy_top1"] or o["latency_ms"] < r["latency_ms"]
                 or o["trial"] < r["trial"])
            for o in rows if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["latency_ms"], -r["proxy_top1"]))


def write_results(out: str | Path, study, summary: dict[str, Any],
                  references: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``pareto.json``, ``specs/trial-NNNNN.json`` and ``pareto.png`` under ``out``."""
    out = Path(out)
    specs = out / SPECS_DIR
    specs.mkdir(parents=True, exist_ok=True)
    rows = finished_trials(study)
    front = pareto_front(rows)
    entries = []
    for r in front:
        path = specs / f"trial-{r['trial']:05d}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(r["spec"], indent=2))
        entries.append({**{k: v for k, v in r.items() if k != "spec"},
                        "spec_path": str(path.relative_to(out))})
    result = {"schema": PARETO_SCHEMA, **summary, "trained_in_budget": len(rows),
              "front": entries, "references": references}
    plot_front(out / PLOT_FILE, rows, front, references, summary)
    write_json(result, out / PARETO_FILE)
    return result


def plot_front(path: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]],
               references: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    # matplotlib (Agg) only when a plot is written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if rows:
        ax.scatter([r["latency_ms"] for r in rows], [r["proxy_top1"] for r in rows], s=14,
                   color="0.7", label="searched (within budget)")
    if front:
        ax.plot([r["latency_ms"] for r in front], [r["proxy_top1"] for r in front], "o-",
                color="tab:red", label="Pareto front")
    measured = [r for r in references if r.get("proxy_top1") is not None]
    if measured:
        ax.scatter([r["latency_ms"] for r in measured], [r["proxy_top1"] for r in measured],
                   marker="s", color="tab:blue", label="NVIDIA's GPUNets, measured the same way")
        for r in measured:
            ax.annotate(r["display"], (r["latency_ms"], r["proxy_top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color="tab:blue")
    ax.axvline(summary["budget_ms"], color="k", linestyle="--", linewidth=1,
               label=f"budget {summary['budget_ms']:g} ms")
    ax.set_xlabel(f"latency, ms ({summary['backend']}, {summary['precision']}, batch "
                  f"{summary['batch']})")
    ax.set_ylabel("proxy top-1, %")
    ax.set_title(f"search {summary['study']}: {summary['trials_counted']} trials")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
