"""A pipeline run whose step after training fails, then re-run: finished work is not redone.

Caching is on for every deterministic step and off for promotion and the report (both read the
registry as it is), in the compiled spec a cluster runs and under ``kfp.local``
(``enable_caching=True``, ``cache_root=<workdir>/kfp-cache``).
Inside a step, ``prepare`` skips verified data and ``train`` resumes from its last checkpoint
(tests/test_datasets.py, tests/faults/test_worker_kill.py).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.train_helpers import TINY_PIPELINE, run_pipeline

pytestmark = pytest.mark.faults

EXPENSIVE = {"prepare-dataset", "train-teacher", "train-student", "export-onnx"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tasks_logged(text: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, ANSI.sub("", text)))


def test_compiled_spec_caches_everything_but_promotion(tmp_path):
    from pipelines.cli import compile_pipeline

    path = compile_pipeline(str(tmp_path / "p.yaml"), gpus_per_node=1, cluster=True)
    tasks = next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]
    caching = {name: task.get("cachingOptions", {}).get("enableCache", False)
               for name, task in tasks.items()}
    assert caching.pop("promote") is False
    assert caching.pop("report") is False  # it reads the registry as it is now
    assert all(caching.values()), caching
    # no per-run value reaches a cached step: its cache key would never match again
    for name, task in tasks.items():
        params = task.get("inputs", {}).get("parameters", {})
        if name != "promote":
            assert "kfp_run_id" not in params, name


@pytest.mark.slow
def test_failed_run_resumes_from_cache_then_registers_and_promotes(tmp_path, monkeypatch,
                                                                   observe):
    """The make-run DAG (teacher + 2 torchrun workers, tiny): its benchmark step fails (TensorRT
    asked for, no GPU); the re-run with the default backend takes every finished step from the
    cache, then registers and promotes; a third run with other settings becomes challenger."""
    import mlflow.onnx
    import mlflow.pytorch
    import onnxruntime
    import torch
    from mlflow import MlflowClient
    from mlflow.models import Model

    work = tmp_path / "local"
    failed, first_s = run_pipeline(work, TINY_PIPELINE + ["bench_backend=tensorrt"])
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr.splitlines()[-1]
    assert "the local pipeline run failed" in failed.stderr, failed.stderr[-3000:]
    assert "TensorRT" in failed.stdout + failed.stderr
    done_first = tasks_logged(failed.stdout + failed.stderr,
                              r"Task '?([\w-]+)'? finished with status SUCCESS")
    assert done_first >= EXPENSIVE, done_first

    again, second_s = run_pipeline(work, TINY_PIPELINE)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    logs = again.stdout + again.stderr
    hits = tasks_logged(logs, r"Task '?([\w-]+)'? cache hit")
    assert hits == done_first, (hits, done_first)  # everything that had finished, nothing else
    ran_again = tasks_logged(logs, r"Task '?([\w-]+)'? finished with status SUCCESS")
    assert not ran_again & done_first and {"benchmark", "promote"} <= ran_again, ran_again
    first = json.loads(again.stdout.strip().splitlines()[-1])
    assert first["version"] == "1" and first["alias"] == "champion"
    assert first["latency_backend"] == "onnxruntime" and first["latency_ms"] > 0
    uri = first["tracking_uri"]
    assert uri.startswith("sqlite:///")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlc = MlflowClient(uri)
    (run_,) = mlc.search_runs([mlc.get_experiment_by_name("gpunet").experiment_id])  # trained once
    assert run_.data.params["model"] == "gpunet_0" and run_.data.params["world_size"] == "2"
    assert run_.data.params["enable_distill"] == "True"
    assert [m.step for m in mlc.get_metric_history(run_.info.run_id, "top1")] == [0]
    for key in ("top1", "train_kd", "val_top1", "bench_latency_ms_median"):
        assert key in run_.data.metrics, key
    version = mlc.get_model_version("gpunet", "1")
    assert version.run_id == run_.info.run_id
    assert float(version.tags["top1"]) == pytest.approx(run_.data.metrics["val_top1"])
    local = mlflow.artifacts.download_artifacts("models:/gpunet/1", dst_path=str(tmp_path / "m"))
    assert {"pytorch", "onnx", "python_function"} <= set(Model.load(local).flavors)
    torch_model = mlflow.pytorch.load_model("models:/gpunet@champion")
    onnx_model = mlflow.onnx.load_model("models:/gpunet@champion")
    x = torch.rand(1, 3, 32, 32)
    session = onnxruntime.InferenceSession(onnx_model.SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch_model(x), torch.from_numpy(onnx_out), atol=1e-4)
    observe({"fault": "a pipeline step after training fails (benchmark backend tensorrt, no "
             "GPU); the run is repeated with the default backend", "injected": 1,
             "outcome": f"re-run took {len(hits)} finished steps from the cache "
             f"({', '.join(sorted(hits))}); benchmark, promote and report ran; one training "
             "run in MLflow; v1 champion", "failed_run_s": round(first_s, 1),
             "rerun_s": round(second_s, 1)})

    third, _ = run_pipeline(work, TINY_PIPELINE + ["enable_distill=false", "nproc_per_node=1",
                                       "promotion_margin=1000"])
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    second = json.loads(third.stdout.strip().splitlines()[-1])
    assert second["version"] == "2" and second["alias"] == "challenger"
    assert second["champion_version"] == "1"
    reason = mlc.get_model_version("gpunet", "2").tags["promotion"]
    assert reason.startswith("challenger: top-1") and "by the margin 1000.00" in reason
    # the tasks that ran were timed from outside, against the work their steps logged (the
    # teacher task, disabled, ran no step); the run's overhead is the rest
    overhead = second["overhead"]
    assert {st["name"] for st in overhead["steps"]} == {
        "train-teacher", "train(gpunet_0)", "export_onnx(gpunet_0)", "validate_onnx",
        "quantize", "benchmark", "promote(gpunet_0)", "write_html_report"}
    assert 0 < overhead["compute_s"] < overhead["total_wall_s"]
    assert overhead["total_wall_s"] == pytest.approx(second["seconds"], abs=0.1)
