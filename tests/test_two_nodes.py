"""Two-node training as Kubeflow Trainer runs it, on loopback, sharing nothing but S3.

The training step's ``TrainJob`` (:func:`gpunet_core.mlops.trainjob.trainjob_manifest` of
:func:`gpunet_core.steps.cluster_config`) is run the way Trainer's torch plugin runs it: its
``trainer.command + args`` once per node, with the env it lists (Secret and ConfigMap
references resolved to this test's values) plus exactly the variables the plugin sets on every
node (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT``). Each "node" has its own working directory, home and cache; the dataset
and the outputs travel only through the S3 server on 127.0.0.1. Gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gpunet_core import steps
from gpunet_core.mlops.cluster import PodSettings
from gpunet_core.mlops.trainjob import trainjob_manifest, trainjob_name
from gpunet_core.training.config import to_argv
from gpunet_core.utils import storage
from tests.mlflow_server import free_port
from tests.train_helpers import REPO

pytestmark = pytest.mark.slow

# what the pipeline keys a TrainJob by: its step's output artifact URI (unique per run and task)
KEY = "minio://mlpipeline/v2/artifacts/gpunet-training/0e6c2f4a/train-student/checkpoint"
TRAIN = {"model": "gpunet_0", "img_size": 32, "batch_size": 16, "workers": 1, "opt": "adamw",
         "lr": 0.002, "warmup_epochs": 0, "seed": 7}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def resolve_env(job: dict, values: dict[tuple[str, str, str], str]) -> dict[str, str]:
    """The container env of ``job``'s trainer: literal values, and Secret/ConfigMap keys
    looked up in ``values`` as the kubelet would (a missing one fails, as there)."""
    env = {}
    for var in job["spec"]["trainer"].get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        kind = "secret" if "secretKeyRef" in ref else "configMap"
        key_ref = ref["secretKeyRef" if kind == "secret" else "configMapKeyRef"]
        env[var["name"]] = values[(kind, key_ref["name"], key_ref["key"])]
    return env


class Nodes:
    """The TrainJob's nodes as local process groups (one ``torchrun`` agent each)."""

    def __init__(self, job: dict, env: dict[str, str], root: Path, attempt: int):
        trainer = job["spec"]["trainer"]
        self.cmd = [*trainer["command"], *trainer.get("args", [])]
        port = free_port()
        self.logs, self.procs = [], []
        for rank in range(trainer["numNodes"]):
            home = root / f"node{rank}"
            (home / "work").mkdir(parents=True, exist_ok=True)
            log = home / f"attempt{attempt}.log"
            self.logs.append(log)
            node_env = {
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "HOME": str(home), "GPUNET_CACHE_DIR": str(home / "cache"),
                "XDG_CACHE_HOME": str(home / "xdg"), "OMP_NUM_THREADS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO), **env,
                # what Trainer's torch plugin sets on every node
                "PET_NNODES": str(trainer["numNodes"]),
                "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port)}
            with open(log, "w") as fh:
                self.procs.append(subprocess.Popen(
                    self.cmd, cwd=home / "work", env=node_env, stdout=fh,
                    stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill_all()
                raise AssertionError(f"nodes did not finish in {timeout} s: {self.tails()}") from None
        return codes

    def kill(self, rank: int) -> None:
        """What losing the node's pod does: SIGKILL for every process in it (torchrun starts
        its workers in sessions of their own, so the agent's process group is not enough)."""
        for pid in [self.procs[rank].pid, *_descendants(self.procs[rank].pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is None:
                self.kill(rank)
                proc.wait()

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- node {r}\n{self.log(r)[-2500:]}" for r in range(len(self.logs)))


@pytest.fixture
def cluster_run(s3_env, digits_tiny, tmp_path, monkeypatch):
    """The step's side: a TrainJob for run ``run_id``, whose outputs go under the S3 prefix."""
    runs = f"s3://{s3_env.bucket}/runs-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("GPUNET_RUNS_URI", runs)
    artifact = tmp_path / "artifact"  # the KFP Model artifact the step fills
    artifact.mkdir()

    def make(epochs: int, run_id: str = KEY, attempt: int = 1, **extra):
        cfg = steps.train_config(digits_tiny, artifact, augment="light", kfp_run_id=run_id,
                                 epochs=epochs, **TRAIN, **extra)
        job_cfg = steps.cluster_config(cfg, run_id=run_id, task="student")
        job = trainjob_manifest(trainjob_name(run_id, "student", attempt), to_argv(job_cfg),
                                nodes=2, nproc_per_node=1, image="gpunet-train:test",
                                settings=PodSettings())
        values = {("secret", "gpunet-s3", "AWS_ACCESS_KEY_ID"): s3_env.access_key,
                  ("secret", "gpunet-s3", "AWS_SECRET_ACCESS_KEY"): s3_env.secret_key,
                  ("secret", "gpunet-mlflow-auth", "MLFLOW_TRACKING_USERNAME"): "unused",
                  ("secret", "gpunet-mlflow-auth", "MLFLOW_TRACKING_PASSWORD"): "unused",
                  ("configMap", "gpunet-config", "S3_ENDPOINT_URL"): s3_env.endpoint,
                  ("configMap", "gpunet-config", "MLFLOW_TRACKING_URI"):
                      os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),
                  ("configMap", "gpunet-config", "RUNS_URI"): runs}
        make.cfg, make.values = cfg, values
        return job_cfg, job, resolve_env(job, values)

    make.artifact = artifact
    make.root = tmp_path
    return make


def _s3_json(uri: str) -> dict | None:
    target = storage.parse_s3_uri(uri)
    if not storage.object_exists(target):
        return None
    return json.loads(storage.read_bytes(target))


def local_trainer(fake, values: dict, root: Path):
    """An ``on_create`` hook that plays Trainer + JobSet + the kubelet for the fake API server:
    it runs the created TrainJob's nodes here (:class:`Nodes`), publishes node 0's log lines as
    its pod's log, and sets the TrainJob's Complete/Failed condition from the exit codes."""
    def run(job: dict) -> None:
        name = job["metadata"]["name"]
        attempt = int(job["metadata"]["labels"]["gpunet-pipeline.io/attempt"])
        nodes = Nodes(job, resolve_env(job, values), root, attempt)
        pods = [fake.add_node_pod(name, rank, phase="Running") for rank in range(2)]
        sent = 0
        while True:
            done = all(proc.poll() is not None for proc in nodes.procs)
            lines = nodes.log(0).splitlines()
            fake.log(pods[0], *lines[sent:])
            sent = len(lines)
            if done:
                break
            time.sleep(0.5)
        codes = [proc.returncode for proc in nodes.procs]
        for pod, code in zip(pods, codes, strict=True):
            fake.set_pod_phase(pod, "Succeeded" if code == 0 else "Failed")
        if any(codes):
            fake.set_condition(name, "Failed", reason="FailedJobs",
                               message=f"jobset failed: node exit codes {codes}")
        else:
            fake.set_condition(name, "Complete", reason="JobsCompleted", message="done")

    return run


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """The fake API server, reached the way a user's kubectl would: through $KUBECONFIG."""
    from tests import k8s_api_server

    fake = k8s_api_server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": fake.host}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                  "namespace": "gpunet"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.stop()


def test_the_train_step_runs_two_nodes_through_s3_only(cluster_run, fake_cluster, digits_tiny,
                                                       caplog):
    """``steps.train(nodes=2)`` as the pipeline's student step calls it: a TrainJob is created,
    its nodes share nothing but S3, and the step returns the single-node result and fills its
    Model artifact; a second call (a retried step) re-attaches instead of training again."""
    job_cfg, job, env = cluster_run(epochs=2)
    fake_cluster.on_create.append(local_trainer(fake_cluster, cluster_run.values,
                                                cluster_run.root))
    # the pods get S3 URIs only: no path of this machine reaches them
    assert job_cfg.data.startswith("s3://") and job_cfg.output.startswith("s3://")
    args = " ".join(job["spec"]["trainer"]["args"])
    assert str(digits_tiny) not in args and str(cluster_run.artifact) not in args

    with caplog.at_level(logging.INFO):
        summary = steps.train(cluster_run.cfg, nodes=2, nproc_per_node=1,
                              image="gpunet-train:test", task="student", job_key=KEY)
    (created,) = fake_cluster.created()
    assert created["metadata"]["name"] == trainjob_name(KEY, "student", 1)
    assert job_cfg.output.endswith("/student/output") and "minio" not in job_cfg.output
    assert created["spec"]["trainer"]["args"] == job["spec"]["trainer"]["args"]
    # node 0's log lines reached the step's log through the pod log stream
    assert any("data shards: 2 ranks x 64 of 128" in r.getMessage() for r in caplog.records)

    # the checkpoint landed under the run prefix
    remote = storage.parse_s3_uri(job_cfg.output)
    assert {"last.pth.tar", "model_best.pth.tar", "result.json", "summary.csv"} <= set(
        storage.list_objects(remote))
    result = _s3_json(f"{job_cfg.output}/result.json")
    assert result["epochs"] == 2
    last = result["last"]
    # the ranks, one per node, read disjoint halves of the 128 training images ...
    assert last["shards"] == {"ranks": 2, "samples": 128, "per_rank": 64, "missing": 0,
                              "duplicated": 0}
    # ... and ended with identical weights
    assert len(last["rank_checksums"]) == 2
    assert last["rank_checksums"][0] == last["rank_checksums"][1]

    # each node fetched and verified the dataset into its own cache; only rank 0 wrote outputs
    for rank in (0, 1):
        cached = list((cluster_run.root / f"node{rank}" / "cache").rglob("SHA256SUMS"))
        assert len(cached) == 1, f"node {rank} has no dataset cache"
    assert not list((cluster_run.root / "node1").rglob("last.pth.tar"))

    # the step returned what single-node training returns, and filled its Model artifact
    assert summary == steps.train_result(cluster_run.artifact)
    assert summary["epochs"] == 2 and summary["steps"] == result["steps"]
    assert summary["top1"] == last["top1"]
    local = cluster_run.artifact / "last.pth.tar"
    remote_bytes = storage.read_bytes(remote.join("last.pth.tar"))
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(remote_bytes).digest()
    assert not (cluster_run.artifact / ".fetch").exists()

    # a retried step finds the completed attempt: no second TrainJob, the same result
    again = steps.train(cluster_run.cfg, nodes=2, nproc_per_node=1, image="gpunet-train:test",
                        task="student", job_key=KEY)
    assert again == summary and len(fake_cluster.created()) == 1


def test_a_killed_node_fails_the_job_and_the_next_attempt_resumes(cluster_run):
    """SIGKILL node 1 mid-run: node 0 fails (gloo loses its peer; no restarts in the job);
    the next attempt, as a retried step creates it, resumes from the S3 checkpoint."""
    job_cfg, job, env = cluster_run(epochs=3)
    nodes = Nodes(job, env, cluster_run.root, attempt=0)
    result_uri = f"{job_cfg.output}/result.json"
    deadline = time.monotonic() + 300
    while (_s3_json(result_uri) or {}).get("epochs", 0) < 1:
        assert time.monotonic() < deadline, nodes.tails()
        assert all(p.poll() is None for p in nodes.procs), nodes.tails()
        time.sleep(0.2)
    nodes.kill(1)
    start = time.monotonic()
    codes = nodes.wait(timeout=300)
    assert codes[0] != 0, f"node 0 did not notice its peer died: {nodes.tails()}"
    assert time.monotonic() - start < 240
    done = _s3_json(result_uri)["epochs"]
    assert done < 3, "the kill landed after the run finished; make the epochs longer"

    _, job2, env2 = cluster_run(epochs=3, attempt=2)
    assert job2["metadata"]["name"] != job["metadata"]["name"]
    assert job2["spec"]["trainer"]["args"] == job["spec"]["trainer"]["args"]
    retry = Nodes(job2, env2, cluster_run.root, attempt=1)
    assert retry.wait() == [0, 0], retry.tails()
    assert f"after epoch {done}" in retry.log(0), retry.tails()
    final = _s3_json(result_uri)
    assert final["epochs"] == 3
    summary = steps.collect_outputs(job_cfg.output, cluster_run.artifact)
    assert summary["epochs"] == 3
    rows = (cluster_run.artifact / "summary.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1, 2]


def test_two_nodes_log_into_the_plugins_run_with_each_nodes_system_metrics(
        cluster_run, fake_cluster, tmp_path, monkeypatch):
    """With KFP's MLflow plugin the step's $MLFLOW_RUN_ID reaches the pods in the argv: both
    nodes log into that run, each node its own system metrics (``system/node_<n>/...``), rank 0
    the epochs and the LoggedModel, and no other run is created."""
    from mlflow import MlflowClient

    from tests import mlflow_server

    server = mlflow_server.start(tmp_path / "mlflow")
    try:
        mlc = MlflowClient(server.uri)
        exp = mlc.create_experiment("gpunet")
        plugin_run = mlc.create_run(exp).info.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_RUN_ID", plugin_run)
        job_cfg, job, _ = cluster_run(epochs=2, mlflow=True, system_metrics_interval=0.3)
        args = job["spec"]["trainer"]["args"]
        assert args[args.index("--mlflow-run-id") + 1] == plugin_run
        fake_cluster.on_create.append(local_trainer(fake_cluster, cluster_run.values,
                                                    cluster_run.root))
        steps.train(cluster_run.cfg, nodes=2, nproc_per_node=1, image="gpunet-train:test",
                    task="student", job_key=KEY)
        assert [r.info.run_id for r in mlc.search_runs([exp])] == [plugin_run]
        run = mlc.get_run(plugin_run)
        for node in ("node_0", "node_1"):
            for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
                assert mlc.get_metric_history(plugin_run, f"system/{node}/{key}"), (node, key)
        assert not any(k.startswith("system/cpu") for k in run.data.metrics)  # node ids only
        assert [m.step for m in mlc.get_metric_history(plugin_run, "top1")] == [0, 1]
        (model,) = mlc.search_logged_models([exp])
        assert model.source_run_id == plugin_run
        # the LoggedModel's id came back with the outputs, beside the checkpoint
        assert (cluster_run.artifact / "mlflow_model_id").read_text() == model.model_id
        assert run.info.status == "RUNNING"  # the plugin ends it
    finally:
        server.stop()
