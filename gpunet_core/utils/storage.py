"""S3 object storage through boto3: URIs, client, parallel upload-then-verify, download to a cache.

Settings come the standard way: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other
boto3 credential source), endpoint from ``AWS_ENDPOINT_URL`` or an explicit ``endpoint`` argument
(MinIO-style stores). Large files go up as parallel multipart uploads (boto3 ``TransferConfig``).

Reliability: every upload carries a SHA-256 checksum that the server verifies on receipt
(``ChecksumAlgorithm``), and afterwards each object's stored checksum is compared with the local
file's. Short blips are retried by botocore (standard mode); a longer outage once a transfer is
under way is retried here with exponential backoff for ``GPUNET_S3_RETRY_SECONDS`` (default 300),
resuming with what is still missing. S3 never shows a partial object under its final key, and
callers write their completion marker (a dataset's manifest) only after a verified upload. The
first contact (:func:`check_bucket`) fails fast instead: a wrong endpoint is a setting to fix.

Checksums are chosen, not left to boto3 (>= 1.36 adds a CRC32 "flexible checksum" to every upload
by default, which some S3-compatible stores reject): ``GPUNET_S3_CHECKSUM=sha256`` (default)
sends one SHA-256 per upload/part and verifies it against ``ChecksumSHA256``; ``off`` (for stores
that reject checksum headers) sends none and verifies the ETag against the local MD5 (multipart:
MD5 of the parts' MD5s + ``-N``; true for unencrypted and SSE-S3 objects, not for SSE-KMS/-C).
Either way boto3 computes only checksums an operation requires (``when_required``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpunet_core.utils.errors import StorageError
from gpunet_core.utils.files import atomic_path

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # multipart threshold and part size: checksums of larger files are composite
CHECKSUM = "SHA256"
CHECKSUM_MODES = ("sha256", "off")  # GPUNET_S3_CHECKSUM, first = default


def checksum_mode() -> str:
    """``GPUNET_S3_CHECKSUM``: ``sha256`` (default) or ``off`` (see the module docstring)."""
    raw = os.environ.get("GPUNET_S3_CHECKSUM", CHECKSUM_MODES[0])
    mode = raw.strip().lower()
    if mode not in CHECKSUM_MODES:
        raise StorageError(f"GPUNET_S3_CHECKSUM={raw!r} is not one of {', '.join(CHECKSUM_MODES)}; "
                           "use sha256 (default), or off for stores that reject checksum headers")
    return mode


@dataclass(frozen=True)
class S3Uri:
    """``s3://bucket/key``; ``key`` may be empty (bucket root) or a prefix ending in ``/``."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a directory prefix (``''`` or ending in ``/``)."""
        key = self.key.strip("/")
        return f"{key}/" if key else ""


def is_s3_uri(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_uri(uri: str) -> S3Uri:
    """Split ``s3://bucket/key`` with a clear error for anything else."""
    if not is_s3_uri(uri):
        raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or "/" in bucket or bucket != bucket.strip():
        raise StorageError(f"S3 URI has no bucket name: {uri!r} (expected s3://bucket/prefix)")
    return S3Uri(bucket, key)


def s3_client(endpoint: str | None = None, *, max_attempts: int = 5,
              max_pool_connections: int = 32):
    """A boto3 S3 client with botocore's standard retry mode and a pool sized for parallel IO."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    validate = "when_supported" if checksum_mode() == "sha256" else "when_required"
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                    max_pool_connections=max_pool_connections, connect_timeout=10,
                    read_timeout=60, s3={"addressing_style": "path"} if endpoint else None,
                    request_checksum_calculation="when_required",  # no CRC32 of boto3's own
                    response_checksum_validation=validate)
    # a fresh session: boto3's default session caches credentials from the first call
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region,
                                          config=config)


def transfer_config(jobs: int = 8):
    """Parallel multipart transfers: 8 MiB parts, ``jobs`` threads."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                          max_concurrency=max(1, jobs), use_threads=True)


def retry_budget_s() -> float:
    """Seconds an interrupted transfer keeps retrying (``GPUNET_S3_RETRY_SECONDS``, default 300)."""
    raw = os.environ.get("GPUNET_S3_RETRY_SECONDS", "300")
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"GPUNET_S3_RETRY_SECONDS={raw!r} is not a number of seconds") from None
    if value < 0:
        raise StorageError(f"GPUNET_S3_RETRY_SECONDS={raw!r} must be >= 0")
    return value


