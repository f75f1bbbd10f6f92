"""NodeMonitor: MLflow's system-metrics sampling delivered to a sink, with no MLflow server."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from gpunet_core.mlops import system_metrics
from gpunet_core.mlops.system_metrics import node_id, start_node_monitor

Call = tuple[dict[str, float], int]


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch):
    """MLflow's own overrides would change intervals and key names under the tests."""
    for name in ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
                 "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "MLFLOW_SYSTEM_METRICS_NODE_ID"):
        monkeypatch.delenv(name, raising=False)
    # Any tracking call would fail loudly instead of reaching a server or creating a database.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")


def _wait_for(calls: list[Call], n: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while len(calls) < n and time.monotonic() < end:
        time.sleep(0.02)
    assert len(calls) >= n, f"only {len(calls)} publishes in {deadline_s} s"


def _monitor(sink, **kwargs):
    monitor = start_node_monitor(sink, **kwargs)
    assert monitor is not None
    return monitor


def _two_publishes() -> tuple[object, list[Call]]:
    """A monitor sampling every 50 ms, finished after its second publish; what it published."""
    calls: list[Call] = []
    monitor = _monitor(lambda m, s: calls.append((m, s)), interval_s=0.05)
    try:
        _wait_for(calls, 2)
    finally:
        monitor.finish()
    return monitor, calls


def test_publishes_prefixed_float_metrics_with_increasing_steps():
    monitor, calls = _two_publishes()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    assert isinstance(monitor, SystemMetricsMonitor)
    assert [s for _, s in calls] == list(range(len(calls)))
    for metrics, _ in calls:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/system_memory_usage_percentage", "system/disk_usage_percentage",
                "system/network_receive_megabytes"} <= metrics.keys()
        assert all(k.startswith("system/") for k in metrics)
        assert all(type(v) is float for v in metrics.values())
        assert metrics["system/system_memory_usage_megabytes"] > 0


def test_node_id_goes_into_every_key():
    calls: list[Call] = []
    monitor = _monitor(lambda m, s: calls.append((m, s)), interval_s=0.05, node_id="node_1")
    try:
        _wait_for(calls, 1)
    finally:
        monitor.finish()
    keys = calls[0][0].keys()
    assert "system/node_1/cpu_utilization_percentage" in keys
    assert all(k.startswith("system/node_1/") for k in keys)


def test_environment_interval_overrides_the_argument(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    calls: list[Call] = []
    monitor = _monitor(lambda m, s: calls.append((m, s)), interval_s=60.0)
    try:
        assert monitor.sampling_interval == 0.05
        _wait_for(calls, 2)
    finally:
        monitor.finish()


def test_a_failing_sink_does_not_stop_the_thread(caplog):
    calls: list[Call] = []

    def sink(metrics: dict[str, float], step: int) -> None:
        calls.append((metrics, step))
        raise RuntimeError("tracker down")

    monitor = _monitor(sink, interval_s=0.05)
    try:
        _wait_for(calls, 3)
        assert monitor._process.is_alive()
    finally:
        monitor.finish()
    assert [s for _, s in calls][:3] == [0, 1, 2]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "tracker down" in
                r.getMessage()]
    assert len(warnings) == 1  # the first failure warns, the repeats do not flood


def test_finish_delivers_a_sample_of_a_short_run_promptly():
    calls: list[Call] = []
    monitor = _monitor(lambda m, s: calls.append((m, s)), interval_s=5.0)
    time.sleep(0.2)
    assert calls == []
    started = time.monotonic()
    monitor.finish()
    assert time.monotonic() - started < 2.0
    assert len(calls) == 1 and calls[0][1] == 0
    assert "system/cpu_utilization_percentage" in calls[0][0]
    assert not monitor._process
    monitor.finish()  # idempotent: no second publish, no error
    assert len(calls) == 1
    assert not any(t.name == "SystemMetricsMonitor" and t.is_alive()
                   for t in threading.enumerate())


def test_finish_publishes_the_partial_period():
    calls: list[Call] = []
    monitor = _monitor(lambda m, s: calls.append((m, s)), interval_s=0.05,
                       samples_before_logging=1000)
    time.sleep(0.3)
    assert calls == []
    monitor.finish()
    assert len(calls) == 1 and calls[0][0]["system/system_memory_usage_megabytes"] > 0


def test_never_contacts_mlflow(monkeypatch):
    from mlflow.tracking import MlflowClient

    def boom(*args, **kwargs):
        raise AssertionError("NodeMonitor touched MLflow tracking")

    monkeypatch.setattr(MlflowClient, "__init__", boom)
    monitor, calls = _two_publishes()


def test_importing_the_module_does_not_import_mlflow():
    import subprocess

    code = ("import sys, gpunet_core.mlops.system_metrics as m; "
            "assert 'mlflow' not in sys.modules; m.NodeMonitor; assert 'mlflow' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert system_metrics.NodeMonitor.__name__ == "NodeMonitor"


def test_node_id():
    assert node_id(0, 1) is None
    assert node_id(1, 2) == "node_1"
    assert node_id(0, 2) == "node_0"
