"""``gpunet report``: latency-vs-accuracy tables and plots from result JSONs."""

from __future__ import annotations

import argparse
import json

from gpunet_core.inference.report import write_report
from gpunet_core.utils.files import check_output_dir, check_output_file, remove_new_dirs_on_error

# what write_report puts in --output-dir
REPORT_FILES = ("report.md", "report.json", "pareto.png", "published.png", "report.html")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "report", help="latency-vs-accuracy tables, plots and an HTML page",
        description="From `gpunet bench` and `gpunet validate` result JSONs (files or "
                    "directories), write to --output-dir: report.md (tables), report.json, "
                    "pareto.png (the measured points: each benchmark with a validation of the "
                    "same graph, with its dataset, resolution, backend, precision and "
                    "hardware), published.png (NVIDIA's published ImageNet points, on axes of "
                    "their own) and report.html (all of it in one page). The registry is not "
                    "read: the pipeline's report task compares a candidate with its champion "
                    "history.")
    parser.add_argument("results", nargs="+", help="result JSON files or directories of them")
    parser.add_argument("--output-dir", "-o", default="report", help="default: ./report")
    return parser


def run(args: argparse.Namespace) -> int:
    flag = "-o/--output-dir"
    if check_output_dir(args.output_dir, flag):  # before any result is read
        for name in REPORT_FILES:
            check_output_file(f"{args.output_dir}/{name}", flag, parents=True)
    with remove_new_dirs_on_error(args.output_dir):
        summary = write_report(args.results, args.output_dir)
    print(summary["table"])
    print(json.dumps({k: summary[k] for k in ("markdown", "json", "plot", "published_plot",
                                              "html", "measured_points")}, indent=2))
    return 0
