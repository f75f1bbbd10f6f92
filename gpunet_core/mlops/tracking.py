"""MLflow tracking that never kills a training run.

:class:`RunTracker` logs params, per-epoch metrics, system metrics, tags, artifacts and the
best checkpoint's LoggedModel through ``MlflowClient`` (explicit run ids, no global fluent
state). Every call retries briefly with backoff; what still fails is spooled to
``<output>/mlflow_spool.jsonl`` and sent, in order and once, at the next call that reaches the
server. A server that is down when training starts only delays run creation.

The run: ``--mlflow-run-id`` / ``$MLFLOW_RUN_ID`` when set (KFP's MLflow plugin creates one per
task: we log into it, tag it, and leave ending it to the plugin), else one of our own in the
experiment, which gets MLflow's model-training kind.

Tracking URI: ``MLFLOW_TRACKING_URI``, else a sqlite file under the output directory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from gpunet_core.mlops import registry
from gpunet_core.mlops.mlflow_client import ensure_experiment, plugin_run_id, set_kind
from gpunet_core.utils.files import MODEL_ID_FILE, RUN_ID_FILE, write_text

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
    """Resilient MLflow logging for one training run.

    Rank 0 owns the run; with ``create=False`` (the first rank of another node, which logs only
    its system metrics) the tracker never creates one: until ``run_id`` is known its items wait
    in its own ``spool``. Calls are thread-safe (system metrics come from a sampler thread).
    """

    def __init__(self, output: Path, experiment: str, run_name: str, tags: dict[str, str],
                 retries: int = 3, backoff_s: float = 0.5, *, run_id: str | None = None,
                 create: bool = True, spool: str = "mlflow_spool.jsonl"):
        from mlflow.tracking import MlflowClient

        self.output = output
        self.uri = tracking_uri(output)
        self.client = MlflowClient(self.uri)
        self.experiment, self.run_name, self.tags = experiment, run_name, tags
        self.retries, self.backoff_s = retries, backoff_s
        self.spool = output / spool
        self.create = create
        # an external run (KFP's plugin): ours to log into, not to end
        self.external = bool(run_id)
        self.run_id: str | None = run_id or (self._load_run_id() if create else None)
        self._lock = threading.RLock()
        self._tagged = False
        self.params: dict[str, str] = {}  # the run's params, also given to its LoggedModel

    # ---- lifecycle
    @classmethod
    def start(cls, args, output: Path, params: dict[str, Any]) -> RunTracker:
        external = getattr(args, "mlflow_run_id", "") or plugin_run_id()
        tags = {"git_sha": git_sha(), "model": str(args.model), "preset": str(args.preset or ""),
                **dict(tag.split("=", 1) for tag in getattr(args, "run_tag", []))}
        if not external:
            tags["mlflow.runName"] = f"train-{args.model}"
        tracker = cls(output, args.experiment, f"train-{args.model}", tags, run_id=external)
        flat = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        flat.update(params)
        tracker.params = {k: str(v)[:500] for k, v in flat.items()}
        tracker._submit({"op": "params", "params": tracker.params})
        return tracker

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        metrics = {k: float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and k != "epoch"}
        self.log_metrics(metrics, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``metrics`` at ``step`` (also the system-metrics sink, from the sampler thread)."""
        self._submit({"op": "metrics", "metrics": metrics, "step": step,
                      "timestamp": int(time.time() * 1000)})

    def log_artifacts(self, folder: Path, names: list[str]) -> None:
        for name in names:
            self._submit({"op": "artifact", "path": str(folder / name)})

    def log_model(self, checkpoint: Path, model_name: str, img_size: int, step: int = 0) -> None:
        """The checkpoint's model as a LoggedModel of the run (``pytorch`` flavor, the run's
        metrics at ``step`` linked to it; :func:`gpunet_core.mlops.registry.log_pytorch_model`),
        which registration completes; its id goes to ``<output>/mlflow_model_id``."""
        self._submit({"op": "model", "checkpoint": str(checkpoint), "model_name": model_name,
                      "img_size": img_size, "step": step,
                      "params": self.params})

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
        if self.run_id and (self._tagged or not self.create):
            return self.run_id
        if self.run_id is None:
            if not self.create:
                raise RuntimeError("the run is not known yet (rank 0 creates it)")
            exp_id = ensure_experiment(self.client, self.experiment)
            run = self.client.create_run(exp_id, tags=self.tags, run_name=self.run_name)
            self.run_id = run.info.run_id
        else:  # resumed or external: tag it (idempotent), give its experiment our kind
            run = self.client.get_run(self.run_id)
            set_kind(self.client, run.info.experiment_id)
            for key, value in self.tags.items():
                if run.data.tags.get(key) != value:
                    self.client.set_tag(self.run_id, key, value)
        self._tagged = True
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
                    model_id = registry.log_pytorch_model(
                        run_id, item["checkpoint"], model_name=item["model_name"],
                        img_size=item["img_size"], step=item.get("step", 0),
                        params=item.get("params"), mlc=self.client)
                except registry.ModelBuildError as exc:  # not the server: no retry, no spool
                    _logger.warning("no MLflow model logged: building it from %s failed (%s); "
                                    "registration builds it from the checkpoint",
                                    item["checkpoint"], str(exc).splitlines()[0][:200])
                else:
                    write_text(Path(item["checkpoint"]).parent / MODEL_ID_FILE, model_id)
        elif op == "end" and not self.external:
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
        with self._lock:
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


def start_system_metrics(tracker: RunTracker | None, *, output: Path, experiment: str,
                         run_id: str | None, node_rank: int, nnodes: int, local_rank: int,
                         interval_s: float):
    """Sample this node's system metrics into the run, on its first process only; returns
    (the tracker they go through, the monitor), either None where nothing is sampled.

    Node 0 samples through rank 0's ``tracker``; another node through a tracker of its own
    (``create=False``, spool ``mlflow_spool.node_<n>.jsonl``) for ``run_id``, which rank 0
    shares (None until the run exists: set it on the tracker when it is known). Keys carry the
    node id on multi-node runs (``system/node_1/...``).
    """
    # MLflow's monitors and psutil: only where a node samples
    from gpunet_core.mlops.system_metrics import node_id, start_node_monitor

    if interval_s <= 0 or local_rank != 0:
        return None, None
    node = node_id(node_rank, nnodes)
    if tracker is None:
        tracker = RunTracker(output, experiment, "", {}, run_id=run_id, create=False,
                             spool=f"mlflow_spool.{node or 'node_0'}.jsonl")
    monitor = start_node_monitor(tracker.log_metrics, interval_s=interval_s, node_id=node)
    return tracker, monitor


def flush_spool(output: Path, experiment: str = "gpunet") -> int:
    """Send what a run spooled while MLflow was down; returns how many items remain."""
    tracker = RunTracker(Path(output), experiment, "train", {})
    pending = tracker._pending()
    if pending:
        tracker._write_pending(pending[:-1])
        tracker._submit(pending[-1])
    return len(tracker._pending())
