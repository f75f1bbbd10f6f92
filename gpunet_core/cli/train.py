"""``gpunet train``: NVIDIA's recipe under torchrun (see :mod:`gpunet_core.training.loop`)."""

from __future__ import annotations

import argparse
import json
import math


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from gpunet_core.training.config import add_arguments

    parser = sub.add_parser(
        "train", help="train a GPUNet (run under torchrun for several processes)",
        description="Train a GPUNet with NVIDIA's recipe. Single process as is; several with "
                    "`python -m torch.distributed.run --nproc_per_node N -m gpunet_core train ...`"
                    ". --preset loads NVIDIA's hyper-parameters; explicit flags override them.")
    return add_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Flag checks argparse cannot express, run before any data, model or output work.

    (``gpunet_core.training.loop`` checks the rest; these cover values that would otherwise surface as
    a timm traceback, a silent no-op, an out-of-memory kill or a late S3 failure.)
    """
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from gpunet_core.models.spec import check_img_size
    from gpunet_core.training.config import TrainError
    from gpunet_core.utils import storage

    check_img_size(args.img_size)
    check_img_size(args.teacher_img_size, "--teacher-img-size")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise TrainError(f"--scale {low:g} {high:g}: the random-resized-crop area range needs "
                         "0 < MIN <= MAX <= 1 (default 0.08 1.0)")
    for flag, value in (("--warmup-lr", args.warmup_lr), ("--min-lr", args.min_lr),
                        ("--warmup-epochs", args.warmup_epochs)):
        if not (math.isfinite(value) and value >= 0):
            raise TrainError(f"{flag} must be a finite number >= 0, got {value}")
    if not (math.isfinite(args.decay_epochs) and args.decay_epochs > 0):
        raise TrainError(f"--decay-epochs must be > 0, got {args.decay_epochs}")
    if not 0 < args.decay_rate <= 1:
        raise TrainError(f"--decay-rate must be in (0, 1], got {args.decay_rate}")
    if not 0 <= args.model_ema_decay < 1:
        raise TrainError(f"--model-ema-decay must be in [0, 1), got {args.model_ema_decay}")
    probe = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(probe, opt=args.opt, lr=args.lr,
                                        weight_decay=args.weight_decay, momentum=args.momentum,
                                        eps=args.opt_eps)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise TrainError(f"--opt {args.opt!r} is not usable ({exc}); use a timm optimizer name "
                         "such as rmsproptf (NVIDIA's), adamw or sgd") from None
    try:
        create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                            decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
                            min_lr=args.min_lr, updates_per_epoch=1)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise TrainError(f"--sched {args.sched!r} is not usable ({exc}); use a timm scheduler "
                         "name such as step (NVIDIA's), cosine or multistep") from None
    if storage.is_s3_uri(args.output):  # fail now, not after the first epoch's upload
        storage.check_bucket(storage.parse_s3_uri(args.output))


def run(args: argparse.Namespace) -> int:
    from gpunet_core.training.loop import build_parser, resolve_args, train

    args = resolve_args(build_parser(), args._argv)
    check_args(args)
    result = train(args)
    if result.get("epochs"):
        print(json.dumps({k: v for k, v in result.items() if k != "last"}))
    return 0
