"""Multi-node training as a Kubeflow Trainer v2 TrainJob: names, the manifest (validated strictly
against Trainer v2.3.0's CRD, CEL rules and webhook checks), run_trainjob against a stand-in API
server (tests/k8s_api_server.py: create, re-attach, retry, failures, log streaming), the RBAC
Role it needs, and ``gpunet trainjob``."""

from __future__ import annotations

import copy
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from gpunet_core import cli
from gpunet_core.mlops import trainjob as tj
from gpunet_core.mlops.cluster import (
    CONFIG_MAP,
    DEFAULT_ENV,
    SECRET,
    ClusterSettingsError,
    EnvRef,
    PodSettings,
)
from gpunet_core.mlops.trainjob import TrainJobError, run_trainjob, trainjob_manifest, trainjob_name
from tests import k8s_api_server, trainjob_schema

pytest.importorskip("celpy")  # cel-python: the CRD's CEL rules ([dev] extra)

REPO = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/gpunet-pipeline/gpunet-train:v1"
ARGS = ["s3://gpunet/runs/r/datasets/abc", "--model", "gpunet_0", "--epochs", "2",
        "--output", "s3://gpunet/runs/r/train/output", "--auto-resume"]
GPU = PodSettings(gpus_per_node=8, node_selector={"nvidia.com/gpu.present": "true"},
                  tolerations=({"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"},))
SEEN: set[tuple[str, str, str]] = set()  # (verb, group, resource) over every test here


# --------------------------------------------------------------------------- names


def test_names_are_labels_distinct_per_run_task_attempt_and_stable():
    runs = [str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), "manual", "x" * 300, "Run #7 (été)",
            "-"]
    names = {(r, t, a): trainjob_name(r, t, a) for r in runs for t in ("train-teacher",
                                                                     "train_student")
             for a in (1, 2, 10)}
    assert len(set(names.values())) == len(names)
    for (run, task, attempt), name in names.items():
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert name == trainjob_name(run, task, attempt)
        assert name.endswith(f"-{attempt}")
        labels = tj.trainjob_labels(run, task, attempt)
        assert all(trainjob_schema._key_problem(k) is None for k in labels)
        assert all(len(v) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", v)
                   for v in labels.values()), labels
    assert tj.run_label(str(uuid.UUID(int=1))) == str(uuid.UUID(int=1))  # greppable as is
    assert trainjob_name("r", "train_student", 1) == trainjob_name("r", "train-student", 1)


@pytest.mark.parametrize("run_id,task,attempt,message", [
    ("", "train", 1, "run_id must be a non-empty string"),
    ("  ", "train", 1, "run_id must be a non-empty string"),
    ("r", "", 1, "task ''"),
    ("r", "1train", 1, "starting with a letter"),
    ("r", "t" * 31, 1, "<= 30"),
    ("r", "train", 0, "attempt must be an integer >= 1"),
    ("r", "train", True, "attempt must be an integer >= 1"),
])
def test_bad_name_parts_fail_clearly(run_id, task, attempt, message):
    with pytest.raises(TrainJobError, match=re.escape(message)):
        trainjob_name(run_id, task, attempt)


# --------------------------------------------------------------------------- the manifest


VARIANTS = {
    "1 node, CPU": dict(nodes=1, nproc_per_node=1, settings=PodSettings()),
    "2 nodes, GPUs, placement": dict(nodes=2, nproc_per_node=8, settings=GPU),
    "16 nodes, CPU, 4 processes": dict(nodes=16, nproc_per_node=4, settings=PodSettings(
        cpu="500m", memory="1Gi", cpu_limit="2", memory_limit="2Gi", shm_size="1Gi")),
    "no env at all": dict(nodes=2, nproc_per_node=1, settings=PodSettings(env=())),
    "ConfigMap env only, other SA and user": dict(nodes=3, nproc_per_node=2, settings=PodSettings(
        env=(EnvRef("MLFLOW_TRACKING_URI", CONFIG_MAP, "gpunet-config", "MLFLOW_TRACKING_URI"),),
        service_account="trainer", run_as_user=2000, run_as_group=3000)),
    "other accelerator, several tolerations": dict(nodes=2, nproc_per_node=2, settings=PodSettings(
        gpus_per_node=2, accelerator="amd.com/gpu", node_selector={"pool": "a", "zone": "b-1"},
        tolerations=({"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                     {"key": "spot", "operator": "Equal", "value": "true",
                      "effect": "NoExecute", "tolerationSeconds": 60}))),
}


