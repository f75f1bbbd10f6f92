"""`make bench` harness (bench.perf): a quick run writes the agreed JSON and markdown.

No timing assertions here: speed targets live in the benchmark output, never in timed tests.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import perf
from gpunet_core.utils.errors import BenchmarkError
from pipelines.timing import TimingError

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    timings = out / "steps.json"
    timings.write_text(json.dumps([{"name": "prepare", "wall_s": 10.0, "compute_s": 9.0},
                                   {"name": "train", "wall_s": 30.0, "compute_s": 28.0}]))
    proc = _run("--quick", "--results-dir", str(out), "--work-dir", str(out / "work"),
                "--pipeline-timings", str(timings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(out.glob("*-quick.json"))
    assert len(results) == 1, list(out.iterdir())
    return results[0], out / "quick.md", json.loads(results[0].read_text())


@pytest.mark.slow
def test_quick_run_writes_the_results_schema(quick_run):
    path, _, res = quick_run
    assert path.name.endswith(f"-{perf.host_name()}-quick.json")
    assert res["schema"] == perf.PERF_SCHEMA and res["quick"] is True
    assert res["fingerprint"]["torch"] and res["targets"] == perf.TARGETS
    s = res["sections"]
    assert set(s) == {"train", "data", "inference", "pipeline"}  # quick mode: no torchrun
    assert not any("error" in v for v in s.values()), s

    (row,) = s["train"]["models"]
    assert row["model"] == "gpunet_0"
    assert row["bare"]["img_per_sec"] > 0 and row["gpunet_train"]["img_per_sec"] > 0
    assert row["ratio"] == pytest.approx(row["gpunet_train"]["img_per_sec"]
                                         / row["bare"]["img_per_sec"])  # quick: one round
    assert row["ratio_rounds"] == [row["ratio"]] and s["train"]["rounds"] == 1
    assert 0 <= row["gpunet_train"]["data_wait_frac"] < 1
    assert row["gpunet_train"]["steps"] == 3 * s["train"]["steps_per_epoch"]
    assert len(row["gpunet_train"]["img_per_sec_epochs"]) == 2  # warm epochs only
    assert set(row["bare"]["ms_per_step"]) == {"fwd_bwd", "optimizer", "ema"}
    assert [v["variant"] for v in s["train"]["variants"]] == [v for v, _ in perf.TRAIN_VARIANTS]

    (data,) = s["data"]["rows"]
    assert data["backend"] == "pil" and data["images_per_s"] > 0
    assert data["images_per_s_per_worker"] == data["images_per_s"] / data["workers"]

    (inf,) = s["inference"]["rows"]
    assert inf["model"] == "gpunet_0" and inf["img_size"] == 320
    assert inf["latency_ms"]["eager"]["1"]["median"] > 0
    assert inf["latency_ms"]["onnxruntime"]["1"]["median"] > 0
    assert inf["published_fp16_ms"] == {"a100": 0.46, "v100": 0.63}

    p = s["pipeline"]
    assert p["status"] == "measured" and p["overhead_frac"] == pytest.approx(3 / 40)


@pytest.mark.slow
def test_markdown_is_regenerated_from_the_json(quick_run, tmp_path):
    path, md, res = quick_run
    text = md.read_text()
    for heading in ("## Training step throughput", "## Input pipeline", "## Inference latency",
                    "## Pipeline overhead"):
        assert heading in text
    row = res["sections"]["train"]["models"][0]
    assert perf._ratio(row["ratio"], perf.TARGETS["train_vs_bare"]) in text
    eager = res["sections"]["inference"]["rows"][0]["latency_ms"]["eager"]["1"]["median"]
    assert f"{eager:,.1f}" in text
    again = tmp_path / "again.md"
    proc = _run("--render", str(path), "--markdown", str(again))
    assert proc.returncode == 0, proc.stderr
    assert again.read_text() == text.replace(str(path), str(path))


def test_pipeline_overhead_split():
    res = perf.pipeline_overhead([{"name": "a", "task": "t-a", "wall_s": 4, "compute_s": 3},
                                  {"name": "b", "wall_s": 6, "compute_s": 6}], total_wall_s=12)
    assert res["overhead_s"] == pytest.approx(3) and res["overhead_frac"] == pytest.approx(0.25)
    assert [st["overhead_s"] for st in res["steps"]] == [1, 0]
    assert res["steps"][0]["task"] == "t-a" and "task" not in res["steps"][1]
    assert res["tasks_s"] == pytest.approx(10) and res["runner_s"] == pytest.approx(2)
    res["noop_floor"] = {"tasks": 2, "total_s": 0.6, "per_task_s": 0.3}
    text = perf.render_markdown({"sections": {"pipeline": res}})
    assert "the steps' own work 9.0 s, everything else 3.0 s = 0.25 ❌ of the total" in text
    assert "2.0 s in the runner between the task processes" in text
    assert "| step | task process s | work s | overhead s |" in text
    assert "| a | 4.0 | 3.0 | 1.0 |" in text and "imports s" not in text
    assert "chain of 2 *empty* KFP components under kfp.local takes 0.6 s (0.30 s" in text
    assert "Distillation" not in text  # not measured: nothing claimed
    res["distillation"] = {"student_top1": 96.11, "teacher_top1": 97.22,
                           "without_teacher_top1": 92.22, "gain_points": 96.11 - 92.22,
                           "without_teacher_wall_s": 90.0}
    text = perf.render_markdown({"sections": {"pipeline": res}})
    assert "the student reaches 96.11 % top-1 with the teacher (97.22 %), 92.22 % without " \
           "it: +3.89 points" in text
    with pytest.raises(TimingError, match="compute_s"):
        perf.pipeline_overhead([{"name": "a", "wall_s": 1, "compute_s": 2}])
    with pytest.raises(TimingError, match="numeric"):
        perf.pipeline_overhead([{"name": "a"}])
    with pytest.raises(TimingError, match="no pipeline step timings"):
        perf.pipeline_overhead([])
    quick = perf.BenchConfig(extra={"quick": True})
    assert "skipped in quick mode" in perf.bench_pipeline(quick, Path("."))["status"]
    bad = perf.BenchConfig(pipeline_timings=[{"name": "a", "wall_s": 1, "compute_s": 2}])
    with pytest.raises(BenchmarkError, match="--pipeline-timings: step 'a'"):
        perf.bench_pipeline(bad, Path("."))  # fails the run, not only its section


def test_production_code_carries_no_benchmark_machinery():
    """The library, components and DAG neither import the bench tool nor patch imports; the
    pipeline's overhead is measured from outside the steps (pipelines.timing)."""
    import ast

    offenders = []
    for package in ("gpunet_core", "components", "pipelines"):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            tree = ast.parse(text, str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.name}: imports {n}" for n in names
                              if n == "bench" or n.startswith("bench.")]
                if isinstance(node, ast.Attribute) and node.attr == "__import__" \
                        and isinstance(node.ctx, ast.Store):
                    offenders.append(f"{path.name}: assigns __import__")
            if "GPUNET_STEP_TIMINGS" in text:
                offenders.append(f"{path.name}: GPUNET_STEP_TIMINGS")
    assert not offenders, offenders
    # and the check itself sees what it looks for
    probe = ast.parse("import builtins\nbuiltins.__import__ = None\nfrom bench.perf import x")
    stores = [n for n in ast.walk(probe) if isinstance(n, ast.Attribute)
              and n.attr == "__import__" and isinstance(n.ctx, ast.Store)]
    froms = [n.module for n in ast.walk(probe) if isinstance(n, ast.ImportFrom)]
    assert stores and froms == ["bench.perf"]


