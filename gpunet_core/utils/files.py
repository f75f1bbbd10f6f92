"""Files: schema and file names, atomic writes and checksums (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

RESULTS_SCHEMA = "gpunet.validate/1"
BENCH_SCHEMA = "gpunet.bench/1"

# The files a training run leaves in its output folder, read by steps, components and trackers.
BEST_CHECKPOINT = "model_best.pth.tar"
LAST_CHECKPOINT = "last.pth.tar"
RESULT_FILE = "result.json"  # the run so far, readable without torch
SUMMARY_FILE = "summary.csv"
RUN_ID_FILE = "mlflow_run_id"  # the MLflow run that trained the checkpoints beside it
MODEL_ID_FILE = "mlflow_model_id"  # the MLflow LoggedModel of the best checkpoint beside it
# A prepared dataset's description (classes, splits, checksums), at its root.
MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file name beside ``path``, renamed over ``path`` only when the block succeeds.

    The one home of "temp name, then rename": readers never see a partial file, and on any
    error the temp file is removed and ``path`` keeps its old content. For writers that take a
    file name (``torch.onnx.export``, matplotlib: the temp name keeps ``path``'s suffix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
    """Write ``path`` through an open temp file (:func:`atomic_path`); ``fsync`` flushes it to
    disk before the rename (checkpoints)."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst``, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write a JSON-able dict as indented JSON, atomically (:func:`atomic_write`)."""
    with atomic_write(path) as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    return Path(path)
