"""`gpunet search`: a real study (sqlite), measured latency, proxy training, resume, workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from gpunet_core.cli import main as gpunet
from gpunet_core.search.measure import MemoryCache, measure_latency
from gpunet_core.search.space import load_space
from tests.search_helpers import search_argv, tiny_space


def _study(out, name="gpunet-search"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _study_made(out, name="gpunet-search") -> bool:
    """Whether the search has created its study, read without touching the schema (Optuna's
    own load would create its tables, racing the search process doing the same)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True) as db:
            return bool(db.execute("SELECT 1 FROM studies WHERE study_name = ?",
                                   (name,)).fetchone())
    except sqlite3.Error:
        return False


def _states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def test_measure_latency_measures_a_spec_once_per_cache(monkeypatch):
    import gpunet_core.search.measure as measure

    calls = []
    real = measure.run_benchmark
    monkeypatch.setattr(measure, "run_benchmark", lambda *a, **k: calls.append(a) or real(*a, **k))
    spec = load_space().smallest("non_d", num_classes=10, resolution=32)
    cache = MemoryCache()
    first = measure_latency(spec, backend="onnxruntime", iterations=5, cache=cache)
    second = measure_latency(spec, backend="onnxruntime", iterations=5, cache=cache)
    assert len(calls) == 1 and not first["cached"] and second["cached"]
    assert second["latency_ms"] == first["latency_ms"] > 0
    assert first["key"].startswith(first["key"].split(".")[0]) and ".onnxruntime.fp32.b1." in first["key"]
    other = measure_latency(spec, backend="onnxruntime", batch=2, iterations=5, cache=cache)
    assert not other["cached"] and len(calls) == 2  # another batch is another measurement


@pytest.mark.slow
def test_a_tiny_search_writes_a_front_and_never_measures_a_spec_twice(digits_tiny, tmp_path,
                                                                      capsys):
    space, out = tiny_space(tmp_path), tmp_path / "search"
    assert gpunet(search_argv(digits_tiny, out, space, "--json", trials=5)) == 0
    result = json.loads(capsys.readouterr().out)
    study = _study(out)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) >= 5 and sorted(t.number for t in trials) == list(range(len(trials)))
    measured = [t for t in trials if "latency_ms" in t.user_attrs]
    fresh = [t for t in measured if not t.user_attrs["latency_cached"]]
    hashes = {t.user_attrs["spec_hash"] for t in measured}
    assert len(fresh) == len(hashes)  # one measurement per distinct architecture
    assert result["front"], result
    for row in result["front"]:
        spec = json.loads((out / row["spec_path"]).read_text())
        assert load_space(space).violations(spec) == []
        assert row["latency_ms"] <= 200 and 0 <= row["proxy_top1"] <= 100 and row["gmacs"] > 0
    tops = [r["proxy_top1"] for r in result["front"]]
    assert tops == sorted(tops)  # fastest first, each slower one more accurate
    assert (out / "pareto.png").stat().st_size > 1000
    # rerun: the study holds its trials already, nothing is measured or trained again
    assert gpunet(search_argv(digits_tiny, out, space, trials=5)) == 0
    assert len(_study(out).get_trials(deepcopy=False)) == len(trials)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(digits_tiny, tmp_path):
    space, out = tiny_space(tmp_path), tmp_path / "search"
    assert gpunet(search_argv(digits_tiny, out, space, "--workers", "2", trials=4)) == 0
    study = _study(out)
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    states = _states(study)
    assert states.get("RUNNING", 0) == states.get("WAITING", 0) == states.get("FAIL", 0) == 0
    finished = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    assert 4 <= finished <= 5  # a race may start one extra trial, never loses one


