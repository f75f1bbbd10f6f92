"""A pipeline run whose step after training fails, then re-run: finished work is not redone.

Caching is on for every deterministic step and off for promotion, in the compiled spec a cluster
runs and under ``kfp.local`` (``enable_caching=True``, ``cache_root=<workdir>/kfp-cache``).
Inside a step, ``prepare`` skips verified data and ``train`` resumes from its last checkpoint
(tests/test_datasets.py, tests/faults/test_worker_kill.py).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import yaml

from tests.train_helpers import run

pytestmark = pytest.mark.faults

PARAMS = ["dataset_per_class=12", "epochs=1", "enable_distill=false", "nproc_per_node=1",
          "bench_iterations=10"]
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
    assert all(caching.values()), caching
    # no per-run value reaches a cached step: its cache key would never match again
    for name, task in tasks.items():
        params = task.get("inputs", {}).get("parameters", {})
        if name != "promote":
            assert "kfp_run_id" not in params, name


def run_local(workdir, params):
    args = [sys.executable, "-m", "pipelines", "run-local", "--workdir", str(workdir), "--json"]
    for p in params:
        args += ["--param", p]
    started = time.monotonic()
    result = run(args, timeout=1200)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_rerun_after_a_failed_step_reuses_finished_steps(tmp_path, observe):
    from mlflow import MlflowClient

    work = tmp_path / "work"
    failed, first_s = run_local(work, PARAMS + ["bench_backend=tensorrt"])  # no GPU here
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr.splitlines()[-1]
    assert "the local pipeline run failed" in failed.stderr, failed.stderr[-3000:]
    assert "TensorRT" in failed.stdout + failed.stderr
    done_first = tasks_logged(failed.stdout + failed.stderr,
                              r"Task '?([\w-]+)'? finished with status SUCCESS")
    assert done_first >= EXPENSIVE, done_first

    again, second_s = run_local(work, PARAMS + ["bench_backend=onnxruntime"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    logs = again.stdout + again.stderr
    hits = tasks_logged(logs, r"Task '?([\w-]+)'? cache hit")
    assert hits == done_first, (hits, done_first)  # everything that had finished, nothing else
    ran_again = tasks_logged(logs, r"Task '?([\w-]+)'? finished with status SUCCESS")
    assert not ran_again & done_first and {"benchmark", "promote"} <= ran_again, ran_again
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["version"] == "1" and summary["alias"] == "champion"

    mlc = MlflowClient(summary["tracking_uri"])
    (training,) = mlc.search_runs([mlc.get_experiment_by_name("gpunet").experiment_id])
    assert [m.step for m in mlc.get_metric_history(training.info.run_id, "top1")] == [0]
    assert "val_top1" in training.data.metrics and "bench_latency_ms_median" in training.data.metrics
    assert mlc.get_model_version("gpunet", "1").run_id == training.info.run_id
    observe({"fault": "pipeline step after training fails (benchmark backend tensorrt without "
             "GPU), then re-run with onnxruntime", "injected": 1,
             "outcome": f"re-run served {len(hits)} steps from the cache "
             f"({', '.join(sorted(hits))}); benchmark, promote, report ran; one training run "
             "in MLflow", "first_run_s": round(first_s, 1), "rerun_s": round(second_s, 1)})
