"""``gpunet bench-data``: images/s of each input pipeline backend on a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpunet_core.models.spec import check_img_size
from gpunet_core.utils.errors import GpunetError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "bench-data", help="measure input pipeline throughput (pil vs dali)",
        description="Time the training or evaluation input pipeline of each backend on a "
                    "prepared dataset (ROOT/train or ROOT/val) and print images/s.")
    parser.add_argument("root", help="prepared dataset directory (holding train/ and val/)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="which split/pipeline to time (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="resolution "
                        "(default: %(default)s)")
    parser.add_argument("--crop-pct", type=float, default=0.875,
                        help="eval crop fraction (default: %(default)s)")
    parser.add_argument("-b", "--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("-j", "--workers", type=int, default=2,
                        help="loader workers / DALI threads (default: %(default)s)")
    parser.add_argument("--backends", default="pil,dali",
                        help="comma-separated backends to time (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=20,
                        help="timed batches per backend (default: %(default)s)")
    parser.add_argument("--dali-device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="DALI decode device (default: %(default)s: GPU when present)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_img_size(args.img_size)
    if args.batch_size < 1:
        raise GpunetError(f"-b/--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise GpunetError(f"-j/--workers must be >= 0 (0: load in this process), got "
                          f"{args.workers}")
    if args.batches < 1:
        raise GpunetError(f"--batches must be >= 1, got {args.batches}")
    if not 0 < args.crop_pct <= 1:
        raise GpunetError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")


def benchmark(args: argparse.Namespace) -> list[dict]:
    check_args(args)
    # torch: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.data import loaders

    root = Path(args.root) / args.split
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if args.split == "train":
            loader = loaders.build_train_loader(
                root, loaders.AugmentConfig(img_size=args.img_size), batch_size=args.batch_size,
                workers=args.workers, backend=backend, dali_device=args.dali_device)
        else:
            loader = loaders.build_eval_loader(
                root, loaders.EvalConfig(args.img_size, args.crop_pct),
                batch_size=args.batch_size, workers=args.workers, backend=backend,
                dali_device=args.dali_device)
        result = loaders.measure_throughput(loader, max_batches=args.batches)
        rows.append({"backend": backend, "split": args.split, "img_size": args.img_size,
                     "batch_size": args.batch_size, "workers": args.workers,
                     "device": getattr(loader, "device", "cpu"), **result})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = benchmark(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['backend']:>5} ({r['device']}) {r['split']} {r['img_size']}px "
                  f"b={r['batch_size']} j={r['workers']}: {r['images_per_s']:,.0f} img/s "
                  f"({r['images']} images in {r['seconds']:.2f}s)")
    return 0
