"""Files: schema and file names, output-path checks, atomic writes and checksums (no torch
needed)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from gpunet_core.utils.errors import OutputPathError

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


# --------------------------------------------------------------------------- output paths
#
# The rule every command follows for the paths it writes, checked before any work:
#
# * a folder output (``train --output``, ``prepare --out``, ``report -o``, ``export-triton -r``,
#   ``run-local --workdir``) may exist (as a writable folder) or not: missing folders along
#   its path are created, as by ``mkdir -p``;
# * a file output (``validate --results-file``, ``bench -o``, ``export-onnx -o``,
#   ``compile -o``) goes into a folder that exists, as with a shell redirection: a missing
#   folder is most often a typo, and creating it would put the result where nobody looks. An
#   existing file is replaced (atomically, :func:`atomic_path`);
# * either way it is an error when a folder on the path is a file, when the folder that would
#   hold the output (or the deepest existing one, for folders to create) is not writable, or
#   when the path itself is a file where a folder is wanted or a folder where a file is;
# * a command that fails afterwards removes the folders it created, when they are still
#   empty (:func:`remove_new_dirs_on_error`).
#
# "Not writable" is what the system says when a file is actually created there (a probe
# file, removed at once), not only the permission bits: root passes every permission check
# but still cannot create files on a read-only mount or in /sys.


def _is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def _deepest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a folder, a file or a link)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _not_writable(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder``; None when one can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpunet-write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()
    os.close(fd)
    os.unlink(probe)
    return None


def _what(path: Path) -> str:
    return "a broken symbolic link" if path.is_symlink() and not path.exists() else "a file"


def _existing_folder(path: Path, flag: str, error: type[Exception]) -> Path:
    """The nearest existing ancestor of ``path``'s parent, which must be a folder."""
    base = _deepest_existing(path.parent)
    if not base.is_dir():
        raise error(f"cannot write {flag} {path}: {base} is {_what(base)}, not a folder; "
                    f"choose another {flag} or move {base} away")
    return base


def _check_writable(base: Path, path: Path, flag: str, error: type[Exception],
                    kind: str) -> None:
    """Refuse ``path`` when no ``kind`` (file or folder) can be created in ``base``."""
    why = _not_writable(base)
    if why:
        raise error(f"cannot write {flag} {path}: no {kind} can be created in {base} ({why}); "
                    f"choose another {flag} in a writable place")


def check_output_dir(path: str | Path, flag: str, *,
                     error: type[Exception] = OutputPathError) -> Path | None:
    """Check that the folder output ``path`` (given as ``flag``) can be written, before any
    work: it is a writable folder, or a path whose missing folders can be created (see the
    rule above). Raises ``error`` with one line naming the path and the flag to change;
    returns the path (None for an ``s3://`` or other URI, which is not checked here)."""
    if _is_uri(path):
        return None
    path = Path(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise error(f"cannot write {flag} {path}: it is {_what(path)}, not a folder; "
                        f"remove it or choose another {flag}")
        why = _not_writable(path)
        if why:
            raise error(f"cannot write {flag} {path}: no file can be created in it ({why}); "
                        f"choose another {flag}")
        return path
    _check_writable(_existing_folder(path, flag, error), path, flag, error, "folder")
    return path


def check_output_file(path: str | Path, flag: str, *, error: type[Exception] = OutputPathError,
                      parents: bool = False) -> Path | None:
    """Check that the file output ``path`` (given as ``flag``) can be written, before any
    work: it is not a folder, and the folder holding it exists and is writable (see the rule
    above). ``parents``: a missing folder is fine and will be created, for a file inside a
    folder output (``report -o``) and for library callers such as pipeline steps, whose output
    paths the orchestrator chooses. Raises ``error`` with one line naming the path and the flag
    to change; returns the path (None for a URI)."""
    if _is_uri(path):
        return None
    path = Path(path)
    if path.is_dir():
        fix = (f"move it away or choose another {flag}" if parents else
               f"name a file inside it or choose another {flag}")
        raise error(f"cannot write {flag} {path}: it is a folder, not a file; {fix}")
    parent = path.parent
    base = _existing_folder(path, flag, error)
    if base != parent and not parents:
        raise error(f"cannot write {flag} {path}: its folder {parent} does not exist; create "
                    f"it (mkdir -p {parent}) or choose another {flag}")
    _check_writable(base, path, flag, error, "file")
    return path


@contextmanager
def remove_new_dirs_on_error(*paths: str | Path | None) -> Iterator[None]:
    """When the block raises, remove the folders among ``paths`` and their ancestors that did
    not exist when it began and are empty now, deepest first: a command that fails leaves no
    empty folder behind. Folders holding anything are kept (the resumable staging of
    ``prepare``, a run's checkpoints); URIs and None are ignored."""
    new: set[Path] = set()
    for raw in paths:
        if raw is None or _is_uri(raw):
            continue
        for candidate in (Path(raw), *Path(raw).parents):
            if os.path.lexists(candidate):
                break
            new.add(candidate)
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, not a folder, or gone
                folder.rmdir()
        raise
