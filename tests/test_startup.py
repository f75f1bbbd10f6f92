"""What a pipeline step's process pays besides its work: imports, start-up and exit."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest

from gpunet_core import steps


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_light_steps_do_not_import_torch():
    # dataset prep, reports, ONNX Runtime benchmarks and the training launcher need neither
    # torch nor timm (about 5 s of imports each)
    loaded = _python("""
        import sys
        import gpunet_core, gpunet_core.steps, gpunet_core.data.prepare, gpunet_core.inference.report
        import gpunet_core.mlops.registry, gpunet_core.utils.storage, gpunet_core.inference.latency, gpunet_core.inference.export
        import components, pipelines.cli
        from gpunet_core.cli import build_parser
        build_parser()  # every `gpunet` subcommand: --help and flag errors cost no torch import
        print(sorted(m for m in ("torch", "timm", "torchvision", "mlflow") if m in sys.modules))
    """)
    assert loaded == "[]"


def test_validation_needs_neither_timm_nor_torchvision(tmp_path):
    # their imports cost about 3 s in every validation process; the eval transform and the
    # image folder are ours (checked against theirs in test_loaders.py)
    out = _python(f"""
        import sys
        from PIL import Image
        from gpunet_core import steps
        from gpunet_core.inference.validate import validate
        from gpunet_core.models.factory import create_model
        for cls in ("a", "b"):
            (d := __import__("pathlib").Path({str(tmp_path)!r}) / cls).mkdir()
            Image.new("RGB", (40, 30), (9, 99, 199)).save(d / "0.jpg")
        result = validate(create_model("gpunet_0", num_classes=2), {str(tmp_path)!r},
                          batch_size=2, workers=0, img_size=32, progress=False)
        print(result["images"], sorted(m for m in ("timm", "torchvision") if m in sys.modules))
        for module in steps.validate.modules:
            __import__(module)
        print(sorted(m for m in ("timm", "torchvision") if m in sys.modules))
    """)
    assert out.splitlines() == ["2 []", "[]"]


def test_public_names_load_on_use_and_register_with_timm():
    out = _python("""
        import sys
        import gpunet_core
        assert "torch" not in sys.modules
        try:
            gpunet_core.no_such_name
        except AttributeError as exc:
            print(exc)
        model = gpunet_core.create_model("gpunet_0", num_classes=3)
        print("timm" in sys.modules, "torchvision" in sys.modules)  # a GPUNet needs neither
        import timm  # the import hook registers the models right after timm's own import
        print(type(model).__name__, timm.is_model("gpunet_0"), "create_model" in dir(gpunet_core))
        print(type(timm.create_model("gpunet_p0", num_classes=2)).__name__)
    """)
    assert out.splitlines() == ["module 'gpunet_core' has no attribute 'no_such_name'",
                                "False False", "GPUNet True True", "GPUNet"]
    # any order: timm first, or timm between the package and the model module
    assert _python("import timm, gpunet_core; print(timm.is_model('gpunet_d2'))") == "True"
    assert _python("import gpunet_core.models.gpunet, timm.models, timm; print(timm.is_model('gpunet_1'))"
                   ) == "True"


def test_timed_logs_its_work_after_its_imports(tmp_path, monkeypatch, caplog):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    original_import = builtins.__import__

    @steps.timed("slow_to_import")
    def work(*, model: str, fail: bool = False) -> int:
        import time

        assert "slow_to_import" in sys.modules  # loaded before the clock started
        time.sleep(0.1)  # the step's own work
        if fail:
            raise steps.StepError("boom")
        return 7

    with caplog.at_level(logging.INFO, logger="gpunet_core.steps"):
        assert work(model="m") == 7
        with pytest.raises(steps.StepError):
            work(model="m", fail=True)  # a failed attempt worked too
    assert builtins.__import__ is original_import and work.modules == ("slow_to_import",)
    logged = [steps.parse_work_log(r.getMessage()) for r in caplog.records]
    assert [name for name, _ in logged] == ["work(m)", "work(m)"]
    assert all(0.1 <= seconds < 0.35 for _, seconds in logged), logged  # not the 0.4 s import
    assert not list(tmp_path.glob("*.json*"))  # a log line, no timing files

    @steps.timed()
    def train(cfg: object) -> None:  # the training step takes a TrainConfig: named by its model
        pass

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpunet_core.steps"):
        train(types.SimpleNamespace(model="gpunet_0"))
        train("not a config")
    assert [steps.parse_work_log(r.getMessage())[0] for r in caplog.records] == [
        "train(gpunet_0)", "train"]
    assert steps.parse_work_log("    [KFP Executor ...]: gpunet step benchmark: 1.250 s of "
                                "work") == ("benchmark", 1.25)
    assert steps.parse_work_log("gpunet step benchmark: fast") is None


def test_fast_exit_freezes_gc_after_later_atexit_handlers_once():
    out = _python("""
        import atexit, gc
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        from gpunet_core.utils.process import fast_exit
        before = atexit._ncallbacks()
        fast_exit(); fast_exit()
        print("registered:", atexit._ncallbacks() - before)
    """)
    assert out.splitlines() == ["registered: 1", "frozen at exit: True"]


def test_train_result_is_a_clear_error_when_missing(tmp_path):
    with pytest.raises(steps.StepError, match="result.json is missing or unreadable.*re-run"):
        steps.train_result(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps(
        {"epochs": 2, "steps": 8, "best_top1": 50.0, "best_epoch": 1,
         "last": {"epoch": 1, "top1": 40.0, "rank_checksums": [1.0], "flag": True}}))
    assert steps.train_result(tmp_path) == {"epochs": 2, "steps": 8, "best_top1": 50.0,
                                            "epoch": 1, "top1": 40.0}


def test_step_preloads_write_no_files(tmp_path):
    # a step imports these before checking its arguments: a bad call must leave nothing behind
    timed_steps = [f for f in vars(steps).values() if hasattr(f, "__wrapped__")]
    preloads = sorted({m for f in timed_steps for m in f.modules})
    assert "gpunet_core.inference.validate" in preloads
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    proc = subprocess.run([sys.executable, "-c", f"import {', '.join(preloads)}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))[:5]


# --------------------------------------------------------------------------- from outside


def _kfp_line(level: str, text: str) -> str:
    """A line as kfp.local logs it (its own lines are not indented; a task's output is)."""
    return f"22:41:27.985 - {level} - {text}\n"


def test_task_clock_times_each_task_from_the_runner_side():
    import io
    import threading

    from pipelines.timing import TaskClock

    now = [0.0]
    out = io.StringIO()
    clock = TaskClock(out, clock=lambda: now[0])

    def task(name: str, start: float, lines: list[str], end: float, status: str = "SUCCESS"):
        now[0] = start
        clock.write(_kfp_line("INFO", f"Executing task \x1b[96m'{name}'\x1b[0m"))
        for line in lines:
            clock.write("    ")
            clock.write(line + "\n")  # streamed output: indented, in pieces
        now[0] = end
        clock.write(_kfp_line("INFO" if status == "SUCCESS" else "ERROR",
                              f"Task \x1b[96m'{name}'\x1b[0m finished with status "
                              f"\x1b[92m{status}\x1b[0m"))

    task("train-student", 1.0, ["[KFP Executor]: gpunet step train(gpunet_0): 7.500 s of work"],
         9.0, status="FAILURE")  # first attempt, then the retry
    task("train-student", 9.5, ["gpunet step train(gpunet_0): 3.000 s of work"], 13.0)
    task("train-teacher", 13.5, [_kfp_line("INFO", "Executing task 'fake'").strip(),
                                 "gpunet step elsewhere: 99.0 s of work"], 14.0)
    clock.write(_kfp_line("INFO", "Task prepare-dataset cache hit (key=abc); skipping."))
    now[0] = 20.0
    clock.write(_kfp_line("INFO", "gpunet step outside: 5.0 s of work"))  # no task open
    assert "Executing task \x1b[96m'train-student'" in out.getvalue()  # passed on unchanged
    rows = clock.timings()
    # the task that logged a fake runner line still ends at the runner's own line
    assert rows == [
        {"name": "train(gpunet_0)", "task": "train-student", "wall_s": 11.5, "compute_s": 10.5,
         "attempts": 2},
        {"name": "elsewhere", "task": "train-teacher", "wall_s": 0.5, "compute_s": 0.5,
         "attempts": 1}]

    # tasks that run in parallel (dsl.ParallelFor) write from their own threads
    clock = TaskClock(io.StringIO(), clock=lambda: now[0])
    now[0] = 0.0
    barrier = threading.Barrier(2)

    def parallel(name: str) -> None:
        clock.write(_kfp_line("INFO", f"Executing task '{name}'"))
        barrier.wait()
        clock.write(f"    gpunet step {name}: 0.250 s of work\n")
        barrier.wait()
        if name == "b":
            now[0] = 2.0
        barrier.wait()
        clock.write(_kfp_line("INFO", f"Task '{name}' finished with status SUCCESS"))

    threads = [threading.Thread(target=parallel, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((r["name"], r["wall_s"], r["compute_s"]) for r in clock.timings()) == [
        ("a", 2.0, 0.25), ("b", 2.0, 0.25)]


_TIMED_CHAIN = '''
import json, sys, time
from kfp import dsl, local

from pipelines.timing import TaskClock, pipeline_overhead


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def slow_start(pause: float, work: float) -> float:
    import time

    time.sleep(pause)  # the task process's own cost (its start-up), not the step's work

    from gpunet_core import steps

    @steps.timed()
    def nap(*, model: str) -> float:
        time.sleep(work)
        return work

    return nap(model="m")


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def no_step(x: float) -> float:
    import time

    time.sleep(x)
    return x


@dsl.pipeline(name="timed-chain")
def chain():
    first = slow_start(pause=0.8, work=0.3)
    no_step(x=first.output)


local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[1],
           enable_caching=False)
start = time.monotonic()
with TaskClock.on_stdout() as clock:
    chain()
tasks = clock.timings()
print(json.dumps(pipeline_overhead(tasks, total_wall_s=time.monotonic() - start)))
'''


@pytest.mark.slow
def test_kfp_local_tasks_are_timed_from_outside_against_the_work_they_log(tmp_path):
    # real kfp.local: its log lines are what TaskClock reads, so a kfp upgrade that changes
    # them fails here and not silently in `make bench`
    script = tmp_path / "chain.py"
    script.write_text(_TIMED_CHAIN)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "kfp")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = res["steps"]
    assert (first["name"], first["task"], second["name"]) == ("nap(m)", "slow-start", "no-step")
    assert 0.3 <= first["compute_s"] < 0.6  # the step's own clock: the nap only
    assert first["wall_s"] >= 0.8 + 0.3  # the runner's: the pause and the process too
    assert second["compute_s"] == 0 and second["wall_s"] >= 0.3  # a task that logged no work
    assert res["overhead_s"] == pytest.approx(res["total_wall_s"] - res["compute_s"])
    assert first["wall_s"] + second["wall_s"] <= res["total_wall_s"]
    assert res["runner_s"] == pytest.approx(res["total_wall_s"] - res["tasks_s"])