def test_rendered_photos_are_imagenet_like(tmp_path):
    from PIL import Image

    root = perf.make_jpeg_dataset(tmp_path, images=3, classes=2, val_images=1)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 3 and len(list((root / "val").rglob("*.jpg"))) == 1
    assert Image.open(files[0]).size == (500, 375)
    assert all(f.stat().st_size > 20_000 for f in files)  # not flat colour: compresses like photos
    stamp = (root / ".complete.json").stat().st_mtime_ns
    perf.make_jpeg_dataset(tmp_path, images=3, classes=2, val_images=1)
    assert (root / ".complete.json").stat().st_mtime_ns == stamp  # reused, not re-rendered


def test_markdown_shows_skips_errors_and_pending():
    res = {"fingerprint": {}, "sections": {
        "inference": {"batches": [1, 32], "backends": ["eager", "tensorrt"], "torch_threads": 2,
                      "rows": [{"model": "gpunet_0", "img_size": 320,
                                "published_fp16_ms": {"a100": 0.46, "v100": 0.63},
                                "latency_ms": {"eager": {"1": {"median": 50.0},
                                                         "32": {"skipped": "slow"}},
                                               "tensorrt": {"1": {"skipped": "no GPU"},
                                                            "32": {"error": "boom"}}}}]},
        "pipeline": perf.bench_pipeline(perf.BenchConfig(extra={"quick": True}), Path(".")),
        "scaling": {"model": "gpunet_0", "img_size": 32, "batch_per_proc": 8,
                    "efficiency": {"2": 0.8},
                    "rows": [{"procs": 1, "img_per_sec": 10.0, "data_wait_frac": 0.01},
                             {"procs": 2, "img_per_sec": 16.0, "data_wait_frac": 0.02}]},
        "data": {"error": "DataError: no images"}}}
    text = perf.render_markdown(res)
    assert "| gpunet_0 | 320 | 50.0 | skip | skip | error |" in text
    assert "skipped in quick mode" in text
    assert "| 2 | 16.0 | 0.80 | 2.0 % |" in text
    assert "Failed: DataError: no images" in text


