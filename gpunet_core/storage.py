"""S3 object storage through boto3: URIs, client, parallel upload-then-verify, download to a cache.

Settings come the standard way: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other
boto3 credential source), endpoint from ``AWS_ENDPOINT_URL`` or an explicit ``endpoint`` argument
(MinIO-style stores). Large files go up as parallel multipart uploads (boto3 ``TransferConfig``),
transient failures are retried by botocore's retry config, and every upload is verified by
listing what landed (key set and sizes) before the caller writes its completion marker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpunet_core.errors import StorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


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
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                    max_pool_connections=max_pool_connections, connect_timeout=10,
                    read_timeout=60, s3={"addressing_style": "path"} if endpoint else None)
    # a fresh session: boto3's default session caches credentials from the first call
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region,
                                          config=config)


def transfer_config(jobs: int = 8):
    """Parallel multipart transfers: 8 MiB parts, ``jobs`` threads."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                          max_concurrency=max(1, jobs), use_threads=True)


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
    out: dict[str, int] = {}
    prefix = uri.prefix
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket,
                                                                      Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = int(obj["Size"])
    except _boto_errors() as exc:
        raise storage_error(exc, uri, "list") from None
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
                 skip_existing: bool = True, progress: bool = True) -> int:
    """Upload ``(local path, key relative to dest)`` pairs in parallel, then verify.

    Objects already present with the same size are skipped (resume). After the upload the
    prefix is listed and every file must be there with its local size, else StorageError.
    Returns the number of files actually uploaded.
    """
    from boto3.s3.transfer import create_transfer_manager
    from tqdm import tqdm

    client = client or s3_client(max_pool_connections=max(10, jobs * 2))
    check_bucket(dest, client)
    files = [(Path(p), rel) for p, rel in files]
    present = list_objects(dest, client) if skip_existing else {}
    todo = [(p, rel) for p, rel in files if present.get(rel) != p.stat().st_size]
    window = max(64, jobs * 16)
    try:
        with create_transfer_manager(client, transfer_config(jobs)) as manager, tqdm(
                total=len(todo), unit="file", desc=f"upload {dest}", disable=not progress,
                leave=False) as bar:
            pending = []
            for path, rel in todo:
                pending.append(manager.upload(str(path), dest.bucket, dest.join(rel).key))
                if len(pending) >= window:
                    for fut in pending:
                        fut.result()
                        bar.update()
                    pending = []
            for fut in pending:
                fut.result()
                bar.update()
    except _boto_errors() as exc:
        raise storage_error(exc, dest, "upload to") from None
    landed = list_objects(dest, client)
    bad = [rel for p, rel in files if landed.get(rel) != p.stat().st_size]
    if bad:
        raise StorageError(f"upload to {dest} could not be verified: {len(bad)} object(s) missing "
                           f"or with the wrong size (first: {bad[0]}); re-run to resume")
    return len(todo)


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
    from tqdm import tqdm

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
    todo = {rel: size for rel, size in objects.items() if not rel.endswith("/") and not (
        (dest / rel).is_file() and (dest / rel).stat().st_size == size)}
    try:
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
    except _boto_errors() as exc:
        raise storage_error(exc, src, "download") from None
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
