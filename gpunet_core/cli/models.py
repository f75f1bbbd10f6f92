"""``gpunet models``: the shipped GPUNet family with its published figures."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "models", help="list the GPUNet models",
        description="List the shipped GPUNet models: parameters, input size, eval crop, and "
                    "NVIDIA's published ImageNet top-1 and TensorRT FP16 batch-1 latency.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def format_table(rows: list[dict]) -> str:
    header = ("model", "family", "params", "input", "crop_pct", "top-1 %", "A100 ms", "V100 ms",
              "teacher")
    lines = [header]
    for r in rows:
        lines.append((r["name"], r["family"], f"{r['params']:,}", f"{r['input_size'][-1]}px",
                      f"{r['crop_pct']:g}", f"{r['published_top1']:.1f}",
                      f"{r['published_latency_ms_a100_trt_fp16']:.2f}",
                      f"{r['published_latency_ms_v100_trt_fp16']:.2f}", r["teacher"] or "-"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("latency: NVIDIA's published TensorRT 8 FP16 batch-1 figures; "
               "top-1: ImageNet, NVIDIA's README")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    # torch: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.models.factory import list_models, model_summary

    rows = [model_summary(name) for name in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
