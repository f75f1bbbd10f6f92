"""Promotion rules on a real MLflow registry (sqlite): champion, challenger, rollback."""

from __future__ import annotations

import json

import mlflow.models
import pytest
from mlflow import MlflowClient

from gpunet_core.cli import main as cli_main
from gpunet_core.mlops import registry

NAME = "gpunet-test"


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlc = MlflowClient(uri)
    mlc.create_registered_model(NAME)
    return mlc


def add_version(mlc, top1, latency):
    version = mlc.create_model_version(NAME, "file:///nowhere/model",
                                       tags={"top1": str(top1), "latency_ms": str(latency)})
    return str(version.version)


def champion(mlc):
    return str(mlc.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def test_first_better_worse_and_rollback(mlflow_sqlite):
    mlc = mlflow_sqlite
    v1 = add_version(mlc, 70.0, 1.0)
    first = registry.promote(NAME, v1, min_top1=50, max_latency_ms=2.0)
    assert first.promoted and first.reason == "first champion" and champion(mlc) == v1

    v2 = add_version(mlc, 72.0, 1.5)
    better = registry.promote(NAME, v2, margin=1.0, max_latency_ms=2.0)
    assert better.promoted and champion(mlc) == v2
    assert better.previous_champion["version"] == v1
    assert str(mlc.get_model_version_by_alias(NAME, registry.PREVIOUS).version) == v1

    v3 = add_version(mlc, 72.5, 1.2)  # better, but not by the margin
    worse = registry.promote(NAME, v3, margin=1.0)
    assert not worse.promoted and worse.alias == registry.CHALLENGER
    assert "does not beat champion" in worse.reason and champion(mlc) == v2
    assert mlc.get_model_version(NAME, v3).tags["promotion"].startswith("challenger:")
    assert "| candidate v3 | 72.5 |" in worse.markdown()

    back = registry.rollback(NAME)
    assert back.version == v1 and champion(mlc) == v1
    assert str(mlc.get_model_version_by_alias(NAME, registry.PREVIOUS).version) == v2


def test_promoting_the_champion_again_changes_nothing(mlflow_sqlite):
    mlc = mlflow_sqlite
    v1 = add_version(mlc, 70.0, 1.0)
    registry.promote(NAME, v1)
    tag = mlc.get_model_version(NAME, v1).tags["promotion"]
    again = registry.promote(NAME, v1)
    assert again.alias == registry.CHAMPION and not again.promoted
    assert again.reason == "it already is the champion"
    version = mlc.get_model_version(NAME, v1)
    assert version.aliases == [registry.CHAMPION]  # not also the challenger
    assert version.tags["promotion"] == tag == "champion: first champion"


@pytest.mark.parametrize("top1,latency,kw,reason", [
    (40.0, 1.0, {"min_top1": 50.0}, "below the minimum 50.00"),
    (90.0, 9.0, {"max_latency_ms": 2.0}, "latency 9 ms exceeds the budget 2 ms"),
])
def test_thresholds_keep_the_champion(mlflow_sqlite, top1, latency, kw, reason):
    mlc = mlflow_sqlite
    v1 = add_version(mlc, 60.0, 1.0)
    registry.promote(NAME, v1)
    v2 = add_version(mlc, top1, latency)
    decision = registry.promote(NAME, v2, **kw)
    assert not decision.promoted and reason in decision.reason
    assert champion(mlc) == v1  # exactly one champion, unchanged


def test_errors_are_clear(mlflow_sqlite, capsys):
    with pytest.raises(registry.RegistryError, match="has no version 7"):
        registry.promote(NAME, "7")
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(NAME)
    assert cli_main(["promote", NAME, "--rollback"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err


def test_a_missing_validation_set_is_refused_before_any_alias_moves(mlflow_sqlite, capsys,
                                                                    tmp_path):
    v1 = add_version(mlflow_sqlite, 55.0, 3.0)
    assert cli_main(["promote", NAME, "--version", v1, "--data", str(tmp_path / "nope")]) == 2
    assert "no such directory; pass the candidate's validation set" in capsys.readouterr().err
    assert not mlflow_sqlite.get_registered_model(NAME).aliases


def test_cli_promote_json(mlflow_sqlite, capsys):
    v1 = add_version(mlflow_sqlite, 55.0, 3.0)
    assert cli_main(["promote", NAME, "--version", v1, "--min-top1", "50", "--json"]) == 0
    assert '"alias": "champion"' in capsys.readouterr().out


# ------------------------------------------------- registering a trained checkpoint's model

IMG = 32


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two gpunet_0 checkpoints (other weights) and their ONNX exports."""
    import torch

    from gpunet_core.inference.export import export_onnx
    from gpunet_core.models.factory import create_model

    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        (folder / str(seed)).mkdir()
        paths.append(folder / str(seed) / "model_best.pth.tar")
        torch.save({"state_dict": create_model("gpunet_0", num_classes=3).state_dict()},
                   paths[-1])
    onnx_paths = []
    for path in paths:
        onnx_paths.append(path.with_name("model.onnx"))
        export_onnx(registry_model(path), onnx_paths[-1], model_name="gpunet_0", img_size=IMG,
                    dynamic_batch=True)
    return paths, onnx_paths


def registry_model(checkpoint):
    from gpunet_core.inference.validate import load_inference_model

    return load_inference_model("gpunet_0", checkpoint)


@pytest.fixture
def training_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlc = MlflowClient(uri)
    exp = mlc.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
    return mlc, mlc.create_run(exp).info.run_id


def register_in_fresh_process(run_id, checkpoint, onnx_path, img_size=IMG, model_id=None):
    """``registry.register`` in a new interpreter: returns the version, its LoggedModel and
    whether it imported torch."""
    import subprocess
    import sys

    code = (f"import sys; from gpunet_core.mlops import registry; "
            f"v, m = registry.register({run_id!r}, {str(checkpoint)!r}, {str(onnx_path)!r}, "
            f"model_name='gpunet_0', name={NAME!r}, img_size={img_size}, tags={{'top1': 1.0}}, "
            f"model_id={model_id!r}); print(v, m, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, model, torch_loaded = proc.stdout.split()
    return version, model, torch_loaded == "True"


def assert_version_is(uri, checkpoint, onnx_of):
    """Both flavors of the model at ``uri`` load: the pytorch one computes exactly what
    ``checkpoint``'s model computes, the onnx one what ``onnx_of``'s model computes (1e-4),
    and pyfunc serves the onnx... or pytorch flavor with the same shape."""
    import mlflow.onnx
    import mlflow.pyfunc
    import mlflow.pytorch
    import onnxruntime
    import torch

    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        got = mlflow.pytorch.load_model(uri)(x)
        assert torch.equal(got, registry_model(checkpoint)(x))
        expected_onnx = registry_model(onnx_of)(x)
    session = onnxruntime.InferenceSession(mlflow.onnx.load_model(uri).SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_out), expected_onnx, atol=1e-4)
    served = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    assert tuple(served.shape) == (2, 3)


def source(mlc, version):
    return mlc.get_model_version(NAME, version).source


def test_register_completes_the_model_training_logged(training_run, two_checkpoints):
    from gpunet_core import steps

    mlc, run_id = training_run
    (first, second), (onnx_first, onnx_second) = two_checkpoints
    model_id = registry.log_pytorch_model(run_id, first, model_name="gpunet_0", img_size=IMG)
    logged = mlc.get_logged_model(model_id)
    assert str(logged.status) == "READY" and logged.source_run_id == run_id
    assert logged.tags[registry.IMG_SIZE_TAG] == str(IMG)
    # logging it again (a retried, spooled call) finds it instead of a second model
    assert registry.log_pytorch_model(run_id, first, model_name="gpunet_0",
                                      img_size=IMG) == model_id
    version, got_id, torch_loaded = register_in_fresh_process(run_id, first, onnx_first,
                                                              model_id=model_id)
    assert (version, got_id, torch_loaded) == ("1", model_id, False)  # nothing built: no torch
    assert source(mlc, "1") == f"models:/{model_id}"
    assert mlc.get_model_version(NAME, "1").run_id == run_id
    # the model page lists the version (MLflow's link tag on the LoggedModel)
    linked = json.loads(mlc.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked] == [(NAME, "1")]
    # registered and aliased: loads back identically through models:/<name>@champion
    steps_metrics = {"top1": 70.0, "top5": 99.0}
    import os

    os.environ["MLFLOW_TRACKING_URI"] = mlc.tracking_uri
    steps.log_metrics(run_id, steps_metrics, "val_", model_id=model_id,
                      dataset={"checksum": "a" * 64, "split": "val"})
    assert registry.promote(NAME, "1").alias == registry.CHAMPION
    assert_version_is(f"models:/{NAME}@champion", first, onnx_of=first)
    import mlflow

    (found,) = mlflow.search_logged_models(
        experiment_ids=[logged.experiment_id], filter_string="metrics.val_top1 > 50",
        output_format="list")
    assert found.model_id == model_id
    assert {m.key: m.value for m in found.metrics}["val_top1"] == 70.0
    # another export of the same checkpoint: v1's model is not rewritten; v2 is a copy of the
    # model training logged, still without torch
    version, copy_id, torch_loaded = register_in_fresh_process(run_id, first, onnx_second,
                                                               model_id=model_id)
    assert (version, torch_loaded) == ("2", False) and copy_id != model_id
    assert source(mlc, "2") == f"models:/{copy_id}"
    assert mlc.get_logged_model(copy_id).source_run_id == run_id
    assert copy_id in {o.model_id for o in mlc.get_run(run_id).outputs.model_outputs}
    assert_version_is(f"models:/{NAME}/2", first, onnx_of=second)
    assert_version_is(f"models:/{NAME}/1", first, onnx_of=first)


def test_register_builds_the_model_when_the_run_lacks_it_or_holds_another(training_run,
                                                                          two_checkpoints):
    mlc, run_id = training_run
    (first, second), (onnx_first, onnx_second) = two_checkpoints
    # nothing logged by training (e.g. --no-log-model): built here, with torch
    v1, m1, torch_loaded = register_in_fresh_process(run_id, first, onnx_first)
    assert (v1, torch_loaded) == ("1", True)
    assert_version_is(f"models:/{NAME}/1", first, onnx_of=first)
    # the run's model is the first checkpoint's; the second is built into its own
    v2, m2, torch_loaded = register_in_fresh_process(run_id, second, onnx_second)
    assert (v2, torch_loaded) == ("2", True) and m2 != m1
    assert_version_is(f"models:/{NAME}/2", second, onnx_of=second)
    # same checkpoint at another resolution: the signature differs, so built again
    v3, m3, torch_loaded = register_in_fresh_process(run_id, second, onnx_second,
                                                     img_size=IMG + 8)
    assert (v3, torch_loaded) == ("3", True) and m3 not in (m1, m2)
    signature = mlflow.models.get_model_info(f"models:/{NAME}/3").signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"][-1] == IMG + 8
    assert [source(mlc, v) for v in "123"] == [f"models:/{m}" for m in (m1, m2, m3)]
    # earlier versions are untouched
    assert_version_is(f"models:/{NAME}/1", first, onnx_of=first)
    assert_version_is(f"models:/{NAME}/2", second, onnx_of=second)


def test_training_tracker_skips_a_model_it_cannot_build(tmp_path, monkeypatch, caplog):
    """A checkpoint that does not load is not retried or spooled as if MLflow were down: the
    run still finishes, without the model (registration then builds it or fails clearly)."""
    from gpunet_core.mlops.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (out := tmp_path / "out").mkdir()
    bad = out / "model_best.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    tracker = RunTracker(out, "train", "train-gpunet_0", {})
    tracker.log_model(bad, "gpunet_0", IMG)
    tracker.finish({"best_top1": 1.0})
    assert not tracker.spool.exists()
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert not MlflowClient(uri).search_logged_models([run.info.experiment_id])
    assert not (out / "mlflow_model_id").exists()
    assert "no MLflow model logged: building it from" in caplog.text


def add_deployed(mlc, top1, fp32_top1, precision="int8", latency=1.0):
    tags = {"top1": str(top1), "latency_ms": str(latency), registry.PRECISION_TAG: precision,
            registry.FP32_TOP1_TAG: str(fp32_top1), registry.TARGET_TAG: "cpu"}
    return str(mlc.create_model_version(NAME, "file:///nowhere/model", tags=tags).version)


def test_a_quantized_candidate_is_judged_against_its_own_fp32_figure(mlflow_sqlite, capsys):
    mlc = mlflow_sqlite
    broken = add_deployed(mlc, 70.0, 71.0)  # an INT8 graph that lost a point
    decision = registry.promote(NAME, broken)
    assert not decision.promoted and decision.alias == registry.CHALLENGER
    assert "int8 graph's top-1 70.00 is 1.00 points below its own FP32 top-1 71.00" \
        in decision.reason and "max_quant_drop 0.5" in decision.reason
    assert decision.candidate["quant_drop"] == 1.0
    assert "Deployed precision: int8 (target cpu)" in decision.markdown()
    # a looser gate can be asked for; within the allowed drop a candidate qualifies
    assert registry.promote(NAME, broken, max_quant_drop=2.0).promoted
    assert registry.promote(NAME, add_deployed(mlc, 70.8, 71.0)).promoted
    # an FP32 version is never gated by it, even when its tags say otherwise
    fp32 = add_deployed(mlc, 80.0, 90.0, precision="fp32")
    assert registry.promote(NAME, fp32).promoted
    assert cli_main(["promote", NAME, "--version", fp32, "--max-quant-drop", "-1"]) == 2
    assert "--max-quant-drop must be >= 0" in capsys.readouterr().err