def _variant(key: str, **extra) -> dict:
    kw = VARIANTS[key]
    return trainjob_manifest("gpunet-train-0123456789-1", ARGS, image=IMAGE, **kw, **extra)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_every_trainjob_we_build_validates_strictly(key):
    job = _variant(key, namespace="gpunet",
                   labels=tj.trainjob_labels("run-1", "train", 1),
                   annotations={tj.ANNOTATION_RUN_ID: "run-1"})
    trainjob_schema.validate(job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    settings = VARIANTS[key]["settings"]
    assert spec["trainer"]["numNodes"] == VARIANTS[key]["nodes"]
    assert spec["trainer"]["numProcPerNode"] == VARIANTS[key]["nproc_per_node"]
    assert spec["trainer"]["command"] == ["torchrun", "--max-restarts=0", "-m", "gpunet_core",
                                          "train"]
    assert spec["trainer"]["args"] == ARGS
    env = {e["name"]: e for e in spec["trainer"]["env"]}
    assert not set(env) & trainjob_schema.RESERVED_ENV  # torchrun's come from Trainer
    for ref in settings.env:  # every variable by reference, never a value
        kind = "secretKeyRef" if ref.source_kind == SECRET else "configMapKeyRef"
        assert env[ref.name] == {"name": ref.name, "valueFrom": {kind: {"name": ref.source,
                                                                         "key": ref.key}}}
    assert env["PYTHONUNBUFFERED"]["value"] == "1"
    limits = spec["trainer"]["resourcesPerNode"]["limits"]
    assert limits.get(settings.accelerator) == (str(settings.gpus_per_node)
                                                if settings.gpus_per_node else None)
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == tj.MANAGER
    pod = trainjob_schema.node_pod(job)
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "training"
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gpunet-pipeline"
    assert pod["spec"]["serviceAccountName"] == settings.service_account
    assert pod["spec"]["securityContext"]["runAsUser"] == settings.run_as_user
    assert pod["spec"]["nodeSelector"] if settings.node_selector else "nodeSelector" not in pod[
        "spec"]
    (node,) = pod["spec"]["containers"]
    assert node["image"] == IMAGE
    assert node["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in node["volumeMounts"]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": settings.shm_size}


def test_the_node_pod_is_a_valid_pod():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for key in VARIANTS:
        pod = trainjob_schema.node_pod(_variant(key))
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                      "metadata": {**pod["metadata"], "name": "node-0"},
                                      "spec": pod["spec"]}, "1.33.0", strict=True)


def test_the_create_time_cel_rules_are_the_known_ones():
    # cel-python evaluates them all; this says when a new CRD brings rules worth a look
    assert trainjob_schema.create_time_rules() == trainjob_schema.CREATE_TIME_RULES


def _patch_pod(job: dict) -> dict:
    return (job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
            ["replicatedJobs"][0]["template"]["spec"]["template"]["spec"])


