"""S3 datasets through the per-node cache (gpunet_core.data.cache), against the real S3 server.

Requests are observed with a botocore event hook on the real clients (what was asked of the
server, nothing answered for it); the server itself is never mocked.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from gpunet_core.data.cache import MARKER, cache_path, local_dataset
from gpunet_core.data.prepare import prepare_digits
from gpunet_core.training.outputs import manifest_checksum
from gpunet_core.utils import storage
from gpunet_core.utils.errors import DataError
from tests.train_helpers import FAST, gpunet_cmd, run


@pytest.fixture
def dataset(s3_env, tmp_path) -> str:
    """The digits set (8 per class: 64 train / 16 val) prepared to a fresh S3 prefix."""
    uri = f"s3://{s3_env.bucket}/ds-{uuid.uuid4().hex[:10]}"
    prepare_digits(uri, img_size=32, per_class=8, work_dir=tmp_path / "stage")
    return uri


@pytest.fixture
def requests(monkeypatch) -> list[tuple[str, str]]:
    """``(operation, key)`` of every S3 call made by clients from ``storage.s3_client``."""
    seen: list[tuple[str, str]] = []
    real = storage.s3_client

    def observed(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register(
            "before-parameter-build.s3",
            lambda params, model, **_: seen.append((model.name, params.get("Key", ""))))
        return client

    monkeypatch.setattr(storage, "s3_client", observed)
    return seen


def _listing(s3, uri: str) -> dict[str, str]:
    """``{relative path: sha256}`` from the dataset's SHA256SUMS, read straight from S3."""
    src = storage.parse_s3_uri(uri)
    body = s3.client().get_object(Bucket=src.bucket, Key=f"{src.key}/SHA256SUMS")["Body"].read()
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in body.decode().splitlines()}


def _object(s3, uri: str, rel: str) -> bytes:
    src = storage.parse_s3_uri(uri)
    return s3.client().get_object(Bucket=src.bucket, Key=f"{src.key}/{rel}")["Body"].read()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gets(requests, prefix: str = "") -> list[str]:
    return sorted(key for op, key in requests if op == "GetObject" and key.startswith(prefix))


def test_downloads_verifies_then_reuses_without_touching_the_data(dataset, s3_env, requests):
    listed = _listing(s3_env, dataset)
    root = local_dataset(dataset, progress=False)
    src = storage.parse_s3_uri(dataset)
    assert root == Path(os.environ["GPUNET_CACHE_DIR"]) / "datasets" / src.bucket / src.key
    # exactly the listed images + SHA256SUMS + manifest.json, each fetched once; no listing
    assert _gets(requests) == sorted(f"{src.key}/{rel}" for rel in
                                     [*listed, "SHA256SUMS", "manifest.json"])
    assert not any(op.startswith("List") for op, _ in requests)
    assert _files(root) == {*listed, "SHA256SUMS", "manifest.json", MARKER}
    assert {rel: _sha(root / rel) for rel in listed} == listed
    manifest = json.loads(_object(s3_env, dataset, "manifest.json"))
    assert (root / MARKER).read_text().strip() == manifest["checksum"]
    # the MLflow param dataset_manifest_sha256 of an S3 dataset: the S3 manifest's own hash
    assert manifest_checksum(root) == hashlib.sha256(
        _object(s3_env, dataset, "manifest.json")).hexdigest()

    # second call: the marker matches, so only the manifest is read; prove the images are not
    # needed any more by deleting them from S3, and that no file was rewritten (same inodes)
    inodes = {rel: (root / rel).stat().st_ino for rel in listed}
    s3_env.client().delete_objects(Bucket=src.bucket, Delete={"Objects": [
        {"Key": f"{src.key}/{rel}"} for rel in listed]})
    requests.clear()
    assert local_dataset(dataset, progress=False) == root
    assert local_dataset(f"{dataset}/val", progress=False) == root / "val"  # one split
    assert _gets(requests) == [f"{src.key}/manifest.json"] * 2
    assert not any(op.startswith("List") for op, _ in requests)
    assert {rel: (root / rel).stat().st_ino for rel in listed} == inodes


