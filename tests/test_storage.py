"""S3 storage and S3 datasets against a real S3 API server (moto_server) on 127.0.0.1."""

from __future__ import annotations

import json

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
    big = bytes(range(256)) * (40 * 1024 * 10)  # 10 MiB: multipart (8 MiB parts)
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


def test_uploads_carry_server_checked_sha256_and_are_verified(s3_env, tmp_path):
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"checksum me")
    big.write_bytes(bytes(range(256)) * (40 * 1024 * 10))  # 10 MiB: a composite checksum
    uri = storage.parse_s3_uri(f"s3://{s3_env.bucket}/sums/")
    storage.upload_files([(small, "small.bin"), (big, "big.bin")], uri, progress=False)
    client = s3_env.client()
    for path in (small, big):
        head = client.head_object(Bucket=s3_env.bucket, Key=f"sums/{path.name}",
                                  ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"].split("-")[0] == storage.local_checksum(path)
    # an object replaced behind our back (same size, other bytes) fails verification
    client.put_object(Bucket=s3_env.bucket, Key="sums/small.bin", Body=b"checksum ME",
                      ChecksumAlgorithm="SHA256")
    assert storage.verify_checksums([(small, "small.bin"), (big, "big.bin")], uri,
                                    storage.s3_client()) == ["small.bin"]


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
