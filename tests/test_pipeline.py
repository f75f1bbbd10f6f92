"""The KFP pipeline: compiled structure, platform config, submit payloads, local runs
(schedule: tests/test_schedule.py)."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from pipelines import cli
from tests import kfp_api_server
from tests.train_helpers import TINY_PIPELINE

STEPS = ["prepare-dataset", "train-teacher", "train-student", "validate", "export-onnx",
         "quantize", "validate-deployed", "benchmark", "promote", "report"]


def compiled(tmp_path, **kw):
    path = cli.compile_pipeline(tmp_path / "p.yaml", **kw)
    docs = list(yaml.safe_load_all(path.read_text()))
    return path.read_text(), docs[0], (docs[1] if len(docs) > 1 else {})


def test_dag_steps_order_and_artifact_types(tmp_path):
    _, spec, platform = compiled(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(STEPS) <= set(tasks)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["prepare-dataset"] == set()
    assert deps["train-teacher"] == {"prepare-dataset"}
    assert {"prepare-dataset", "train-teacher"} <= deps["train-student"]
    assert "train-student" in deps["export-onnx"]
    assert deps["validate"] == {"export-onnx", "prepare-dataset"}  # the FP32 export, in ORT
    assert deps["quantize"] == {"export-onnx", "prepare-dataset"}
    assert deps["validate-deployed"] == {"quantize", "prepare-dataset"}
    assert deps["benchmark"] == {"quantize"}  # the deployed graph is what is timed
    assert {"validate", "validate-deployed", "benchmark", "quantize",
            "train-student"} <= deps["promote"]
    # the report compares the registered candidate with its champion history: after promote
    assert deps["report"] == {"validate-deployed", "benchmark", "promote"}
    comps = spec["components"]

    def out_types(step):
        outs = comps[tasks[step]["componentRef"]["name"]].get("outputDefinitions", {})
        return {k: v["artifactType"]["schemaTitle"] for k, v in outs.get("artifacts", {}).items()}

    assert out_types("prepare-dataset") == {"dataset": "system.Dataset"}
    assert out_types("train-student") == {"checkpoint": "system.Model", "metrics": "system.Metrics"}
    assert out_types("validate")["confusion"] == "system.ClassificationMetrics"
    assert out_types("export-onnx") == {"onnx": "system.Model"}
    assert out_types("quantize") == {"deployed": "system.Model"}
    assert out_types("validate-deployed")["results"] == "system.Artifact"
    assert out_types("benchmark")["metrics"] == "system.Metrics"
    assert out_types("promote") == {"report": "system.Markdown"}
    assert out_types("report") == {"html": "system.HTML"}
    # promotion is never replayed from cache; everything else may be
    assert tasks["promote"]["cachingOptions"] == {}
    assert tasks["train-student"]["cachingOptions"] == {"enableCache": True}
    assert not platform, "the laptop DAG needs no Kubernetes platform config"
    # our images ship kfp: no task starts with `pip install kfp` (PyPI access, ~1 s per task)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "kfp.dsl.executor_main" in command and "pip install" not in command, name


def test_cluster_platform_config_and_no_secret_values(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value-42")
    text, spec, platform = compiled(tmp_path, gpus_per_node=8)
    assert "sentinel-secret-value-42" not in text
    execs = spec["deploymentSpec"]["executors"]
    train = next(e for name, e in execs.items() if "train-student" in name)
    assert train["container"]["resources"]["accelerator"]["resourceCount"] == "8"
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    student = next(v for k, v in kube.items() if "train-student" in k)
    assert student["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert student["secretAsEnv"][0]["secretName"] == "gpunet-s3"
    from_secret = {m["secretName"]: {k["envVar"] for k in m["keyToEnv"]}
                   for m in student["secretAsEnv"]}
    assert from_secret == {"gpunet-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "gpunet-mlflow-auth": {"MLFLOW_TRACKING_USERNAME",
                                                  "MLFLOW_TRACKING_PASSWORD"}}
    assert student["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert student["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert student["pvcMount"][0]["mountPath"] == "/data"
    # a GPU cluster deploys TensorRT's Q/DQ graphs; the laptop ONNX Runtime's CPU INT8
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["quant_target"]["defaultValue"] == "tensorrt"
    assert defaults["precision"]["defaultValue"] == "fp32"
    _, laptop, _ = compiled(tmp_path / "laptop")
    assert laptop["root"]["inputDefinitions"]["parameters"]["quant_target"]["defaultValue"] \
        == "cpu"


def test_pipeline_defaults_are_the_tools_own():
    """The DAG's quantization defaults are the ones `gpunet quantize`/`promote` use."""
    import inspect

    from gpunet_core.inference.quantize import DEFAULT_CALIB_SAMPLES
    from gpunet_core.mlops.registry import DEFAULT_MAX_QUANT_DROP
    from pipelines.gpunet_training import gpunet_training

    params = inspect.signature(gpunet_training.pipeline_func).parameters
    assert params["max_quant_drop"].default == DEFAULT_MAX_QUANT_DROP
    assert params["calib_samples"].default == DEFAULT_CALIB_SAMPLES