def test_an_interrupted_or_damaged_copy_is_repaired(dataset, s3_env, requests):
    listed = _listing(s3_env, dataset)
    root = local_dataset(dataset, progress=False)
    corrupt, missing = sorted(listed)[:2]
    data = bytearray((root / corrupt).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: a size check would not notice
    (root / corrupt).write_bytes(bytes(data))
    (root / missing).unlink()
    stray = root / "train" / "0" / ".x.JPEG.tmp.JPEG"  # what a killed download leaves
    stray.write_bytes(b"partial")
    (root / MARKER).unlink()  # an interrupted sync never wrote it
    requests.clear()
    assert local_dataset(dataset, progress=False) == root
    key = storage.parse_s3_uri(dataset).key
    assert _gets(requests, f"{key}/train/") + _gets(requests, f"{key}/val/") == sorted(
        f"{key}/{rel}" for rel in (corrupt, missing))  # only those two, each once
    assert {rel: _sha(root / rel) for rel in listed} == listed
    assert not stray.exists() and (root / MARKER).is_file()


def test_a_re_prepared_dataset_is_re_synced(dataset, s3_env, requests, tmp_path):
    old = _listing(s3_env, dataset)
    root = local_dataset(dataset, progress=False)
    src = storage.parse_s3_uri(dataset)
    objects = s3_env.client().list_objects_v2(Bucket=src.bucket, Prefix=f"{src.key}/")
    s3_env.client().delete_objects(Bucket=src.bucket, Delete={"Objects": [
        {"Key": o["Key"]} for o in objects["Contents"]]})
    prepare_digits(dataset, img_size=32, per_class=6, work_dir=tmp_path / "stage2")
    new = _listing(s3_env, dataset)
    assert set(old) - set(new)  # some files are gone in the new version
    requests.clear()
    assert local_dataset(dataset, progress=False) == root
    assert _files(root) == {*new, "SHA256SUMS", "manifest.json", MARKER}
    assert {rel: _sha(root / rel) for rel in new} == new
    changed = [rel for rel, digest in new.items() if old.get(rel) != digest]
    assert _gets(requests, f"{src.key}/train/") + _gets(requests, f"{src.key}/val/") == sorted(
        f"{src.key}/{rel}" for rel in changed)  # unchanged files were kept, not fetched


def test_a_damaged_object_in_s3_is_an_error_naming_it(dataset, s3_env, requests):
    rel = sorted(_listing(s3_env, dataset))[-1]
    src = storage.parse_s3_uri(dataset)
    good = _object(s3_env, dataset, rel)
    s3_env.client().put_object(Bucket=src.bucket, Key=f"{src.key}/{rel}",
                               Body=bytes(reversed(good)))
    with pytest.raises(DataError, match=rf"{dataset}/{rel}: SHA-256 .* does not match "
                                        r"SHA256SUMS .* after 2 downloads.*gpunet prepare"):
        local_dataset(dataset, progress=False)
    assert _gets(requests, f"{src.key}/{rel}") == [f"{src.key}/{rel}"] * 2  # re-fetched once
    root = cache_path(src)
    assert not (root / MARKER).exists() and not (root / rel).exists()


def test_a_prefix_without_a_manifest_says_how_to_prepare_it(s3_env):
    uri = f"s3://{s3_env.bucket}/not-prepared-{uuid.uuid4().hex[:8]}"
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{uri.split('/', 3)[3]}/train/x.JPEG",
                               Body=b"x")
    with pytest.raises(DataError, match=rf"no prepared dataset at {uri}: manifest.json missing "
                                        r"\(incomplete or not prepared\); run `gpunet prepare "
                                        rf"\.\.\. --out {uri}`"):
        local_dataset(uri, progress=False)
    assert local_dataset("some/local/dir") == Path("some/local/dir")  # local: as it is


