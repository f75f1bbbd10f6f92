"""S3 datasets on local disk: one verified copy per node, shared by every process on it.

Training and validation read a local ImageFolder. For an ``s3://bucket/prefix`` dataset,
:func:`local_dataset` downloads exactly the files its ``SHA256SUMS`` lists, plus SHA256SUMS and
``manifest.json`` (never ``quarantine/``), into ``<cache>/datasets/<bucket>/<prefix>/``,
checks every file's SHA-256 and only then writes a marker holding the manifest's checksum.

* One download per node: a matching marker means done (one small manifest read, no listing);
  torchrun's local ranks serialize on an ``fcntl.flock`` beside the cache directory, so one
  downloads and the others wait and reuse its copy.
* Resumable: files land under temp names and are renamed when complete, and the marker comes
  last; the next call hashes what is there and fetches only what is missing or wrong.
* Re-prepared datasets (another manifest checksum) are re-synced: changed files fetched, files
  no longer listed removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from gpunet_core.data.prepare import CHECKSUMS
from gpunet_core.utils import storage
from gpunet_core.utils.errors import DataError, StorageError
from gpunet_core.utils.files import MANIFEST_FILE, sha256_file, write_bytes, write_text

log = logging.getLogger(__name__)

MARKER = ".gpunet-complete"  # holds the manifest checksum of the verified copy beside it


def local_dataset(location: str | Path, *, cache_dir: Path | None = None, jobs: int = 8,
                  progress: bool = True) -> Path:
    """A local directory for the dataset at ``location``: local paths as they are, ``s3://``
    datasets as their verified per-node cache copy (downloaded on first use).

    ``s3://bucket/prefix/val`` (one split of a prepared dataset, as ``gpunet validate`` takes)
    caches the whole dataset and returns its ``val`` folder.
    """
    if not storage.is_s3_uri(location):
        return Path(location)
    uri = storage.parse_s3_uri(str(location))
    client = storage.s3_client(max_pool_connections=max(10, jobs * 2))
    storage.check_bucket(uri, client)  # wrong bucket / credentials / endpoint: before any work
    root, split, raw = _find_manifest(uri, client)
    manifest = _parse_manifest(raw, root)
    local = cache_path(root, cache_dir)
    if _marker(local) != manifest["checksum"]:
        with _locked(local):
            if _marker(local) != manifest["checksum"]:  # not done meanwhile by a local rank
                _sync(root, local, manifest, raw, client, jobs, progress)
    return local / split if split else local


def cache_path(uri: storage.S3Uri, cache_dir: Path | None = None) -> Path:
    """``<cache>/datasets/<bucket>/<prefix>`` (cache: ``$GPUNET_CACHE_DIR`` by default)."""
    parts = [p for p in uri.key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{uri}: '.' and '..' are not allowed in a dataset prefix")
    return Path(cache_dir or storage.default_cache_dir()) / "datasets" / uri.bucket / Path(*parts)


def _find_manifest(uri: storage.S3Uri, client) -> tuple[storage.S3Uri, str, bytes]:
    """``(dataset root, split or '', manifest bytes)`` for a dataset root or one of its splits."""
    key = uri.key.strip("/")
    parent, _, last = key.rpartition("/")
    candidates = [(storage.S3Uri(uri.bucket, key), "")]
    if last:
        candidates.append((storage.S3Uri(uri.bucket, parent), last))
    for root, split in candidates:
        target = root.join(MANIFEST_FILE)
        if storage.object_exists(target, client):
            raw = storage.read_bytes(target, client)
            if not split or split in _parse_manifest(raw, root).get("splits", {}):
                return root, split, raw
    where = f"s3://{uri.bucket}/{key}"
    raise DataError(f"no prepared dataset at {where}: {MANIFEST_FILE} missing (incomplete or not "
                    f"prepared); run `gpunet prepare ... --out {where}`")


def _parse_manifest(raw: bytes, root: storage.S3Uri) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{root.join(MANIFEST_FILE)} is not valid JSON ({exc}); re-run gpunet "
                        "prepare") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checksum"), str):
        raise DataError(f"{root.join(MANIFEST_FILE)} has no dataset checksum; it was not "
                        "written by gpunet prepare: re-run it")
    return manifest


def _marker(local: Path) -> str | None:
    try:
        return (local / MARKER).read_text().strip()
    except OSError:
        return None


@contextmanager
def _locked(local: Path) -> Iterator[None]:
    """Hold ``<local>.lock`` exclusively: one process per node syncs, the others wait."""
    lock = local.with_name(f"{local.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish downloading into %s", local)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sync(root: storage.S3Uri, local: Path, manifest: dict[str, Any], raw_manifest: bytes,
          client, jobs: int, progress: bool) -> None:
    """Bring ``local`` to exactly the dataset at ``root``, verified, then write the marker."""
    (local / MARKER).unlink(missing_ok=True)
    sums_name = str(manifest.get("checksum_file") or CHECKSUMS)
    sums_raw = _read_checksums(root, sums_name, manifest["checksum"], client)
    expected = _parse_checksums(sums_raw, root.join(sums_name))
    local.mkdir(parents=True, exist_ok=True)
    removed = _remove_unlisted(local, {*expected, sums_name, MANIFEST_FILE})
    have = _hash_files(local, [r for r in expected if (local / r).is_file()], jobs, progress)
    todo = [rel for rel, digest in expected.items() if have.get(rel) != digest]
    fetched = len(todo)
    for attempt in (1, 2):  # a file that arrives wrong is fetched once more, then it is an error
        got = storage.fetch_objects(root, todo, local, client=client, jobs=jobs,
                                    progress=progress)
        todo = [rel for rel in todo if got[rel] != expected[rel]]
        if not todo:
            break
        if attempt == 2:
            for rel in todo:
                (local / rel).unlink(missing_ok=True)
            raise DataError(
                f"{root.join(todo[0])}: SHA-256 {got[todo[0]][:16]}... does not match "
                f"{sums_name} ({expected[todo[0]][:16]}...) after 2 downloads"
                f"{f' ({len(todo)} files in all)' if len(todo) > 1 else ''}: the object in S3 "
                f"is damaged or was replaced; re-run `gpunet prepare ... --out {root}`")
    write_bytes(local / sums_name, sums_raw)
    write_bytes(local / MANIFEST_FILE, raw_manifest)
    write_text(local / MARKER, manifest["checksum"] + "\n")  # last: the copy is complete
    log.info("dataset %s: %d files verified in %s (%d downloaded, %d stale removed)", root,
             len(expected), local, fetched, removed)


def _read_checksums(root: storage.S3Uri, name: str, checksum: str, client) -> bytes:
    """The checksum file's bytes, which must hash to the manifest's ``checksum``."""
    for _ in range(2):
        raw = storage.read_bytes(root.join(name), client)
        if hashlib.sha256(raw).hexdigest() == checksum:
            return raw
    raise DataError(f"{root.join(name)} does not match the checksum in {MANIFEST_FILE}: the "
                    f"dataset is being re-prepared or is damaged; re-run `gpunet prepare ... "
                    f"--out {root}` and retry")


def _parse_checksums(raw: bytes, where: storage.S3Uri) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from ``sha256sum`` lines (``<hex>  <path>``)."""
    out: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, rest = line.partition(" ")
        rel = rest[1:] if rest[:1] in (" ", "*") else rest
        path = PurePosixPath(rel)
        if (len(digest) != 64 or not rel or path.is_absolute() or ".." in path.parts
                or path.as_posix() != rel):
            raise DataError(f"{where} line {n} is not '<sha256>  <relative path>': {line[:120]!r}"
                            "; re-run gpunet prepare")
        out[rel] = digest.lower()
    return out


def _remove_unlisted(local: Path, keep: set[str]) -> int:
    """Delete files of an older copy or of an interrupted download; returns how many."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(local, topdown=False):
        base = Path(dirpath)
        for name in filenames:
            rel = (base / name).relative_to(local).as_posix()
            if rel not in keep:
                (base / name).unlink()
                removed += 1
        for name in dirnames:
            with suppress(OSError):
                (base / name).rmdir()  # only when empty
    return removed


def _hash_files(local: Path, rels: list[str], jobs: int, progress: bool) -> dict[str, str]:
    """SHA-256 of files already in the cache (a resumed or re-synced copy), ``jobs`` threads."""
    if not rels:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        digests = tqdm(pool.map(lambda rel: sha256_file(local / rel), rels), total=len(rels),
                       unit="file", desc=f"verify {local}", disable=not progress, leave=False)
        return dict(zip(rels, digests, strict=True))
