"""A real MLflow tracking server on 127.0.0.1 for tests (sqlite store, local artifact root)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    port: int
    root: Path
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def backend_store_uri(root: Path) -> str:
    """The sqlite tracking store :func:`start` gives the server under ``root``."""
    return f"sqlite:///{root / 'mlflow.db'}"


def start(root: Path, port: int | None = None, timeout_s: float = 120.0,
          artifacts_destination: str | None = None,
          extra_env: dict[str, str] | None = None, *, app_name: str | None = None,
          auth_config: Path | None = None,
          extra_args: Sequence[str] = ()) -> MlflowServer:
    """Start ``mlflow server`` (one worker, no job runner: ~0.5 GB) and wait until healthy.

    ``app_name="basic-auth"`` with ``auth_config`` (the INI file, passed as
    $MLFLOW_AUTH_CONFIG_PATH) serves with MLflow's authentication; the MLFLOW_AUTH_ADMIN_*
    variables of this process are then not passed on, so that file alone configures it.
    ``extra_args`` go to ``mlflow server`` as they are (e.g. ``--allowed-hosts=...``).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", **(extra_env or {})}
    app_args = []
    if app_name:
        app_args = ["--app-name", app_name]
    if auth_config is not None:
        env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_AUTH_ADMIN_")}
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    log = open(root / "server.log", "ab")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend_store_uri(root),
         "--artifacts-destination", artifacts_destination or str(root / "artifacts"),
         *app_args, *extra_args],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return MlflowServer(uri, port, root, process)
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mlflow server did not become healthy within {timeout_s}s")
