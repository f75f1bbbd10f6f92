"""Promotion through the pipeline's steps on a real MLflow store: the champion is judged on the
candidate's validation set, and with KFP's MLflow plugin every step logs into the task's run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from gpunet_core import steps
from gpunet_core.utils.files import BEST_CHECKPOINT
from tests.train_helpers import REPO

pytestmark = pytest.mark.slow
NAME = "gpunet-fair"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlc = MlflowClient(uri)
    mlc.create_experiment("gpunet", artifact_location=(root / "artifacts").as_uri())
    return uri, mlc


def candidate(data, out, monkeypatch, uri, *, epochs=1, seed=0):
    """Train, validate, export and benchmark one candidate as the DAG does; its step inputs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = steps.train_config(data, out, augment="light", model="gpunet_0", epochs=epochs,
                             batch_size=16, img_size=32, lr=0.002, opt="adamw", mlflow=True,
                             experiment="gpunet", seed=seed)
    steps.train(cfg)
    best = out / BEST_CHECKPOINT
    validation = steps.validate(data / "val", best, model="gpunet_0", img_size=32)
    onnx = out / "model.onnx"
    steps.export_onnx(best, onnx, model="gpunet_0", img_size=32)
    bench = steps.benchmark(onnx, backend="onnxruntime", iterations=5)
    return best, onnx, validation, bench


