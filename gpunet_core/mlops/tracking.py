"""MLflow tracking that never kills a training run.

:class:`RunTracker` logs params, per-epoch metrics, tags and artifacts through ``MlflowClient``
(explicit run ids, no global fluent state). Every call retries briefly with backoff; what still
fails is spooled to ``<output>/mlflow_spool.jsonl`` and sent, in order and once, at the next call
that reaches the server. A server that is down when training starts only delays run creation.

Tracking URI: ``MLFLOW_TRACKING_URI``, else a sqlite file under the output directory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from gpunet_core.mlops import (
    mlflow_client,  # noqa: F401  (MLflow client environment defaults)
    registry,
)
from gpunet_core.utils.files import RUN_ID_FILE, write_text

_logger = logging.getLogger(__name__)



def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tracking_uri(output: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output / 'mlflow.db').resolve()}"


class RunTracker:
    """Resilient MLflow logging for one training run (rank 0 only)."""

    def __init__(self, output: Path, experiment: str, run_name: str, tags: dict[str, str],
                 retries: int = 3, backoff_s: float = 0.5):
        from mlflow.tracking import MlflowClient

        self.output = output
        self.uri = tracking_uri(output)
        self.client = MlflowClient(self.uri)
        self.experiment, self.run_name, self.tags = experiment, run_name, tags
        self.retries, self.backoff_s = retries, backoff_s
        self.spool = output / "mlflow_spool.jsonl"
        self.run_id: str | None = self._load_run_id()

    # ---- lifecycle
    @classmethod
    def start(cls, args, output: Path, params: dict[str, Any]) -> RunTracker:
        tags = {"git_sha": git_sha(), "model": str(args.model), "preset": str(args.preset or ""),
                "mlflow.runName": f"train-{args.model}",
                **dict(tag.split("=", 1) for tag in getattr(args, "run_tag", []))}
        tracker = cls(output, args.experiment, f"train-{args.model}", tags)
        flat = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        flat.update(params)
        tracker._submit({"op": "params", "params": {k: str(v)[:500] for k, v in flat.items()}})
        return tracker

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        metrics = {k: float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and k != "epoch"}
        self._submit({"op": "metrics", "metrics": metrics, "step": step,
                      "timestamp": int(time.time() * 1000)})

    def log_artifacts(self, folder: Path, names: list[str]) -> None:
        for name in names:
            self._submit({"op": "artifact", "path": str(folder / name)})

    def log_model(self, checkpoint: Path, model_name: str, img_size: int) -> None:
        """The checkpoint's model as an MLflow model (``pytorch`` flavor) in the run's ``model``
        folder (:func:`gpunet_core.mlops.registry.log_pytorch_model`), which registration reuses."""
        self._submit({"op": "model", "checkpoint": str(checkpoint), "model_name": model_name,
                      "img_size": img_size})

    def finish(self, result: dict[str, Any]) -> None:
        self._submit({"op": "end", "best_top1": float(result.get("best_top1", -1))})
        if self.spool.exists():
            _logger.warning("MLflow unreachable at %s: %s kept for a later send "
                            "(gpunet_core.mlops.tracking.flush_spool)", self.uri, self.spool)

    # ---- internals
    def _run_id_file(self) -> Path:
        return self.output / RUN_ID_FILE

    def _load_run_id(self) -> str | None:
        path = self._run_id_file()
        return path.read_text().strip() or None if path.exists() else None

    def _ensure_run(self) -> str:
        if self.run_id:
            return self.run_id
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, tags=self.tags, run_name=self.run_name)
        self.run_id = run.info.run_id
        write_text(self._run_id_file(), self.run_id)
        return self.run_id

    def _apply(self, item: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._ensure_run()
        op = item["op"]
        if op == "params":
            existing = self.client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in item["params"].items() if k not in existing]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100])
        elif op == "metrics":
            metrics = [Metric(k, v, item["timestamp"], item["step"])
                       for k, v in item["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
        elif op == "artifact":
            if Path(item["path"]).exists():
                self.client.log_artifact(run_id, item["path"])
        elif op == "model":

            if Path(item["checkpoint"]).exists():
                try:
                    registry.log_pytorch_model(run_id, item["checkpoint"],
                                               model_name=item["model_name"],
                                               img_size=item["img_size"], mlc=self.client)
                except registry.ModelBuildError as exc:  # not the server: no retry, no spool
                    _logger.warning("no MLflow model logged: building it from %s failed (%s); "
                                    "registration builds it from the checkpoint",
                                    item["checkpoint"], str(exc).splitlines()[0][:200])
        elif op == "end":
            self.client.set_terminated(run_id, "FINISHED")

    def _pending(self) -> list[dict[str, Any]]:
        if not self.spool.exists():
            return []
        return [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]

    def _write_pending(self, items: list[dict[str, Any]]) -> None:
        if not items:
            self.spool.unlink(missing_ok=True)
            return
        write_text(self.spool, "".join(json.dumps(i) + "\n" for i in items))

    def _submit(self, item: dict[str, Any]) -> None:
        """Send spooled items then this one, in order; keep whatever could not be sent."""
        queue = self._pending() + [item]
        for attempt in range(self.retries):
            try:
                while queue:
                    self._apply(queue[0])
                    queue.pop(0)
                break
            except Exception as exc:  # any transport/server error: back off, then spool
                if attempt + 1 == self.retries:
                    _logger.warning("MLflow unreachable (%s); %d item(s) spooled to %s",
                                    str(exc).splitlines()[0][:200], len(queue), self.spool)
                else:
                    time.sleep(self.backoff_s * 2**attempt)
        self._write_pending(queue)


def flush_spool(output: Path, experiment: str = "gpunet") -> int:
    """Send what a run spooled while MLflow was down; returns how many items remain."""
    tracker = RunTracker(Path(output), experiment, "train", {})
    pending = tracker._pending()
    if pending:
        tracker._write_pending(pending[:-1])
        tracker._submit(pending[-1])
    return len(tracker._pending())
