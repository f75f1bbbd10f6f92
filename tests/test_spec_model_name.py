"""``model_name`` as an architecture search's GPUNet JSON spec: an ``s3://`` URI or a ``.json``
path (the ``gpunet_training`` DAG's parameter, ``gpunet train --model``), or a KFP artifact
(:func:`pipelines.gpunet_training.train_and_deploy`'s ``spec_artifact``). A spec goes by
``<file stem>-<8 hex of its SHA-256>`` everywhere (MLflow, ONNX, registry) and its verified copy
travels with the checkpoint. (No ``from __future__ import annotations``: KFP reads the test
components' annotations as types.)"""

import copy
import inspect
import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from gpunet_core.models import spec as specs
from gpunet_core.utils.errors import GpunetError, SpecError, StorageError, UnknownModelError
from pipelines import cli
from tests.train_helpers import TINY_PIPELINE


def tiny_spec() -> list[dict]:
    """GPUNet-0's layer types at 32 px, cut down to a stem, two blocks and the tail."""
    raw = specs.spec_json("gpunet_0")
    return [{**raw[0], "img_resolution": 32},
            {**raw[1], "num_out_channels": 8},
            {**raw[4], "num_in_channels": 8, "num_out_channels": 16, "expansion": 2},
            {**raw[9], "num_in_channels": 16, "num_out_channels": 24, "expansion": 2},
            {**raw[-1], "num_in_channels": 24, "num_out_channels": 64}]


def params_of(layers, num_classes: int = 10) -> int:
    from gpunet_core.models.factory import count_parameters, create_model

    return count_parameters(create_model(layers, num_classes=num_classes))


def upload(s3, key: str, body: bytes | str) -> str:
    s3.client().put_object(Bucket=s3.bucket, Key=key,
                           Body=body.encode() if isinstance(body, str) else body)
    return f"s3://{s3.bucket}/{key}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private spec store (the cache folder)."""
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "specs"


# --------------------------------------------------------------------------- names and the store


def test_a_spec_goes_by_its_stem_and_digest_and_its_stored_copy(tmp_path, store):
    path = tmp_path / "trial 17.v2.json"
    path.write_text(json.dumps(tiny_spec()))
    name = specs.model_name(path)
    digest = specs.spec_digest(specs.load_spec(tiny_spec()))
    assert name == f"trial_17_v2-{digest[:8]}"
    assert specs.is_custom_name(name)
    assert json.loads((store / f"{name}.json").read_text()) == tiny_spec()
    # the name builds the same model as the spec, in any process using that store
    assert params_of(name) == params_of(tiny_spec()) == params_of(str(path))
    # key order and layout do not count; the content does
    reordered = [dict(reversed(list(e.items()))) for e in tiny_spec()]
    (tmp_path / "trial 17.v2.json").write_text(json.dumps(reordered, indent=4))
    assert specs.model_name(path) == name
    assert specs.model_name(path, label="trial-17") == f"trial-17-{digest[:8]}"
    # the stored copy (and the one kept with a checkpoint) is known by the same name again
    assert specs.model_name(store / f"{name}.json") == name
    wider = tiny_spec()
    wider[2]["num_out_channels"] = wider[3]["num_in_channels"] = 32
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    assert specs.model_name(tmp_path / "wider.json").split("-")[1] != digest[:8]
    # names are returned as they are
    assert specs.model_name("gpunet_1") == "gpunet_1"
    assert specs.model_name("efficientnet_b0") == "efficientnet_b0"


def test_a_custom_name_needs_its_stored_copy(tmp_path, store):
    with pytest.raises(UnknownModelError, match="none of that name is in the spec store"):
        specs.model_name("trial_3-0123abcd")
    with pytest.raises(UnknownModelError, match="pass the spec itself"):
        params_of("trial_3-0123abcd")
    name = specs.model_name(_write(tmp_path))
    tampered = copy.deepcopy(tiny_spec())
    tampered[1]["num_out_channels"] = tampered[2]["num_in_channels"] = 4
    (store / f"{name}.json").write_text(json.dumps(tampered))
    with pytest.raises(SpecError, match="does not hold spec"):
        params_of(name)