def is_transient(exc: BaseException) -> bool:
    """Connection trouble or a 5xx/throttling reply: worth retrying (credentials are not)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError
                      | ConnectTimeoutError | ResponseStreamingError | ConnectionError):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling")
        if isinstance(exc, S3UploadFailedError) and any(
                word in str(exc) for word in ("Connection", "connect", "timed out", "endpoint")):
            return True
        if isinstance(exc, RetriesExceededError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def with_retries(action: str, uri: S3Uri | str, attempt: Callable[[], object], *,
                 budget_s: float | None = None, first_delay_s: float = 1.0,
                 max_delay_s: float = 30.0):
    """Call ``attempt()`` until it succeeds, retrying transient S3 errors with backoff.

    Waits 1, 2, 4, ... s (with jitter, capped at ``max_delay_s``) while the total stays within
    ``budget_s`` (default :func:`retry_budget_s`); a non-transient error is raised at once.
    Every failure is translated by :func:`storage_error`.
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    start = time.monotonic()
    delay, tries = first_delay_s, 0
    while True:
        tries += 1
        try:
            return attempt()
        except _boto_errors() as exc:
            elapsed = time.monotonic() - start
            if not is_transient(exc):
                raise storage_error(exc, uri, action) from None
            if elapsed + delay > budget:
                err = storage_error(exc, uri, action)
                raise StorageError(
                    f"{err} -- still failing after {tries} attempt(s) over {elapsed:.0f} s "
                    f"(retry budget GPUNET_S3_RETRY_SECONDS={budget:g}); nothing incomplete is "
                    "visible under the final keys: fix the store and re-run to resume") from None
            wait = min(max_delay_s, delay) * random.uniform(0.8, 1.2)
            log.warning("%s %s: S3 unavailable (%s); retry %d in %.1f s", action, uri,
                        str(exc).splitlines()[0][:160], tries, wait)
            time.sleep(wait)
            delay *= 2


def local_checksum(path: Path, part_size: int = PART_SIZE) -> str:
    """The SHA-256 checksum S3 stores for ``path`` uploaded with our transfer config.

    Single-part objects: base64(sha256(data)); multipart ones (size >= ``part_size``, as
    s3transfer decides): the composite base64(sha256(concat(sha256(part)))) of the parts.
    """
    whole, parts = _part_digests(path, part_size, hashlib.sha256)
    return base64.b64encode(whole if parts is None else hashlib.sha256(parts).digest()).decode()


def local_etag(path: Path, part_size: int = PART_SIZE) -> str:
    """The ETag S3 gives ``path`` uploaded with our transfer config and no checksum.

    Single part: md5 hex; multipart (size >= ``part_size``): md5(concat(md5(part))) hex + ``-N``.
    """
    whole, parts = _part_digests(path, part_size, hashlib.md5)
    if parts is None:
        return whole.hex()
    return f"{hashlib.md5(parts).hexdigest()}-{len(parts) // hashlib.md5().digest_size}"


def _part_digests(path: Path, part_size: int, algo) -> tuple[bytes, bytes | None]:
    """(digest of the whole file, None) below ``part_size``; else (b"", concatenated part
    digests). s3transfer uploads a file of exactly ``part_size`` as one part of a multipart."""
    multipart = path.stat().st_size >= part_size
    whole, parts = algo(), []
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            if multipart:
                parts.append(algo(chunk).digest())
            else:
                whole.update(chunk)
    return (b"", b"".join(parts)) if multipart else (whole.digest(), None)


def remote_checksum(uri: S3Uri, client) -> str | None:
    """The object's stored SHA-256 checksum (composite ``-N`` suffix dropped), or None."""
    head = client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
    value = head.get("ChecksumSHA256")
    return value.split("-")[0] if value else None