@pytest.mark.parametrize("mutate,message", [
    (lambda j: j["spec"]["trainer"].update(numNode=2), "'numNode' was unexpected"),
    (lambda j: j["spec"]["trainer"]["resourcesPerNode"]["limits"].update(cpu="lots"),
     "does not match"),
    (lambda j: _patch_pod(j)["containers"][0].update(resources={}),
     "'resources' was unexpected"),  # a container patch allows name/env/mounts/securityContext
    (lambda j: _patch_pod(j).update(hostNetwork=True), "'hostNetwork' was unexpected"),
    (lambda j: j["metadata"].update(name="Gpunet_Train"), "RFC 1035 DNS label"),
    (lambda j: j["metadata"].update(name="g" * 64), "no more than 63 characters"),
    (lambda j: j["metadata"].update(nmae="x"), "unknown field(s) ['nmae']"),
    (lambda j: j["metadata"]["labels"].update(run="manual run"), "not a valid label value"),
    (lambda j: j["spec"].update(managedBy="me"), "ManagedBy must be"),
    (lambda j: j["spec"]["trainer"]["env"].append(j["spec"]["trainer"]["env"][0]),
     "duplicate entries for name: AWS_ACCESS_KEY_ID"),
    (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"}),
     "must not have reserved envs"),
    (lambda j: _patch_pod(j)["containers"][0].update(env=[{"name": "A", "value": "1"}]),
     "must not have envs for the"),
    (lambda j: _patch_pod(j)["containers"][0].update(name="trainer"),
     "container 'trainer' doesn't exist"),
    (lambda j: j["spec"]["runtimePatches"][0].update(manager="gpunet"),
     "must be a domain-prefixed path"),
    (lambda j: j["spec"]["runtimeRef"].update(name="torch-distributed-gpu"),
     "specified clusterTrainingRuntime must be created"),
])
def test_the_validator_rejects_what_the_cluster_would(mutate, message):
    job = _variant("2 nodes, GPUs, placement", labels=tj.trainjob_labels("r", "train", 1))
    trainjob_schema.validate(job)
    broken = copy.deepcopy(job)
    mutate(broken)
    with pytest.raises(trainjob_schema.Invalid, match=re.escape(message)):
        trainjob_schema.validate(broken)


@pytest.mark.parametrize("kw,message", [
    (dict(nodes=0), "nodes must be an integer >= 1"),
    (dict(nodes=2.0), "nodes must be an integer >= 1"),
    (dict(nproc_per_node=0), "nproc_per_node must be an integer >= 1"),
    (dict(nproc_per_node=9, settings=GPU), "nproc_per_node 9 > gpus_per_node 8"),
    (dict(image=""), "is not a container image reference"),
    (dict(image="my image:v1"), "is not a container image reference"),
    (dict(image="Registry/UPPER"), "is not a container image reference"),
    (dict(name="gpunet_train"), "must be an RFC 1035 label"),
    (dict(train_args=["d"] * 129), "at most 128"),
    (dict(labels={"bad key!": "x"}), "label 'bad key!'"),
    (dict(namespace="Gpunet"), "not a valid namespace name"),
])
def test_bad_manifest_input_fails_clearly(kw, message):
    args = dict(name="gpunet-train-x-1", train_args=ARGS, nodes=2, nproc_per_node=1,
                image=IMAGE, settings=PodSettings())
    with pytest.raises(TrainJobError, match=re.escape(message)):
        trainjob_manifest(**{**args, **kw})


