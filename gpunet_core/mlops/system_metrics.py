"""System metrics (CPU, memory, disk, network, GPU) for training runs, on MLflow's own monitors.

:class:`NodeMonitor` reuses MLflow's ``SystemMetricsMonitor`` sampling, aggregation and key
naming (``system/[<node_id>/]<metric>``, so the MLflow UI groups them as usual) but hands each
aggregate to a ``sink`` instead of MLflow's ``BatchMetricsLogger``. Why: the parent polls
``get_run`` on every sample and stops for good the first time the server is unreachable, and its
constructor resolves a tracking store (for the default sqlite URI that creates and migrates a
database). Our sink, the run tracker, retries and spools what it cannot send, so sampling must go
on regardless of the server.

Environment overrides, as in MLflow: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds)
overrides ``interval_s``, ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` overrides
``samples_before_logging`` and ``MLFLOW_SYSTEM_METRICS_NODE_ID`` overrides ``node_id``.

MLflow (about 1.5 s to import) is loaded on first use of :class:`NodeMonitor`, not on import.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.environment_variables import _EnvironmentVariable
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

_logger = logging.getLogger(__name__)

Sink = Callable[[dict[str, float], int], None]
"""Receives the prefixed metrics of one logging period and its step (0, 1, ...)."""


def node_id(node_rank: int, nnodes: int) -> str | None:
    """Metric-key node id: None on one node (plain ``system/...`` keys, as MLflow logs them)."""
    return f"node_{node_rank}" if nnodes > 1 else None


def _env_or(var: _EnvironmentVariable, default: Any) -> Any:
    """MLflow's ``var.get() or default``, but a malformed value warns instead of raising."""
    try:
        return var.get() or default
    except ValueError as e:
        _logger.warning("Ignoring %s: %s", var.name, e)
        return default


class _NodeMonitorMixin:
    """The overrides of :class:`NodeMonitor`; kept apart from its MLflow base so that importing
    this module does not import MLflow."""

    _JOIN_TIMEOUT_S = 5.0
    monitors: list[Any]
    _process: threading.Thread | None

    def __init__(self, sink: Sink, interval_s: float = 10.0, node_id: str | None = None,
                 samples_before_logging: int = 1) -> None:
        # Deliberately no super().__init__(): it builds an MlflowClient, i.e. a tracking store.
        from mlflow.environment_variables import (
            MLFLOW_SYSTEM_METRICS_NODE_ID,
            MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
            MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
        )
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.sink = sink
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        if gpu_monitor := self._initialize_gpu_monitor():  # type: ignore[attr-defined]
            self.monitors.append(gpu_monitor)
        # Clamped: a zero interval would spin a core, zero samples would never publish.
        self.sampling_interval = max(
            0.01, float(_env_or(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, interval_s)))
        self.samples_before_logging = max(
            1, int(_env_or(MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING, samples_before_logging)))
        self.node_id = _env_or(MLFLOW_SYSTEM_METRICS_NODE_ID, node_id)
        self._shutdown_event = threading.Event()
        self._process = None
        self._metrics_prefix = "system/"
        self._logging_step = 0
        self._lock = threading.Lock()  # finish() may publish while a stuck thread still lives
        self._failed: set[str] = set()
        self._finished = False

    def start(self) -> None:
        """Start the sampling thread once; failure to start only warns (parent behaviour)."""
        if self._process is None and not self._finished:
            super().start()  # type: ignore[misc]

    def monitor(self) -> None:
        """Thread body: every ``samples_before_logging`` samples, publish their aggregate.

        Waits before each sample (the parent samples first), so the per-thread
        ``psutil.cpu_percent()`` baseline primed here makes the first CPU sample meaningful.
        Never consults MLflow and never gives up: failures are logged and the loop goes on.
        """
        self._guarded("collect", self._prime_cpu_percent)
        while True:
            for _ in range(self.samples_before_logging):
                if self._shutdown_event.wait(self.sampling_interval):
                    return  # finish() publishes the partial period
                with self._lock:
                    self._sample()
            with self._lock:
                self._guarded("publish", self._publish_pending)

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        """Prefix keys exactly as MLflow does and hand them to the sink; the step advances and
        the samples are dropped even if the sink raises (the sink owns delivery)."""
        prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
        try:
            self.sink({prefix + k: float(v) for k, v in metrics.items()}, self._logging_step)
        finally:
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

    def finish(self) -> None:
        """Stop sampling and publish the samples of the unfinished period; a run that ended
        before its first publish gets one sample taken now. Idempotent, never raises."""
        if self._finished:
            return
        self._finished = True
        self._shutdown_event.set()
        if self._process is None:
            return
        try:
            self._process.join(self._JOIN_TIMEOUT_S)
            if not self._lock.acquire(timeout=1.0):
                _logger.warning("System metrics thread is stuck; dropping its last samples.")
                return
            try:
                if self._logging_step == 0 and not self._pending():
                    self._sample()
                self._guarded("publish", self._publish_pending)
            finally:
                self._lock.release()
        except Exception as e:  # finishing must never fail a training run
            _logger.warning("Failed to finish system metrics monitoring: %s", e)
        self._process = None

    # ---- helpers
    def _pending(self) -> bool:
        return any(m.metrics for m in self.monitors)

    def _sample(self) -> None:
        """One sample from every monitor; one failing monitor does not cost the others."""
        for m in self.monitors:
            self._guarded(f"collect {type(m).__name__}", m.collect_metrics)

    def _publish_pending(self) -> None:
        if self._pending():
            self.publish_metrics(self.aggregate_metrics())  # type: ignore[attr-defined]

    @staticmethod
    def _prime_cpu_percent() -> None:
        import psutil  # loaded by MLflow's CPUMonitor already: no cost here, none on import

        psutil.cpu_percent()

    def _guarded(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; the first failure of each kind warns, repeats log at debug (no flood)."""
        try:
            fn()
        except Exception as e:
            first = what not in self._failed
            self._failed.add(what)
            _logger.log(logging.WARNING if first else logging.DEBUG,
                        "System metrics: %s failed: %s", what, e, exc_info=first)


if TYPE_CHECKING:
    class NodeMonitor(_NodeMonitorMixin, SystemMetricsMonitor):
        """MLflow's ``SystemMetricsMonitor`` publishing to a sink; see the module docstring."""


@functools.cache
def _node_monitor_class() -> type[NodeMonitor]:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    doc = "MLflow's ``SystemMetricsMonitor`` publishing to a sink; see the module docstring."
    return type("NodeMonitor", (_NodeMonitorMixin, SystemMetricsMonitor),
                {"__module__": __name__, "__qualname__": "NodeMonitor", "__doc__": doc})


def __getattr__(name: str) -> Any:
    """Lazy ``NodeMonitor``: MLflow is imported on first access, not with this module."""
    if name == "NodeMonitor":
        return _node_monitor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start_node_monitor(sink: Sink, interval_s: float = 10.0, node_id: str | None = None,
                       samples_before_logging: int = 1) -> NodeMonitor | None:
    """Build and start a :class:`NodeMonitor`; None (with a warning) if that fails, because
    system metrics must never stop a training run."""
    try:
        monitor = _node_monitor_class()(sink, interval_s, node_id, samples_before_logging)
        monitor.start()
        return monitor
    except Exception as e:
        _logger.warning("System metrics disabled: %s", e)
        return None