def remote_etag(uri: S3Uri, client) -> str | None:
    """The object's ETag without quotes (compared with :func:`local_etag` in ``off`` mode)."""
    value = client.head_object(Bucket=uri.bucket, Key=uri.key).get("ETag")
    return value.strip('"') if value else None


def verify_checksums(files: list[tuple[Path, str]], dest: S3Uri, client, jobs: int = 8) -> list[str]:
    """Keys (relative to ``dest``) whose stored checksum differs from the local file's.

    SHA-256 against ``ChecksumSHA256``, or with ``GPUNET_S3_CHECKSUM=off`` MD5 against the ETag.
    """
    local, remote_of = ((local_checksum, remote_checksum) if checksum_mode() == "sha256"
                        else (local_etag, remote_etag))

    def check(item: tuple[Path, str]) -> str | None:
        path, rel = item
        remote = with_retries("verify", dest.join(rel), lambda: remote_of(dest.join(rel), client))
        return None if remote == local(path) else rel

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [rel for rel in pool.map(check, files) if rel is not None]


def storage_error(exc: Exception, uri: S3Uri | str, action: str) -> StorageError:
    """Translate a botocore exception into a message that says what to fix."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = f"{action} {uri}"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO-style stores)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{where}: cannot reach the S3 endpoint ({exc}); check "
                            "AWS_ENDPOINT_URL / --s3-endpoint")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = uri.bucket if isinstance(uri, S3Uri) else str(uri)
        if code in ("NoSuchBucket",) or (code == "404" and action == "open bucket"):
            return StorageError(f"{where}: bucket {bucket!r} does not exist; create it or fix "
                                "the bucket name in the URI")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"):
            return StorageError(f"{where}: S3 rejected the credentials ({code}); check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return StorageError(f"{where}: access denied; the credentials in use lack "
                                "permission for this bucket/prefix (or they are wrong)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{where}: object not found")
        return StorageError(f"{where}: S3 error {code or status}: {err.get('Message', exc)}")
    return StorageError(f"{where}: {exc}")


def _boto_errors() -> tuple[type[Exception], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import (
        RetriesExceededError,
        S3DownloadFailedError,
        S3UploadFailedError,
    )

    return (BotoCoreError, ClientError, Boto3Error, RetriesExceededError, S3UploadFailedError,
            S3DownloadFailedError)


def check_bucket(uri: S3Uri, client=None) -> None:
    """Fail early and clearly when the bucket is missing or the credentials are refused."""
    client = client or s3_client()
    try:
        client.head_bucket(Bucket=uri.bucket)
    except _boto_errors() as exc:
        # HEAD replies carry no error code; a GET tells wrong credentials from missing rights
        try:
            client.list_objects_v2(Bucket=uri.bucket, MaxKeys=1)
        except _boto_errors() as detailed:
            raise storage_error(detailed, uri, "open bucket") from None
        raise storage_error(exc, uri, "open bucket") from None


def list_objects(uri: S3Uri, client=None) -> dict[str, int]:
    """``{key relative to the prefix: size}`` of every object under ``uri``'s prefix."""
    client = client or s3_client()
    try:
        return _list(uri, client)
    except _boto_errors() as exc:
        raise storage_error(exc, uri, "list") from None


def _list(uri: S3Uri, client) -> dict[str, int]:
    out: dict[str, int] = {}
    prefix = uri.prefix
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket,
                                                                  Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = int(obj["Size"])
    return out


def object_exists(uri: S3Uri, client=None) -> bool:
    client = client or s3_client()
    try:
        client.head_object(Bucket=uri.bucket, Key=uri.key)
        return True
    except _boto_errors() as exc:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in (
                "404", "NoSuchKey", "NotFound"):
            return False
        raise storage_error(exc, uri, "stat") from None


def read_bytes(uri: S3Uri, client=None) -> bytes:
    client = client or s3_client()
    try:
        return client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except _boto_errors() as exc:
        raise storage_error(exc, uri, "read") from None


