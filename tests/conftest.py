"""Shared fixtures. Every test runs offline on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests/s3_server.py) on 127.0.0.1 with one bucket, for the
    whole session."""
    from tests import s3_server

    server = s3_server.start(tmp_path_factory.mktemp("seaweedfs") / "weed.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    """Point boto3 (AWS_* variables) at the test S3 server, with a private cache dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "gpunet-cache"))
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def _digits(tmp_path_factory, name: str, per_class: int):
    from gpunet_core.data.prepare import prepare_digits

    out = tmp_path_factory.mktemp(name)
    prepare_digits(out, img_size=32, per_class=per_class)
    return out


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory):
    """The embedded digits dataset, 40 images per class at 32 px (320 train / 80 val)."""
    return _digits(tmp_path_factory, "digits_small", 40)


@pytest.fixture(scope="session")
def digits_tiny(tmp_path_factory):
    """The embedded digits dataset, 16 images per class at 32 px (128 train / 32 val)."""
    return _digits(tmp_path_factory, "digits_tiny", 16)
