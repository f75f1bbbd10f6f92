"""``gpunet spec``: validate a GPUNet JSON spec (or a shipped model) and show its layers."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "spec", help="validate a JSON architecture spec and show its layers",
        description="Validate a GPUNet JSON spec (NVIDIA's format) or a shipped model name, and "
                    "print one row per layer with its widths, kernel, stride, padding, SE width, "
                    "residual and drop-path rate, plus the parameter count.")
    parser.add_argument("spec", help="path of a JSON spec, or a model name such as gpunet_0")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: the spec's tail num_classes)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    # torch: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.models.factory import count_parameters, create_model, describe_layers

    with torch.device("meta"):
        model = create_model(args.spec, num_classes=args.num_classes)
    rows = describe_layers(model)
    result = {"source": model.spec.source, "family": "D" if model.spec.distill else "non-D",
              "img_resolution": model.spec.img_resolution, "params": count_parameters(model),
              "layers": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cols = ("name", "type", "in", "out", "kernel", "stride", "padding", "se", "residual",
            "drop_path", "params")
    table = [cols] + [tuple("-" if r[c] is None else str(r[c]) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"{result['family']} family, {result['img_resolution']} px, "
          f"{result['params']:,} trainable parameters ({result['source']})")
    return 0
