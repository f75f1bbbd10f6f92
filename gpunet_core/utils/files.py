"""Result files: schema names, atomic writes and file checksums (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

RESULTS_SCHEMA = "gpunet.validate/1"
BENCH_SCHEMA = "gpunet.bench/1"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
    """Write ``path`` through a temp file beside it, renamed over ``path`` only on success.

    Readers never see a partial file; on any error the temp file is removed and ``path`` keeps
    its old content. ``fsync`` flushes to disk before the rename (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write a JSON-able dict as indented JSON, atomically (:func:`atomic_write`)."""
    with atomic_write(path) as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    return Path(path)