def test_bad_arguments_are_clear_errors(tmp_path):
    proc = _run("--sections", "train,nope", "--results-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown section(s) ['nope']" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--quick", "--models", "gpunet_9", "--results-dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown model(s) ['gpunet_9']" in proc.stderr
    timings = tmp_path.parent / f"{tmp_path.name}-timings.json"
    timings.write_text(json.dumps([{"name": "train", "wall_s": 1.0, "compute_s": 2.0}]))
    proc = _run("--quick", "--pipeline-timings", str(timings), "--results-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--pipeline-timings: step 'train': compute_s 2.0 must be in [0, wall_s 1.0]" \
        in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_training_loop_still_stops_on_a_non_finite_loss():
    """The per-step isfinite() host sync moved to the logging points; the check itself stays."""
    import torch

    from gpunet_core.training.loop import TrainError, _check_finite, _Progress

    _check_finite(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), 0, 5)
    with pytest.raises(TrainError, match=r"loss became nan in epoch 3 \(by step 7\)"):
        _check_finite(torch.tensor([float("nan"), 1.0, 0.0], dtype=torch.float64), 3, 7)
    progress = _Progress(total=10, epoch=0, enabled=False, interval=4)
    assert [s for s in range(1, 11) if progress.due(s)] == [4, 8, 10]


def test_ratio_shows_a_third_digit_when_rounding_would_hide_a_miss():
    assert perf._ratio(0.9478, 0.95) == "0.948 ❌"
    assert perf._ratio(0.9503, 0.95) == "0.950 ✅"
    assert perf._ratio(0.96, 0.95) == "0.96 ✅"
    assert perf._ratio(0.26, 0.10, False) == "0.26 ❌"


def test_train_ratio_is_the_median_round_against_the_bare_runs_around_it(tmp_path, monkeypatch):
    # the main size, then the small-input size, then six bare runs of the hot-path variants
    # (3 variants x 2 repeats)
    bare_runs = iter([100.0, 80.0, 100.0, 100.0] + [10.0] * 4 + [1.0] * 6)
    train_runs = iter([90.0, 90.0, 50.0] + [8.0, 9.0, 7.0])
    sizes = []

    def bare(name, **kw):
        sizes.append(("bare", kw["img_size"], kw["batch"], kw["steps"]))
        return {"img_per_sec": next(bare_runs), "params": 1, "ms_per_step": {}}

    def train(name, data, out, **kw):
        sizes.append(("train", kw["img_size"], kw["batch"], len(list(data.glob("train/*/*")))))
        return {"img_per_sec": next(train_runs)}

    monkeypatch.setattr(perf, "bare_train_loop", bare)
    monkeypatch.setattr(perf, "gpunet_train_loop", train)
    cfg = perf.BenchConfig(train_models=("gpunet_0",), train_img_size=32, train_batch=2,
                           train_steps=2, train_rounds=3, train_repeats=2,
                           train_small=(16, 3, 2), train_small_models=("gpunet_0",))
    res = perf.bench_train(cfg, tmp_path)
    row, small = res["models"]
    assert row["ratio_rounds"] == [1.0, 1.0, 0.5]  # 90 / mean(100, 80), 90 / mean(80, 100), ...
    assert row["ratio"] == 1.0 and row["bare"]["img_per_sec"] == 95.0
    assert row["bare"]["img_per_sec_runs"] == [100.0, 80.0, 100.0, 100.0]
    assert (row["img_size"], row["batch"], small["img_size"], small["batch"]) == (32, 2, 16, 3)
    assert small["ratio_rounds"] == [0.8, 0.9, 0.7] and small["ratio"] == 0.8
    # each size trains on its own dataset (batch x steps images) and the variants use the main one
    assert sizes[:7] == [("bare", 32, 2, 2), ("train", 32, 2, 4)] * 3 + [("bare", 32, 2, 2)]
    assert sizes[7:14] == [("bare", 16, 3, 2), ("train", 16, 3, 6)] * 3 + [("bare", 16, 3, 2)]
    assert set(sizes[14:]) == {("bare", 32, 2, 2)} and len(sizes) == 20
    assert set(res["datasets"]) == {"32", "16"}


def test_pipeline_section_shows_the_median_of_its_runs(tmp_path, monkeypatch):
    fracs = iter([0.12, 0.08, 0.10])
    cmds = []

    def run_json(cmd, what, env=None):
        cmds.append(cmd)
        if "enable_distill=false" in cmd:  # the run without the teacher
            return {"top1": 92.0, "overhead": {"total_wall_s": 80.0}}
        frac = next(fracs)
        return {"top1": 96.0 + frac, "teacher_top1": 97.0,
                "overhead": {"total_wall_s": 100.0, "compute_s": 100 * (1 - frac),
                             "overhead_s": 100 * frac, "overhead_frac": frac,
                             "steps": [{"name": f"step-{frac}", "wall_s": 1.0, "compute_s": 1.0,
                                        "overhead_s": 0.0}]}}

    monkeypatch.setattr(perf, "_run_json", run_json)
    monkeypatch.setattr(perf, "kfp_task_floor", lambda tasks, work: {"tasks": tasks})
    res = perf.bench_pipeline(perf.BenchConfig(pipeline_runs=3), tmp_path)
    assert res["overhead_frac"] == 0.10 and res["steps"][0]["name"] == "step-0.1"
    assert [r["overhead_frac"] for r in res["runs"]] == [0.08, 0.10, 0.12]
    workdirs = [c[c.index("--workdir") + 1] for c in cmds]
    assert len(set(workdirs)) == 4 and all("--no-cache" in c for c in cmds)
    # the distillation gain: the median run's student against the one without the teacher
    assert res["distillation"]["gain_points"] == pytest.approx(96.10 - 92.0)
    assert res["distillation"]["without_teacher_wall_s"] == 80.0
    text = perf.render_markdown({"sections": {"pipeline": {**res, "status": "measured"}}})
    assert "3 runs, everything else / total: 0.080 / 0.100 / 0.120" in text
    assert "96.10 % top-1 with the teacher (97.00 %), 92.00 % without it: +4.10 points" in text


@pytest.mark.slow
def test_quantization_section_at_smoke_sizes(tmp_path):
    """The quantization section end to end at quick's sizes (not part of --quick's sections:
    it trains a model): its rows and figures, never their speed."""
    cfg = perf.BenchConfig.quick(sections=("quantization",), threads=2)
    res = perf.bench_quantization(cfg, tmp_path)
    assert res["threads"] == 2 and res["batch"] == 1 and res["block"] == cfg.quant_block

    (row,) = res["rows"]
    assert (row["model"], row["img_size"], row["native_img_size"]) == ("gpunet_0", 64, 320)
    lat = row["latency_ms"]
    assert list(lat) == ["fp32"] + [key for key, _, _ in perf.QUANT_GRAPHS]
    rounds = lat["fp32"]["rounds"]
    assert cfg.quant_min_rounds <= rounds <= cfg.quant_max_rounds
    for stats in lat.values():
        assert stats["median"] > 0 and stats["count"] == rounds * cfg.quant_block
        assert len(stats["round_medians"]) == rounds
    for key, _, _ in perf.QUANT_GRAPHS:
        # the ratio is the two medians measured side by side
        assert row["vs_fp32"][key] == pytest.approx(lat[key]["median"] / lat["fp32"]["median"])
        assert row["vs_fp32_rounds"][key] == pytest.approx(
            [a / b for a, b in zip(lat[key]["round_medians"], lat["fp32"]["round_medians"],
                                   strict=True)])
        assert row["vs_fp32_paired"][key] == pytest.approx(
            statistics.median(row["vs_fp32_rounds"][key]))
        assert "error" not in row["graphs"][key]
        assert row["graphs"][key]["calibration_images"] == cfg.quant_calib_samples
    assert row["graphs"]["int8_cpu"]["method"]["format"] == "qoperator"

    v = res["variants"]
    assert (v["model"], v["img_size"]) == ("gpunet_0", 64)
    assert [r["variant"] for r in v["rows"]] == list(cfg.quant_variants)
    fp32_ms = v["fp32_latency_ms"]["median"]
    for r in v["rows"]:
        assert "error" not in r and "digits_error" not in r, r
        assert r["vs_fp32"] == pytest.approx(r["latency_ms"]["median"] / fp32_ms)
        assert r["vs_fp32_paired"] > 0
        assert 0 <= r["digits_top1"] <= 100
        assert r["digits_drop_points"] == pytest.approx(v["digits_fp32_top1"] - r["digits_top1"])

    a = res["accuracy"]
    assert (a["model"], a["img_size"], a["epochs"]) == ("gpunet_0", 32, 1)
    graphs = a["graphs"]
    assert list(graphs) == ["fp32"] + [key for key, _, _ in perf.QUANT_GRAPHS]
    val_images = graphs["fp32"]["images"]
    assert val_images == 20  # 10 digits per class, a fifth of them held out
    for key, g in graphs.items():
        assert 0 <= g["top1"] <= 100 and g["images"] == val_images, key
        assert g["drop_points"] == pytest.approx(graphs["fp32"]["top1"] - g["top1"])
        if key != "fp32":
            assert g["images"] == val_images and g["logits_max_abs_diff"] >= 0
            assert g["calibration_images"] == 80  # the whole (small) train split
    assert 0 <= a["train"]["last_top1"] <= 100 and "gpunet train" in a["train"]["command"]

    text = perf.render_markdown({"sections": {"quantization": res}})
    assert "## Quantization (ONNX Runtime, CPU)" in text
    ratio = perf._ratio(row["vs_fp32_paired"]["int8_cpu"], perf.TARGETS["int8_cpu_vs_fp32_b1"],
                        False)
    assert f"| gpunet_0 | 64 | {lat['fp32']['median']:,.1f} | " \
           f"{lat['int8_cpu']['median']:,.1f} | {ratio} |" in text
    assert f"| FP16 (ModelOpt AutoCast) | {graphs['fp16']['top1']:.2f} |" in text


def test_interleaved_latency_rotates_the_graphs_and_times_blocks(monkeypatch):
    calls: list[str] = []
    cfg = perf.BenchConfig(quant_block=2, quant_min_rounds=3, quant_max_rounds=3,
                           quant_time_budget_s=0.0)
    res = perf.interleaved_latency({n: (lambda n=n: calls.append(n)) for n in "abc"}, cfg)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # two warm-up calls each
    rounds = [calls[6 + 9 * r: 6 + 9 * (r + 1)] for r in range(3)]
    assert rounds == [list("aaabbbccc"), list("bbbcccaaa"), list("cccaaabbb")]
    assert len(calls) == 6 + 27
    assert all(s["count"] == 6 and s["rounds"] == 3 and len(s["round_medians"]) == 3
               for s in res.values())
    capped = perf.BenchConfig(quant_block=1, quant_min_rounds=1, quant_max_rounds=2,
                              quant_time_budget_s=600.0)  # the budget ends no round here
    res = perf.interleaved_latency({"a": lambda: None}, capped)
    assert res["a"]["rounds"] == 2 and res["a"]["count"] == 2


def test_quantization_markdown_marks_targets_and_errors():
    stats = {"median": 10.0, "rounds": 4}
    q = {"batch": 1, "threads": 2, "block": 5,
         "calibration": {"latency_models": "64 photos"},
         "rows": [{"model": "gpunet_0", "img_size": 320, "native_img_size": 320,
                   "latency_ms": {"fp32": stats, "int8_cpu": {"median": 4.0},
                                  "fp16": {"median": 10.1}},
                   "vs_fp32": {"int8_cpu": 0.4, "fp16": 1.01},
                   "vs_fp32_rounds": {"int8_cpu": [0.45, 0.38, 0.41]},
                   "graphs": {"int8_tensorrt": {"error": "RuntimeError: no"}}},
                  {"model": "gpunet_1", "error": "ExportError: boom"}],
         "variants": {"model": "gpunet_0", "img_size": 320, "batch": 1,
                      "fp32_latency_ms": stats, "digits_fp32_top1": 98.0,
                      "rows": [{"variant": "qdq_s8", "label": "QDQ, s8 activations",
                                "latency_ms": {"median": 11.0}, "vs_fp32": 1.1,
                                "vs_fp32_paired": 1.12,
                                "digits_top1": 97.5, "digits_drop_points": 0.5},
                               {"variant": "per_tensor", "label": "per-tensor",
                                "error": "ValueError: x"}]},
         "accuracy": {"model": "gpunet_0", "img_size": 64, "epochs": 2,
                      "train": {"wall_s": 25.0},
                      "graphs": {"fp32": {"top1": 98.0, "images": 360, "drop_points": 0.0},
                                 "int8_cpu": {"top1": 97.2, "drop_points": 0.8,
                                              "logits_max_abs_diff": 0.3,
                                              "logits_max_abs": 12.0, "top1_agreement": 0.99,
                                              "calibration_images": 256},
                                 "fp16": {"top1": 98.0, "drop_points": 0.0,
                                          "logits_max_abs_diff": 0.02, "top1_agreement": 1.0},
                                 "int8_tensorrt": {"error": "RuntimeError: no"}}}}
    text = perf.render_markdown({"sections": {"quantization": q}})
    assert "each model at its native resolution" in text and "(per model here: 4)" in text
    # the target is judged on the median of the rounds' ratios (0.41), not the medians' (0.40)
    assert ("| gpunet_0 | 320 | 10.0 | 4.0 | 0.41 ✅ | 0.38–0.45 | 0.40 | 10.1 | 1.01 | error "
            "| – |" in text)
    assert "| gpunet_1 | – | error: ExportError: boom |" in text
    assert "Not written: gpunet_0 int8_tensorrt: RuntimeError: no" in text
    assert "| QDQ, s8 activations | 11.0 | 1.12 | 1.10 | 0.50 |" in text
    assert "| per-tensor | error: ValueError: x | – | – | error |" in text
    assert "| INT8 `--target cpu` (ORT QOperator) | 97.20 | 0.80 ❌ | 3.00e-01 | 99.0 % |" in text
    assert "| FP16 (ModelOpt AutoCast) | 98.00 | 0.00 | 2.00e-02 ❌ | 100.0 % |" in text
    assert "256 calibration images" in text and "FP32 logits reach 12.00" in text
    failed = perf.render_markdown({"sections": {"quantization": {"error": "OSError: disk"}}})
    assert "## Quantization (ONNX Runtime, CPU)\n\nFailed: OSError: disk" in failed


# --------------------------------------------------------------------------- search section


def _pareto(front, references, budget=10.0):
    return {"budget_ms": budget, "trials_counted": 8, "trained_in_budget": len(front),
            "fastest_in_space_ms": {"non_d": 1.0, "d": 2.0},
            "front": [{"trial": t, "proxy_top1": a, "latency_ms": ms, "params": 2e6,
                       "gmacs": 0.01, "spec_hash": f"h{t}", "spec_path": f"specs/trial-{t}.json",
                       "epoch_top1": [a]} for t, a, ms in front],
            "references": [{"name": n, "display": n.upper(), "proxy_top1": a, "latency_ms": ms,
                            "params": 3e6, "gmacs": 0.02, "within_budget": ms <= budget}
                           for n, a, ms in references]}


def test_search_target_beats_or_matches_the_best_published_gpunet_within_budget():
    refs = [("gpunet_0", 90.0, 10.0), ("gpunet_1", 95.0, 13.0),  # 95 % but over the budget
            ("gpunet_d2", 80.0, 4.0)]
    # beating: higher top-1 than GPUNet-0 (the best within the budget)
    res = perf.versus_published(_pareto([(1, 85.0, 3.0), (2, 91.0, 9.0)], refs))
    assert res["best_published"]["name"] == "gpunet_0" and res["best_front"]["trial"] == 2
    assert res["beating"] == [2] and res["matching"] == [] and res["holds"] is True
    assert res["top1_gain_points"] == pytest.approx(1.0)
    # matching: at most 0.5 points lower at <= 0.8x its latency (8.0 ms here)
    res = perf.versus_published(_pareto([(1, 89.5, 8.0), (2, 89.6, 8.1)], refs))
    assert res["beating"] == [] and res["matching"] == [1] and res["holds"] is True
    # neither: close on top-1 but not faster enough, or faster but too far behind
    res = perf.versus_published(_pareto([(1, 89.6, 8.1), (2, 89.4, 5.0)], refs))
    assert res["holds"] is False and res["top1_gain_points"] == pytest.approx(-0.4)
    # an equal top-1 does not beat it
    assert perf.versus_published(_pareto([(1, 90.0, 9.0)], refs))["holds"] is False
    # no published GPUNet trained within the budget: not judged, never a pass
    none = perf.versus_published(_pareto([(1, 99.0, 1.0)], [("gpunet_1", 95.0, 13.0)]))
    assert none["holds"] is None and "no published GPUNet" in none["why"]
    assert perf.versus_published(_pareto([(1, 99.0, 1.0)], []))["holds"] is None


def test_spearman_uses_scipy_or_numpy_ranks(monkeypatch):
    res = perf.spearman([1, 2, 3, 4], [10, 30, 20, 40])
    assert res["rho"] == pytest.approx(0.8) and res["method"] == "scipy.stats.spearmanr"
    assert 0 < res["p_value"] < 1 and res["n"] == 4
    tied = perf.spearman([1, 2, 2, 3], [1, 3, 2, 4])
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import` fails
    fallback = perf.spearman([1, 2, 3, 4], [10, 30, 20, 40])
    assert fallback["rho"] == pytest.approx(0.8) and fallback["p_value"] is None
    assert fallback["method"].startswith("numpy ranks")
    assert perf.spearman([1, 2, 2, 3], [1, 3, 2, 4])["rho"] == pytest.approx(tied["rho"])
    assert perf.spearman([3, 2, 1], [1, 2, 3])["rho"] == pytest.approx(-1.0)
    flat = perf.spearman([10.0, 10.0, 10.0], [1, 2, 3])
    assert flat["rho"] is None and "constant" in flat["why"]
    with pytest.raises(BenchmarkError, match="equal-length"):
        perf.spearman([1], [1])


def test_search_section_runs_three_parts_under_gpunet_0s_budget(tmp_path, monkeypatch):
    from gpunet_core.search import driver

    seeded, runs, ranked = [], [], {}
    monkeypatch.setattr(perf, "_search_data", lambda cfg, work: tmp_path / "digits")
    monkeypatch.setattr(driver, "num_classes", lambda data: 10)
    monkeypatch.setattr(perf, "_budget_latency", lambda cfg, classes: {
        "model": "gpunet_0", "img_size": cfg.search_img_size, "latency_ms": 10.0,
        "cache": {"k": {"latency_ms": 10.0}}})
    monkeypatch.setattr(perf, "_seed_latency", lambda scfg, entries: seeded.append(
        (scfg.out, entries)))

    def timed(scfg):
        runs.append(scfg)
        out = Path(scfg.out)
        assert not out.exists()  # a fresh study
        if scfg.references:
            result = _pareto([(3, 88.0, 6.0), (5, 91.0, 9.5)],
                             [("gpunet_0", 90.0, 10.0), ("gpunet_d2", 80.0, 4.0)])
            in_budget = [{"trial": t, "spec": [{"trial": t}], "latency_ms": ms}
                         for t, ms in ((3, 6.0), (4, 7.0), (5, 9.5))]
            return {"result": result, "wall_s": 120.0, "trials_span_s": 100.0,
                    "trials_ended": 8, "in_budget": in_budget}
        # throughput: 2 workers evaluate 12 trials in 60 s instead of 90 s
        wall = 90.0 if scfg.workers == 1 else 60.0
        result = {**_pareto([], []), "trials_counted": 12, "trained_in_budget": 7}
        return {"result": result, "wall_s": wall, "trials_span_s": wall - 10,
                "trials_ended": 12, "in_budget": []}

    def rank(cfg, data, budget_ms, candidates, front):
        ranked.update(budget=budget_ms, candidates=candidates, front=front)
        return {"proxy": {"epochs": 3}, "long": {"epochs": 12},
                "train_images": {"proxy": 640, "long": 1437}, "val_images": 360,
                "rho": 0.83, "p_value": 0.04, "method": "scipy.stats.spearmanr",
                "rows": [{"name": "trial-3", "source": "front", "params": 2e6,
                          "proxy_top1": 88.0, "long_top1": 95.0, "proxy_s": 30.0,
                          "long_s": 270.0}]}

    monkeypatch.setattr(perf, "_timed_search", timed)
    monkeypatch.setattr(perf, "_rank_correlation", rank)
    cfg = perf.BenchConfig(search_trials=40, search_throughput_trials=12)
    res = perf.bench_search(cfg, tmp_path)

    # one budget for every study: GPUNet-0's measurement, seeded into the compared study only
    assert [r.budget_ms for r in runs] == [10.0] * 3
    assert [(r.trials, r.workers, r.references) for r in runs] == \
        [(40, 1, True), (12, 1, False), (12, 2, False)]
    assert {r.backend for r in runs} == {"onnxruntime"} and {r.resolutions for r in runs} == \
        {(32,)}
    assert len({r.out for r in runs}) == 3  # separate fresh studies
    assert seeded == [(runs[0].out, {"k": {"latency_ms": 10.0}})]
    assert "cache" not in res["budget"] and res["budget"]["latency_ms"] == 10.0

    v = res["versus_published"]
    assert v["holds"] is True and v["beating"] == [5] and v["best_published"]["name"] == \
        "gpunet_0"
    assert [r["trial"] for r in v["front"]] == [3, 5] and v["wall_s"] == 120.0
    # the rank correlation draws on the compared study: its front and its other candidates
    assert ranked["budget"] == 10.0 and ranked["front"] == {3, 5}
    assert [c["trial"] for c in ranked["candidates"]] == [3, 4, 5]

    th = res["throughput"]
    assert [r["per_min"] for r in th["rows"]] == [pytest.approx(8.0), pytest.approx(12.0)]
    assert th["ratio"] == {"2": pytest.approx(1.5)}
    assert th["ratio_span"] == {"2": pytest.approx(80 / 50)}

    text = perf.render_markdown({"sections": {"search": res}})
    assert "## Architecture search (ONNX Runtime, CPU)" in text
    assert "run: 10.000 ms" in text
    assert "- best front member within the budget: trial 5, 91.00 % at 9.500 ms" in text
    assert "- best published GPUNet within the budget: GPUNET_0, 90.00 % at 10.000 ms" in text
    assert "**✅ met** (beating it: trials [5]; matching it faster: trials none)" in text
    assert "| front: trial 5 | 9.500 | 91.00 | 2.00 | 0.010 | yes |" in text
    assert "| GPUNET_0 (published) | 10.000 | 90.00 | 3.00 | 0.020 | yes |" in text
    assert "| 1 | 12 | 7 | 90 | 8.00 | 1.00 | 80 | 9.00 | 1.00 |" in text
    assert "| 2 | 12 | 7 | 60 | 12.00 | 1.50 | 50 | 14.40 | 1.60 |" in text
    assert "**Spearman ρ = 0.83**, p = 0.040 (scipy.stats.spearmanr)" in text
    assert "| trial-3 | front | 2.00 | 88.00 | 95.00 | 30 | 270 |" in text

    # a failing part is recorded, the others still run
    def broken(scfg):
        if scfg.references:
            raise RuntimeError("study storage is gone")
        return timed(scfg)

    monkeypatch.setattr(perf, "_timed_search", broken)
    res = perf.bench_search(perf.BenchConfig(search_workers=(1,)), tmp_path)
    assert res["versus_published"] == {"error": "RuntimeError: study storage is gone"}
    assert len(res["throughput"]["rows"]) == 1 and res["throughput"]["ratio"] == {}
    assert ranked["candidates"] == [] and ranked["front"] == set()  # the failed study's
    text = perf.render_markdown({"sections": {"search": res}})
    assert "Against the published GPUNets: failed: RuntimeError: study storage is gone" in text
    failed = perf.render_markdown({"sections": {"search": {"error": "OSError: disk"}}})
    assert "## Architecture search (ONNX Runtime, CPU)\n\nFailed: OSError: disk" in failed


def test_rank_correlation_trains_the_studys_candidates_both_ways(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gpunet_core.search import measure, proxy
    from gpunet_core.search.space import spec_hash

    loads, trained, measured = [], [], []

    def load(data, img_size, cfg):
        loads.append((img_size, cfg.epochs, cfg.train_images))
        n = cfg.train_images or 1437
        return SimpleNamespace(num_classes=10, train_y=[0] * n, val_y=[0] * 360)

    def latency(spec, **kw):  # half the random samples over the budget (10 ms)
        measured.append(spec_hash(spec))
        return {"latency_ms": 5.0 if int(spec_hash(spec), 16) % 2 else 50.0, "cached": False}

    def train(spec, data, cfg, on_epoch=None):
        trained.append((spec_hash(spec), cfg.epochs))
        score = int(spec_hash(spec)[:4], 16) % 97  # the longer run ranks like the proxy
        return {"top1": float(score + (cfg.epochs > 3)), "seconds": float(cfg.epochs)}

    monkeypatch.setattr(proxy.ProxyData, "load", load)
    monkeypatch.setattr(proxy, "train_proxy", train)
    monkeypatch.setattr(measure, "measure_latency", latency)
    monkeypatch.setattr(measure, "model_cost", lambda spec: {"params": 1e6, "gmacs": 0.01})
    # trials 0-4 on the front (latency 1..5 ms), 5-9 the study's other candidates (6..10 ms)
    candidates = [{"trial": t, "spec": [{"arch": t}], "latency_ms": 1.0 + t,
                   "pruned": t == 9} for t in range(10)]
    cfg = perf.BenchConfig(search_rank_archs=6)
    res = perf._rank_correlation(cfg, tmp_path, 10.0, candidates, front={0, 1, 2, 3, 4})

    assert loads == [(32, 3, 640), (32, 12, 1280)]
    assert res["train_images"] == {"proxy": 640, "long": 1280} and res["val_images"] == 360
    rows = res["rows"]
    # half from the front, half from the rest, each spread over its latency range, ends kept
    assert [r["name"] for r in rows] == ["trial-0", "trial-2", "trial-4", "trial-5", "trial-7",
                                         "trial-9"]
    assert [r["source"] for r in rows] == ["front"] * 3 + ["study", "study", "study (pruned)"]
    assert measured == [] and res["random_draws"] == 0  # enough in the study: nothing drawn
    assert [e for _, e in trained] == [3, 12] * 6  # each trained with the proxy, then longer
    assert res["rho"] == pytest.approx(1.0) and res["long"]["epochs"] == 12
    assert all(r["long_top1"] == r["proxy_top1"] + 1 for r in rows)

    # a study with too few candidates: seeded samples of the space measured within the budget
    trained.clear()
    res = perf._rank_correlation(cfg, tmp_path, 10.0, candidates[:1], front={0})
    rows = res["rows"]
    assert rows[0]["name"] == "trial-0" and len(rows) == 6
    assert {r["source"] for r in rows[1:]} == {"random"}
    assert all(r["latency_ms"] <= 10.0 for r in rows[1:]) and len(measured) >= 5
    assert res["rejected"]["over_budget"] >= 1 and res["study_candidates"] == 1
    assert res["random_draws"] >= 5 + sum(res["rejected"].values())
    # and at most search_rank_draws of them: too few architectures, no correlation claimed
    capped = perf.BenchConfig(search_rank_archs=6, search_rank_draws=0)
    res = perf._rank_correlation(capped, tmp_path, 10.0, candidates[:1], front={0})
    assert len(res["rows"]) == 1 and res["rho"] is None and "only 1 architecture" in res["why"]


def test_the_budget_measurement_is_the_searchs_own_gpunet_0_row(tmp_path):
    """Seeded into the study, GPUNet-0's budget measurement is what the search's reference
    row reads (the same key, a cache hit), not a second noisy measurement."""
    from gpunet_core.search import study as studies
    from gpunet_core.search.driver import reference_spec
    from gpunet_core.search.measure import hardware_key, latency_key
    from gpunet_core.search.space import load_space

    cfg = perf.BenchConfig()
    scfg = perf._search_config(cfg, tmp_path / "digits", tmp_path / "out", budget_ms=12.5,
                               trials=4, workers=1, references=True)
    key = latency_key(reference_spec("gpunet_0", 32, 10), backend="onnxruntime",
                      precision="fp32", batch=1, hardware=hardware_key("onnxruntime", 1))
    perf._seed_latency(scfg, {key: {"latency_ms": 12.5, "backend": "onnxruntime"}})
    study = studies.open_study(scfg, load_space())  # as the search opens it: same settings
    assert studies.StudyCache(study).get(key)["latency_ms"] == 12.5
    assert study.user_attrs["settings"]["budget_ms"] == 12.5
    assert study.user_attrs["settings"]["resolutions"] == [32]


def test_quick_mode_leaves_the_search_out_unless_asked():
    assert "search" in perf.SECTIONS and "search" not in perf.BenchConfig.quick().sections
    args = perf.build_parser().parse_args(["--quick", "--sections", "search"])
    cfg = perf.config_from_args(args)
    assert cfg.sections == ("search",) and cfg.search_trials == 4
    assert cfg.search_references is False and cfg.search_workers == (1,)
    args = perf.build_parser().parse_args(["--sections", "search", "--search-trials", "60"])
    full = perf.config_from_args(args)
    assert full.search_trials == 60 and full.search_references and full.search_workers == (1, 2)


@pytest.mark.slow
def test_search_section_at_smoke_sizes(tmp_path):
    """The search section end to end at quick's sizes (not part of --quick's sections): its
    parts and figures, never their speed. At most 4 random draws for the rank correlation:
    measuring each costs seconds, and a 4-trial study rarely has candidates to spare."""
    cfg = perf.BenchConfig.quick(sections=("search",), threads=2, search_rank_draws=4)
    res = perf.bench_search(cfg, tmp_path)
    assert res["dataset"]["img_size"] == 32 and res["dataset"]["classes"] == 10
    budget = res["budget"]["latency_ms"]
    assert budget > 0 and res["budget"]["iterations"] == cfg.search_iterations

    v = res["versus_published"]
    assert "error" not in v, v
    assert v["trials_counted"] == cfg.search_trials and v["references"] == []
    assert v["holds"] is None  # quick mode: no references, nothing to judge
    assert all(r["latency_ms"] <= budget for r in v["front"])
    if v["front"]:
        assert v["best_front"]["proxy_top1"] == max(r["proxy_top1"] for r in v["front"])

    th = res["throughput"]
    assert "error" not in th, th
    (row,) = th["rows"]
    assert row["workers"] == 1 and row["trials_counted"] == cfg.search_throughput_trials
    assert row["per_min"] == pytest.approx(60 * row["trials_counted"] / row["wall_s"])

    rk = res["rank"]
    assert "error" not in rk, rk
    assert rk["long"]["epochs"] == 2 * rk["proxy"]["epochs"]
    assert rk["long"]["train_images"] == cfg.search_rank_images  # asked for; the set has fewer
    assert rk["train_images"]["long"] == 160  # 20 digits per class, a fifth held out
    assert len(rk["rows"]) <= cfg.search_rank_archs
    assert rk["random_draws"] <= cfg.search_rank_draws
    for r in rk["rows"]:
        assert 0 <= r["proxy_top1"] <= 100 and 0 <= r["long_top1"] <= 100
        assert r["latency_ms"] <= budget
    # quick's proxy barely trains: every top-1 may be the same, and then nothing is claimed
    assert rk["rho"] is None or -1 <= rk["rho"] <= 1
    if rk["rho"] is None:
        assert rk["why"]

    text = perf.render_markdown({"sections": {"search": res}})
    assert "## Architecture search (ONNX Runtime, CPU)" in text
    assert "target (" in text and "not judged" in text