def upload_files(files: Iterable[tuple[Path, str]], dest: S3Uri, *, client=None, jobs: int = 8,
                 skip_existing: bool = True, progress: bool = True,
                 retry_budget: float | None = None) -> int:
    """Upload ``(local path, key relative to dest)`` pairs in parallel, then verify.

    Objects already present with the same size are skipped (resume). Each upload carries a
    SHA-256 checksum the server checks (unless ``GPUNET_S3_CHECKSUM=off``); afterwards every
    uploaded object's stored checksum (or ETag) must equal the local file's and every file must
    be listed with its size, else StorageError. An outage mid-transfer is retried with backoff
    (see :func:`with_retries`), each round sending only what has not landed yet. Returns the
    number of files actually uploaded.
    """
    client = client or s3_client(max_pool_connections=max(10, jobs * 2))
    check_bucket(dest, client)  # fail fast on a wrong endpoint/bucket/credentials
    files = [(Path(p), rel) for p, rel in files]
    present = list_objects(dest, client) if skip_existing else {}
    todo = [(p, rel) for p, rel in files if present.get(rel) != p.stat().st_size]
    remaining = list(todo)

    def send() -> None:
        nonlocal remaining
        if len(remaining) < len(todo):  # a retry: skip what landed in the previous round
            landed = _list(dest, client)
            remaining = [(p, rel) for p, rel in remaining if landed.get(rel) != p.stat().st_size]
        _transfer_up(remaining, dest, client, jobs, progress)
        remaining = []

    with_retries("upload to", dest, send, budget_s=retry_budget)
    bad = verify_checksums(todo, dest, client, jobs)
    landed = with_retries("list", dest, lambda: _list(dest, client), budget_s=retry_budget)
    bad += [rel for p, rel in files if landed.get(rel) != p.stat().st_size and rel not in bad]
    if bad:
        raise StorageError(f"upload to {dest} could not be verified: {len(bad)} object(s) missing "
                           f"or with the wrong checksum/size (first: {bad[0]}); re-run to resume")
    return len(todo)


def _transfer_up(files: list[tuple[Path, str]], dest: S3Uri, client, jobs: int,
                 progress: bool) -> None:
    """One round of parallel uploads, with server-verified SHA-256 checksums unless they are off."""
    from boto3.s3.transfer import create_transfer_manager

    window = max(64, jobs * 16)
    extra = {"ChecksumAlgorithm": CHECKSUM} if checksum_mode() == "sha256" else {}
    with create_transfer_manager(client, transfer_config(jobs)) as manager, tqdm(
            total=len(files), unit="file", desc=f"upload {dest}", disable=not progress,
            leave=False) as bar:
        pending = []
        for path, rel in files:
            pending.append(manager.upload(str(path), dest.bucket, dest.join(rel).key,
                                          extra_args=extra))
            if len(pending) >= window:
                for fut in pending:
                    fut.result()
                    bar.update()
                pending = []
        for fut in pending:
            fut.result()
            bar.update()


def upload_dir(local_dir: str | Path, uri: str | S3Uri, *, exclude: Iterable[str] = (),
               **kwargs) -> int:
    """Upload every file under ``local_dir`` to the prefix ``uri`` (see :func:`upload_files`)."""
    root = Path(local_dir)
    dest = parse_s3_uri(uri) if isinstance(uri, str) else uri
    skip = set(exclude)
    files = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
             if p.is_file() and p.relative_to(root).as_posix() not in skip]
    return upload_files(files, dest, **kwargs)


def upload_file(path: str | Path, uri: str | S3Uri, *, client=None) -> None:
    """Upload one file to exactly ``uri`` and verify its size."""
    dest = parse_s3_uri(uri) if isinstance(uri, str) else uri
    key = dest.key.rstrip("/")
    parent, _, name = key.rpartition("/")
    upload_files([(Path(path), name)], S3Uri(dest.bucket, parent), client=client, jobs=4,
                 skip_existing=False, progress=False)


