"""S3 storage and S3 datasets against a real S3 server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest

from gpunet_core.data import prepare as datasets
from gpunet_core.utils import storage
from gpunet_core.utils.errors import StorageError
from tests.test_datasets import jpeg_bytes


def test_parse_s3_uri():
    assert storage.parse_s3_uri("s3://b/a/b/") == storage.S3Uri("b", "a/b/")
    assert str(storage.parse_s3_uri("s3://b").join("x", "y.txt")) == "s3://b/x/y.txt"
    for bad in ("b/a", "s3://", "s3:///key"):
        with pytest.raises(StorageError):
            storage.parse_s3_uri(bad)


def test_upload_verify_download_roundtrip(s3_env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    big = os.urandom(10 * 1024 * 1024)  # multipart (8 MiB parts); random: SeaweedFS gzips
    # compressible data, which made this upload ~10x slower
    (src / "sub" / "big.bin").write_bytes(big)
    uri = f"s3://{s3_env.bucket}/rt/"
    assert storage.upload_dir(src, uri, progress=False) == 2
    assert storage.upload_dir(src, uri, progress=False) == 0  # resume: nothing left to do
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="rt/sub/big.bin")
    assert "-" in head["ETag"]  # a multipart upload
    dest = storage.download(uri, tmp_path / "dl", progress=False)
    assert (dest / "a.txt").read_text() == "hello"
    assert (dest / "sub/big.bin").read_bytes() == big
    one = storage.download(f"{uri}a.txt", tmp_path / "one", progress=False)
    assert one == tmp_path / "one/a.txt" and one.read_text() == "hello"
    with pytest.raises(StorageError, match="nothing found"):
        storage.download(f"s3://{s3_env.bucket}/no/such/thing", tmp_path / "x", progress=False)


def record_checksum_headers(client) -> list[tuple[str, dict[str, str]]]:
    """(method, checksum headers) of every request ``client`` sends from now on."""
    sent: list[tuple[str, dict[str, str]]] = []

    def record(request, **_) -> None:
        sent.append((request.method, {
            k.lower(): v.decode() if isinstance(v, bytes) else str(v)
            for k, v in request.headers.items()
            if "checksum" in k.lower() or k.lower() == "content-md5"}))

    client.meta.events.register("before-send.s3", record)
    return sent


@pytest.mark.parametrize("mode", ["sha256", "off"])
def test_checksum_modes_upload_verify_and_catch_a_replaced_object(s3_env, tmp_path, monkeypatch,
                                                                 mode):
    """GPUNET_S3_CHECKSUM: exactly the checksums asked for go up (never boto3's own CRC32), the
    stored value matches the local one for a single part, exactly one part (8 MiB: s3transfer
    makes that a multipart upload) and three parts, and an object replaced behind our back with
    other bytes of the same size fails verification."""
    monkeypatch.setenv("GPUNET_S3_CHECKSUM", mode)
    part = storage.PART_SIZE
    sizes = {"small.bin": 11, "one-part.bin": part, "three-parts.bin": 2 * part + 1024 * 1024}
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
        files.append((tmp_path / name, name))
    uri = storage.parse_s3_uri(f"s3://{s3_env.bucket}/sums-{mode}/")
    client = storage.s3_client()
    sent = record_checksum_headers(client)
    assert storage.upload_files(files, uri, client=client, progress=False) == 3
    uploads = [headers for method, headers in sent if method == "PUT"]  # PutObject, UploadPart
    assert len(uploads) == 1 + 1 + 3
    if mode == "sha256":
        assert all(h.get("x-amz-checksum-sha256") and h.get("x-amz-sdk-checksum-algorithm")
                   == "SHA256" for h in uploads), uploads
    else:
        assert not [h for _, h in sent if h], sent  # not one checksum header, on any request
    assert "crc32" not in str(sent).lower()
    raw = s3_env.client()
    for path, name in files:
        head = raw.head_object(Bucket=s3_env.bucket, Key=uri.join(name).key,
                               ChecksumMode="ENABLED")
        if mode == "sha256":
            stored, _, parts = head["ChecksumSHA256"].partition("-")
            assert stored == storage.local_checksum(path)
            assert parts == {11: "", part: "1"}.get(path.stat().st_size, "3")
        else:
            assert "ChecksumSHA256" not in head
            assert head["ETag"].strip('"') == storage.local_etag(path)
            assert head["ETag"].endswith({11: '"', part: '-1"'}.get(path.stat().st_size, '-3"'))
    assert storage.verify_checksums(files, uri, client) == []
    # replaced behind our back: same sizes, other bytes, uploaded the way we upload
    for name in ("small.bin", "three-parts.bin"):
        other = tmp_path / "other" / name
        other.parent.mkdir(exist_ok=True)
        data = bytearray((tmp_path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        other.write_bytes(bytes(data))
        storage.upload_files([(other, name)], uri, client=client, skip_existing=False,
                             progress=False)
    assert storage.verify_checksums(files, uri, client) == ["small.bin", "three-parts.bin"]
    raw.delete_objects(Bucket=s3_env.bucket, Delete={"Objects": [
        {"Key": uri.join(name).key} for name in sizes]})
    for path, _ in files:
        path.unlink()


def test_a_bad_checksum_setting_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from gpunet_core.cli import main as cli_main

    monkeypatch.setenv("GPUNET_S3_CHECKSUM", "crc32")
    message = "GPUNET_S3_CHECKSUM='crc32' is not one of sha256, off"
    with pytest.raises(StorageError, match=message):
        storage.upload_dir(tmp_path, "s3://bucket/prefix/", progress=False)
    assert cli_main(["prepare", "digits", "--out", "s3://bucket/digits",
                     "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_retries_stop_at_the_budget_with_a_clear_message(monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    calls = []

    def down():
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(StorageError, match="retry budget GPUNET_S3_RETRY_SECONDS=2"):
        storage.with_retries("upload to", "s3://b/p", down, budget_s=2, first_delay_s=0.2)
    assert 2 <= len(calls) <= 5  # backed off: 0.2, 0.4, 0.8 s ... within 2 s
    calls.clear()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    from botocore.exceptions import ClientError

    def refused():
        calls.append(1)
        raise ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "PutObject")

    with pytest.raises(StorageError, match="rejected the credentials"):
        storage.with_retries("upload to", "s3://b/p", refused, budget_s=30)
    assert len(calls) == 1  # not transient: no retry


def test_wrong_bucket_and_wrong_credentials(s3, s3_env, tmp_path, monkeypatch):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.upload_dir(tmp_path, "s3://no-such-bucket/p/", progress=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="rejected the credentials.*AWS_SECRET_ACCESS_KEY"):
        storage.upload_dir(tmp_path, f"s3://{s3.bucket}/p/", progress=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(StorageError, match="rejected the credentials"):
        storage.download(f"s3://{s3.bucket}/p/", tmp_path / "d", progress=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.denied_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.denied_secret_key)
    with pytest.raises(StorageError, match="access denied"):
        storage.upload_dir(tmp_path, f"s3://{s3.bucket}/p/", progress=False)


def test_prepare_to_s3_and_back(s3_env, tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        for k, cls in enumerate(("ant", "bee", "cow")):
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                (src / split / cls / f"{i}.jpg").write_bytes(jpeg_bytes(k * 10 + i))
    (src / "train/bee/gray.jpg").write_bytes(jpeg_bytes(99, mode="L"))
    out = f"s3://{s3_env.bucket}/datasets/small"
    summary = datasets.prepare_folder(src, out, work_dir=tmp_path / "stage", progress=False)
    assert summary.uploaded == 19 + 1  # images + SHA256SUMS; then the manifest, last
    client = s3_env.client()
    manifest = json.loads(client.get_object(Bucket=s3_env.bucket,
                                            Key="datasets/small/manifest.json")["Body"].read())
    assert manifest == summary.manifest and manifest["converted"][0]["from"] == "L"
    again = datasets.prepare_folder(src, out, work_dir=tmp_path / "stage2", progress=False)
    assert again.up_to_date and not (tmp_path / "stage2").exists()
    # the folder source reads it back from S3 and re-prepares it locally, identically
    local = datasets.prepare_folder(out, tmp_path / "copy", progress=False)
    assert local.manifest["checksum"] == manifest["checksum"]
    assert local.manifest["splits"] == manifest["splits"]
    with pytest.raises(StorageError, match="does not exist"):
        datasets.prepare_digits("s3://missing-bucket/x", img_size=8, work_dir=tmp_path / "s3")
