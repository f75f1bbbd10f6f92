"""The S3 server SIGKILLed in the middle of uploads, then started again on its data directory.

The store is the session's real SeaweedFS process; the fault is a real crash of it
(:meth:`tests.s3_server.S3Server.kill`) and a restart on the same disk and port. In-process
uploads are killed from a botocore hook at an exact request; uploads from a ``gpunet`` process
go through a TcpProxy that only meters bytes, so that the kill lands at a byte count inside the
transfer. The end state is read directly from the store: every object complete and
checksum-verified, the dataset's manifest (its completion marker) written last, nothing
half-uploaded visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import threading
import time

import pytest

from gpunet_core.models.checkpoint import read_checkpoint
from gpunet_core.utils import storage
from tests.train_helpers import FAST, REPO, env, gpunet_cmd, run

pytestmark = [pytest.mark.faults, pytest.mark.slow]
PER_CLASS = 12
IMAGES = 10 * PER_CLASS


def stored_keys(s3, prefix: str) -> list[str]:
    """Every key under ``prefix``, listed directly from the store (not through the proxy)."""
    return [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix) for o in page.get("Contents", [])]


def stored_objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` read directly from the store."""
    client = s3.client()
    return {k[len(prefix):]: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read()
            for k in stored_keys(s3, prefix)}


def assert_checksums_stored_and_right(s3, prefix: str, objects: dict[str, bytes]) -> None:
    """The server-side SHA-256 of each object is present and matches its bytes (composite of
    8 MiB parts from 8 MiB on: s3transfer's multipart threshold)."""
    part = storage.PART_SIZE
    client = s3.client()
    for rel, data in objects.items():
        head = client.head_object(Bucket=s3.bucket, Key=prefix + rel, ChecksumMode="ENABLED")
        stored = head.get("ChecksumSHA256", "").split("-")[0]
        if len(data) < part:
            expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
        else:
            parts = [hashlib.sha256(data[i:i + part]).digest() for i in range(0, len(data), part)]
            expected = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        assert stored == expected, rel


def retries_logged(text: str) -> int:
    return text.count("S3 unavailable")


def prepare_digits_to_s3(uri: str, work, **env_vars):
    return run(gpunet_cmd("prepare", "digits", "--img-size", "32", "--per-class", str(PER_CLASS),
                          "--out", uri, "--work-dir", str(work), "--no-progress"),
               timeout=600, **env_vars)


