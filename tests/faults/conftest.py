"""Fixtures for the fault-injection tests: an S3 proxy that can fail, and an observation log.

``GPUNET_RELIABILITY_LOG=path.jsonl`` makes every test append what it injected and observed;
``python -m tests.faults.report path.jsonl`` turns that into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

import pytest

from tests.faults.tcp_proxy import TcpProxy


@pytest.fixture
def observe(request):
    """``observe(fault=..., injected=..., observed=..., **figures)``: one row for the report."""
    rows: list[dict] = []
    yield rows.append
    path = os.environ.get("GPUNET_RELIABILITY_LOG")
    if path and rows:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps({"test": request.node.nodeid, "time": time.time(), **row})
                         + "\n")


@pytest.fixture
def s3_proxy(s3):
    """A TcpProxy in front of the session's moto_server (its state survives the outages)."""
    proxy = TcpProxy(urlparse(s3.endpoint).port)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_s3_env(s3_env, s3_proxy, monkeypatch):
    """``s3_env`` with the endpoint moved to the proxy and a short retry budget (60 s)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)
    monkeypatch.setenv("GPUNET_S3_RETRY_SECONDS", "60")
    return s3_env

