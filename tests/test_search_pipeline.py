"""The ``gpunet_search`` KFP pipeline: its compiled structure (the workers' ParallelFor, the
study's Secret on a cluster), its steps' storage and pick rules, the CLI's up-front checks, and
a whole local run (kfp.local: two workers on one sqlite study, the front, the chosen spec
trained and registered)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from gpunet_core import steps
from pipelines import cli
from pipelines.gpunet_search import SEARCH_TIMEOUTS_S, STUDY_ENV, STUDY_SECRET
from tests.search_helpers import tiny_space
from tests.train_helpers import TINY_PIPELINE, run

SEARCH_TASKS = ["search-setup", "search-worker", "search-front"]
TRAIN_TASKS = ["train-teacher", "train-student", "export-onnx", "validate", "quantize",
               "validate-deployed", "benchmark", "promote", "report"]


def compiled(tmp_path, **kw):
    path = cli.compile_pipeline(tmp_path / "s.yaml", pipeline="search", **kw)
    docs = list(yaml.safe_load_all(path.read_text()))
    return path.read_text(), docs[0], (docs[1] if len(docs) > 1 else {})


def loop_of(spec) -> tuple[str, dict, dict]:
    """The root DAG's ParallelFor task, its sub-DAG component's tasks."""
    tasks = spec["root"]["dag"]["tasks"]
    (name,) = [n for n, t in tasks.items() if "parameterIterator" in t]
    body = spec["components"][tasks[name]["componentRef"]["name"]]["dag"]["tasks"]
    return name, tasks[name], body


# --------------------------------------------------------------------------- compiled DAG


def test_search_dag_fans_workers_out_over_the_setup_output_and_trains_the_chosen_spec(tmp_path):
    _, spec, platform = compiled(tmp_path)
    assert spec["pipelineInfo"]["name"] == "gpunet-search"
    tasks = spec["root"]["dag"]["tasks"]
    loop, loop_task, body = loop_of(spec)
    assert set(body) == {"search-worker"}  # the only task inside the ParallelFor
    # the items are the setup task's output (the worker indices), one worker per item
    items = loop_task["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--search-setup-Output"
    worker_inputs = body["search-worker"]["inputs"]
    assert worker_inputs["parameters"]["worker"]["componentInputParameter"] == \
        loop_task["parameterIterator"]["itemInput"]
    assert "setup" in worker_inputs["artifacts"] and "dataset" in worker_inputs["artifacts"]
    assert "iteratorPolicy" not in loop_task  # parallelism 0: every worker at once
    assert {"prepare-dataset", "search-setup", "search-front", *TRAIN_TASKS} <= set(tasks)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["search-setup"] == {"prepare-dataset"}
    assert loop in deps["search-front"]  # after every worker
    # the workers' counts are collected from the loop
    collected = tasks["search-front"]["inputs"]["parameters"]["trials_run"]
    assert collected["taskOutputParameter"]["producerTask"] == loop
    # the chosen spec is what the student trains
    student = tasks["train-student"]["inputs"]["artifacts"]["spec"]["taskOutputArtifact"]
    assert student == {"outputArtifactKey": "spec", "producerTask": "search-front"}
    # the study is state outside the inputs: no search task is ever served from a cache
    for name in ("search-setup", "search-front"):
        assert tasks[name]["cachingOptions"] == {}, name
    assert body["search-worker"]["cachingOptions"] == {}
    assert body["search-worker"]["retryPolicy"]["maxRetryCount"] == 1
    # the run's outputs: the front's folder and the chosen spec's URI
    outs = spec["root"]["outputDefinitions"]
    assert set(outs["artifacts"]) == {"front"} and set(outs["parameters"]) == {"spec_uri"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["backend"]["defaultValue"] == "onnxruntime"
    assert params["references"]["defaultValue"] is False  # minutes of CPU on a laptop
    assert params["study_storage"]["defaultValue"] == ""
    setup_args = tasks["search-setup"]["inputs"]["parameters"]
    assert setup_args["shared_storage"]["runtimeValue"]["constant"] is False
    assert not platform, "the laptop DAG needs no Kubernetes platform config"


def test_parallelism_is_compiled_into_the_loop(tmp_path):
    _, spec, _ = compiled(tmp_path, parallelism=3)
    _, loop_task, _ = loop_of(spec)
    assert loop_task["iteratorPolicy"]["parallelismLimit"] == 3
    with pytest.raises(cli.PipelineError, match="--parallelism"):
        cli.compile_pipeline(tmp_path / "t.yaml", parallelism=2)  # training has no loop


def test_cluster_search_tasks_get_the_study_secret_and_parse_as_kfp_protos(tmp_path,
                                                                           monkeypatch):
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    monkeypatch.setenv(STUDY_ENV, "postgresql+psycopg2://optuna:sentinel-pass-42@db/optuna")
    text, spec, platform = compiled(tmp_path, gpus_per_node=1)
    assert "sentinel-pass-42" not in text  # the URL is the pods' Secret, never compiled in
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    configs = {name: json_format.ParseDict(body, k8s_pb2.KubernetesExecutorConfig(),
                                           ignore_unknown_fields=False)
               for name, body in executors.items()}
    assert len(configs) == 1 + len(SEARCH_TASKS) + len(TRAIN_TASKS)

    def config(task: str):
        (found,) = [c for n, c in configs.items() if n == f"exec-{task}"]
        return found

    for name in SEARCH_TASKS:
        cfg = config(name)
        env = {(s.secret_name, k.secret_key, k.env_var) for s in cfg.secret_as_env
               for k in s.key_to_env}
        assert (STUDY_SECRET, STUDY_ENV, STUDY_ENV) in env, name
        assert {s.secret_name for s in cfg.secret_as_env} == {"gpunet-s3", "gpunet-mlflow-auth",
                                                               STUDY_SECRET}, name
        assert cfg.active_deadline_seconds == SEARCH_TIMEOUTS_S[name], name
        assert cfg.security_context.run_as_non_root and \
            cfg.security_context.run_as_user == 10001, name
    for name in ("prepare-dataset", *TRAIN_TASKS):  # least privilege: only the search's tasks
        assert STUDY_SECRET not in {s.secret_name for s in config(name).secret_as_env}, name
    # latency is measured on the GPU node where the setup and the workers run
    execs = spec["deploymentSpec"]["executors"]
    for name in ("search-setup", "search-worker"):
        assert execs[f"exec-{name}"]["container"]["resources"]["accelerator"][
            "resourceCount"] == "1", name
        assert dict(config(name).node_selector.labels) == {"nvidia.com/gpu.present": "true"}
    assert "resources" not in execs["exec-search-front"]["container"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["backend"]["defaultValue"] == "tensorrt"
    assert params["quant_target"]["defaultValue"] == "tensorrt"
    assert params["references"]["defaultValue"] is True
    # the pods share no disk: search-setup refuses the sqlite default there
    setup_args = spec["root"]["dag"]["tasks"]["search-setup"]["inputs"]["parameters"]
    assert setup_args["shared_storage"]["runtimeValue"]["constant"] is True


def test_the_study_env_and_secret_are_the_searchs_and_the_manifests():
    from pathlib import Path

    from gpunet_core.search.study import STORAGE_ENV

    assert STUDY_ENV == STORAGE_ENV
    manifests = Path(__file__).resolve().parents[1] / "manifests"
    assert f"name: {STUDY_SECRET}" in (manifests / "base" / "kustomization.yaml").read_text()
    assert STUDY_ENV in (manifests / "base" / "secrets" / "optuna.env.example").read_text()


def test_search_parameters_include_the_training_chains():
    search = cli.pipeline_parameters("search")
    training = cli.pipeline_parameters("training")
    # every training parameter but those the search decides (the architecture, the
    # dataset's preparation is shared, the benchmark's backend is the search's)
    assert set(training) - set(search) == {"model_name", "bench_backend"}
    for name in set(training) & set(search) - {"quant_target"}:
        assert search[name] == training[name], name
    for name in ("budget_ms", "trials", "workers", "backend", "precision", "img_size",
                 "proxy_epochs", "proxy_images", "study_name", "study_storage", "references",
                 "search_space", "pick"):
        assert name in search, name


# --------------------------------------------------------------------------- steps


def test_the_storage_is_the_parameter_then_the_secret_then_the_local_file(tmp_path,
                                                                          monkeypatch):
    monkeypatch.delenv(STUDY_ENV, raising=False)
    db = tmp_path / "setup" / "study.db"
    assert steps.search_storage_url("", db) == f"sqlite:///{db}"
    with pytest.raises(steps.StepError, match="needs a database"):
        steps.search_storage_url("", None)  # a cluster's tasks share no disk
    monkeypatch.setenv(STUDY_ENV, "postgresql+psycopg2://u:secret@db/optuna")
    assert steps.search_storage_url("", db) == "postgresql+psycopg2://u:secret@db/optuna"
    assert steps.search_storage_url("sqlite:///x.db", db) == "sqlite:///x.db"
    # a task that resolves another storage than the setup task did fails, password redacted
    setup = {"config": {"data": "d", "budget_ms": 1.0, "proxy": {}}, "out": str(tmp_path),
             "storage": "sqlite:///elsewhere.db", "local_db": None}
    with pytest.raises(steps.StepError) as err:
        steps.search_config(setup)
    assert "postgresql+psycopg2://u:***@db/optuna" in str(err.value)
    assert "secret" not in str(err.value)


def test_the_pick_rule_chooses_within_the_budget():
    front = [{"trial": 3, "latency_ms": 1.0, "proxy_top1": 50.0},
             {"trial": 1, "latency_ms": 2.0, "proxy_top1": 70.0},
             {"trial": 2, "latency_ms": 4.0, "proxy_top1": 80.0}]
    assert steps.pick_from_front(front, "most_accurate", 5.0)["trial"] == 2
    assert steps.pick_from_front(front, "most_accurate", 3.0)["trial"] == 1
    assert steps.pick_from_front(front, "fastest", 5.0)["trial"] == 3
    with pytest.raises(steps.StepError, match="no trial within the 0.5 ms budget"):
        steps.pick_from_front(front, "most_accurate", 0.5)
    with pytest.raises(steps.StepError, match="pick must be one of"):
        steps.pick_from_front(front, "best", 5.0)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("param, message", [
    ("budget_ms=0", "--param budget_ms=0.0: must be > 0"),
    ("budget_ms=-2.5", "--param budget_ms=-2.5: must be > 0"),
    ("backend=tpu", "--param backend='tpu': valid values are onnxruntime, torch, tensorrt"),
    ("workers=0", "--param workers=0: must be >= 1"),
    ("pick=best", "--param pick='best': valid values are most_accurate, fastest"),
    ("study_storage=/tmp/x.db", "expected an Optuna storage URL"),
    ("search_space=/no/such/space.yaml", "search space file not found"),
    ("model_name=gpunet_1", "unknown pipeline parameter 'model_name'"),
])
def test_bad_search_parameters_fail_in_one_line_before_the_dag(tmp_path, capsys, param,
                                                               message):
    work = tmp_path / "w"
    assert cli.main(["run-local", "--pipeline", "search", "--workdir", str(work), "--param",
                     param]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pipelines run-local: error: "), err
    assert message in err
    assert not work.exists()


def test_a_backend_this_machine_lacks_fails_before_the_dag(tmp_path, capsys):
    from gpunet_core.inference.tensorrt import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT works here")
    work = tmp_path / "w"
    assert cli.main(["run-local", "--pipeline", "search", "--workdir", str(work), "--param",
                     "backend=tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the search would refuse this run: --backend tensorrt cannot measure here" in err
    assert len(err.splitlines()) == 1
    assert not work.exists()


def test_compile_command_writes_the_search_pipeline(tmp_path, capsys):
    out = tmp_path / "search.yaml"
    assert cli.main(["compile", "--pipeline", "search", "--gpus-per-node", "1",
                     "--parallelism", "4", "-o", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert loop_of(spec)[1]["iteratorPolicy"]["parallelismLimit"] == 4


# --------------------------------------------------------------------------- a local run


@pytest.mark.slow
def test_a_local_search_run_shares_one_study_and_trains_the_chosen_spec(tmp_path):
    """kfp.local, two workers at once on one sqlite study, the tiny space at 32 px within a
    generous budget (every candidate of that space is far below 50 ms on any CPU), then the
    training chain on the most accurate front member (about 3.5 minutes on 2 cores)."""
    import optuna
    from mlflow import MlflowClient

    work = tmp_path / "work"
    params = [*TINY_PIPELINE, "enable_distill=false", "nproc_per_node=1", "trials=4",
              "workers=2", "proxy_epochs=1", "proxy_images=128", "references=false",
              "img_size=32", "budget_ms=50", "latency_iterations=10",
              f"search_space={tiny_space(tmp_path)}", "study_name=pipeline-test"]
    cmd = [sys.executable, "-m", "pipelines", "run-local", "--pipeline", "search", "--workdir",
           str(work), "--json"]
    for p in params:
        cmd += ["--param", p]
    result = run(cmd, timeout=900, GPUNET_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    search = summary["search"]

    # the study: the default storage under --workdir, every trial numbered once
    db = work / "search" / "study.db"
    assert search["storage"] == f"sqlite:///{db}"
    study = optuna.load_study(study_name="pipeline-test", storage=f"sqlite:///{db}")
    numbers = [t.number for t in study.trials]
    assert len(numbers) >= 4 and len(set(numbers)) == len(numbers)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 4, [t.state for t in study.trials]
    # both workers were tasks of the run (kfp.local runs up to 2 loop iterations at once)
    run_dir = next((work / "kfp").iterdir())
    assert sorted(p.name for p in run_dir.glob("for-loop-*-iteration-*")) == \
        ["for-loop-1-iteration-0", "for-loop-1-iteration-1"]

    # the front artifact: gpunet search's files
    front = run_dir / "search-front" / "front"
    assert search["front_dir"] == str(front)
    pareto = json.loads((front / "pareto.json").read_text())
    assert pareto["schema"] == "gpunet.search.pareto/v1" and pareto["front"]
    assert (front / "pareto.png").stat().st_size > 0
    assert all((front / r["spec_path"]).is_file() for r in pareto["front"])
    chosen = search["chosen"]
    assert int(chosen["trial"]) in {r["trial"] for r in pareto["front"]}
    assert chosen["latency_ms"] <= 50
    assert chosen["proxy_top1"] == max(r["proxy_top1"] for r in pareto["front"])
    spec_file = run_dir / "search-front" / "spec"
    assert search["spec_uri"] == str(spec_file)
    assert json.loads(spec_file.read_text()) == \
        json.loads((front / chosen["spec_path"]).read_text())

    # the chosen spec was trained, registered and promoted under its own name
    trial = int(chosen["trial"])
    name_prefix = f"pipeline-test-trial-{trial:05d}-"
    assert summary["alias"] == "champion" and summary["version"] == "1"
    version = MlflowClient(summary["tracking_uri"]).get_model_version("gpunet", "1")
    assert version.tags["model"].startswith(name_prefix), version.tags
    kept = list((run_dir / "train-student" / "checkpoint").glob(f"{name_prefix}*.json"))
    assert len(kept) == 1
    assert json.loads(kept[0].read_text()) == json.loads(spec_file.read_text())
    assert f"* trial {trial:>4}:" in cli.format_summary(summary)
