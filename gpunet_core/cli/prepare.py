"""``gpunet prepare``: build a canonical ImageFolder dataset + manifest.json from a real source."""

from __future__ import annotations

import argparse
import json
import os

from gpunet_core.data import prepare as datasets
from gpunet_core.utils.files import check_output_dir, remove_new_dirs_on_error


def _common(parser: argparse.ArgumentParser, *, bad_fraction: bool = True) -> None:
    parser.add_argument("--out", required=True, metavar="DIR|s3://BUCKET/PREFIX",
                        help="output dataset location (local directory, created if missing, "
                             "or S3 prefix)")
    parser.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes for decode/verify (default: %(default)s)")
    if bad_fraction:
        parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                            help="fail if more than this fraction of images is undecodable "
                                 "(default: %(default)s)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL for MinIO-style stores (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--work-dir", default=None,
                        help="local staging directory when --out is s3:// (default: "
                             "~/.cache/gpunet/prepare/<hash>; kept for resuming)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "prepare", help="prepare a dataset (imagenet, folder, digits)",
        description="Prepare a canonical ImageFolder dataset (train/<class>/..., val/<class>/...) "
                    "with manifest.json, locally or on S3. Bad images are quarantined and "
                    "reported; re-running skips finished work.")
    src = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    imagenet = src.add_parser(
        "imagenet", help="the official ILSVRC2012 archives",
        description="Stream ILSVRC2012_img_train.tar (a tar of <wnid>.tar) and "
                    "ILSVRC2012_img_val.tar into an ImageFolder tree.")
    imagenet.add_argument("--train-tar", help="ILSVRC2012_img_train.tar")
    imagenet.add_argument("--val-tar", help="ILSVRC2012_img_val.tar")
    imagenet.add_argument("--val-labels",
                          help="Kaggle LOC_val_solution.csv or a two-column 'filename wnid' file")
    _common(imagenet)

    folder = src.add_parser(
        "folder", help="an existing ImageFolder tree (local or s3://)",
        description="Verify and normalise SRC/{train,val}/<class>/<images> into a prepared "
                    "dataset.")
    folder.add_argument("src", metavar="SRC", help="source tree: local directory or s3://...")
    _common(folder)

    digits = src.add_parser(
        "digits", help="the embedded demo dataset (scikit-learn digits, offline)",
        description="Render scikit-learn's 1,797 handwritten digits as RGB JPEGs with a fixed, "
                    "stratified train/val split.")
    digits.add_argument("--img-size", type=int, default=32, help="image side in px "
                        "(default: %(default)s)")
    digits.add_argument("--val-fraction", type=float, default=0.2,
                        help="validation fraction (default: %(default)s)")
    digits.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    digits.add_argument("--per-class", type=int, default=None,
                        help="keep only the first N images of each digit (small smoke sets)")
    _common(digits, bad_fraction=False)
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")  # before any source is read
    if args.work_dir:
        check_output_dir(args.work_dir, "--work-dir")
    with remove_new_dirs_on_error(args.out, args.work_dir):
        summary = _prepare(args)
    if args.json:
        print(json.dumps(summary.manifest, indent=2))
    else:
        print(summary.describe())
        for item in summary.manifest["skipped"]:
            print(f"  quarantined {item['path']}: {item['reason']}")
    return 0


def _prepare(args: argparse.Namespace) -> datasets.PrepareSummary:
    common = {"jobs": args.jobs, "s3_endpoint": args.s3_endpoint, "work_dir": args.work_dir,
              "progress": not args.no_progress}
    if args.source == "imagenet":
        summary = datasets.prepare_imagenet(args.out, train_tar=args.train_tar,
                                            val_tar=args.val_tar, val_labels=args.val_labels,
                                            max_bad_fraction=args.max_bad_fraction, **common)
    elif args.source == "folder":
        summary = datasets.prepare_folder(args.src, args.out,
                                          max_bad_fraction=args.max_bad_fraction, **common)
    else:
        summary = datasets.prepare_digits(args.out, img_size=args.img_size, per_class=args.per_class,
                                          val_fraction=args.val_fraction, seed=args.seed,
                                          **common)
    return summary