@pytest.mark.slow
def test_a_killed_search_resumes_without_repeating_finished_trials(digits_tiny, tmp_path):
    space, out = tiny_space(tmp_path), tmp_path / "search"
    argv = search_argv(digits_tiny, out, space, "--heartbeat-s", "1", trials=5)
    cmd = [sys.executable, "-m", "gpunet_core", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done_before: dict[int, tuple] = {}
    while time.time() < deadline:
        time.sleep(0.5)
        if not _study_made(out):
            assert proc.poll() is None, f"the search failed (exit {proc.returncode})"
            continue
        trials = _study(out).get_trials(deepcopy=False)
        finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        if finished >= 2 and any(t.state.name == "RUNNING" for t in trials):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, \
        f"the search finished before it could be killed: {_states(_study(out))}"
    study = _study(out)
    for t in study.get_trials(deepcopy=False):
        if t.state.name in ("COMPLETE", "PRUNED"):
            done_before[t.number] = (t.state.name, t.values, t.datetime_complete)
    killed = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    assert killed
    # resumed at once: the killed trial is not stale yet, the resumed search waits it out
    assert gpunet(argv) == 0
    study = _study(out)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, (state, values, completed) in done_before.items():  # untouched
        assert (trials[number].state.name, trials[number].values,
                trials[number].datetime_complete) == (state, values, completed)
    assert all(trials[n].state.name == "FAIL" for n in killed), \
        f"killed {killed}: {[(n, trials[n].state.name) for n in killed]}, {_states(study)}"
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") in killed]
    assert retried and all(t.state.name in ("COMPLETE", "PRUNED") for t in retried)
    # the same architecture again: what the killed trial had sampled before the kill
    assert trials[killed[0]].params.items() <= retried[0].params.items()
    finished = [t for t in trials.values() if t.state.name in ("COMPLETE", "PRUNED")]
    assert 5 <= len(finished) <= 6


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--budget-ms", "0.0001"], "is below anything this space can reach"),
    (["--backend", "openvino"], "unknown --backend 'openvino'"),
    (["--backend", "tensorrt"], "--backend tensorrt cannot measure here"),
    (["--storage", "postgresql://search:secret@127.0.0.1:9/optuna"],
     "cannot open the study storage postgresql://search:***@127.0.0.1:9/optuna"),
    (["--budget-ms", "-3"], "--budget-ms must be a positive number"),
    (["--trials", "0"], "--trials must be >= 1"),
])
def test_bad_requests_fail_before_any_training(digits_tiny, tmp_path, capsys, monkeypatch,
                                               extra, fragment):
    import gpunet_core.search.proxy as proxy

    monkeypatch.setattr(proxy, "train_proxy", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "search"
    argv = search_argv(digits_tiny, out, tiny_space(tmp_path)) + extra
    assert gpunet(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and "secret" not in err
    assert not out.exists()  # nothing half-made: no folder, no study file


@pytest.mark.slow
def test_two_workers_share_a_study_in_a_real_postgresql(digits_tiny, tmp_path, postgres_server):
    """The cluster's storage: a throwaway PostgreSQL server, psycopg 3, two workers."""
    import optuna

    psql, env, _root = postgres_server
    subprocess.run([psql, "-X", "-c", "CREATE DATABASE optuna"], env=env, check=True,
                   capture_output=True, timeout=60)
    url = (f"postgresql://{env['PGUSER']}:{env['PGPASSWORD']}@{env['PGHOST']}:{env['PGPORT']}"
           "/optuna")
    out = tmp_path / "search"
    argv = search_argv(digits_tiny, out, tiny_space(tmp_path), "--workers", "2",
                       "--storage", url, trials=4)
    assert gpunet(argv) == 0
    assert not (out / "study.db").exists()
    study = optuna.load_study(study_name="gpunet-search", storage=url)
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False))
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["storage"].endswith("/optuna") and env["PGPASSWORD"] not in pareto["storage"]


def test_a_worker_stops_after_three_failed_trials_in_a_row(digits_tiny, tmp_path, monkeypatch):
    import gpunet_core.search.study as study_mod
    from gpunet_core.search.proxy import ProxyConfig
    from gpunet_core.search.study import SearchConfig, SearchError, run_worker

    def broken(*args, **kwargs):
        raise RuntimeError("ONNX Runtime could not run this graph")

    monkeypatch.setattr(study_mod, "measure_latency", broken)
    cfg = SearchConfig(data=str(digits_tiny), out=str(tmp_path / "s"), budget_ms=100,
                       trials=10, resolutions=(32,), space=str(tiny_space(tmp_path)),
                       proxy=ProxyConfig(epochs=1, train_images=32))
    with pytest.raises(SearchError, match="3 trials in a row failed.*could not run this graph"):
        run_worker(cfg)
    assert _states(_study(tmp_path / "s")) == {"FAIL": 3}


def test_a_study_is_tied_to_the_datasets_content_not_its_path(digits_tiny, digits_small,
                                                              tmp_path):
    import shutil

    from gpunet_core.search.study import SearchConfig, SearchError, open_study

    space = load_space(tiny_space(tmp_path))
    (tmp_path / "s").mkdir()

    def config(data):
        return SearchConfig(data=str(data), out=str(tmp_path / "s"), budget_ms=100,
                            resolutions=(32,), space=space.source)

    study = open_study(config(digits_tiny), space)
    assert study.user_attrs["settings"]["data"].startswith("sha256:")
    moved = shutil.copytree(digits_tiny, tmp_path / "re-prepared")  # same content, new path
    assert open_study(config(moved), space).user_attrs == study.user_attrs
    with pytest.raises(SearchError, match="created with other settings \\(data: 'sha256:"):
        open_study(config(digits_small), space)


def test_workers_opening_a_new_database_at_once_all_get_the_storage(tmp_path):
    """Each creates Optuna's tables; the losers of that race open it again (without the
    retry, most of these 4 x 10 openings fail with "table studies already exists")."""
    import threading

    from gpunet_core.search.study import SearchConfig, open_storage

    errors: list[str] = []
    for i in range(10):
        cfg = SearchConfig(data="d", out=str(tmp_path / f"s{i}"), budget_ms=1)

        def open_it(cfg=cfg):
            try:
                open_storage(cfg)
            except Exception as exc:  # collected: a thread's exception would be lost
                errors.append(str(exc))

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
