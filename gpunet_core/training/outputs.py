"""A run's output folder: where it is (local, or staged for ``s3://``), ``summary.csv``,
``args.yaml`` and the mirror to S3. Rank 0 writes; every file is written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from gpunet_core.training.config import TrainConfig
from gpunet_core.utils import storage
from gpunet_core.utils.files import MANIFEST_FILE, atomic_write, sha256_file

ARGS_FILE = "args.yaml"
SUMMARY_FIELDS = ("epoch", "train_loss", "train_ce", "train_kd", "eval_loss", "top1", "top5",
                  "lr", "img_per_sec", "data_wait_frac")


def output_dir(requested: str) -> Path:
    """Where outputs are written: the directory itself, or a local staging copy of an s3:// one."""
    if not storage.is_s3_uri(requested):
        return Path(requested)
    src = storage.parse_s3_uri(requested)
    return storage.default_cache_dir() / "outputs" / src.bucket / src.key


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``summary.csv`` from the run history (one row per epoch, atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def write_args(path: Path, cfg: TrainConfig) -> None:
    """``args.yaml``: the run's settings, as resolved (defaults < preset < flags)."""
    with atomic_write(path) as fh:
        fh.write(yaml.safe_dump(vars(cfg), sort_keys=True))


def manifest_checksum(root: Path) -> str:
    """SHA-256 of the dataset's ``manifest.json`` ("" when it has none)."""
    manifest = root / MANIFEST_FILE
    return sha256_file(manifest) if manifest.exists() else ""


def sync_output(requested: str, local: Path) -> None:
    """Mirror the staging directory to an ``s3://`` output (uploads are verified)."""
    if storage.is_s3_uri(requested):
        files = [(p, p.relative_to(local).as_posix()) for p in sorted(local.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.name != "mlflow.db"]
        # checkpoints keep their size from epoch to epoch: never skip by size here
        storage.upload_files(files, storage.parse_s3_uri(requested), skip_existing=False,
                             progress=False)
