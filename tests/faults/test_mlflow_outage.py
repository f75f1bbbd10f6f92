"""The MLflow server stopped while a training run logs to it, then restarted on the same store.

Training keeps going; what could not be sent is spooled (``<output>/mlflow_spool.jsonl``) and sent
in order at the first call that reaches the restarted server: every epoch's metrics and every
system-metrics sample end up in the run exactly once, and the spool is gone.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from gpunet_core.mlops import registry
from gpunet_core.utils.files import sha256_file
from tests import mlflow_server
from tests.train_helpers import FAST, REPO, env, gpunet_cmd, read_summary

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EPOCHS = 10


def rows(out) -> int:
    return len(read_summary(out / "summary.csv")) if (out / "summary.csv").exists() else 0


def test_mlflow_restart_during_training_loses_and_duplicates_nothing(digits_small, tmp_path,
                                                                      observe):
    from mlflow import MlflowClient

    server = mlflow_server.start(tmp_path / "mlflow")
    out = tmp_path / "run"
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            gpunet_cmd("train", str(digits_small), "--model", "gpunet_0", "--epochs",
                       str(EPOCHS), "--output", str(out), "--mlflow", "--experiment", "outage",
                       "--system-metrics-interval", "0.5", *FAST),
            stdout=log, stderr=subprocess.STDOUT, env=env(MLFLOW_TRACKING_URI=server.uri),
            cwd=REPO)
        try:
            deadline = time.monotonic() + 600
            while rows(out) < 1:  # epoch 0 reached the server
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
            server.stop()
            stopped_at, epochs_before = time.monotonic(), rows(out)
            while rows(out) < epochs_before + 2:  # one epoch's logging surely failed and spooled
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.1)
            server = mlflow_server.start(tmp_path / "mlflow", port=server.port)  # same store
            outage_s = time.monotonic() - stopped_at
            epochs_during = rows(out) - epochs_before
            assert proc.poll() is None, "training ended before MLflow was back: more epochs"
            assert proc.wait(timeout=900) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    try:
        text = log_path.read_text()
        assert "MLflow unreachable" in text, text[-3000:]
        assert not (out / "mlflow_spool.jsonl").exists()
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("top1", "train_loss", "eval_loss", "lr"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), (key, steps)  # none lost, none twice
        # the system metrics sampled while the server was down were spooled too: no gaps
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert len(steps) >= 2 and steps == list(range(len(steps))), (key, steps)
        assert run.data.params["model"] == "gpunet_0"
        (model,) = client.search_logged_models([run.info.experiment_id])
        assert model.tags[registry.CHECKPOINT_TAG] == sha256_file(out / "model_best.pth.tar")
        spooled = [int(n) for n in re.findall(r"(\d+) item\(s\) spooled", text)]
    finally:
        server.stop()
    observe({"fault": "MLflow server stopped during training, restarted on the same store",
             "injected": 1, "outcome": f"training finished; {EPOCHS}/{EPOCHS} epochs of "
             "metrics in MLflow, each once; spool emptied", "outage_s": round(outage_s, 1),
             "epochs_finished_during_outage": epochs_during,
             "max_items_spooled": max(spooled, default=0)})