def download(uri: str, dest: str | Path, *, client=None, jobs: int = 8,
             progress: bool = True) -> Path:
    """Download an object or a whole prefix into the local directory ``dest``.

    An object ``s3://b/path/to/x.pth`` lands at ``dest/x.pth`` and that file path is returned;
    a prefix ``s3://b/data/`` lands under ``dest/`` keeping relative keys, and ``dest`` is
    returned. Files already present with the right size are not fetched again (a cache);
    boto3 writes each file under a temporary name and renames it when complete.
    """
    from boto3.s3.transfer import create_transfer_manager

    src = parse_s3_uri(uri)
    dest = Path(dest)
    client = client or s3_client(max_pool_connections=max(10, jobs * 2))
    check_bucket(src, client)
    single = bool(src.key) and not src.key.endswith("/") and object_exists(src, client)
    if single:
        objects = {src.key.rsplit("/", 1)[-1]: _object_size(src, client)}
        base = S3Uri(src.bucket, src.key.rsplit("/", 1)[0] if "/" in src.key else "")
    else:
        objects = list_objects(src, client)
        base = src
        if not objects:
            raise StorageError(f"nothing found at {uri}: no such object and no objects under "
                               "that prefix; check the path")

    def fetch() -> None:
        todo = {rel: size for rel, size in objects.items() if not rel.endswith("/") and not (
            (dest / rel).is_file() and (dest / rel).stat().st_size == size)}
        with create_transfer_manager(client, transfer_config(jobs)) as manager, tqdm(
                total=len(todo), unit="file", desc=f"download {uri}", disable=not progress,
                leave=False) as bar:
            futures = []
            for rel in todo:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                futures.append(manager.download(base.bucket, base.join(rel).key, str(target)))
            for fut in futures:
                fut.result()
                bar.update()

    with_retries("download", src, fetch)  # each round fetches only what is still missing
    return dest / next(iter(objects)) if single else dest


def _object_size(uri: S3Uri, client) -> int:
    try:
        return int(client.head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"])
    except _boto_errors() as exc:
        raise storage_error(exc, uri, "stat") from None


def fetch_file(uri: str | os.PathLike, cache_dir: str | Path | None = None) -> Path:
    """A local path for a file or ``s3://`` object; objects are always fetched fresh.

    (Training checkpoints keep their size from epoch to epoch, so the size-based cache of
    :func:`download` could serve a stale copy.)
    """
    if not is_s3_uri(uri):
        return Path(uri)
    src = parse_s3_uri(str(uri))
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "files"
    dest = cache / src.bucket / str(Path(src.key).parent)
    (dest / Path(src.key).name).unlink(missing_ok=True)
    return download(str(uri), dest, progress=False)


def default_cache_dir() -> Path:
    """``$GPUNET_CACHE_DIR`` or ``~/.cache/gpunet``."""
    return Path(os.environ.get("GPUNET_CACHE_DIR", Path.home() / ".cache" / "gpunet"))


def fetch_objects(base: S3Uri, rels: Iterable[str], dest: str | Path, *, client=None,
                  jobs: int = 8, progress: bool = True) -> dict[str, str]:
    """Download exactly the objects ``base/<rel>`` to ``dest/<rel>`` (no listing) and return
    ``{rel: SHA-256 hex}`` of what arrived, hashed while it streamed in.

    For many small objects (dataset images): one GET each, ``jobs`` at a time. Each object goes
    to a temp file beside its target and is renamed into place only when complete, so an
    interrupted run leaves no partial file under a final name; transient errors are retried per
    object (:func:`with_retries`).
    """
    rels = list(rels)
    root = Path(dest)
    client = client or s3_client(max_pool_connections=max(10, jobs * 2))

    def fetch(rel: str) -> str:
        uri = base.join(rel)

        def attempt() -> str:
            digest = hashlib.sha256()
            with atomic_path(root / rel) as tmp, open(tmp, "wb") as fh:
                body = client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"]
                for chunk in body.iter_chunks(MiB):
                    digest.update(chunk)
                    fh.write(chunk)
            return digest.hexdigest()

        return with_retries("download", uri, attempt)

    out: dict[str, str] = {}
    window = max(1, jobs) * 16  # bounded look-ahead: a million keys are not a million futures
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, tqdm(
            total=len(rels), unit="file", desc=f"download {base}", disable=not progress,
            leave=False) as bar:
        pending: dict = {}
        try:
            for rel in [*rels, None]:
                if rel is not None:
                    pending[pool.submit(fetch, rel)] = rel
                while pending and (len(pending) >= window or rel is None):
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        out[pending.pop(fut)] = fut.result()
                        bar.update()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return out