def _write(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_spec()))
    return path


def test_s3_spec_is_fetched_validated_and_one_line_when_wrong(s3_env, tmp_path):
    uri = upload(s3_env, "specs/tiny.json", json.dumps(tiny_spec()))
    assert params_of(uri) == params_of(tiny_spec())  # create_model takes the URI too
    name = specs.model_name(uri)
    assert name.startswith("tiny-") and params_of(name) == params_of(tiny_spec())
    broken = tiny_spec()
    broken[3]["num_in_channels"] = 12
    cases = {
        f"s3://{s3_env.bucket}/specs/missing.json": (SpecError, "no such object in bucket"),
        upload(s3_env, "specs/broken.json", json.dumps(broken)):
            (SpecError, "entry 3, field 'num_in_channels'): channel mismatch"),
        upload(s3_env, "specs/not-json.json", "{layers: "): (SpecError, "not valid JSON"),
        upload(s3_env, "specs/binary.json", b"\xff\xfe\x00"): (SpecError, "not a UTF-8"),
        f"s3://{s3_env.bucket}/specs/": (SpecError, "names one object"),
        "s3://no-such-bucket/specs/tiny.json": (StorageError, "does not exist"),
    }
    for bad, (kind, message) in cases.items():
        with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
            specs.model_name(bad)
        assert "\n" not in str(exc.value)
    # the training step checks it before any training process starts
    from gpunet_core import steps

    with pytest.raises(GpunetError, match="no such object"):
        steps.train_config(tmp_path / "data", tmp_path / "out", model=next(iter(cases)))
    assert not (tmp_path / "out").exists()


def test_gpunet_train_refuses_a_missing_s3_spec(s3_env, tmp_path, digits_tiny, capsys):
    from gpunet_core.cli import main

    missing = f"s3://{s3_env.bucket}/specs/nothing-here.json"
    assert main(["train", str(digits_tiny), "--model", missing, "--output",
                 str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"invalid GPUNet spec ({missing}): no such object" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_multi_node_pods_get_the_spec_through_s3(s3_env, tmp_path, monkeypatch):
    from gpunet_core import steps

    monkeypatch.setenv(steps.RUNS_ENV, f"s3://{s3_env.bucket}/runs")
    cfg = steps.train_config(f"s3://{s3_env.bucket}/datasets/d", tmp_path / "out",
                             model=_write(tmp_path))
    job = steps.cluster_config(cfg, run_id="run-1", task="student")
    assert job.model == f"s3://{s3_env.bucket}/runs/run-1/student/inputs/model/{cfg.model}.json"
    # a pod's `gpunet train` fetches it and trains it by the same name
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "pod-cache"))
    assert specs.model_name(job.model) == cfg.model


# --------------------------------------------------------------------------- the pipeline's CLI


def test_pipeline_parameters_check_a_local_spec(tmp_path):
    good, broken = tmp_path / "good.json", tmp_path / "broken.json"
    good.write_text(json.dumps(tiny_spec()))
    broken.write_text(json.dumps(tiny_spec()[:2]))
    assert cli.parse_params([f"model_name={good}"]) == {"model_name": str(good)}
    assert cli.parse_params(["model_name=s3://b/specs/x.json"])["model_name"]
    with pytest.raises(cli.PipelineError, match="at least a data, a head and a tail"):
        cli.parse_params([f"model_name={broken}"])
    with pytest.raises(cli.PipelineError, match="file not found"):
        cli.parse_params([f"model_name={tmp_path / 'missing.json'}"])
    with pytest.raises(cli.PipelineError, match="or a GPUNet JSON spec: an s3:// URI"):
        cli.parse_params(["model_name=gpunet_9"])
    # a cluster's pods cannot read this machine's files
    with pytest.raises(cli.PipelineError, match="upload it to S3 and pass its s3:// URI"):
        cli.check_cluster_params({"model_name": str(good)})
    cli.check_cluster_params({"model_name": "s3://b/specs/x.json"})