def run_through_outage(cmd: list[str], outage, down_s: float, log_path,
                       timeout_s: float = 900) -> tuple[int, str]:
    """Run ``cmd``; once ``outage`` has killed the server, restart it ``down_s`` later."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        try:
            deadline = time.monotonic() + timeout_s
            while not outage.killed.wait(0.2):
                assert proc.poll() is None, f"ended unkilled:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no kill within the time limit"
            time.sleep(down_s)
            outage.restart()  # from this (the main) thread
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, log_path.read_text()


def test_dataset_upload_survives_a_server_kill_mid_multipart(s3_outage, tmp_path, caplog,
                                                           observe):
    """upload_dir of 100 files and one 2-part file; SIGKILL just before the second part is sent
    (once 30 files are in), restart 3 s later: the retry loop resumes, the multipart file is
    sent again and every object verifies; the interrupted multipart upload never shows."""
    caplog.set_level(logging.WARNING, logger=storage.__name__)
    s3, prefix = s3_outage.s3, "faults/upload-kill/"
    src = tmp_path / "ds"
    (src / "img").mkdir(parents=True)
    (src / "big").mkdir()
    local = {"big/weights.bin": os.urandom(storage.PART_SIZE + 1024 * 1024)}  # sorted first
    local.update({f"img/{i:03d}.bin": os.urandom(2000 + 37 * i) for i in range(100)})
    for rel, data in local.items():
        (src / rel).write_bytes(data)
    client = storage.s3_client(endpoint=s3.endpoint)  # straight to the server: no proxy here
    at_kill: set[str] = set()

    def kill_before_part_2(params, **_) -> None:  # in a transfer thread; the others go on
        if params.get("PartNumber") != 2 or s3_outage.killed.is_set():
            return
        deadline = time.monotonic() + 30
        while len(landed := stored_keys(s3, prefix)) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        at_kill.update(key[len(prefix):] for key in landed)
        s3_outage.kill()

    client.meta.events.register("before-parameter-build.s3.UploadPart", kill_before_part_2)
    multiparts: list[str] = []
    client.meta.events.register("before-parameter-build.s3.CreateMultipartUpload",
                                lambda params, **_: multiparts.append(params["Key"]))
    outcome: dict[str, object] = {}

    def upload() -> None:
        try:
            outcome["uploaded"] = storage.upload_dir(src, f"s3://{s3.bucket}/{prefix}",
                                                     client=client, progress=False,
                                                     retry_budget=60)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert s3_outage.killed.wait(60), "the multipart upload never reached part 2"
    assert 30 <= len(at_kill) < len(local) and "big/weights.bin" not in at_kill  # mid-upload
    time.sleep(3)
    s3_outage.restart()
    thread.join(120)
    took = time.monotonic() - started
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert outcome["uploaded"] == len(local)
    assert multiparts[0] == multiparts[-1] == prefix + "big/weights.bin" and len(multiparts) >= 2
    objects = stored_objects(s3, prefix)
    assert objects == local  # all there, byte for byte, and nothing else
    assert_checksums_stored_and_right(s3, prefix, objects)
    retries = retries_logged(caplog.text)
    assert retries >= 1
    left = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    observe({"fault": "S3 server SIGKILLed inside an upload_dir (100 files + one 2-part file: "
             "before part 2), restarted after 3 s",
             "injected": s3_outage.kills, "outcome": f"upload resumed and completed; "
             f"{len(objects)}/{len(local)} objects byte-identical and SHA-256-verified, the "
             "2-part file sent again whole; no partial object visible",
             "objects_before_kill": len(at_kill), "client_retries_logged": retries,
             "multipart_uploads_left_incomplete": len(left),
             "outage_s": round(s3_outage.down_s, 1), "seconds": round(took, 1)})


def test_s3_killed_past_retry_budget_fails_clearly_then_resumes(s3_outage, tmp_path, observe):
    s3, prefix = s3_outage.s3, "faults/dataset-budget/"
    uri = f"s3://{s3.bucket}/{prefix}"
    s3_outage.kill_after(40_000)  # mid-upload: ~1/5 of the images are in; not restarted
    started = time.monotonic()
    failed = prepare_digits_to_s3(uri, tmp_path / "stage", GPUNET_S3_RETRY_SECONDS="5")
    took = time.monotonic() - started
    assert s3_outage.kills == 1
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "retry budget GPUNET_S3_RETRY_SECONDS=5" in failed.stderr, failed.stderr[-2000:]
    assert "re-run to resume" in failed.stderr

    s3_outage.restart()
    partial = stored_objects(s3, prefix)
    assert "manifest.json" not in partial  # the dataset is not marked complete
    assert 0 < len(partial) < IMAGES + 1
    assert_checksums_stored_and_right(s3, prefix, partial)  # what is there is whole
    resumed = prepare_digits_to_s3(uri, tmp_path / "stage")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    objects = stored_objects(s3, prefix)
    assert "manifest.json" in objects and len(objects) == IMAGES + 2  # + SHA256SUMS, manifest
    assert json.loads(objects["manifest.json"])["format"] == "gpunet-imagefolder/1"
    sums = dict(line.split("  ", 1)[::-1] for line in
                objects["SHA256SUMS"].decode().splitlines())
    images = {rel: data for rel, data in objects.items() if rel.endswith(".jpg")}
    assert len(images) == len(sums) == IMAGES
    for rel, data in images.items():  # content equals the checksum list written at prepare
        assert hashlib.sha256(data).hexdigest() == sums[rel], rel
    assert_checksums_stored_and_right(s3, prefix, objects)
    unchanged = sum(objects[k] == v for k, v in partial.items())
    observe({"fault": "S3 server SIGKILLed during a dataset upload and not restarted "
             "(budget 5 s)", "injected": s3_outage.kills,
             "outcome": f"exit {failed.returncode} after {took:.0f} s with 'retry budget' "
             f"message; {len(partial)} complete objects, no manifest; after a restart the "
             f"re-run resumed and completed, {IMAGES}/{IMAGES} images checksum-verified",
             "objects_before_resume": len(partial), "objects_kept_from_first_try": unchanged})


def test_checkpoint_upload_survives_s3_kill(s3_outage, digits_small, tmp_path, observe):
    s3, prefix = s3_outage.s3, "faults/train-kill/"
    # a small timm model keeps the checkpoint at a few MiB (two 8 MiB parts would need more)
    s3_outage.kill_after(3_000_000)  # inside the first epoch's checkpoint upload
    code, log = run_through_outage(
        gpunet_cmd("train", str(digits_small), "--model", "mobilenetv3_small_050", "--epochs",
                   "2", "--output", f"s3://{s3.bucket}/{prefix}", *FAST),
        s3_outage, down_s=6.0, log_path=tmp_path / "train.log")
    assert code == 0, log[-3000:]
    assert s3_outage.kills == 1
    objects = stored_objects(s3, prefix)
    assert {"last.pth.tar", "model_best.pth.tar", "summary.csv"} <= set(objects)
    assert_checksums_stored_and_right(s3, prefix, objects)
    (tmp_path / "last.pth.tar").write_bytes(objects["last.pth.tar"])
    assert read_checkpoint(tmp_path / "last.pth.tar")["epoch"] == 2
    rows = objects["summary.csv"].decode().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1]
    observe({"fault": "S3 server SIGKILLed during a checkpoint upload in training, restarted "
             "after 6 s", "injected": s3_outage.kills,
             "outcome": "training finished; last/best checkpoints and summary.csv complete and "
             "checksum-verified; epochs [0, 1] once each",
             "client_retries_logged": retries_logged(log),
             "checkpoint_bytes": len(objects["last.pth.tar"])})
