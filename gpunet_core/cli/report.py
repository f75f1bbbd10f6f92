"""``gpunet report``: latency-vs-accuracy table and Pareto plot from result JSONs."""

from __future__ import annotations

import argparse
import json

from gpunet_core.inference.report import write_report


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "report", help="latency-vs-accuracy table and Pareto plot",
        description="From `gpunet bench` and `gpunet validate` result JSONs (files or "
                    "directories), write report.md (table), report.json and pareto.png (NVIDIA's "
                    "published GPUNet points with the measured ones overlaid) to --output-dir.")
    parser.add_argument("results", nargs="+", help="result JSON files or directories of them")
    parser.add_argument("--output-dir", "-o", default="report", help="default: ./report")
    return parser


def run(args: argparse.Namespace) -> int:
    summary = write_report(args.results, args.output_dir)
    print(summary["table"])
    print(json.dumps({k: summary[k] for k in ("markdown", "json", "plot", "measured_points")},
                     indent=2))
    return 0