def promote_in_fresh_process(args: dict, env: dict) -> tuple[dict, bool]:
    """``steps.promote(**args)`` in a new interpreter: its decision, and whether torch was
    imported (it must not be unless the champion is evaluated)."""
    code = ("import json, sys; from gpunet_core import steps; "
            f"d = steps.promote(**json.loads({json.dumps(json.dumps(args))})); "
            "print(json.dumps({'decision': d, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["decision"], out["torch"]


def promote_args(best, onnx, validation, bench, data):
    return {"checkpoint": str(best), "onnx": str(onnx), "validation": validation,
            "bench": bench, "model": "gpunet_0", "img_size": 32,
            "registered_model": NAME, "data": str(data / "val"), "kfp_run_id": "fair"}


def test_champion_is_judged_on_the_candidates_validation_set(
        store, digits_tiny, digits_small, tmp_path, monkeypatch):
    import os

    from gpunet_core.mlops import registry

    uri, mlc = store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    # the champion: trained and validated on dataset A
    a = candidate(digits_tiny, tmp_path / "a", monkeypatch, uri)
    first, _ = promote_in_fresh_process(promote_args(*a, digits_tiny), env)
    assert first["alias"] == "champion" and first["previous_champion"] is None
    # a candidate trained and validated on dataset B: the champion is evaluated on B's split
    b = candidate(digits_small, tmp_path / "b", monkeypatch, uri, seed=1)
    assert a[2]["dataset"]["checksum"] != b[2]["dataset"]["checksum"]
    second, torch_loaded = promote_in_fresh_process(promote_args(*b, digits_small), env)
    champ = second["previous_champion"]
    assert torch_loaded and champ["evaluated"] and champ["version"] == first["version"]
    on_b = registry.evaluate_version(NAME, first["version"], digits_small / "val",
                                     tracking_uri=uri)
    assert champ["top1"] == pytest.approx(on_b["top1"])  # the same split, model, preprocessing
    assert champ["top1_registered"] == pytest.approx(a[2]["top1"])  # its figure on A
    assert second["comparison"]["dataset"] == b[2]["dataset"]["checksum"]
    # the decision is made on B's figures for both, and the report shows both
    beats = b[2]["top1"] >= on_b["top1"]
    assert second["alias"] == ("champion" if beats else "challenger")
    assert f"| champion before v{first['version']} | {on_b['top1']:.4g} | " \
           f"{a[2]['top1']:.4g} |" in second["markdown"]
    assert "evaluated on the candidate's validation set" in second["markdown"]
    assert "measured alike" in second["markdown"]  # same backend and machine: compared
    run = mlc.get_run(second["run_id"])
    assert run.data.metrics["promotion_champion_top1"] == pytest.approx(on_b["top1"])

    # another candidate on B against a champion validated on B: no re-evaluation (no torch)
    current = mlc.get_model_version_by_alias(NAME, "champion")
    if current.tags[registry.DATASET_TAG] != b[2]["dataset"]["checksum"]:
        registry.promote(NAME, second["version"], margin=-100.0, data=digits_small / "val")
    third, torch_loaded = promote_in_fresh_process(
        promote_args(*b, digits_small) | {"registered_model": NAME}, env)
    champ = third["previous_champion"]
    assert not torch_loaded and not champ["evaluated"]
    assert champ["top1"] == champ["top1_registered"] == pytest.approx(b[2]["top1"])
    assert "validated on the same dataset" in third["markdown"]


def test_with_kfps_plugin_run_every_step_logs_into_it(store, digits_tiny, tmp_path, monkeypatch):
    """KFP's MLflow plugin creates the task's run and passes $MLFLOW_RUN_ID: training,
    validation, benchmark and promotion log into it and create no run of their own."""
    uri, mlc = store
    exp = mlc.get_experiment_by_name("gpunet").experiment_id
    plugin_run = mlc.create_run(exp, tags={"mlflow.runName": "train-student"}).info.run_id
    runs_before = {r.info.run_id for r in mlc.search_runs([exp])}
    monkeypatch.setenv("MLFLOW_RUN_ID", plugin_run)
    best, onnx, validation, bench = candidate(digits_tiny, tmp_path / "p", monkeypatch, uri)
    decision = steps.promote(best, onnx, validation, bench, model="gpunet_0", img_size=32,
                             registered_model="gpunet-plugin", kfp_run_id="kfp-1",
                             data=digits_tiny / "val")
    assert {r.info.run_id for r in mlc.search_runs([exp])} == runs_before  # no other run
    assert decision["run_id"] == plugin_run
    run = mlc.get_run(plugin_run)
    assert run.info.status == "RUNNING"  # the plugin ends its runs, not us
    assert run.data.tags["model"] == "gpunet_0" and run.data.tags["kfp_run_id"] == "kfp-1"
    assert run.data.tags["mlflow.runName"] == "train-student"  # the plugin's name is kept
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert {"top1", "val_top1", "bench_latency_ms_median"} <= set(run.data.metrics)
    (model,) = mlc.search_logged_models([exp], filter_string=f"source_run_id = '{plugin_run}'")
    assert model.model_id == decision["model_id"]
    assert mlc.get_model_version("gpunet-plugin", decision["version"]).source == \
        f"models:/{model.model_id}"
    assert {m.key for m in model.metrics} >= {"val_top1", "bench_latency_ms_median"}


def test_a_quantized_champion_is_evaluated_through_the_graph_it_deploys(
        store, digits_tiny, digits_small, tmp_path, monkeypatch):
    from gpunet_core.inference.validate import validate_onnx
    from gpunet_core.mlops import registry

    uri, mlc = store
    best, onnx, validation, bench = candidate(digits_tiny, tmp_path / "q", monkeypatch, uri)
    int8 = tmp_path / "q" / "deployed.onnx"
    steps.quantize(onnx, int8, calib_data=digits_tiny, precision="int8", target="cpu",
                   calib_samples=16)
    deployed = steps.validate_onnx(digits_tiny / "val", int8)
    bench = steps.benchmark(int8, backend="onnxruntime", iterations=3)
    name = "gpunet-int8"
    decision = steps.promote(best, int8, validation, bench, model="gpunet_0", img_size=32,
                             registered_model=name, deployed_validation=deployed,
                             max_quant_drop=100.0)
    version = mlc.get_model_version(name, decision["version"])
    assert version.tags["precision"] == "int8" and version.tags["quant_target"] == "cpu"
    assert float(version.tags["top1"]) == deployed["top1"]
    assert float(version.tags["fp32_top1"]) == validation["top1"]
    # on another validation set the champion is judged by its INT8 graph, not its checkpoint
    on_b = registry.evaluate_version(name, decision["version"], digits_small / "val",
                                     tracking_uri=uri)
    assert on_b["precision"] == "int8" and on_b["runtime"] == "onnxruntime"
    direct = validate_onnx(int8, digits_small / "val", workers=0, progress=False)
    assert on_b["top1"] == direct["top1"] and on_b["onnx_sha256"] == direct["onnx_sha256"]
    # an fp32 pass-through copies the export and says so
    same = steps.quantize(onnx, tmp_path / "q" / "fp32.onnx", calib_data=digits_tiny)
    assert same["precision"] == "fp32"
    assert (tmp_path / "q" / "fp32.onnx").read_bytes() == onnx.read_bytes()
    with pytest.raises(steps.StepError, match="precision must be one of fp32, fp16, int8"):
        steps.quantize(onnx, tmp_path / "q" / "x.onnx", calib_data=digits_tiny,
                       precision="int4")
    assert not (tmp_path / "q" / "x.onnx").exists()