def test_parameters_and_cron():
    assert cli.parse_params(["epochs=3", "enable_distill=false", "lr=0.1"]) == {
        "epochs": 3, "enable_distill": False, "lr": 0.1}
    with pytest.raises(cli.PipelineError, match="unknown pipeline parameter 'epoch'"):
        cli.parse_params(["epoch=3"])
    with pytest.raises(cli.PipelineError, match="expected a int"):
        cli.parse_params(["epochs=three"])
    assert cli.to_kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert cli.to_kfp_cron("30 */15 9-17 * * MON-FRI") == "30 */15 9-17 * * MON-FRI"
    for bad, message in [("0 25 * * *", "hour field '25': 25 is outside 0-23"),
                         ("* * *", "expected 5 fields"), ("0 3 * * 1/0", "bad step"),
                         ("0 3 32 * *", "day of month field '32'"),
                         ("0 3 * FOO *", "'FOO' is not a number")]:
        with pytest.raises(cli.PipelineError, match=message.replace("(", r"\(")):
            cli.to_kfp_cron(bad)


@pytest.fixture
def fake_kfp():
    server = kfp_api_server.start()
    yield server
    server.stop()


def test_submit_sends_spec_and_parameters(fake_kfp):
    out = cli.submit(fake_kfp.host, {"epochs": 3, "model_name": "gpunet_1"}, experiment="gpunet",
                     run_name="nightly")
    assert out == {"run_id": "run-1", "url": f"{fake_kfp.host}/#/runs/details/run-1"}
    (req,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert req.body["display_name"] == "nightly" and req.body["experiment_id"] == "exp-1"
    assert req.body["runtime_config"]["parameters"] == {"epochs": 3, "model_name": "gpunet_1"}
    # with a platform spec, KFP nests {"pipeline_spec": ..., "platform_spec": ...}
    sent = req.body["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "gpunet-training"
    assert "train-student" in sent["pipeline_spec"]["root"]["dag"]["tasks"]
    assert sent["platform_spec"]["platforms"]["kubernetes"]


def test_bad_inputs_before_anything_is_sent(fake_kfp, capsys):
    assert cli.main(["schedule", "--host", fake_kfp.host, "--cron", "61 * * * *"]) == 2
    assert "minute field '61'" in capsys.readouterr().err
    assert not fake_kfp.find("POST", "/apis/v2beta1/recurringruns")
    assert cli.main(["submit", "--host", fake_kfp.host, "--param", "nope=1"]) == 2
    assert "unknown pipeline parameter 'nope'" in capsys.readouterr().err
    assert cli.main(["list-runs", "--host", "http://127.0.0.1:9"]) == 2
    assert "http://127.0.0.1:9" in capsys.readouterr().err


def test_run_local_preflight_fails_before_the_dag(tmp_path, capsys, s3_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    work = tmp_path / "w"
    assert cli.main(["run-local", "--workdir", str(work), "--param",
                     f"dataset_source={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["run-local", "--workdir", str(work), "--param",
                     "dataset_source=s3://no-such-bucket/data"]) == 2
    assert "no-such-bucket" in capsys.readouterr().err
    assert not (work / "kfp").exists()


def test_run_local_summary_splits_the_steps_work_from_the_rest():
    from pipelines.timing import pipeline_overhead

    summary = {"registered_model": "gpunet", "version": "1", "alias": "champion",
               "champion_version": "1", "top1": 90.0, "latency_ms": 1.5,
               "latency_backend": "onnxruntime", "seconds": 120.4,
               "tracking_uri": "sqlite:///m.db", "kfp_outputs": "runs/local/kfp",
               "overhead": pipeline_overhead([{"name": "a", "wall_s": 50.0, "compute_s": 45.0},
                                              {"name": "b", "wall_s": 68.0, "compute_s": 63.0}],
                                             total_wall_s=120.4)}
    first = cli.format_summary(summary).splitlines()[0]
    assert first == ("pipeline finished in 120 s (108 s in the steps' own work, 10 % process "
                     "start, imports, artifact copies and logging, timed around its 2 task "
                     "processes)")
    assert cli.format_summary({**summary, "overhead": None}).splitlines()[0] == \
        "pipeline finished in 120 s"  # every task from the cache: nothing was timed
    # the UI link opens the model-training view (MLflow 3.17's UI defaults to GenAI)
    served = cli.format_summary({**summary, "tracking_uri": "http://mlflow:5000",
                                 "experiment_id": "3"})
    assert "http://mlflow:5000/#/experiments/3?workflowType=machine_learning" in served


def test_list_runs(fake_kfp, capsys):
    assert cli.main(["list-runs", "--host", fake_kfp.host]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == "run-1"


def test_cluster_pipeline_parses_strictly_as_kfp_protos(tmp_path):
    """What the KFP 2.17 backend reads: the IR as ``PipelineSpec``, the platform part as
    ``PlatformSpec`` and each task's Kubernetes config as kfp-kubernetes'
    ``KubernetesExecutorConfig``, all with unknown fields rejected."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    _, spec, platform = compiled(tmp_path, gpus_per_node=8)
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    parsed = json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(),
                                   ignore_unknown_fields=False)
    # finished runs' pods are garbage-collected after a week (kept that long for their logs)
    assert parsed.platforms["kubernetes"].pipelineConfig.resource_ttl_on_completion == 7 * 24 * 3600
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    configs = {name: json_format.ParseDict(body, k8s_pb2.KubernetesExecutorConfig(),
                                           ignore_unknown_fields=False)
               for name, body in executors.items()}
    assert len(configs) == len(STEPS)
    for name, config in configs.items():
        # every task: a timeout, non-root, the credentials by reference
        assert config.active_deadline_seconds > 0, name
        assert config.security_context.run_as_non_root, name
        assert config.security_context.run_as_user == 10001, name
        assert {s.secret_name for s in config.secret_as_env} == {"gpunet-s3",
                                                                  "gpunet-mlflow-auth"}, name
    student = next(c for n, c in configs.items() if "train-student" in n)
    assert student.active_deadline_seconds == 7 * 24 * 3600
    assert student.empty_dir_mounts[0].mount_path == "/dev/shm"


def test_cluster_pipeline_gives_the_train_step_its_pod_settings(tmp_path):
    from gpunet_core.mlops.cluster import PodSettings

    _, spec, platform = compiled(tmp_path, gpus_per_node=4)
    inputs = spec["root"]["dag"]["tasks"]["train-student"]["inputs"]["parameters"]
    settings = PodSettings.from_json(inputs["pod_settings"]["runtimeValue"]["constant"])
    assert settings.gpus_per_node == 4
    assert settings.node_selector == {"nvidia.com/gpu.present": "true"}
    # the same secrets feed the single-node tasks (kfp-kubernetes) and the TrainJob pods
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    student = next(v for k, v in kube.items() if "train-student" in k)
    task_env = {(m["secretName"], k["secretKey"], k["envVar"])
                for m in student["secretAsEnv"] for k in m["keyToEnv"]}
    pod_env = {(r.source, r.key, r.name) for r in settings.env if r.source_kind == "secret"}
    assert task_env == pod_env
    # the TrainJob is keyed by the checkpoint artifact's URI at run time, not by a run-id
    # parameter: that would make every run's training miss the cache
    assert "kfp_run_id" not in inputs
    # the laptop DAG compiles no settings in: the step falls back to PodSettings()
    _, local, _ = compiled(tmp_path / "local")
    local_inputs = local["root"]["dag"]["tasks"]["train-student"]["inputs"]["parameters"]
    assert local_inputs["pod_settings"]["runtimeValue"]["constant"] == ""


# --------------------------------------------------------------------------- full local runs

def run_local(workdir, params, **env):
    """Run the DAG; returns (summary, everything it printed)."""
    from tests.train_helpers import run_pipeline

    result, _ = run_pipeline(workdir, params, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the summary is the last line
    return summary, result.stdout + result.stderr


def files_containing(root, secrets: list[str]) -> list[str]:
    """Files under ``root`` whose bytes contain any of ``secrets``."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if any(secret.encode() in data for secret in secrets):
                hits.append(str(path))
    return hits


@pytest.mark.slow
def test_dag_with_mlflow_server_and_s3_artifacts(tmp_path, s3_env, monkeypatch):
    import mlflow.pytorch

    import gpunet_core.mlops.tracking  # noqa: F401  (sets the MLflow client defaults)
    from tests import mlflow_server

    server = mlflow_server.start(tmp_path / "mlflow",
                                 artifacts_destination=f"s3://{s3_env.bucket}/mlflow",
                                 extra_env={**s3_env.env(),
                                            "MLFLOW_S3_ENDPOINT_URL": s3_env.endpoint})
    try:
        # make run's DAG as it is (teacher, 2 torchrun workers, the defaults), against a
        # real MLflow server with S3 artifacts
        out, logs = run_local(tmp_path / "work", ["registered_model=gpunet-s3"],
                              MLFLOW_TRACKING_URI=server.uri)
        assert out["alias"] == "champion"
        # the defaults make a model that works (docstring of gpunet_training): the figure
        # the run itself reports
        assert out["top1"] >= 95.0, out
        assert out["teacher"] == "gpunet_0" and out["teacher_top1"] > 90.0
        # each task's process was timed from outside, against the work its step logged
        overhead = out["overhead"]
        tasks = {st["task"]: st for st in overhead["steps"]}
        assert set(tasks) == set(STEPS) and len(overhead["steps"]) == len(STEPS)
        assert tasks["train-teacher"]["name"] == "train(gpunet_0)"
        assert tasks["train-student"]["name"] == "train(gpunet_0)"
        assert all(0 < st["compute_s"] < st["wall_s"] for st in tasks.values())
        assert overhead["tasks_s"] <= overhead["total_wall_s"]
        assert overhead["total_wall_s"] == pytest.approx(out["seconds"], abs=0.1)
        # the S3 keys were in every step's environment: none may reach a log or an output
        secrets = [s3_env.secret_key, s3_env.access_key]
        assert not [s for s in secrets if s in logs + (tmp_path / "mlflow" / "server.log")
                    .read_text(errors="replace")]
        assert not files_containing(tmp_path / "work", secrets)
        keys = [o["Key"] for o in s3_env.client().list_objects_v2(
            Bucket=s3_env.bucket, Prefix="mlflow/").get("Contents", [])]
        # the LoggedModel's files, both flavors, in the S3 artifact store
        assert any(re.search(r"/models/m-\w+/artifacts/MLmodel$", k) for k in keys), keys
        assert any(re.search(r"/models/m-\w+/artifacts/model\.onnx$", k) for k in keys)
        assert any(k.endswith("summary.csv") for k in keys)
        assert_ui_view(server.uri, "gpunet", "gpunet-s3")
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        import torch

        model = mlflow.pytorch.load_model("models:/gpunet-s3@champion")
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.stop()


def rest(uri: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API, the one its web UI makes (GET, or POST with ``body``)."""
    import urllib.parse
    import urllib.request

    if body is None:
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}")
    else:
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def assert_ui_view(uri: str, experiment: str, registered: str) -> None:
    """What the MLflow UI shows after a DAG run, read through the REST API it uses: a
    model-training experiment, one LoggedModel with its validation and latency metrics, the
    registered version's ``models:/m-...`` source and its alias, the run's system metrics."""
    import urllib.parse

    exp = rest(uri, "experiments/get-by-name?experiment_name=" + experiment)["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    models = rest(uri, "logged-models/search",
                  {"experiment_ids": [exp["experiment_id"]]})["models"]
    assert len(models) == 1, models  # one row per candidate, both flavors in it
    info, data = models[0]["info"], models[0].get("data", {})
    assert info["status"] == "LOGGED_MODEL_READY"
    metrics = {m["key"]: m for m in data.get("metrics", [])}
    assert {"val_top1", "val_top5", "bench_latency_ms_median", "top1"} <= set(metrics)
    assert metrics["val_top1"].get("dataset_digest")  # measured on a named validation set
    assert not [k for k in metrics if k.startswith("system/")]  # those are the run's
    model = rest(uri, "registered-models/get?name=" + urllib.parse.quote(registered))
    aliases = {a["alias"]: a["version"] for a in model["registered_model"].get("aliases", [])}
    version = rest(uri, f"model-versions/get?name={urllib.parse.quote(registered)}"
                        f"&version={aliases['champion']}")["model_version"]
    assert version["source"] == f"models:/{info['model_id']}"
    model_tags = {t["key"]: t["value"] for t in info.get("tags", [])}
    linked = [(v["name"], str(v["version"])) for v in json.loads(model_tags["mlflow.modelVersions"])]
    assert linked == [(registered, aliases["champion"])]  # "Model versions" on its page
    run = rest(uri, "runs/get?run_id=" + info["source_run_id"])["run"]
    run_metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes"} <= run_metrics
    assert {"val_top1", "bench_latency_ms_median"} <= run_metrics


def blank_images(root, classes: int = 10, per_class: int = 4, size: int = 32):
    """An ImageFolder of black images: a calibration set that sees no real activations."""
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_int8_dag_deploys_the_quantized_graph_and_the_gate_refuses_a_broken_one(tmp_path,
                                                                               monkeypatch):
    """precision=int8 under kfp.local: the registered version is the INT8 graph, measured; the
    same run calibrated on blank images (every step before quantize from the cache) is refused
    by the accuracy gate, its reason in the promotion report."""
    import mlflow.artifacts
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import Model

    work = tmp_path / "work"
    # a model that learns something (no warmup), so a broken quantization shows
    params = TINY_PIPELINE + ["enable_distill=false", "nproc_per_node=1", "warmup_epochs=0",
                              "epochs=3", "precision=int8", "max_quant_drop=5"]
    first, logs = run_local(work, params)
    assert first["precision"] == "int8" and first["alias"] == "champion", first
    assert first["fp32_top1"] > 30, "the FP32 model must be well above chance for this test"
    assert first["top1"] >= first["fp32_top1"] - 5
    assert "deployed int8 (FP32 top-1" in cli.format_summary(first)
    mlc = MlflowClient(first["tracking_uri"])
    version = mlc.get_model_version("gpunet", first["version"])
    assert version.tags["precision"] == "int8" and version.tags["quant_target"] == "cpu"
    assert float(version.tags["fp32_top1"]) == first["fp32_top1"]
    # the registered onnx flavor is the INT8 graph that was validated and timed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first["tracking_uri"])
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                dst_path=str(tmp_path / "model"))
    graph = onnx.load(str(os.path.join(local, Model.load(local).flavors["onnx"]["data"])))
    assert any(n.op_type == "QLinearConv" for n in graph.graph.node)

    blank = blank_images(tmp_path / "blank")
    second, logs = run_local(work, params + [f"calib_data={blank}"])
    assert second["version"] == "2" and second["alias"] == "challenger", second
    assert second["fp32_top1"] == first["fp32_top1"]  # the same checkpoint, from the cache
    assert second["fp32_top1"] - second["top1"] > 5
    assert "max_quant_drop 5" in second["promotion"]
    assert "why not champion: " in cli.format_summary(second)
    assert "below its own FP32 top-1" in cli.format_summary(second)
    reports = sorted((work / "kfp").glob("*/promote/report"), key=os.path.getmtime)
    text = reports[-1].read_text()
    assert "Deployed precision: int8 (target cpu)" in text and "max_quant_drop 5" in text
