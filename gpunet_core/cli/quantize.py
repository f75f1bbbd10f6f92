"""``gpunet quantize``: the FP16 or calibrated INT8 graph of an ONNX export, per target."""

from __future__ import annotations

import argparse
import json

from gpunet_core.inference.quantize import (
    CALIB_SEED,
    DEFAULT_CALIB_SAMPLES,
    PRECISIONS,
    TARGETS,
    check_options,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "quantize", help="write the FP16 or INT8 graph of an ONNX export",
        description="Rewrite a `gpunet export-onnx` file in lower precision (TensorRT 11 builds "
                    "strongly typed: the precision lives in the graph). fp16: ModelOpt "
                    "AutoCast, FP32 inputs/outputs kept. int8 --target tensorrt: ModelOpt "
                    "Q/DQ (symmetric, per-channel weights); int8 --target cpu: ONNX Runtime "
                    "QOperator u8/s8 per-channel, the fastest form on x86. Calibration: a "
                    "seeded sample of the dataset's train split through the eval transform.")
    parser.add_argument("--onnx", required=True, help="FP32 ONNX file from gpunet export-onnx")
    parser.add_argument("--calib-data", required=True,
                        help="prepared dataset (its train/ split) or an ImageFolder, local or s3://")
    parser.add_argument("--precision", choices=PRECISIONS, required=True, help="fp16 or int8")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt",
                        help="tensorrt (default) or cpu (ONNX Runtime on x86)")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                        help=f"calibration images (default {DEFAULT_CALIB_SAMPLES})")
    parser.add_argument("--seed", type=int, default=CALIB_SEED,
                        help=f"which images are drawn (default {CALIB_SEED})")
    parser.add_argument("--output", "-o", required=True, help="output .onnx path")
    return parser


def run(args: argparse.Namespace) -> int:
    check_options(precision=args.precision, target=args.target, calib_samples=args.calib_samples)
    # onnx, onnxruntime, ModelOpt and torch (transforms): only when the command runs
    from gpunet_core.inference.quantize import quantize_onnx

    sidecar = quantize_onnx(args.onnx, args.output, calib_data=args.calib_data,
                            precision=args.precision, target=args.target,
                            calib_samples=args.calib_samples, seed=args.seed)
    print(json.dumps({"onnx": args.output, "precision": sidecar["precision"],
                      "target": sidecar["target"], "calibration_images":
                      sidecar["calibration"]["images"], **sidecar["parity_vs_fp32"]}, indent=2))
    return 0
