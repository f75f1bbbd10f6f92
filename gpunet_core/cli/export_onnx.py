"""``gpunet export-onnx``: ONNX export with onnx.checker and an ONNX Runtime parity check."""

from __future__ import annotations

import argparse
import json

from gpunet_core.cli._model_args import add_model_args, model_from_args
from gpunet_core.inference.export import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    OPSETS,
    check_export_output,
    check_options,
    export_onnx,
    sidecar_path,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "export-onnx", help="export a GPUNet to ONNX and check it against PyTorch",
        description="Export a GPUNet (eval mode: no dropout/drop path, constant folding) to ONNX, "
                    "run onnx.checker, compare ONNX Runtime with PyTorch on a fixed input (fails "
                    "above 1e-4 + 1e-4 * max|logit|) and write a sidecar JSON beside the file.")
    add_model_args(parser)
    parser.add_argument("--output", "-o", required=True,
                        help="output .onnx path (its folder must exist); the sidecar JSON is "
                             "written beside it as <output>.json")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the input (default 1)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="make the batch axis dynamic (checked at batch 1 and 4)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; torchscript 13-20, dynamo 18+)")
    parser.add_argument("--exporter", choices=list(OPSETS), default=DEFAULT_EXPORTER,
                        help=f"torch.onnx exporter (default {DEFAULT_EXPORTER}, see docs)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the model's own)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max abs difference allowed (default 1e-4 + 1e-4 * max|logit|)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_options(batch=args.batch, opset=args.opset, exporter=args.exporter,
                  img_size=args.img_size, tolerance=args.tolerance)  # before loading anything
    check_export_output(args.output)
    model = model_from_args(args)
    sidecar = export_onnx(model, args.output, model_name=args.model, img_size=args.img_size,
                          batch=args.batch, dynamic_batch=args.dynamic_batch, opset=args.opset,
                          checkpoint=args.checkpoint, tolerance=args.tolerance,
                          exporter=args.exporter)
    print(json.dumps({"onnx": str(args.output), "sidecar": str(sidecar_path(args.output)),
                      "input_shape": sidecar["input_shape"], "opset": sidecar["opset"],
                      "parity_max_abs_diff": sidecar["parity_max_abs_diff"]}, indent=2))
    return 0
