"""``gpunet validate``: accuracy, loss, speed, per-class accuracy and confusion matrix, of a
PyTorch checkpoint (``--model``) or of an ONNX file in ONNX Runtime (``--onnx``)."""

from __future__ import annotations

import argparse
import json

from gpunet_core.cli._model_args import add_model_args, model_from_args
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import check_output_file, write_json

# flags of the PyTorch path that mean nothing for an ONNX file: (attribute, flag, its unset value)
_TORCH_ONLY = (("checkpoint", "--checkpoint", None), ("trust_checkpoint", "--trust-checkpoint",
               False), ("use_ema", "--no-use-ema", True), ("amp", "--amp", False),
               ("channels_last", "--channels-last", False), ("device", "--device", None))


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "validate", help="evaluate a checkpoint or an ONNX file on a labelled image folder",
        description="Evaluate a GPUNet on DATA (<class>/<image> folders, sorted class order, as "
                    "the model was trained): top-1, top-5, loss, images/s, per-class accuracy "
                    "and the confusion matrix. Preprocessing is NVIDIA's eval transform. Two "
                    "modes: --model [--checkpoint] evaluates the model in PyTorch; --onnx FILE "
                    "evaluates an ONNX file (an export from `gpunet export-onnx`, or a quantized "
                    "FP16/INT8 graph) in ONNX Runtime (CUDA if available, else CPU) with the "
                    "same transform, loader and metrics, its preprocessing read from the file.")
    parser.add_argument("data", help="validation directory (ImageFolder layout), or a prepared "
                                     "dataset (its val/ split), local or s3://")
    add_model_args(parser, required=False, model_help="; PyTorch mode (give --model or --onnx)")
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="evaluate this ONNX file with ONNX Runtime instead of a PyTorch "
                             "checkpoint (no --model/--checkpoint/--amp/--channels-last/--device)")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="batch size (256)")
    parser.add_argument("-j", "--workers", type=int, default=4, help="data loader workers (4)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the model's own; with --onnx only the "
                             "graph's input size is accepted)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="center-crop fraction (default: the model's own, with --onnx the "
                             "one recorded in the file)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 autocast on CUDA, bf16 autocast on the CPU")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                       "available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--onnx: ONNX Runtime intra-op threads (default: the runtime's)")
    parser.add_argument("--results-file", default=None,
                        help="write the full results as JSON to this file (its folder must "
                             "exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_mode(args: argparse.Namespace) -> None:
    """Exactly one of --model and --onnx, and no flag of the other mode."""
    if (args.model is None) == (args.onnx is None):
        raise GpunetError("give exactly one of --model (a PyTorch checkpoint) or --onnx FILE "
                          "(an ONNX file in ONNX Runtime)" if args.model is None else
                          "--model and --onnx exclude each other: --onnx evaluates the ONNX "
                          "file, which knows its model")
    if args.onnx is not None:
        for attr, flag, unset in _TORCH_ONLY:
            if getattr(args, attr) != unset:
                raise GpunetError(f"{flag} does not apply with --onnx (the ONNX file holds the "
                                  "weights and runs in ONNX Runtime); leave it out")
    elif args.threads is not None:
        raise GpunetError("--threads sets ONNX Runtime's threads: it applies with --onnx only")
    if args.threads is not None and args.threads < 1:
        raise GpunetError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    check_mode(args)
    if args.results_file:
        check_output_file(args.results_file, "--results-file")
    # torch: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.data.cache import local_dataset
    from gpunet_core.inference.validate import check_options, validate, validate_onnx

    check_options(batch_size=args.batch_size, workers=args.workers, img_size=args.img_size,
                  crop_pct=args.crop_pct, device=args.device)  # before loading anything
    if args.onnx is not None:
        # reads the file before the data: a wrong path fails before any s3:// download
        results = validate_onnx(args.onnx, args.data, batch_size=args.batch_size,
                                workers=args.workers, img_size=args.img_size,
                                crop_pct=args.crop_pct, threads=args.threads,
                                progress=not args.no_progress)
        shown = ("model", "onnx", "precision", "top1", "top5", "loss", "images",
                 "images_per_second")
    else:
        # s3://: bucket and credentials checked, then one verified local copy, before the model
        data = local_dataset(args.data, progress=not args.no_progress)
        model = model_from_args(args)
        results = validate(model, data, batch_size=args.batch_size, workers=args.workers,
                           img_size=args.img_size, crop_pct=args.crop_pct, amp=args.amp,
                           channels_last=args.channels_last, device=args.device,
                           progress=not args.no_progress)
        results["model"] = args.model
        shown = ("model", "top1", "top5", "loss", "images", "images_per_second")
    results["checkpoint"] = args.checkpoint
    results["data"] = str(args.data)
    if args.results_file:
        write_json(results, args.results_file)
    print(json.dumps({k: results[k] for k in shown}, indent=2))
    return 0
