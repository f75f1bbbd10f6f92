"""MLflow basic auth: the config writer that the MLflow Deployment's init container runs
(images/cpu/mlflow_auth_config.py), a real ``mlflow server --app-name basic-auth`` configured by
that same script, and the image/manifest wiring around it."""

from __future__ import annotations

import base64
import importlib.metadata
import os
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from tests import mlflow_server

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "images" / "cpu" / "mlflow_auth_config.py"
IMAGE_SCRIPT = "/opt/gpunet/mlflow_auth_config.py"
USER = "gpunet-pipeline"
PASSWORD = "p@ss%w:rd/#;x y!Z9"  # URL-, INI- and %-interpolation-special characters
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"


def _mlflow_pod() -> dict:
    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "mlflow.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]


def _manifest_args() -> list[str]:
    """The init container's arguments minus --output (the tests choose where to write)."""
    (init,) = _mlflow_pod()["initContainers"]
    return [a for a in init["args"] if not a.startswith("--output=")]


def write_config(output: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run the script as the init container does: secrets in the environment only."""
    return subprocess.run([sys.executable, str(SCRIPT), f"--output={output}", *args],
                          env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True,
                          text=True, timeout=60)


# ------------------------------------------------------------------ the config writer


def test_manifest_invocation_writes_a_private_file_mlflow_reads_back(tmp_path, monkeypatch):
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config
    from sqlalchemy.engine import make_url

    env = {"MLFLOW_AUTH_ADMIN_USERNAME": USER, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "POSTGRES_USER": "ml flow", "POSTGRES_PASSWORD": "pg/p@ss%:w0rd", "POSTGRES_DB": "mlflow"}
    out = tmp_path / "auth" / "basic_auth.ini"
    res = write_config(out, env, *_manifest_args())
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert PASSWORD not in res.stdout + res.stderr and "pg/p@ss" not in res.stdout + res.stderr
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()  # MLflow's own reader (configparser with %-interpolation)
    assert (config.admin_username, config.admin_password) == (USER, PASSWORD)
    assert config.default_permission == "READ"
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION
    url = make_url(config.database_uri)
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql", "gpunet-postgres", 5432, "mlflow")
    assert (url.username, url.password) == ("ml flow", "pg/p@ss%:w0rd")


def test_rerun_replaces_the_file_and_keeps_it_private(tmp_path):
    out = tmp_path / "basic_auth.ini"
    out.write_text("[mlflow]\nadmin_password = old\n")
    out.chmod(0o644)
    env = {"MLFLOW_AUTH_ADMIN_USERNAME": USER, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}
    res = write_config(out, env, f"--database-uri=sqlite:///{tmp_path / 'auth.db'}",
                       "--default-permission=NO_PERMISSIONS")
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "old" not in out.read_text() and "default_permission = NO_PERMISSIONS" in out.read_text()


GOOD = {"MLFLOW_AUTH_ADMIN_USERNAME": USER, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "DB_PASSWORD": "db-secret-value"}


@pytest.mark.parametrize("env, args, message", [
    ({**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": ""}, [], "$MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    ({k: v for k, v in GOOD.items() if k != "MLFLOW_AUTH_ADMIN_USERNAME"}, [],
     "$MLFLOW_AUTH_ADMIN_USERNAME is not set"),
    ({**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"}, [], "shorter than 12 characters"),
    ({**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, [], "old published default"),
    ({**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": "line-one-xyz\nline-two"}, [], "line break"),
    ({**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": " padded-password "}, [], "whitespace"),
    ({**GOOD, "MLFLOW_AUTH_ADMIN_USERNAME": "a:b"}, [], "must not contain ':'"),
    ({k: v for k, v in GOOD.items() if k != "DB_PASSWORD"}, [], "needs $DB_PASSWORD"),
    (GOOD, ["--database-uri=postgresql://u:{DB_PASSWORD:>9}@h/db"], "placeholders are {NAME}"),
    (GOOD, ["--default-permission=ALL"], "invalid choice"),
    (GOOD, ["--admin-password=db-secret-value"], "unrecognized arguments"),
])
def test_bad_settings_fail_clearly_without_echoing_secrets(tmp_path, env, args, message):
    out = tmp_path / "basic_auth.ini"
    if not any(a.startswith("--database-uri") for a in args):
        args = ["--database-uri=postgresql://u:{DB_PASSWORD}@h/db", *args]
    res = write_config(out, env, *args)
    assert res.returncode == 2
    assert message in res.stderr
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "DB_PASSWORD"):
        if env.get(name) and "--admin-password" not in " ".join(args):
            assert env[name].strip() not in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ image and manifest wiring


def test_image_ships_what_the_manifest_runs():
    dockerfile = (REPO / "images" / "cpu" / "Dockerfile").read_text()
    assert f"COPY images/cpu/mlflow_auth_config.py {IMAGE_SCRIPT}" in dockerfile
    assert "!images/cpu/mlflow_auth_config.py" in (REPO / ".dockerignore").read_text().split()
    pod = _mlflow_pod()
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["command"] == ["python", IMAGE_SCRIPT]
    assert init["image"] == server["image"] == "gpunet-cpu"
    output = Path(next(a for a in init["args"] if a.startswith("--output=")).split("=", 1)[1])
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == str(output)
    assert "--app-name=basic-auth" in server["args"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
        "gpunet-mlflow-server"
    # the admin login reaches only the init container; the server gets it from the file
    assert not {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"} & set(env)
    init_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    assert init_env == {
        "MLFLOW_AUTH_ADMIN_USERNAME": {"name": "gpunet-mlflow-auth",
                                       "key": "MLFLOW_TRACKING_USERNAME"},
        "MLFLOW_AUTH_ADMIN_PASSWORD": {"name": "gpunet-mlflow-auth",
                                       "key": "MLFLOW_TRACKING_PASSWORD"}}
    volume = next(v for v in pod["volumes"] if v["name"] == "auth-config")
    assert volume["emptyDir"]["medium"] == "Memory"
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (init, server)}
    assert mounts["auth-config"]["auth-config"]["mountPath"] == str(output.parent)
    assert mounts["mlflow"]["auth-config"] == {"name": "auth-config",
                                               "mountPath": str(output.parent), "readOnly": True}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"  # unauthenticated under basic auth


def test_image_and_dev_extra_install_what_basic_auth_needs():
    # mlflow[auth] is what --app-name basic-auth imports (flask_wtf); the image pins it
    auth_extra = [Requirement(r) for r in importlib.metadata.requires("mlflow")
                  if 'extra == "auth"' in r]
    assert [r.name for r in auth_extra] == ["Flask-WTF"]
    dockerfile = (REPO / "images" / "cpu" / "Dockerfile").read_text()
    pinned = next(tok for tok in dockerfile.split() if tok.startswith("Flask-WTF=="))
    version = pinned.split("==")[1]
    assert auth_extra[0].specifier.contains(version)
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    dev_req = next(Requirement(r) for r in dev if r.lower().startswith("flask-wtf"))
    assert dev_req.specifier.contains(version)
    assert dev_req.specifier.contains(importlib.metadata.version("Flask-WTF"))


# ------------------------------------------------------------------ a real basic-auth server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 configured like the Deployment: the
    script writes the INI, and the auth store shares the tracking store's database."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    config = root / "auth" / "basic_auth.ini"
    args = [a for a in _manifest_args() if not a.startswith("--database-uri=")]
    res = write_config(config, {"MLFLOW_AUTH_ADMIN_USERNAME": USER,
                                "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD},
                       f"--database-uri={mlflow_server.backend_store_uri(root / 'server')}", *args)
    assert res.returncode == 0, res.stderr
    port = mlflow_server.free_port()
    server = mlflow_server.start(
        root / "server", port=port, app_name="basic-auth", auth_config=config,
        extra_env={"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)},
        extra_args=[f"--allowed-hosts=localhost,127.0.0.1:{port}"])
    yield server
    server.stop()


def _get(server, path: str, login: tuple[str, str] | None = None,
         host: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(server.uri + path)
    if login:
        token = base64.b64encode(":".join(login).encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.slow
def test_basic_auth_server_rejects_anonymous_and_wrong_logins(auth_server, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    status, headers, _ = _get(auth_server, SEARCH)
    assert status == 401
    assert headers.get("WWW-Authenticate", headers.get("www-authenticate", "")).startswith("Basic")
    assert _get(auth_server, SEARCH, (USER, PASSWORD[:-1]))[0] == 401
    assert _get(auth_server, SEARCH, ("someone-else", PASSWORD))[0] == 401
    assert _get(auth_server, SEARCH, (USER, PASSWORD))[0] == 200
    # the probes' endpoint needs no login; the probes' Host header is allowed
    status, _, body = _get(auth_server, "/health")
    assert (status, body) == (200, b"OK")
    assert _get(auth_server, "/health", host="localhost")[0] == 200
    # --allowed-hosts still applies in front of the auth app
    assert _get(auth_server, SEARCH, (USER, PASSWORD), host="evil.example")[0] == 403

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    with pytest.raises(MlflowException, match="401|not authenticated"):
        MlflowClient(auth_server.uri).search_experiments()


@pytest.mark.slow
def test_basic_auth_server_accepts_the_pipeline_login_from_env(auth_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(auth_server.uri)
    experiment = client.create_experiment("auth-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "top1", 0.75)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"top1": 0.75}
    assert client.get_experiment(experiment).name == "auth-check"
