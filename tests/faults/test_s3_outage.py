"""S3 stopped in the middle of a dataset upload and of a checkpoint upload, then restarted.

The store is a real moto_server; a TcpProxy in front of it stops serving after a given number of
bytes (connections reset, then refused) and comes back later. The end state is checked through a
direct connection to the store: every object complete and checksum-verified, the dataset's
manifest (its completion marker) written last, nothing half-uploaded visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from gpunet_core.models.checkpoint import read_checkpoint
from tests.train_helpers import FAST, gpunet_cmd, run

pytestmark = [pytest.mark.faults, pytest.mark.slow]
PER_CLASS = 12
IMAGES = 10 * PER_CLASS


def stored_objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` read directly from the store (not through the proxy)."""
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix) for o in page.get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read()
            for k in keys}


def assert_checksums_stored_and_right(s3, prefix: str, objects: dict[str, bytes]) -> None:
    """The server-side SHA-256 of each object is present and matches its bytes."""
    from gpunet_core.utils.storage import PART_SIZE

    client = s3.client()
    for rel, data in objects.items():
        head = client.head_object(Bucket=s3.bucket, Key=prefix + rel, ChecksumMode="ENABLED")
        stored = head.get("ChecksumSHA256", "").split("-")[0]
        if len(data) <= PART_SIZE:
            expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
        else:
            parts = [hashlib.sha256(data[i:i + PART_SIZE]).digest()
                     for i in range(0, len(data), PART_SIZE)]
            expected = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        assert stored == expected, rel


def retries_logged(text: str) -> int:
    return text.count("S3 unavailable")


def prepare_digits_to_s3(uri: str, work, **env):
    return run(gpunet_cmd("prepare", "digits", "--img-size", "32", "--per-class", str(PER_CLASS),
                          "--out", uri, "--work-dir", str(work), "--no-progress"),
               timeout=600, **env)


def test_dataset_upload_survives_s3_restart(proxied_s3_env, s3_proxy, tmp_path, observe):
    s3 = proxied_s3_env
    prefix = "faults/dataset-restart/"
    s3_proxy.cut_after(40_000, outage_s=8.0)  # mid-upload: ~1/5 of the images are in
    started = time.monotonic()
    result = prepare_digits_to_s3(f"s3://{s3.bucket}/{prefix}", tmp_path / "stage")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert s3_proxy.downs == 1
    objects = stored_objects(s3, prefix)
    sums = dict(line.split("  ", 1)[::-1] for line in
                objects["SHA256SUMS"].decode().splitlines())
    images = {rel: data for rel, data in objects.items() if rel.endswith(".jpg")}
    assert len(images) == len(sums) == IMAGES
    for rel, data in images.items():  # content equals the checksum list written at prepare
        assert hashlib.sha256(data).hexdigest() == sums[rel], rel
    assert_checksums_stored_and_right(s3, prefix, objects)
    assert json.loads(objects["manifest.json"])["format"] == "gpunet-imagefolder/1"
    observe({"fault": f"S3 stopped during a dataset upload ({IMAGES} images), back after 8 s",
             "injected": 1, "outcome": f"upload completed; {IMAGES}/{IMAGES} images "
             "checksum-verified; manifest written after them",
             "client_retries_logged": retries_logged(result.stderr),
             "seconds": round(took, 1)})


def test_s3_down_past_retry_budget_fails_clearly_then_resumes(proxied_s3_env, s3_proxy,
                                                              tmp_path, observe):
    s3 = proxied_s3_env
    prefix = "faults/dataset-budget/"
    uri = f"s3://{s3.bucket}/{prefix}"
    s3_proxy.cut_after(40_000, outage_s=None)  # never comes back
    started = time.monotonic()
    failed = prepare_digits_to_s3(uri, tmp_path / "stage", GPUNET_S3_RETRY_SECONDS="5")
    took = time.monotonic() - started
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "retry budget GPUNET_S3_RETRY_SECONDS=5" in failed.stderr, failed.stderr[-2000:]
    assert "re-run to resume" in failed.stderr
    partial = stored_objects(s3, prefix)
    assert "manifest.json" not in partial  # the dataset is not marked complete
    assert 0 < len(partial) < IMAGES + 1
    assert_checksums_stored_and_right(s3, prefix, partial)  # what is there is whole

    s3_proxy.up()
    resumed = prepare_digits_to_s3(uri, tmp_path / "stage")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    objects = stored_objects(s3, prefix)
    assert "manifest.json" in objects and len(objects) == IMAGES + 2  # + SHA256SUMS, manifest
    assert_checksums_stored_and_right(s3, prefix, objects)
    unchanged = sum(objects[k] == v for k, v in partial.items())
    observe({"fault": "S3 stopped during a dataset upload and not restarted (budget 5 s)",
             "injected": 1, "outcome": f"exit {failed.returncode} after {took:.0f} s with "
             f"'retry budget' message; {len(partial)} complete objects, no manifest; re-run "
             f"resumed and completed", "objects_before_resume": len(partial),
             "objects_kept_from_first_try": unchanged})


def test_checkpoint_upload_survives_s3_restart(proxied_s3_env, s3_proxy, digits_small, tmp_path,
                                               observe):
    s3 = proxied_s3_env
    prefix = "faults/train-restart/"
    # a small timm model keeps the checkpoint at a few MiB (two 8 MiB parts would need more)
    s3_proxy.cut_after(3_000_000, outage_s=6.0)  # inside the first epoch's checkpoint upload
    result = run(gpunet_cmd("train", str(digits_small), "--model", "mobilenetv3_small_050",
                            "--epochs", "2", "--output", f"s3://{s3.bucket}/{prefix}", *FAST),
                 timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert s3_proxy.downs == 1
    objects = stored_objects(s3, prefix)
    assert {"last.pth.tar", "model_best.pth.tar", "summary.csv"} <= set(objects)
    assert_checksums_stored_and_right(s3, prefix, objects)
    (tmp_path / "last.pth.tar").write_bytes(objects["last.pth.tar"])
    assert read_checkpoint(tmp_path / "last.pth.tar")["epoch"] == 2
    rows = objects["summary.csv"].decode().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1]
    observe({"fault": "S3 stopped during a checkpoint upload in training, back after 6 s",
             "injected": 1, "outcome": "training finished; last/best checkpoints and "
             "summary.csv complete and checksum-verified; epochs [0, 1] once each",
             "client_retries_logged": retries_logged(result.stderr),
             "checkpoint_bytes": len(objects["last.pth.tar"])})
