"""``gpunet train``'s flags: NVIDIA's names and meanings, presets resolved (no torch import).

Kept apart from :mod:`gpunet_core.training.loop` so that parsing, ``--help`` and flag errors cost no
torch import; :mod:`gpunet_core.training.loop` re-exports everything here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from gpunet_core.training.presets import PRESETS, load_preset
from gpunet_core.utils.errors import GpunetError


class TrainError(GpunetError):
    """Bad training configuration, caught before any training starts."""


# --------------------------------------------------------------------------- arguments


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """NVIDIA's ``train.py`` flags (same names and meanings) plus this project's additions."""
    parser.add_argument("data", help="dataset root holding train/ and val/ ImageFolders")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="load NVIDIA's hyper-parameters for this model (flags override)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="gpunet_0",
                   help="model name or JSON spec (default gpunet_0); other timm model names "
                        "train from scratch (e.g. efficientnet_b0, for comparisons)")
    g.add_argument("--num-classes", type=_positive_int, default=None,
                   help="classes (default: the dataset's)")
    g.add_argument("--drop", type=_non_negative_float, default=None,
                   help="classifier dropout (default 0.2, NVIDIA's hard-coded value)")
    g.add_argument("--drop-connect", type=_non_negative_float, default=None,
                   help="drop-path base rate, block i of N gets rate*i/N (default 0.2; 0 for D)")
    g.add_argument("--img-size", type=_positive_int, default=None,
                   help="train/eval resolution (default: the model's)")
    g.add_argument("--crop-pct", type=float, default=None, help="eval crop (default: the model's)")
    g.add_argument("--initial-checkpoint", default=None,
                   help="start from these weights (e.g. NVIDIA's published file)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints holding pickled Python objects (trusted sources only)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=_positive_int, default=32, help="batch per process")
    g.add_argument("--epochs", type=_positive_int, default=10)
    g.add_argument("--opt", default="rmsproptf", help="timm optimizer name (default rmsproptf)")
    g.add_argument("--opt-eps", type=float, default=1e-3)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--lr", type=_non_negative_float, default=0.06)
    g.add_argument("--weight-decay", type=_non_negative_float, default=1e-5)
    g.add_argument("--sched", default="step", help="timm scheduler (default step)")
    g.add_argument("--decay-epochs", type=float, default=2.4)
    g.add_argument("--decay-rate", type=float, default=0.97)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=int, default=3)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--smoothing", type=_non_negative_float, default=0.1, help="label smoothing")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many optimizer steps in total (smoke runs)")
    g = parser.add_argument_group("data")
    g.add_argument("-j", "--workers", type=int, default=4, help="loader workers per process")
    g.add_argument("--data-backend", choices=("auto", "pil", "dali"), default="pil")
    g.add_argument("--aa", default="rand-m9-mstd0.5", help="timm auto-augment policy ('' for none)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default 0.08 1.0)")
    g.add_argument("--reprob", type=_non_negative_float, default=0.2, help="random erasing prob")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g = parser.add_argument_group("distillation")
    g.add_argument("--enable-distill", type=_bool, default=False, metavar="True|False")
    g.add_argument("--teacher", default=None, help="timm model name of the teacher")
    g.add_argument("--teacher-checkpoint", default=None, help="teacher weights (timm or gpunet)")
    g.add_argument("--teacher-img-size", type=_positive_int, default=None,
                   help="teacher resolution; the student sees a bicubic downsample")
    g.add_argument("--test-teacher", type=_bool, default=False, metavar="True|False",
                   help="validate the teacher once before training")
    g.add_argument("--kd-weight", type=_non_negative_float, default=1.0)
    g.add_argument("--kd-temperature", type=float, default=1.0)
    g = parser.add_argument_group("outputs")
    g.add_argument("--output", default="runs/train", help="output directory")
    g.add_argument("--resume", default=None, help="resume from this checkpoint")
    g.add_argument("--auto-resume", action="store_true",
                   help="resume from <output>/last.pth.tar when it exists")
    g.add_argument("--log-interval", type=_positive_int, default=50)
    g.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=False,
                   help="track the run in MLflow (MLFLOW_TRACKING_URI)")
    g.add_argument("--log-model", action=argparse.BooleanOptionalAction, default=True,
                   help="with --mlflow: log the best checkpoint's model to the run as an MLflow "
                        "model (pytorch flavor), which registration reuses (default: on)")
    g.add_argument("--experiment", default="gpunet", help="MLflow experiment name")
    g.add_argument("--run-tag", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MLflow run tag (repeatable), e.g. kfp_run_id=...")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="gpunet train", description="NVIDIA's GPUNet training recipe under torchrun "
                                         "(or a single process)."))


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse twice: defaults < ``--preset`` values < explicit flags."""
    args = parser.parse_args(argv)
    if args.preset:
        preset = load_preset(args.preset)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(preset) - known)
        if unknown:
            raise TrainError(f"preset {args.preset} sets unknown flags {unknown}")
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args
