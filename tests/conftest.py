"""Shared fixtures. Every test runs offline on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pwd  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory):
    """Digits (16 train / 4 val per class), a gpunet_0 trained briefly (well above chance, but
    far from perfect: the confusion matrix has off-diagonal cells), and its ONNX exports with a
    dynamic batch axis and with fixed batches 1 and 3."""
    from gpunet_core.data.prepare import prepare_digits
    from gpunet_core.inference.export import export_onnx
    from gpunet_core.inference.validate import load_inference_model
    from gpunet_core.models.checkpoint import save_checkpoint
    from tests.train_helpers import train_briefly

    IMG = 32  # noqa: N806
    root = tmp_path_factory.mktemp("digits_onnx")
    prepare_digits(root, img_size=IMG, per_class=20)
    model = train_briefly(root, IMG, steps=20)
    ckpt = save_checkpoint({"state_dict": model.state_dict(), "epoch": 0}, root / "digits.pth")
    model = load_inference_model("gpunet_0", ckpt)
    files = {"dynamic": root / "dynamic.onnx", 1: root / "b1.onnx", 3: root / "b3.onnx"}
    export_onnx(model, files["dynamic"], model_name="gpunet_0", img_size=IMG,
                dynamic_batch=True, checkpoint=ckpt)
    for batch in (1, 3):
        export_onnx(model, files[batch], model_name="gpunet_0", img_size=IMG, batch=batch,
                    checkpoint=ckpt)
    return root, ckpt, model, files


def _postgres_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    installed = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                       key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return str(installed[-1]) if installed else None


@pytest.fixture
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 as the official image's first start leaves it: the
    superuser and database of postgres.env (mlflow/mlflow), password login over TCP."""
    tools = {name: _postgres_tool(name) for name in ("initdb", "pg_ctl", "psql")}
    if None in tools.values():
        pytest.skip("PostgreSQL server not installed (initdb, pg_ctl, psql)")
    version = subprocess.run([tools["psql"], "--version"], capture_output=True, text=True).stdout
    if int(re.search(r"(\d+)", version)[1]) < 15:
        pytest.skip(f"psql 15+ needed for \\getenv: {version.strip()}")
    as_user, owner = [], None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_user = [shutil.which("runuser"), "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="gpunet-pg-"))  # outside pytest's 0700 tmp dirs
    (root / "pw").write_text("superuser-pw\n")
    if owner:
        for path in (root, root / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = root / "data"

    def server(*args):
        res = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    try:
        server(tools["initdb"], "-D", str(data), "-U", "mlflow", f"--pwfile={root / 'pw'}",
               "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        server(tools["pg_ctl"], "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
               "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "mlflow",
                "PGPASSWORD": "superuser-pw", "PGDATABASE": "postgres"}
        subprocess.run([tools["psql"], "-X", "-c", "CREATE DATABASE mlflow"], env=env, check=True,
                       capture_output=True, timeout=60)
        yield tools["psql"], env | {"PGDATABASE": "mlflow"}, root
    finally:
        if data.exists():
            subprocess.run([*as_user, tools["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
