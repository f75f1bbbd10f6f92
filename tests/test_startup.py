"""What a pipeline step's process pays besides its work: imports, start-up and exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
        from gpunet_core.models.gpunet import create_model
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


def test_timed_counts_imports_apart_from_compute(tmp_path, monkeypatch):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.3)\n")
    # a package imported inside the step (after its checks), whose submodule imports another
    (tmp_path / "late_pkg").mkdir()
    (tmp_path / "late_pkg" / "__init__.py").write_text("import time\ntime.sleep(0.2)\n")
    (tmp_path / "late_pkg" / "sub.py").write_text("import time\nimport late_dep\n"
                                                  "time.sleep(0.2)\n")
    (tmp_path / "late_dep.py").write_text("import time\ntime.sleep(0.2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv(steps.TIMINGS_ENV, str(timings))
    import builtins

    original_import = builtins.__import__

    @steps.timed("slow_to_import", late=("late_pkg", "late_dep"))
    def work(*, model: str) -> int:
        import time

        import slow_to_import  # noqa: F401  (already loaded by the decorator: free here)

        time.sleep(0.1)  # the step's own work
        import late_pkg  # noqa: F401  (0.2 s)
        import late_pkg.sub  # noqa: F401  (0.4 s: the submodule and the late_dep it imports)

        return 7

    assert work(model="m") == 7
    assert builtins.__import__ is original_import
    entry = json.loads(timings.read_text())
    assert entry["name"] == "work(m)"
    assert entry["import_s"] >= 0.9 and 0.1 <= entry["compute_s"] < 0.3
    assert entry["wall_s"] >= entry["import_s"] + entry["compute_s"]
    # the steps whose libraries write files on first import time them this way
    assert steps.export_onnx.late == ("onnxruntime",)
    assert steps.write_html_report.late == ("matplotlib",)


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


def test_process_age_counts_from_the_process_start():
    age = float(_python("""
        import time
        time.sleep(0.5)
        from gpunet_core.utils.process import process_age_s
        print(process_age_s())
    """))
    assert 0.5 <= age < 10


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
