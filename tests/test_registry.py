"""Promotion rules on a real MLflow registry (sqlite): champion, challenger, rollback."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from gpunet_core import registry
from gpunet_core.cli import main as cli_main

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


def test_cli_promote_json(mlflow_sqlite, capsys):
    v1 = add_version(mlflow_sqlite, 55.0, 3.0)
    assert cli_main(["promote", NAME, "--version", v1, "--min-top1", "50", "--json"]) == 0
    assert '"alias": "champion"' in capsys.readouterr().out