def test_pod_settings_round_trip_and_name_the_bad_field():
    for settings in [PodSettings(), GPU] + [v["settings"] for v in VARIANTS.values()]:
        assert PodSettings.from_json(settings.to_json()) == settings
        hash(settings)
    # the same env var <- (source, key) pairs as before, in kfp-kubernetes' {key: env var} shape
    assert PodSettings().env_sources() == [
        (("secret", "gpunet-s3"), {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                   "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}),
        (("secret", "gpunet-mlflow-auth"), {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}),
        (("configMap", "gpunet-config"), {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                                          "S3_ENDPOINT_URL": "AWS_ENDPOINT_URL",
                                          "RUNS_URI": "GPUNET_RUNS_URI"}),
        # one key feeding a second variable: a second call for that ConfigMap
        (("configMap", "gpunet-config"), {"S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"})]
    assert PodSettings.from_json('{"gpus_per_node": 4}') == PodSettings(gpus_per_node=4)
    for text, message in [
        ('{"gpus": 4}', "unknown field(s) gpus"),
        ('{"gpus_per_node": -1}', "gpus_per_node must be an integer >= 0"),
        ('{"cpu": "4 cores"}', "cpu: '4 cores' is not a Kubernetes quantity"),
        ('{"memory": "128Gi"}', "memory '128Gi' exceeds memory_limit '64Gi'"),
        ('{"run_as_user": 0}', "run_as_user must be an integer >= 1"),
        ('{"service_account": "Pipeline"}', "service_account 'Pipeline'"),
        ('{"node_selector": {"gpu": "yes please"}}', "node_selector 'gpu'"),
        ('{"tolerations": [{"key": "a", "operator": "Exist"}]}', "operator must be Equal or"),
        ('{"env": [{"name": "X", "source_kind": "vault", "source": "s", "key": "k"}]}',
         "source_kind must be 'secret' or 'configMap'"),
        ('{"env": [{"name": "PET_NNODES", "source_kind": "secret", "source": "s", "key": "k"}]}',
         "Kubeflow Trainer sets PET_NNODES itself"),
        ("[1]", "expected a JSON object"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(ClusterSettingsError, match=re.escape(message)):
            PodSettings.from_json(text)
    with pytest.raises(ClusterSettingsError, match="set twice"):
        PodSettings(env=DEFAULT_ENV + DEFAULT_ENV[:1])


# --------------------------------------------------------------------------- run_trainjob


@pytest.fixture
def fake():
    server = k8s_api_server.start()
    yield server
    SEEN.update(server.seen())
    server.stop()


@pytest.fixture
def client(fake):
    api = fake.api_client()
    yield api
    api.close()


def _run(client, run_id="run-1", task="train-student", **kw):
    args = dict(nodes=2, nproc_per_node=2, image=IMAGE, settings=PodSettings(),
                namespace="gpunet", poll_s=0.02, timeout_s=20, api_client=client)
    return run_trainjob(kw.pop("train_args", ARGS), run_id=run_id, task=task, **{**args, **kw})


def controller(fake, lines=("epoch 0 loss 2.3", "epoch 1 loss 1.9"), outcome="Complete",
               reason="", message="", nodes=2):
    """What Trainer, JobSet and the kubelet would do after a create: pods, logs, a condition."""

    def play(job):
        name = job["metadata"]["name"]
        pods = [fake.add_node_pod(name, rank) for rank in range(nodes)]
        time.sleep(0.05)
        for pod in pods:
            fake.set_pod_phase(pod, "Running")
        fake.set_jobs_status(name, ready=1)
        for line in lines:
            fake.log(pods[0], line)
            fake.log(pods[1], f"rank 1: {line}")
            time.sleep(0.01)
        phase = "Succeeded" if outcome == "Complete" else "Failed"
        for pod in pods:
            fake.set_pod_phase(pod, phase)
        fake.set_condition(name, outcome, reason=reason, message=message)

    return play


def _creates(fake):
    return [r for r in fake.requests if r.verb == "create"]


def test_run_creates_the_validated_body_follows_it_and_streams_rank_0(fake, client, caplog):
    fake.on_create.append(controller(fake))
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"):
        result = _run(client)
    name = trainjob_name("run-1", "train-student", 1)
    assert result == {"trainjob": name, "attempt": 1, "state": "Complete", "reattached": False}
    (stored,) = fake.created()
    expected = trainjob_manifest(name, ARGS, nodes=2, nproc_per_node=2, image=IMAGE,
                                 settings=PodSettings(), namespace="gpunet",
                                 labels=tj.trainjob_labels("run-1", "train-student", 1),
                                 annotations={tj.ANNOTATION_RUN_ID: "run-1"})
    # the body the server validated and stored is exactly trainjob_manifest's (plus defaults)
    assert {k: stored["spec"][k] for k in expected["spec"]} == {
        **expected["spec"], "runtimePatches": [{**expected["spec"]["runtimePatches"][0],
                                                "time": stored["metadata"]["creationTimestamp"]}]}
    assert stored["metadata"]["labels"] == expected["metadata"]["labels"]
    (create,) = _creates(fake)
    assert create.query["fieldValidation"] == ["Strict"]
    messages = [r.getMessage() for r in caplog.records]
    streamed = [m for m in messages if "rank 0]" in m]
    assert streamed == [f"[{name} rank 0] epoch 0 loss 2.3", f"[{name} rank 0] epoch 1 loss 1.9"]
    assert not [m for m in messages if "rank 1:" in m]  # only the master's log
    assert any("Complete" in m for m in messages)


def test_two_runs_and_a_retried_attempt_get_distinct_names(fake, client):
    fake.on_create.append(controller(fake, outcome="Failed", reason="FailedJobs",
                                     message="jobset node failed"))
    with pytest.raises(TrainJobError):
        _run(client, run_id="run-a")
    fake.on_create[:] = [controller(fake)]
    second = _run(client, run_id="run-a")
    other = _run(client, run_id="run-b")
    teacher = _run(client, run_id="run-a", task="train-teacher")
    names = [j["metadata"]["name"] for j in fake.created()]
    assert len(set(names)) == len(names) == 4
    assert second == {"trainjob": trainjob_name("run-a", "train-student", 2), "attempt": 2,
                      "state": "Complete", "reattached": False}
    assert other["trainjob"] == trainjob_name("run-b", "train-student", 1)
    assert teacher["trainjob"] == trainjob_name("run-a", "train-teacher", 1)


def _existing(fake, run_id="run-1", task="train-student", attempt=1, nodes=2):
    name = trainjob_name(run_id, task, attempt)
    fake.add_trainjob(trainjob_manifest(name, ARGS, nodes=nodes, nproc_per_node=2, image=IMAGE,
                                        settings=PodSettings(),
                                        labels=tj.trainjob_labels(run_id, task, attempt)))
    return name


def test_a_running_attempt_is_followed_not_duplicated(fake, client, caplog):
    name = _existing(fake)
    pod = fake.add_node_pod(name, phase="Running")
    fake.log(pod, "epoch 7 (before we re-attached)")

    def finish_later():
        time.sleep(0.3)
        fake.log(pod, "epoch 8")
        fake.set_pod_phase(pod, "Succeeded")
        fake.set_condition(name, "Complete", reason="JobsCompleted")

    threading.Thread(target=finish_later, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"):
        result = _run(client)
    assert result == {"trainjob": name, "attempt": 1, "state": "Complete", "reattached": True}
    assert _creates(fake) == []
    assert len(fake.created()) == 1
    streamed = [r.getMessage() for r in caplog.records if "rank 0]" in r.getMessage()]
    assert [m.split("] ", 1)[1] for m in streamed] == ["epoch 7 (before we re-attached)",
                                                       "epoch 8"]


def test_a_completed_attempt_returns_at_once(fake, client):
    name = _existing(fake, attempt=1)
    fake.set_condition(name, "Failed", reason="FailedJobs")
    done = _existing(fake, attempt=2)
    fake.set_condition(done, "Complete", reason="JobsCompleted")
    assert _run(client) == {"trainjob": done, "attempt": 2, "state": "Complete",
                            "reattached": True}
    assert {(r.verb, r.resource) for r in fake.requests} == {("list", "trainjobs")}


def test_a_failed_attempt_is_followed_by_the_next(fake, client, caplog):
    first = _existing(fake, attempt=1)
    fake.set_condition(first, "Failed", reason="FailedJobs", message="node 1 was OOM-killed")
    _existing(fake, run_id="run-2", attempt=5)  # another run's attempts do not count
    fake.on_create.append(controller(fake))
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"):
        result = _run(client)
    assert result["trainjob"] == trainjob_name("run-1", "train-student", 2)
    assert result["attempt"] == 2 and not result["reattached"]
    assert len(_creates(fake)) == 1
    assert any("node 1 was OOM-killed" in r.getMessage() and "starting attempt 2" in
               r.getMessage() for r in caplog.records)


def test_a_failed_trainjob_raises_its_message_and_last_log_lines(fake, client):
    fake.on_create.append(controller(fake, lines=["epoch 0", "CUDA error: out of memory"],
                                     outcome="Failed", reason="FailedJobs",
                                     message="jobset failed: job node failed"))
    with pytest.raises(TrainJobError) as err:
        _run(client)
    text = str(err.value)
    name = trainjob_name("run-1", "train-student", 1)
    assert f"TrainJob {name} (attempt 1) in namespace gpunet failed: FailedJobs: jobset failed: "\
           "job node failed" in text
    assert text.index("epoch 0") < text.index("CUDA error: out of memory")
    assert "starts attempt 2, resuming from the last checkpoint" in text


def test_a_concurrent_create_is_reattached(fake, client):
    # another step process creates the same attempt between our list and our create
    original = fake._trainjobs
    racing = {"done": False}

    def list_then_race(verb, namespace, name, query, body):
        out = original(verb, namespace, name, query, body)
        if verb == "list" and not racing["done"]:
            racing["done"] = True
            job = _existing(fake)
            threading.Thread(target=controller(fake), args=({"metadata": {"name": job}},),
                             daemon=True).start()
        return out

    fake._trainjobs = list_then_race
    result = _run(client)
    assert result == {"trainjob": trainjob_name("run-1", "train-student", 1), "attempt": 1,
                      "state": "Complete", "reattached": True}
    assert len(_creates(fake)) == 1 and len(fake.created()) == 1  # ours got 409


def test_a_missing_trainer_is_named_not_mistaken_for_a_missing_namespace(fake, client):
    fake.trainer_installed = False
    with pytest.raises(TrainJobError) as err:
        _run(client)
    assert str(err.value).startswith("Kubeflow Trainer v2 is not installed: the "
                                     "trainer.kubeflow.org/v1alpha1 TrainJob API is missing on "
                                     "this cluster (install Trainer v2.3.0")
    assert "manifests/overlays/manager?ref=v2.3.0" in str(err.value)
    assert err.value.status == 404
    fake.trainer_installed = True
    with pytest.raises(TrainJobError, match="namespace ml does not exist"):
        _run(client, namespace="ml")  # listing there is fine (empty), creating is not


def test_rbac_and_webhook_refusals_say_what_to_fix(fake, client, monkeypatch, caplog):
    fake.denied = {("create", "trainjobs")}
    with pytest.raises(TrainJobError) as err:
        _run(client)
    assert "may not create trainjobs in namespace gpunet" in str(err.value)
    assert "grant verb create on resource trainjobs of API group trainer.kubeflow.org" in str(
        err.value)
    fake.denied = {("get", "pods/log")}  # a denied log stream does not stop training
    fake.on_create.append(controller(fake))
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"):
        assert _run(client)["state"] == "Complete"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot stream the log of" in warning and "may not get pods/log" in warning
    fake.denied = {("list", "pods")}
    with pytest.raises(TrainJobError, match=re.escape("may not list pods in namespace gpunet")):
        _run(client, run_id="run-2")
    fake.denied = set()
    other = copy.deepcopy(trainjob_schema.runtime())
    other["metadata"]["name"] = "torch-distributed-gpu"  # the cluster lacks ours
    monkeypatch.setattr(trainjob_schema, "runtime", lambda: other)
    with pytest.raises(TrainJobError) as err:
        _run(client, run_id="run-3")
    assert 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request' in \
        str(err.value)
    assert "clusterTrainingRuntime must be created" in str(err.value)
    assert "install Trainer v2.3.0 and its default runtimes" in str(err.value)


def test_pods_stuck_pending_are_reported(fake, client, caplog):
    def play(job):
        name = job["metadata"]["name"]
        pod = fake.add_node_pod(name)
        other = fake.add_node_pod(name, 1)
        fake.set_pod_waiting(pod, "Unschedulable", "0/4 nodes are available: 4 Insufficient "
                                                   "nvidia.com/gpu.", unschedulable=True)
        fake.set_pod_waiting(other, "CreateContainerConfigError",
                             "couldn't find key RUNS_URI in ConfigMap gpunet/gpunet-config")
        time.sleep(0.3)
        fake.set_condition(name, "Failed", reason="DeadlineExceeded", message="too slow")

    fake.on_create.append(play)
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"), \
            pytest.raises(TrainJobError, match="DeadlineExceeded: too slow"):
        _run(client)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "Insufficient nvidia.com/gpu" in w]) == 1  # once
    assert any("CreateContainerConfigError couldn't find key RUNS_URI" in w for w in warnings)


def test_the_log_stream_survives_drops_restarts_and_a_replaced_pod(fake, client, caplog):
    def play(job):
        name = job["metadata"]["name"]
        time.sleep(0.1)  # the master pod does not exist yet
        pod = fake.add_node_pod(name)
        time.sleep(0.1)  # it exists but its container is waiting to start
        fake.set_pod_phase(pod, "Running")
        fake.log(pod, "a1", "a2")
        time.sleep(0.2)
        fake.break_streams(pod)  # the connection drops; the container keeps running
        fake.log(pod, "a3")
        time.sleep(0.2)
        fake.restart_container(pod)
        fake.log(pod, "b1")
        time.sleep(0.2)
        fake.set_pod_phase(pod, "Failed")
        replacement = fake.add_node_pod(name, attempt=1)  # the Job replaced the pod
        fake.set_pod_phase(replacement, "Running")
        fake.log(replacement, "c1", "c2")
        time.sleep(0.2)
        fake.set_pod_phase(replacement, "Succeeded")
        fake.set_condition(name, "Complete")

    fake.on_create.append(play)
    with caplog.at_level(logging.INFO, logger="gpunet_core.mlops.trainjob"):
        assert _run(client)["state"] == "Complete"
    streamed = [r.getMessage().split("] ", 1)[1] for r in caplog.records
                if "rank 0]" in r.getMessage()]
    assert streamed == ["a1", "a2", "a3", "b1", "c1", "c2"]
    logs = [r for r in fake.requests if r.resource == "pods/log"]
    assert len(logs) >= 3 and all(k8s_api_server._flag(r.query, "follow") for r in logs)


def test_a_trainjob_that_never_ends_times_out_clearly(fake, client):
    name = _existing(fake)
    with pytest.raises(TrainJobError) as err:
        _run(client, timeout_s=0.2)
    assert f"TrainJob {name} did not finish within 0 s" in str(err.value)
    assert "re-attaches to it" in str(err.value)


def test_no_cluster_credentials_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(TrainJobError, match="no Kubernetes credentials for multi-node training"):
        run_trainjob(ARGS, run_id="r", task="train", nodes=2, nproc_per_node=1, image=IMAGE,
                     settings=PodSettings())


def test_bad_arguments_fail_before_any_request(fake, client):
    with pytest.raises(TrainJobError, match="nodes must be an integer >= 1"):
        _run(client, nodes=0)
    with pytest.raises(TrainJobError, match="run_id must be a non-empty string"):
        _run(client, run_id="")
    assert fake.requests == []


# --------------------------------------------------------------------------- RBAC


def _role_rules() -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d and d["kind"] == "Role"]
    return {(verb, group, resource) for rule in role["rules"] for verb in rule["verbs"]
            for group in rule["apiGroups"] for resource in rule["resources"]}


def test_the_role_grants_exactly_what_run_trainjob_uses(fake, client):
    # a full life: a failed attempt, the next one streamed to completion, a re-attach
    fake.on_create.append(controller(fake, outcome="Failed", reason="FailedJobs"))
    with pytest.raises(TrainJobError):
        _run(client)
    fake.on_create[:] = [controller(fake)]
    _run(client)
    _run(client)
    used = fake.seen() | SEEN
    granted = _role_rules()
    assert used <= granted, f"run_trainjob needs {sorted(used - granted)} (rbac.yaml)"
    assert granted == fake.seen(), f"the Role grants unused {sorted(granted - fake.seen())}"
    assert not [r for r in granted if "pytorchjobs" in r[2] or r[0] in ("delete", "*")
                or r[2] in ("secrets", "*")]


# --------------------------------------------------------------------------- the CLI


def gpunet(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpunet_core", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_cli_prints_a_trainjob_that_validates():
    out = gpunet("trainjob", "--nodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4",
                 "--image", IMAGE, "--run-id", "manual", "--task", "train", "--namespace",
                 "gpunet", "--node-selector", "pool=gpu", "--", "data", "--model", "gpunet_0",
                 "--epochs", "1")
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    trainjob_schema.validate(job)
    assert job["metadata"]["name"] == trainjob_name("manual", "train", 1)
    assert job["metadata"]["namespace"] == "gpunet"
    assert job["spec"]["trainer"]["args"] == ["data", "--model", "gpunet_0", "--epochs", "1"]
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainjob_schema.node_pod(job)["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert "lost when the job ends" in out.stderr  # a local --output


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "gpunet trainjob: error: nodes must be an integer >= 1, got 0"),
    (["--", "data", "--epoks", "1"], "the gpunet train arguments after --: unrecognized "
                                     "arguments: --epoks 1"),
    (["--", "data", "--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--", "--epochs", "1"], "the following arguments are required: data"),
    (["--cpu", "64"], "pod settings: cpu '64' exceeds cpu_limit '16'"),
    (["--toleration", "{bad"], "--toleration '{bad' is not JSON"),
    (["--run-id", "r"], "either --name or --run-id"),
])
def test_cli_bad_input_exits_2_without_traceback(args, message, capsys):
    base = ["--nodes", "1", "--nproc-per-node", "1", "--image", IMAGE, "--name", "gpunet-t-1"]
    if "--" not in args:
        args = [*args, "--", "data"]
    assert cli.main(["trainjob", *base, *args]) == 2  # in-process: an exception would escape
    out = capsys.readouterr()
    assert message in out.err
    assert out.out == ""


def test_the_committed_example_is_the_cli_output():
    path = REPO / "manifests" / "examples" / "trainjob" / "trainjob.yaml"
    committed = path.read_text()
    header = committed.splitlines()[0]
    assert header.startswith("# Generated by: gpunet trainjob ")
    command = shlex.split(header.removeprefix("# Generated by: "))
    out = gpunet(*command[1:])
    assert out.returncode == 0, out.stderr
    assert out.stdout == committed, f"regenerate {path.relative_to(REPO)}: {shlex.join(command)}"
    job = yaml.safe_load(committed)
    trainjob_schema.validate(job)
    assert job["spec"]["trainer"]["numNodes"] == 2


def test_cli_settings_file_and_flags_layer(tmp_path, capsys):
    path = tmp_path / "pod.json"
    path.write_text(GPU.to_json())
    assert cli.main(["trainjob", "--nodes", "2", "--nproc-per-node", "8", "--image", IMAGE,
                     "--name", "gpunet-t-1", "--settings", str(path), "--memory", "32Gi",
                     "--node-selector", "pool=a100", "--", "s3://b/d", "--output",
                     "s3://b/out"]) == 0
    out = capsys.readouterr()
    assert out.err == ""  # an s3:// output: no warning
    job = yaml.safe_load(out.out)
    trainjob_schema.validate(job)
    pod = trainjob_schema.node_pod(job)["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert pod["tolerations"] == [dict(t) for t in GPU.tolerations]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "32Gi",
                                                             "nvidia.com/gpu": "8"}
    path.write_text('{"gpus_per_node": "8"}')
    assert cli.main(["trainjob", "--nodes", "2", "--nproc-per-node", "1", "--image", IMAGE,
                     "--name", "gpunet-t-1", "--settings", str(path), "--", "d"]) == 2
    assert "gpus_per_node must be an integer >= 0, got '8'" in capsys.readouterr().err
