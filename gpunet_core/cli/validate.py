"""``gpunet validate``: accuracy, loss, speed, per-class accuracy and confusion matrix."""

from __future__ import annotations

import argparse
import json

from gpunet_core.cli._model_args import add_model_args, model_from_args
from gpunet_core.utils.files import write_json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "validate", help="evaluate a checkpoint on a labelled image folder",
        description="Evaluate a GPUNet on DATA (<class>/<image> folders, sorted class order, as "
                    "the model was trained): top-1, top-5, loss, images/s, per-class accuracy "
                    "and the confusion matrix. Preprocessing is NVIDIA's eval transform.")
    parser.add_argument("data", help="validation directory (ImageFolder layout), or a prepared "
                                     "dataset (its val/ split), local or s3://")
    add_model_args(parser)
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="batch size (256)")
    parser.add_argument("-j", "--workers", type=int, default=4, help="data loader workers (4)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the model's own)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="center-crop fraction (default: the model's own)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 autocast on CUDA, bf16 autocast on the CPU")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                       "available)")
    parser.add_argument("--results-file", default=None, help="write the full results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    # torch: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.data.cache import local_dataset
    from gpunet_core.inference.validate import check_options, validate

    check_options(batch_size=args.batch_size, workers=args.workers, img_size=args.img_size,
                  crop_pct=args.crop_pct, device=args.device)  # before loading anything
    # s3://: bucket and credentials checked, then one verified local copy, before the model
    data = local_dataset(args.data, progress=not args.no_progress)
    model = model_from_args(args)
    results = validate(model, data, batch_size=args.batch_size, workers=args.workers,
                       img_size=args.img_size, crop_pct=args.crop_pct, amp=args.amp,
                       channels_last=args.channels_last, device=args.device,
                       progress=not args.no_progress)
    results["model"] = args.model
    results["checkpoint"] = args.checkpoint
    results["data"] = str(args.data)
    if args.results_file:
        write_json(results, args.results_file)
    print(json.dumps({k: results[k] for k in ("model", "top1", "top5", "loss", "images",
                                               "images_per_second")}, indent=2))
    return 0
