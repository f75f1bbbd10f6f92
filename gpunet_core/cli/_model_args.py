"""``--model/--checkpoint/--trust-checkpoint/--use-ema`` shared by validate and export-onnx."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gpunet_core.models.spec import MODEL_INFO

if TYPE_CHECKING:
    from gpunet_core.models.gpunet import GPUNet


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True,
                   model_help: str = "") -> None:
    """``required=False``: the command checks ``--model`` itself (validate: --model or --onnx)."""
    parser.add_argument("--model", "-m", required=required,
                        help=f"model name ({', '.join(MODEL_INFO)}) or a GPUNet JSON spec"
                             + model_help)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file or s3:// URI: NVIDIA's published .pth.tar (or NGC "
                             "zip) or the project's own; default: random weights")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow checkpoints holding pickled Python objects (e.g. NVIDIA's "
                             "files with argparse args); only for files you trust")
    parser.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True,
                        help="prefer the EMA weights of a training checkpoint (default: yes)")


def model_from_args(args: argparse.Namespace) -> GPUNet:
    # torch: `gpunet --help` imports every subcommand module, only this one's run needs it
    from gpunet_core.inference.validate import load_inference_model

    return load_inference_model(args.model, args.checkpoint,
                                use_ema=args.use_ema, trusted=args.trust_checkpoint)
