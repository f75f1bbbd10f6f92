"""Shared fixtures. Every test runs offline on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory):
    """The embedded digits dataset, 40 images per class at 32 px (320 train / 80 val)."""
    from gpunet_core.datasets import prepare_digits

    out = tmp_path_factory.mktemp("digits_small")
    prepare_digits(out, img_size=32, per_class=40)
    return out
