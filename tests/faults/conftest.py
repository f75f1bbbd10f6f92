"""Fixtures for the fault-injection tests: a real S3 outage, and an observation log.

``GPUNET_RELIABILITY_LOG=path.jsonl`` makes every test append what it injected and observed;
``python -m tests.faults.report path.jsonl`` turns that into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import threading
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


class S3Outage:
    """SIGKILL the session's SeaweedFS and start it again on its data directory and port.

    Clients of another process reach it through ``endpoint``, a metering TcpProxy that goes down
    and up with the server; :meth:`kill_after` kills it once that many more bytes were sent.
    """

    def __init__(self, s3):
        self.s3 = s3
        self.proxy = TcpProxy(urlparse(s3.endpoint).port)
        self.killed = threading.Event()
        self.kills = 0
        self.down_s = 0.0
        self._down_at = 0.0

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint

    def kill(self) -> None:
        self.s3.kill()
        self.proxy.down()
        self.kills += 1
        self._down_at = time.monotonic()
        self.killed.set()

    def kill_after(self, nbytes: int) -> None:
        self.proxy.on_bytes(nbytes, self.kill)

    def restart(self) -> None:
        """Start the server again (from the main thread: see tests/s3_server.py)."""
        self.s3.restart()
        self.proxy.up()
        self.down_s = time.monotonic() - self._down_at

    def close(self) -> None:
        self.proxy.close()
        if self.s3.process is None or self.s3.process.poll() is not None:
            self.s3.restart()  # the rest of the session needs it


@pytest.fixture
def s3_outage(s3_env, monkeypatch):
    """An :class:`S3Outage`; ``AWS_ENDPOINT_URL`` points at its proxy, retry budget 60 s."""
    outage = S3Outage(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.endpoint)
    monkeypatch.setenv("GPUNET_S3_RETRY_SECONDS", "60")
    yield outage
    outage.close()