def test_run_local_refuses_a_missing_s3_spec_before_the_dag(s3_env, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    work = tmp_path / "w"
    missing = f"s3://{s3_env.bucket}/specs/missing.json"
    assert cli.main(["run-local", "--workdir", str(work), "--param",
                     f"model_name={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"pipelines run-local: error: invalid GPUNet spec ({missing}): no such object" in err
    assert not work.exists()


# --------------------------------------------------------------------------- the reusable DAG


def test_train_and_deploy_is_the_pipelines_dag_with_its_defaults(tmp_path):
    from kfp import compiler, dsl
    from kfp.dsl import Artifact, Output

    import components as c
    from pipelines.gpunet_training import Platform, build_pipeline, train_and_deploy

    pipeline = inspect.signature(build_pipeline().pipeline_func).parameters
    helper = inspect.signature(train_and_deploy).parameters
    shared = set(helper) - {"platform", "dataset", "spec_artifact"}
    assert shared == set(pipeline) - {"dataset_source", "dataset_img_size", "dataset_per_class"}
    assert {n: helper[n].default for n in shared if n != "quant_target"} == \
        {n: pipeline[n].default for n in shared if n != "quant_target"}

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def pick(spec: Output[Artifact]):
        with open(spec.path, "w") as fh:
            fh.write("[]")

    @dsl.pipeline(name="chained")
    def chained():
        data = c.prepare_dataset(source="digits", img_size=32, per_class=0)
        tasks = train_and_deploy(Platform(), data.outputs["dataset"],
                                 spec_artifact=pick().outputs["spec"])
        assert set(tasks) == {"train-teacher", "train-student", "export-onnx", "validate",
                              "quantize", "validate-deployed", "benchmark", "promote", "report"}

    compiler.Compiler().compile(chained, str(tmp_path / "chained.yaml"))
    tasks = yaml.safe_load((tmp_path / "chained.yaml").read_text())["root"]["dag"]["tasks"]
    assert tasks["train-student"]["inputs"]["artifacts"]["spec"]["taskOutputArtifact"] == {
        "outputArtifactKey": "spec", "producerTask": "pick"}
    # the training DAG binds no spec: its train step takes the optional input unbound
    compiler.Compiler().compile(build_pipeline(), str(tmp_path / "training.yaml"))
    ir = yaml.safe_load((tmp_path / "training.yaml").read_text())
    assert "spec" not in ir["root"]["dag"]["tasks"]["train-student"]["inputs"]["artifacts"]
    student = ir["components"]["comp-train-student"]["inputDefinitions"]["artifacts"]
    assert student["spec"]["isOptional"] is True


# --------------------------------------------------------------------------- full local runs


def registered(tracking_uri: str, name: str, version: str):
    """(the registry's version, its LoggedModel, the registered PyTorch model)."""
    import mlflow.pytorch
    from mlflow import MlflowClient

    mlc = MlflowClient(tracking_uri)
    entry = mlc.get_model_version(name, version)
    logged = mlc.get_logged_model(entry.source.removeprefix("models:/"))
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return entry, logged, model


@pytest.mark.slow
def test_dag_trains_an_s3_spec_and_registers_it(tmp_path, s3_env):
    """``model_name=s3://.../trial-7.json`` through the whole DAG: the registered model is that
    architecture, under its name."""
    from gpunet_core.inference.export import inspect_onnx
    from gpunet_core.models.factory import count_parameters
    from tests.test_pipeline import run_local

    uri = upload(s3_env, "search/trial-7.json", json.dumps(tiny_spec()))
    name = f"trial-7-{specs.spec_digest(specs.load_spec(tiny_spec()))[:8]}"
    work = tmp_path / "work"
    # no teacher (its own gpunet_0 is no part of this), but the student's 2 torchrun ranks
    summary, _ = run_local(work, TINY_PIPELINE + [f"model_name={uri}", "enable_distill=false"])
    assert summary["version"] == "1" and summary["alias"] == "champion", summary
    entry, logged, model = registered(summary["tracking_uri"], "gpunet", "1")
    assert entry.tags["model"] == name and logged.name == name
    assert count_parameters(model) == params_of(tiny_spec()) != params_of("gpunet_0")
    # every rank trained it by that name; the checkpoint carries the architecture
    (ckpt,) = work.glob("kfp/*/train-student/checkpoint")
    assert json.loads((ckpt / f"{name}.json").read_text()) == tiny_spec()
    assert yaml.safe_load((ckpt / "args.yaml").read_text())["model"] == name
    (onnx,) = work.glob("kfp/*/export-onnx/onnx")
    assert inspect_onnx(onnx).model == name
    tasks = {t["task"]: t["name"] for t in summary["overhead"]["steps"]}
    assert tasks["train-student"] == f"train({name})"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task")  # our images' tasks
def test_a_spec_artifact_chains_train_to_promote(tmp_path, store, monkeypatch, digits_tiny):
    """A second pipeline hands ``train_and_deploy`` its spec as an artifact (as an architecture
    search would): trained, exported, validated, benchmarked and registered as that spec."""
    from kfp import dsl, local
    from kfp.dsl import Artifact, Output
    from mlflow import MlflowClient

    import components as c
    from components._images import CPU_IMAGE
    from pipelines.gpunet_training import Platform, train_and_deploy

    @dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
    def choose_spec(layers: str, label: str, spec: Output[Artifact]):
        with open(spec.path, "w") as fh:
            fh.write(layers)
        spec.metadata["name"] = label

    @dsl.pipeline(name="gpunet-chosen-spec")
    def chosen(layers: str, label: str):
        data = c.prepare_dataset(source="digits", img_size=32, per_class=20)
        choice = choose_spec(layers=layers, label=label)
        train_and_deploy(Platform(), data.outputs["dataset"], spec_artifact=choice.outputs["spec"],
                         model_name="gpunet_2", epochs=1, enable_distill=False,
                         nproc_per_node=1, bench_iterations=10, registered_model="searched")

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    MlflowClient(tracking).create_experiment("gpunet",
                                             artifact_location=(tmp_path / "art").as_uri())
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp"), raise_on_error=True, enable_caching=False)
    chosen(layers=json.dumps(tiny_spec()), label="trial-3")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    from gpunet_core.models.factory import count_parameters

    name = f"trial-3-{specs.spec_digest(specs.load_spec(tiny_spec()))[:8]}"
    entry, logged, model = registered(tracking, "searched", "1")
    assert entry.tags["model"] == name and logged.name == name
    assert count_parameters(model) == params_of(tiny_spec())

    # another machine (a later promotion's pod) has no spec store: the champion's spec comes
    # from the copy its training run logged, checked against its name
    from gpunet_core.mlops import registry

    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "elsewhere"))
    on_other = registry.evaluate_version("searched", "1", digits_tiny / "val",
                                         tracking_uri=tracking)
    assert 0 <= on_other["top1"] <= 100
    assert specs.spec_digest(specs.stored_spec(name)) == specs.spec_digest(
        specs.load_spec(tiny_spec()))
    run_artifacts = MlflowClient(tracking).get_run(logged.source_run_id).info.artifact_uri
    logged_copy = Path(urlparse(run_artifacts).path) / f"{name}.json"
    assert logged_copy.is_file()
    wider = tiny_spec()
    wider[2]["num_out_channels"] = wider[3]["num_in_channels"] = 32
    logged_copy.write_text(json.dumps(wider))
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "third"))
    with pytest.raises(registry.RegistryError, match="holds another spec"):
        registry.evaluate_version("searched", "1", digits_tiny / "val", tracking_uri=tracking)
    logged_copy.unlink()
    with pytest.raises(registry.RegistryError, match=f"holds no {name}.json"):
        registry.evaluate_version("searched", "1", digits_tiny / "val", tracking_uri=tracking)