def _sync_in_child(uri: str, barrier, results) -> None:
    keys: list[str] = []
    real = storage.s3_client

    def observed(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register(
            "before-parameter-build.s3.GetObject",
            lambda params, **_: keys.append(params["Key"]))
        return client

    storage.s3_client = observed
    barrier.wait(timeout=60)
    try:
        results.put((str(local_dataset(uri, progress=False)), keys))
    except Exception as exc:  # reported to the test, which fails on it
        results.put(("error", repr(exc)))


def test_concurrent_processes_on_a_node_download_once(dataset, s3_env):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_sync_in_child, args=(dataset, barrier, results))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert all(path != "error" for path, _ in got), got
    key = storage.parse_s3_uri(dataset).key
    listed = _listing(s3_env, dataset)
    images = [sorted(k for k in keys if k.split("/", 1)[1] in listed) for _, keys in got]
    assert sorted(images, key=len) == [[], sorted(f"{key}/{rel}" for rel in listed)]
    assert got[0][0] == got[1][0]
    assert {rel: _sha(Path(got[0][0]) / rel) for rel in listed} == listed


@pytest.mark.slow
def test_train_and_validate_on_s3_data(dataset, s3_env, tmp_path):
    from gpunet_core import steps

    out = f"{dataset}-run"
    result = run(gpunet_cmd("train", dataset, "--model", "gpunet_0", "--epochs", "1",
                            "--output", out, *FAST), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cache = cache_path(storage.parse_s3_uri(dataset))
    assert f"dataset {dataset}: local copy at {cache}" in result.stderr
    run_key = storage.parse_s3_uri(out).key
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(
        Bucket=s3_env.bucket, Prefix=f"{run_key}/")["Contents"]}
    assert {f"{run_key}/last.pth.tar", f"{run_key}/result.json"} <= keys
    ckpt = f"{out}/last.pth.tar"
    results_file = tmp_path / "val.json"
    common = ["--model", "gpunet_0", "--checkpoint", ckpt, "--img-size", "32", "-b", "16",
              "-j", "0", "--device", "cpu", "--no-progress"]
    # a split (what the pipeline passes) and the dataset root (its val/) give the same numbers
    result = run(gpunet_cmd("validate", f"{dataset}/val", *common, "--results-file",
                            str(results_file)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(results_file.read_text())
    assert figures["images"] == 16 and figures["data"] == f"{dataset}/val"
    step = steps.validate(dataset, ckpt, model="gpunet_0", img_size=32, batch_size=16)
    assert (step["images"], step["top1"]) == (figures["images"], figures["top1"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BROKEN = {
    "wrong bucket": ({}, "bucket 'no-such-bucket-x' does not exist"),
    "no credentials": ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
                       "no S3 credentials found"),
    "unreachable endpoint": ({"AWS_ENDPOINT_URL": "closed"}, "cannot reach the S3 endpoint"),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_s3_problems_fail_fast_with_one_line(s3_env, tmp_path, monkeypatch, case, command):
    settings, message = BROKEN[case]
    # nowhere else to find credentials either: no ~/.aws files, no instance metadata
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in settings.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, f"http://127.0.0.1:{_closed_port()}")
    bucket = "no-such-bucket-x" if case == "wrong bucket" else s3_env.bucket
    data = f"s3://{bucket}/digits"
    out = tmp_path / "run"
    if command == "train":
        args = ["train", data, "--output", str(out), "--epochs", "1", *FAST]
    else:  # (the results file's folder exists: the S3 problem is the one to report)
        args = ["validate", data, "--model", "gpunet_0", "--device", "cpu", "--results-file",
                str(tmp_path / "val.json")]
    started = time.monotonic()
    result = run(gpunet_cmd(*args), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert time.monotonic() - started < 20
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpunet {command}: error: open bucket {data}: {message}"), last
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "val.json").exists()
    assert not (Path(os.environ["GPUNET_CACHE_DIR"]) / "datasets").exists()
