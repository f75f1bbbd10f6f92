"""``make bench``: the project's performance, every figure a ratio measured in the same run.

Sections (each a function returning a JSON-able dict, run by :func:`run_all`):

- ``train``: images/s of ``gpunet train``'s loop (in-process, the real recipe, EMA on, its own
  loader) against a bare PyTorch loop over the same model and a synthetic batch (the ceiling);
  GPUNet-0 and timm's ``efficientnet_b0``; plus the bare loop's per-phase split and the
  hot-path variants (optimizer ``foreach``, a per-step host sync) side by side.
- ``data``: images/s of the pil and DALI (CPU here) training pipelines at 224 px on JPEGs of
  ImageNet-like size that the benchmark renders itself, per worker.
- ``inference``: latency at batch 1 and 32, native resolution: PyTorch eager, ``torch.compile``,
  ONNX Runtime; TensorRT FP16 where a GPU is present; NVIDIA's published table beside it.
- ``quantization``: ONNX Runtime batch-1 latency of FP32, INT8 (``gpunet quantize --target cpu``),
  FP16 and the TensorRT-target INT8 Q/DQ graph, timed side by side (interleaved), per model at
  native resolution; the CPU INT8 format variants; top-1 of each graph of a GPUNet-0 trained
  in the bench on digits at 64 px, and the FP16 logit drift.
- ``pipeline``: the ``make run`` DAG's wall time split into the steps' work and everything else:
  ``pipelines run-local`` times each task's process from the runner's side, each step logs its
  own work (:mod:`pipelines.timing`).
- ``scaling``: ``gpunet train`` under ``torchrun`` with 1 and 2 processes, efficiency ratio.
- ``search``: ``gpunet search`` on digits at 32 px with the ONNX Runtime CPU backend, the latency
  budget being GPUNet-0's measured latency: the front against NVIDIA's seven GPUNets measured
  and proxy-trained the same way (target: a front member beats the best of them within the
  budget, or matches it at <= 0.8x its latency); candidates per minute with 1 and 2 workers;
  and the accuracy proxy's rank correlation (Spearman) with a 4x longer training.

:func:`render_markdown` turns a results dict into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpunet_core.utils.errors import BenchmarkError
from pipelines.timing import TimingError, pipeline_overhead

_logger = logging.getLogger(__name__)

PERF_SCHEMA = "gpunet.perf/1"
SECTIONS = ("train", "data", "inference", "quantization", "pipeline", "scaling", "search")
INFERENCE_BACKENDS = ("eager", "eager_fold", "eager_fold_cl", "compile", "onnxruntime",
                      "tensorrt")
REPO = Path(__file__).resolve().parents[1]

# Targets from the issue (benchmarks, never timed tests).
TARGETS = {"train_vs_bare": 0.95, "data_wait_frac": 0.05, "ort_vs_eager_b1": 1.0,
           "pipeline_overhead_frac": 0.10,
           # CPU INT8 (--target cpu) batch-1 latency / FP32's, in ONNX Runtime, side by side
           "int8_cpu_vs_fp32_b1": 0.50,
           # top-1 points lost by the CPU INT8 graph of the digits model (at most)
           "int8_top1_drop_points": 0.5,
           # max |FP16 logit - FP32 logit| on the digits validation split (at most)
           "fp16_logits_max_abs_diff": 1e-2,
           # the search's front against the best published GPUNet within the same budget:
           # higher proxy top-1, or at most this many points lower ...
           "search_match_top1_points": 0.5,
           # ... at no more than this fraction of its latency
           "search_match_latency_frac": 0.8}


@dataclass
class BenchConfig:
    """What to measure and how hard; :meth:`quick` is the seconds-long smoke variant."""

    sections: tuple[str, ...] = SECTIONS
    models: tuple[str, ...] = ()  # inference models; empty = all shipped
    train_models: tuple[str, ...] = ("gpunet_0", "efficientnet_b0")
    # the resolution users train at (ImageNet's 224; GPUNet-0's own is 320), from ImageNet-sized
    # JPEGs: how the loader's per-image work weighs against the model's in a real run
    train_img_size: int = 224
    train_batch: int = 8
    train_steps: int = 8  # timed steps (bare loop) and steps per epoch (gpunet train)
    # the same comparison at small inputs (img_size, batch, steps), where the per-image
    # augmentation work weighs most against the model's (None: skip)
    train_small: tuple[int, int, int] | None = (64, 16, 16)
    train_small_models: tuple[str, ...] = ("gpunet_0",)
    train_workers: int = 1
    train_repeats: int = 2
    train_rounds: int = 5  # gpunet train runs, alternating with bare-loop runs (VM noise: ~10 %)
    data_img_size: int = 224
    data_images: int = 160
    data_batch: int = 32
    data_workers: tuple[int, ...] = (1, 2)
    data_backends: tuple[str, ...] = ("pil", "dali")
    batches: tuple[int, ...] = (1, 32)
    inference_backends: tuple[str, ...] = INFERENCE_BACKENDS
    time_budget_s: float = 2.0  # timed seconds per latency cell (iterations are adaptive)
    max_iterations: int = 30
    min_iterations: int = 2
    max_call_s: float = 6.0  # skip a cell whose single call is predicted slower than this
    compile_batches: tuple[int, ...] = (1,)
    compile_models: tuple[str, ...] = ("gpunet_0",)  # empty = every inference model
    scaling_procs: tuple[int, ...] = (1, 2)
    scaling_img_size: int = 32
    threads: int | None = None
    work_dir: str | None = None
    pipeline_timings: list[dict[str, Any]] | None = None
    pipeline_runs: int = 3  # DAG runs; the median run's split is shown
    quant_models: tuple[str, ...] = ("gpunet_0", "gpunet_1", "gpunet_p0")
    quant_img_size: int | None = None  # None: each model's native resolution
    quant_calib_samples: int = 64  # rendered photos calibrating the (random-weight) latency models
    quant_time_budget_s: float = 20.0  # timed seconds per model, all its graphs together
    quant_block: int = 5  # consecutive timed calls of one graph before the next graph's turn
    quant_min_rounds: int = 3
    quant_max_rounds: int = 40
    quant_variants: tuple[str, ...] = ()  # CPU INT8 variants (keys of CPU_INT8_VARIANTS); () = all
    quant_variant_model: str | None = "gpunet_0"  # None: no variant table
    # the digits model whose graphs are validated: (img_size, epochs); None: no accuracy rows
    quant_accuracy: tuple[int, int] | None = (64, 4)
    quant_digits_per_class: int | None = None  # None: all 1,797 digits
    # search: digits at this size, ONNX Runtime CPU, budget = GPUNet-0's measured latency
    search_img_size: int = 32
    search_digits_per_class: int | None = None  # None: all 1,797 digits
    search_trials: int = 40  # the study compared with the published GPUNets
    search_references: bool = True  # measure and proxy-train NVIDIA's seven beside it
    search_workers: tuple[int, ...] = (1, 2)  # throughput: one fresh study per worker count
    search_throughput_trials: int = 8  # trials of each throughput study
    search_iterations: int = 50  # timed runs per latency measurement (gpunet search's default)
    search_proxy_epochs: int = 3  # the accuracy proxy (gpunet search's defaults)
    search_proxy_images: int = 640
    search_rank_archs: int = 6  # architectures trained both ways for the rank correlation (0: none)
    search_rank_epochs_factor: int = 4  # the longer training: this many times the proxy's epochs,
    search_rank_images: int = 1280  # on this many training images (0: all)
    search_rank_draws: int = 48  # random samples drawn at most when the study has too few
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        # sections: torchrun, training a model to quantize, and a search take too long for a
        # smoke run (asked for by name, they run at the tiny sizes below)
        base = dict(sections=tuple(x for x in SECTIONS
                                   if x not in ("scaling", "quantization", "search")),
                    models=("gpunet_0",),
                    train_models=("gpunet_0",), train_img_size=32, train_small=None,
                    train_batch=4, train_steps=3, train_repeats=1, train_rounds=1, data_img_size=64, data_images=24,
                    data_batch=4, data_workers=(1,), data_backends=("pil",), batches=(1,),
                    inference_backends=("eager", "onnxruntime"), time_budget_s=0.2,
                    max_iterations=3, min_iterations=1, compile_batches=(), scaling_procs=(),
                    max_call_s=30.0, quant_models=("gpunet_0",), quant_img_size=64,
                    quant_calib_samples=8, quant_time_budget_s=0.3, quant_block=2,
                    quant_min_rounds=1, quant_max_rounds=3,
                    quant_variants=("default", "qdq_s8"), quant_accuracy=(32, 1),
                    quant_digits_per_class=10, search_digits_per_class=20, search_trials=4,
                    search_references=False, search_workers=(1,), search_throughput_trials=2,
                    search_iterations=10, search_proxy_epochs=1, search_proxy_images=64,
                    search_rank_archs=3, search_rank_epochs_factor=2, search_rank_draws=8)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adaptive_latency(call: Callable[[], Any], cfg: BenchConfig,
                     sync: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """Warm up once, then time ``call`` for about ``cfg.time_budget_s`` (clamped iterations)."""
    from gpunet_core.inference.latency import latency_stats

    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    probe = time.perf_counter()
    call()
    sync()
    second = time.perf_counter() - probe
    iterations = int(min(cfg.max_iterations,
                         max(cfg.min_iterations - 1, cfg.time_budget_s / max(second, 1e-6))))
    times = [second * 1000.0]
    for _ in range(iterations):
        t = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t) * 1000.0)
    stats = latency_stats(times)
    stats["first_call_ms"] = first * 1000.0
    return stats


# --------------------------------------------------------------------------- synthetic data


def render_photo(rng: random.Random, size: tuple[int, int] = (500, 375)):
    """A random-ish 'photo' (gradient, shapes, noise) that JPEG-compresses like a real one."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    nrng = np.random.default_rng(rng.getrandbits(32))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w * rng.uniform(50, 200) + rng.uniform(0, 55)),
                     (yy / h * rng.uniform(50, 200) + rng.uniform(0, 55)),
                     ((xx + yy) / (w + h) * rng.uniform(50, 200) + rng.uniform(0, 55))], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(8, 20)):
        x0, y0 = rng.uniform(-w / 4, w), rng.uniform(-h / 4, h)
        box = [x0, y0, x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2)]
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noise = nrng.normal(0, 12, (h, w, 3))
    arr = (np.asarray(img, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_jpeg_dataset(root: str | Path, *, images: int, classes: int = 2,
                      size: tuple[int, int] = (500, 375), val_images: int = 0,
                      seed: int = 0, quality: int = 90) -> Path:
    """``root/train/<class>/*.jpg`` (and ``root/val``) of rendered photos; reused when present."""
    root = Path(root)
    stamp = root / ".complete.json"
    want = {"images": images, "classes": classes, "size": list(size), "val": val_images,
            "seed": seed, "quality": quality}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return root
    rng = random.Random(seed)
    for split, count in (("train", images), ("val", val_images)):
        for i in range(count):
            out = root / split / f"c{i % classes}" / f"{i:05d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            render_photo(rng, size).save(out, quality=quality)
    stamp.write_text(json.dumps(want))
    return root


def dataset_stats(root: Path) -> dict[str, Any]:
    files = sorted(root.rglob("*.jpg"))
    sizes = [f.stat().st_size for f in files]
    return {"files": len(files), "mean_kib": round(sum(sizes) / max(len(sizes), 1) / 1024, 1)}


# --------------------------------------------------------------------------- train section


def bare_train_loop(name: str, *, img_size: int, batch: int, steps: int, warmup: int = 2,
                    num_classes: int = 10, foreach: bool | None = None, ema: bool = True,
                    host_sync: bool = False, device: str | None = None) -> dict[str, Any]:
    """The ceiling: the same model, optimizer (rmsproptf), loss and EMA as ``gpunet train``, one
    synthetic batch reused, nothing else. Returns img/s and the per-phase split (ms/step).

    ``host_sync`` adds a ``loss.item()`` per step (what per-step logging costs).
    """
    import timm.optim
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.utils import ModelEmaV3

    from gpunet_core.models.factory import create_any_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = create_any_model(name, num_classes=num_classes).to(dev).train()
    defaults = _train_defaults()
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=defaults.opt, lr=defaults.lr, weight_decay=defaults.weight_decay,
        momentum=defaults.momentum, eps=defaults.opt_eps, foreach=foreach)
    model_ema = ModelEmaV3(model, decay=defaults.model_ema_decay) if ema else None
    criterion = LabelSmoothingCrossEntropy(defaults.smoothing)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    phases = {"fwd_bwd": 0.0, "optimizer": 0.0, "ema": 0.0}

    def step(i: int, timed: bool) -> None:
        t0 = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if timed:
            _sync(dev)
            t1 = time.perf_counter()
        optimizer.step()
        if timed:
            _sync(dev)
            t2 = time.perf_counter()
        if model_ema is not None:
            model_ema.update(model, step=i)
        if host_sync:
            loss.item()
        if timed:
            _sync(dev)
            t3 = time.perf_counter()
            phases["fwd_bwd"] += t1 - t0
            phases["optimizer"] += t2 - t1
            phases["ema"] += t3 - t2

    for i in range(warmup):
        step(i, False)
    _sync(dev)
    t_start = time.perf_counter()
    for i in range(steps):
        step(warmup + i, True)
    _sync(dev)
    seconds = time.perf_counter() - t_start
    return {"model": name, "img_size": img_size, "batch": batch, "steps": steps,
            "seconds": seconds, "img_per_sec": batch * steps / seconds,
            "ms_per_step": {k: 1000 * v / steps for k, v in phases.items()},
            "optimizer": defaults.opt, "foreach": foreach, "ema": ema, "host_sync": host_sync,
            "params": sum(p.numel() for p in model.parameters()), "device": str(dev)}


def _train_defaults():
    from gpunet_core.training.config import TrainConfig

    return TrainConfig(data=".")


def train_argv(data: Path, output: Path, *, model: str, img_size: int, batch: int,
               epochs: int, workers: int, extra: Sequence[str] = ()) -> list[str]:
    """``gpunet train`` flags for a throughput run: the recipe's defaults, EMA on."""
    return [str(data), "--model", model, "--img-size", str(img_size), "-b", str(batch),
            "--epochs", str(epochs), "-j", str(workers), "--model-ema", "--warmup-epochs", "0",
            "--output", str(output), "--log-interval", "1000000", *extra]


def gpunet_train_loop(name: str, data: Path, output: Path, *, img_size: int, batch: int,
                      workers: int, epochs: int = 3) -> dict[str, Any]:
    """``gpunet train`` in this process; img/s and data-wait fraction averaged over the warm
    epochs (all but the first, which pays for worker start-up and allocator warm-up)."""
    from gpunet_core.training import loop as train
    from gpunet_core.training.config import parse

    argv = train_argv(data, output, model=name, img_size=img_size, batch=batch, epochs=epochs,
                      workers=workers)
    args = parse(argv)
    t0 = time.perf_counter()
    result = train.train(args)
    wall = time.perf_counter() - t0
    warm = _summary_rows(output / "summary.csv")[1:] or [result["last"]]
    per_epoch = [float(r["img_per_sec"]) for r in warm]
    return {"model": name, "img_size": img_size, "batch": batch, "workers": workers,
            "epochs": epochs, "steps": result["steps"],
            "img_per_sec": sum(per_epoch) / len(per_epoch), "img_per_sec_epochs": per_epoch,
            "data_wait_frac": sum(float(r["data_wait_frac"]) for r in warm) / len(warm),
            "wall_s": wall, "command": "gpunet train " + " ".join(argv[1:])}


def _summary_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))


TRAIN_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("foreach=False (timm's CPU default)", {"foreach": False}),
    ("foreach=True", {"foreach": True}),
    ("foreach=False + loss.item() per step", {"foreach": False, "host_sync": True}),
)


def _train_row(name: str, cfg: BenchConfig, data: Path, work: Path, *, img_size: int,
               batch: int, steps: int) -> dict[str, Any]:
    """``gpunet train`` vs the bare loop for one model and size, over alternating rounds.

    bare, train, bare, train, ..., bare: each round's ratio is taken against the mean of the
    bare runs on either side, so drifting machine load hits both sides alike; the median round
    is reported (single runs on a shared VM vary by about 10 %).
    """
    common = dict(img_size=img_size, batch=batch, steps=steps)
    _logger.info("train: %s at %d px, bare loop", name, img_size)
    bare = [bare_train_loop(name, **common)]
    rounds: list[tuple[float, dict[str, Any]]] = []
    for r in range(cfg.train_rounds):
        _logger.info("train: %s at %d px under gpunet train (round %d/%d)", name, img_size,
                     r + 1, cfg.train_rounds)
        around = [bare[-1]]  # the bare run before this round, and the one after if any
        ours = gpunet_train_loop(name, data, work / f"run-{name}-{img_size}-{r}",
                                 img_size=img_size, batch=batch, workers=cfg.train_workers)
        if cfg.train_repeats > 1 or r + 1 < cfg.train_rounds:
            _logger.info("train: %s at %d px, bare loop again", name, img_size)
            bare.append(bare_train_loop(name, **common))
            around.append(bare[-1])
        ceiling = sum(b["img_per_sec"] for b in around) / len(around)
        rounds.append((ours["img_per_sec"] / ceiling, ours))
    ratio, ours = sorted(rounds, key=lambda x: x[0])[len(rounds) // 2]
    mean_bare = sum(b["img_per_sec"] for b in bare) / len(bare)
    return {"model": name, "img_size": img_size, "batch": batch, "steps_per_epoch": steps,
            "bare": {**bare[0], "img_per_sec": mean_bare,
                     "img_per_sec_runs": [b["img_per_sec"] for b in bare]},
            "gpunet_train": ours, "ratio": ratio, "ratio_rounds": [x[0] for x in rounds]}


def _train_source_size(img_size: int) -> tuple[int, int]:
    """Rendered JPEGs to train on: ImageNet-sized (500x375) for ImageNet-sized training, else
    just above the training size (decoding a big JPEG for a tiny crop would be unrealistic)."""
    return (500, 375) if img_size >= 224 else (img_size * 5 // 4, img_size)


def bench_train(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """gpunet train vs the bare loop, per model (and at small inputs), plus hot-path variants
    of the bare loop on the first model."""
    settings = [(cfg.train_img_size, cfg.train_batch, cfg.train_steps, cfg.train_models)]
    if cfg.train_small and cfg.train_small_models:
        settings.append((*cfg.train_small, cfg.train_small_models))
    rows: list[dict[str, Any]] = []
    datasets: dict[str, dict[str, Any]] = {}
    for size, batch, steps, models in settings:
        source = _train_source_size(size)
        data = make_jpeg_dataset(work / f"train-{size}", images=batch * steps, classes=10,
                                 val_images=10, seed=1, size=source)
        datasets[str(size)] = {"path": str(data), **dataset_stats(data), "image_size": source}
        rows += [_train_row(name, cfg, data, work, img_size=size, batch=batch, steps=steps)
                 for name in models]
    common = dict(img_size=cfg.train_img_size, batch=cfg.train_batch, steps=cfg.train_steps)
    variants: list[dict[str, Any]] = []
    if cfg.train_models:
        name = cfg.train_models[0]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in TRAIN_VARIANTS}
        for _ in range(cfg.train_repeats):  # interleaved rounds, median per variant
            for label, kwargs in TRAIN_VARIANTS:
                _logger.info("train: %s bare loop, %s", name, label)
                runs[label].append(bare_train_loop(name, **common, **kwargs))
        for label, results in runs.items():
            results.sort(key=lambda r: r["img_per_sec"])
            med = results[len(results) // 2]
            variants.append({"variant": label, **med,
                             "img_per_sec_runs": [r["img_per_sec"] for r in results]})
    return {"img_size": cfg.train_img_size, "batch": cfg.train_batch,
            "steps_per_epoch": cfg.train_steps, "workers": cfg.train_workers,
            "rounds": cfg.train_rounds, "datasets": datasets, "models": rows,
            "variants": variants}


# --------------------------------------------------------------------------- data section


def bench_data(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """Training pipeline img/s per backend and worker count on rendered 500x375 JPEGs."""
    from gpunet_core.data import loaders

    data = make_jpeg_dataset(work / "photos", images=cfg.data_images, classes=2, seed=2)
    rows = []
    max_batches = max(1, cfg.data_images // cfg.data_batch - 1)
    for backend in cfg.data_backends:
        if backend == "dali" and not loaders.dali_available():
            rows.append({"backend": backend, "skipped": "NVIDIA DALI is not installed"})
            continue
        for workers in cfg.data_workers:
            _logger.info("data: %s, %d workers", backend, workers)
            loader = loaders.build_train_loader(
                data / "train", loaders.AugmentConfig(img_size=cfg.data_img_size),
                batch_size=cfg.data_batch, workers=workers, backend=backend, dali_device="auto")
            try:
                result = loaders.measure_throughput(loader, max_batches=max_batches, warmup=1)
            finally:
                del loader
            rows.append({"backend": backend, "workers": workers,
                         "device": "gpu" if backend == "dali" and torch.cuda.is_available()
                         else "cpu", **result,
                         "images_per_s_per_worker": result["images_per_s"] / max(workers, 1)})
    return {"img_size": cfg.data_img_size, "batch": cfg.data_batch, "pipeline": "train "
            "(RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5, random erasing 0.2)",
            "dataset": {"path": str(data), "image_size": [500, 375], **dataset_stats(data)},
            "rows": rows}


# --------------------------------------------------------------------------- inference section


def _export(model: torch.nn.Module, name: str, img_size: int, path: Path) -> Path:
    from gpunet_core.inference.export import export_onnx

    if not path.exists():
        export_onnx(model, path, model_name=name, img_size=img_size, dynamic_batch=True)
    return path


def _cell(cfg: BenchConfig, predicted_s: float | None, call: Callable[[], Any],
          sync: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    if predicted_s is not None and predicted_s > cfg.max_call_s:
        return {"skipped": f"one call predicted to take {predicted_s:.1f} s here "
                           f"(> --max-call-s {cfg.max_call_s:g})"}
    try:
        return adaptive_latency(call, cfg, sync)
    except Exception as exc:  # a backend failing must not lose the other figures
        _logger.warning("latency cell failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def bench_inference_model(name: str, cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """Latency cells of one model: ``{backend: {batch: stats}}`` plus published figures."""
    from gpunet_core.inference.export import fixed_input, onnxruntime_session
    from gpunet_core.inference.validate import fold_batchnorm
    from gpunet_core.models.factory import create_model
    from gpunet_core.models.spec import MODEL_INFO

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    model = create_model(name).eval()
    img_size = int(model.pretrained_cfg["input_size"][-1])
    cells: dict[str, dict[str, Any]] = {b: {} for b in cfg.inference_backends}
    per_image_s: dict[str, float] = {}  # measured batch-1 seconds, to predict batch 32

    def predicted(backend: str, batch: int) -> float | None:
        return per_image_s[backend] * batch if backend in per_image_s and batch > 1 else None

    def record(backend: str, batch: int, stats: dict[str, Any]) -> None:
        cells[backend][str(batch)] = stats
        if batch == 1 and "median" in stats:
            per_image_s[backend] = stats["median"] / 1000.0

    eager_model = model.to(device)
    for batch in cfg.batches:
        x = fixed_input(batch, img_size).to(device)
        if "eager" in cells:
            _logger.info("inference: %s eager b%d", name, batch)
            with torch.inference_mode():
                record("eager", batch, _cell(cfg, predicted("eager", batch),
                                             lambda x=x: eager_model(x), sync))
        for variant, channels_last in (("eager_fold", False), ("eager_fold_cl", True)):
            if variant not in cells:
                continue
            _logger.info("inference: %s %s b%d", name, variant, batch)
            folded = fold_batchnorm(eager_model)
            xv = x
            if channels_last:
                folded = folded.to(memory_format=torch.channels_last)
                xv = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                record(variant, batch, _cell(cfg, predicted(variant, batch),
                                             lambda xv=xv, f=folded: f(xv), sync))
        if "compile" in cells:
            if batch not in cfg.compile_batches:
                cells["compile"][str(batch)] = {"skipped": "batch not in --compile-batches"}
            elif cfg.compile_models and name not in cfg.compile_models:
                cells["compile"][str(batch)] = {"skipped": "model not in --compile-models"}
            else:
                _logger.info("inference: %s torch.compile b%d", name, batch)
                compiled = torch.compile(eager_model, dynamic=False)
                with torch.inference_mode():
                    record("compile", batch, _cell(cfg, predicted("eager", batch),
                                                   lambda x=x, c=compiled: c(x), sync))
    onnx_path = None
    if "onnxruntime" in cells or "tensorrt" in cells:
        _logger.info("inference: exporting %s to ONNX", name)
        try:
            onnx_path = _export(model.cpu(), name, img_size, work / "onnx" / f"{name}.onnx")
        except Exception as exc:
            for b in ("onnxruntime", "tensorrt"):
                if b in cells:
                    cells[b] = {str(n): {"error": f"export failed: {exc}"} for n in cfg.batches}
    if "onnxruntime" in cells and onnx_path is not None:
        session = onnxruntime_session(onnx_path, None, cfg.threads)
        input_name = session.get_inputs()[0].name
        for batch in cfg.batches:
            feed = {input_name: fixed_input(batch, img_size).numpy()}
            _logger.info("inference: %s onnxruntime b%d", name, batch)
            record("onnxruntime", batch, _cell(cfg, predicted("onnxruntime", batch),
                                               lambda feed=feed: session.run(None, feed)))
    if "tensorrt" in cells and onnx_path is not None:
        cells["tensorrt"] = _tensorrt_cells(onnx_path, cfg)
    info = MODEL_INFO[name]
    return {"model": name, "img_size": img_size, "device": str(device), "latency_ms": cells,
            "published_fp16_ms": {"a100": info["latency_ms_a100"], "v100": info["latency_ms_v100"]}}


def _tensorrt_cells(onnx_path: Path, cfg: BenchConfig) -> dict[str, Any]:
    from gpunet_core.inference.latency import run_benchmark
    from gpunet_core.inference.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return {str(b): {"skipped": reason} for b in cfg.batches}
    out = {}
    for batch in cfg.batches:
        try:
            result = run_benchmark(onnx_path, backend="tensorrt", precision="fp16", batch=batch,
                                   iterations=max(cfg.max_iterations, 100))
            out[str(batch)] = {**result["latency_ms"], "latency_kind": result["latency_kind"]}
        except Exception as exc:
            out[str(batch)] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def bench_inference(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    from gpunet_core.models.factory import list_models

    models = cfg.models or tuple(list_models())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = [bench_inference_model(name, cfg, work) for name in models]
    return {"batches": list(cfg.batches), "backends": list(cfg.inference_backends),
            "weights": "random (latency does not depend on weight values)",
            "torch_threads": torch.get_num_threads(), "rows": rows}


# --------------------------------------------------------------------------- quantization section


# the graphs `gpunet quantize` writes, beside the FP32 export: (key, --precision, --target)
QUANT_GRAPHS: tuple[tuple[str, str, str], ...] = (
    ("int8_cpu", "int8", "cpu"), ("fp16", "fp16", "tensorrt"),
    ("int8_tensorrt", "int8", "tensorrt"))

# ONNX Runtime static INT8 settings compared for --target cpu (CpuInt8 fields; {} = its default)
CPU_INT8_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("default", "QOperator, u8 activations, per-channel s8 weights (the default)", {}),
    ("qoperator_s8", "QOperator, s8 activations", {"activations": "s8"}),
    ("qdq_u8", "QDQ, u8 activations", {"quant_format": "qdq"}),
    ("qdq_s8", "QDQ, s8 activations", {"quant_format": "qdq", "activations": "s8"}),
    ("per_tensor", "per-tensor weights (per_channel=False)", {"per_channel": False}),
    ("reduce_range", "7-bit weights (reduce_range=True)", {"reduce_range": True}),
    ("fp32_first_conv", "first conv left in FP32", {"exclude_first_conv": True}),
    ("fp32_classifier", "classifier left in FP32", {"exclude_classifier": True}),
)


def interleaved_latency(calls: dict[str, Callable[[], Any]], cfg: BenchConfig
                        ) -> dict[str, dict[str, Any]]:
    """Latency of several graphs measured side by side: in each round every graph gets
    ``cfg.quant_block`` timed calls in a row (plus one untimed, which pays for the caches the
    previous graph evicted), in an order that rotates from round to round. Noise on a shared VM
    lasts seconds, so it lands on every graph alike instead of on whichever ran during it.

    Returns ``{name: latency stats + round_medians}``. Rounds run until
    ``cfg.quant_time_budget_s`` is spent (at least ``quant_min_rounds``, at most
    ``quant_max_rounds``): a clock, not a probe call, so a burst of load at the start cannot
    leave a model with only a few rounds.
    """
    from gpunet_core.inference.latency import latency_stats

    names = list(calls)
    for name in names:  # two warm-up calls each
        calls[name]()
        calls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    while r < cfg.quant_min_rounds or (r < cfg.quant_max_rounds and time.perf_counter() - start
                                        < cfg.quant_time_budget_s):
        for name in names[r % len(names):] + names[:r % len(names)]:
            calls[name]()
            block = []
            for _ in range(cfg.quant_block):
                t = time.perf_counter()
                calls[name]()
                block.append((time.perf_counter() - t) * 1000.0)
            times[name] += block
            medians[name].append(statistics.median(block))
        r += 1
    return {n: {**latency_stats(times[n]), "round_medians": medians[n], "rounds": r}
            for n in names}


def _quant_source(name: str, cfg: BenchConfig, work: Path) -> tuple[Path, int, int]:
    """The FP32 export (dynamic batch) of a random-weight ``name`` at the bench's size:
    (path, img_size, native img_size); the inference section's file when it made one."""
    from gpunet_core.models.factory import create_model

    model = create_model(name).eval()
    native = int(model.pretrained_cfg["input_size"][-1])
    img_size = cfg.quant_img_size or native
    stem = name if img_size == native else f"{name}-{img_size}"
    return _export(model, name, img_size, work / "onnx" / f"{stem}.onnx"), img_size, native


def _quantized(src: Path, out_dir: Path, calib: Path, samples: int
               ) -> tuple[dict[str, Path], dict[str, Any]]:
    """``gpunet quantize`` of ``src`` for each of :data:`QUANT_GRAPHS`: the graphs written
    (the FP32 export as ``fp32``) and, per graph, its sidecar's parity or the error."""
    from gpunet_core.inference.quantize import quantize_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    graphs, facts = {"fp32": src}, {}
    for key, precision, target in QUANT_GRAPHS:
        out = out_dir / f"{src.stem}-{key}.onnx"
        _logger.info("quantization: %s %s --target %s", src.stem, precision, target)
        try:
            sidecar = quantize_onnx(src, out, calib_data=calib, precision=precision,
                                    target=target, calib_samples=samples)
        except Exception as exc:  # one tool failing must not lose the other graphs
            _logger.warning("quantization of %s (%s) failed: %s", src.name, key, exc)
            facts[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        graphs[key] = out
        facts[key] = {"parity_vs_fp32": sidecar["parity_vs_fp32"], "method": sidecar["method"],
                      "calibration_images": sidecar["calibration"]["images"]}
    return graphs, facts


def _timed_graphs(graphs: dict[str, Path], img_size: int, cfg: BenchConfig, threads: int
                  ) -> dict[str, Any]:
    """Batch-1 ONNX Runtime latency of every graph, interleaved, same thread count, and each
    graph's ratio to the ``fp32`` one: round by round (the two medians of adjacent blocks),
    their median (``vs_fp32_paired``, the figure the target is judged on: paired, so load
    lasting seconds cancels), and the ratio of the two medians over all rounds (``vs_fp32``)."""
    from gpunet_core.inference.export import INPUT_NAME, fixed_input, onnxruntime_session

    feed = {INPUT_NAME: fixed_input(1, img_size).numpy()}
    sessions = {k: onnxruntime_session(p, None, threads) for k, p in graphs.items()}
    calls = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    latency = interleaved_latency(calls, cfg)
    fp32 = latency["fp32"]
    rounds = {k: _round_ratios(v, fp32) for k, v in latency.items() if k != "fp32"}
    return {"latency_ms": latency,
            "vs_fp32": {k: v["median"] / fp32["median"] for k, v in latency.items()
                        if k != "fp32"},
            "vs_fp32_rounds": rounds,
            "vs_fp32_paired": {k: statistics.median(v) for k, v in rounds.items()}}


def _round_ratios(stats: dict[str, Any], fp32: dict[str, Any]) -> list[float]:
    """A graph's round medians over FP32's, round by round."""
    return [a / b for a, b in zip(stats["round_medians"], fp32["round_medians"], strict=True)]


def _quant_latency_row(name: str, cfg: BenchConfig, work: Path, calib: Path,
                       threads: int) -> dict[str, Any]:
    """One model: its FP32 export and the three ``gpunet quantize`` graphs, timed together."""
    src, img_size, native = _quant_source(name, cfg, work)
    graphs, facts = _quantized(src, work / "quant", calib, cfg.quant_calib_samples)
    _logger.info("quantization: %s at %d px, %s side by side", name, img_size, ", ".join(graphs))
    return {"model": name, "img_size": img_size, "native_img_size": native, "batch": 1,
            **_timed_graphs(graphs, img_size, cfg, threads), "graphs": facts}


def _stamp(path: Path, info: Any, **extra: Any) -> None:
    """The export's ``gpunet`` metadata on a graph quantized outside ``quantize_onnx`` (so
    ``validate_onnx`` reads its preprocessing)."""
    import onnx

    from gpunet_core.inference.export import set_metadata

    proto = onnx.load(str(path))
    set_metadata(proto, {**info.metadata, **extra})
    onnx.save(proto, str(path))


def _digits_model(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """A GPUNet-0 trained by ``gpunet train`` (in-process) on digits at ``quant_accuracy``'s
    size and epochs: AdamW, no warm-up, cosine decay, light augmentation (97.5 % after four
    epochs at 64 px, about 70 s on two idle cores; two epochs with the step schedule left it at
    70-86 %), no EMA (a 0.9998 EMA barely moves in 356 steps). The last epoch's weights, not
    the best on the validation split the graphs are then measured on; exported to ONNX with a
    dynamic batch."""
    from gpunet_core.data.prepare import prepare_digits
    from gpunet_core.inference.export import export_onnx
    from gpunet_core.inference.validate import load_inference_model
    from gpunet_core.training import loop as train
    from gpunet_core.training.config import parse

    img_size, epochs = cfg.quant_accuracy or (64, 4)
    data = work / f"quant-digits-{img_size}-{cfg.quant_digits_per_class or 'all'}"
    prepare_digits(data, img_size=img_size, per_class=cfg.quant_digits_per_class)
    out = work / f"quant-train-{img_size}-{epochs}"
    argv = [str(data), "--model", "gpunet_0", "--img-size", str(img_size), "-b", "16",
            "--epochs", str(epochs), "-j", "1", "--opt", "adamw", "--lr", "0.002",
            "--warmup-epochs", "0", "--sched", "cosine", "--aa", "", "--reprob", "0",
            "--scale", "0.5", "1.0", "--output", str(out), "--log-interval", "1000000"]
    _logger.info("quantization: training gpunet_0 on digits at %d px, %d epochs", img_size,
                 epochs)
    t0 = time.perf_counter()
    result = train.train(parse(argv))
    wall = time.perf_counter() - t0
    ckpt = out / "last.pth.tar"
    model = load_inference_model("gpunet_0", ckpt)
    onnx_path = out / "gpunet_0-digits.onnx"
    export_onnx(model, onnx_path, model_name="gpunet_0", img_size=img_size, dynamic_batch=True,
                checkpoint=ckpt)
    return {"data": data, "onnx": onnx_path, "img_size": img_size, "epochs": epochs,
            "train": {"last_top1": result["last"]["top1"], "best_top1": result["best_top1"],
                      "steps": result["steps"], "wall_s": wall,
                      "command": "gpunet train " + " ".join(argv[1:])}}


def _quant_accuracy(digits: dict[str, Any], cfg: BenchConfig, work: Path,
                    threads: int) -> dict[str, Any]:
    """Top-1 on the digits validation split of the FP32 export and of each ``gpunet quantize``
    graph of it (calibrated on the train split, the command's default), in ONNX Runtime; the
    drop in points against FP32; each graph's logits against FP32's on every validation image."""
    from gpunet_core.inference.export import inspect_onnx
    from gpunet_core.inference.quantize import calibration_images, compare_logits
    from gpunet_core.inference.validate import validate_onnx

    data, src = digits["data"], digits["onnx"]
    graphs, facts = _quantized(src, work / "quant-digits", data, 256)
    info = inspect_onnx(src)
    val_images, _ = calibration_images(data / "val", info, samples=10**6)  # every val image
    rows: dict[str, Any] = {}
    for key, path in graphs.items():
        _logger.info("quantization: validating the digits %s graph", key)
        res = validate_onnx(path, data, batch_size=64, workers=0, threads=threads,
                            progress=False)
        rows[key] = {"top1": res["top1"], "images": res["images"], **facts.get(key, {})}
        if key != "fp32":
            rows[key].update(compare_logits(src, path, info, val_images))
    rows.update({k: v for k, v in facts.items() if k not in rows})  # failed graphs
    fp32 = rows["fp32"]["top1"]
    for row in rows.values():
        if "top1" in row:
            row["drop_points"] = fp32 - row["top1"]
    return {"model": "gpunet_0", "img_size": digits["img_size"], "epochs": digits["epochs"],
            "dataset": str(data), "train": digits["train"], "graphs": rows}


def _quant_variants(cfg: BenchConfig, work: Path, calib: Path, threads: int,
                    digits: dict[str, Any] | None) -> dict[str, Any]:
    """Each CPU INT8 variant of ``quant_variant_model`` timed side by side with its FP32
    export; with the digits model, also each variant's top-1 drop on digits."""
    from gpunet_core.inference.export import inspect_onnx
    from gpunet_core.inference.quantize import CpuInt8, calibration_images, quantize_int8_cpu
    from gpunet_core.inference.validate import validate_onnx

    name = cfg.quant_variant_model or "gpunet_0"
    keys = cfg.quant_variants or tuple(k for k, _, _ in CPU_INT8_VARIANTS)
    chosen = [v for v in CPU_INT8_VARIANTS if v[0] in keys]
    src, img_size, _ = _quant_source(name, cfg, work)
    info = inspect_onnx(src)
    images, _ = calibration_images(calib, info, samples=cfg.quant_calib_samples)
    out_dir = work / "quant-variants"
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs, rows = {"fp32": src}, []
    for key, label, options in chosen:
        _logger.info("quantization: %s CPU INT8 variant %s", name, key)
        out = out_dir / f"{src.stem}-{key}.onnx"
        row = {"variant": key, "label": label, "options": options}
        try:
            quantize_int8_cpu(src, out, info, images, CpuInt8(**options))
            graphs[key] = out
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    timed = _timed_graphs(graphs, img_size, cfg, threads)
    for row in rows:
        if row["variant"] in graphs:
            row["latency_ms"] = timed["latency_ms"][row["variant"]]
            row["vs_fp32"] = timed["vs_fp32"][row["variant"]]
            row["vs_fp32_paired"] = timed["vs_fp32_paired"][row["variant"]]
    result: dict[str, Any] = {"model": name, "img_size": img_size, "batch": 1,
                              "fp32_latency_ms": timed["latency_ms"]["fp32"], "rows": rows}
    if digits is not None:
        d_info = inspect_onnx(digits["onnx"])
        d_images, _ = calibration_images(digits["data"], d_info, samples=256)
        fp32 = validate_onnx(digits["onnx"], digits["data"], batch_size=64, workers=0,
                             threads=threads, progress=False)["top1"]
        result["digits_fp32_top1"] = fp32
        for row in rows:
            if "error" in row:
                continue
            out = out_dir / f"digits-{row['variant']}.onnx"
            try:
                quantize_int8_cpu(digits["onnx"], out, d_info, d_images,
                                  CpuInt8(**row["options"]))
                _stamp(out, d_info, precision="int8", target="cpu")
                top1 = validate_onnx(out, digits["data"], batch_size=64, workers=0,
                                     threads=threads, progress=False)["top1"]
                row["digits_top1"], row["digits_drop_points"] = top1, fp32 - top1
            except Exception as exc:
                row["digits_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return result


class _NoRootInfo(logging.Filter):
    """ONNX Runtime's quantizer logs a line per adjusted bias scale (hundreds per model) with
    ``logging.info`` on the root logger; this drops the root logger's own records below
    WARNING (records of named loggers that propagate to the root are not filtered here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def bench_quantization(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """FP32 vs ``gpunet quantize``'s graphs in ONNX Runtime on this CPU: latency per model
    (random weights, calibrated on rendered photos), the CPU INT8 variants, and the accuracy
    of a digits model's graphs. A failing part is recorded; the others still run."""
    quiet = _NoRootInfo()
    logging.getLogger().addFilter(quiet)
    try:
        return _bench_quantization(cfg, work)
    finally:
        logging.getLogger().removeFilter(quiet)


def _bench_quantization(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    threads = cfg.threads or torch.get_num_threads()
    calib = make_jpeg_dataset(work / "quant-calib", images=cfg.quant_calib_samples, classes=2,
                              seed=4) / "train"

    def guarded(what: str, fn: Callable[[], dict[str, Any]], **ident: Any) -> dict[str, Any]:
        try:
            return fn()
        except Exception as exc:
            _logger.exception("quantization: %s failed", what)
            return {**ident, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}

    rows = [guarded(name, lambda n=name: _quant_latency_row(n, cfg, work, calib, threads),
                    model=name) for name in cfg.quant_models]
    digits = None
    accuracy = None
    if cfg.quant_accuracy:
        holder: dict[str, Any] = {}

        def trained() -> dict[str, Any]:
            holder.update(_digits_model(cfg, work))
            return _quant_accuracy(holder, cfg, work, threads)

        accuracy = guarded("accuracy", trained)
        digits = holder or None
    variants = guarded("variants", lambda: _quant_variants(cfg, work, calib, threads, digits)) \
        if cfg.quant_variant_model else None
    return {"threads": threads, "batch": 1, "block": cfg.quant_block,
            "runtime": "onnxruntime CPUExecutionProvider",
            "calibration": {"latency_models": f"{cfg.quant_calib_samples} rendered 500x375 "
                            "photos (make_jpeg_dataset, seed 4) through each model's eval "
                            "transform", "digits": "up to 256 images of the digits train split, "
                            "seed 0 (gpunet quantize's defaults)"},
            "weights": "random (latency does not depend on weight values)",
            "rows": rows, "variants": variants, "accuracy": accuracy}


# --------------------------------------------------------------------------- pipeline section


# the `make run` DAG as users run it: its own defaults (all 1,797 digits, 2 epochs); a
# smaller DAG would only inflate the fixed overhead's share
PIPELINE_PARAMS: tuple[str, ...] = ()


def bench_pipeline(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """The `make run` DAG (kfp.local, no cache): wall time vs the steps' work.

    The figures are ``run-local``'s own (its ``overhead``): each task's process timed by the
    runner's side, each step's work from its log line. ``--pipeline-timings FILE.json`` instead
    splits a run measured elsewhere (e.g. a cluster's task durations). Quick mode skips the run
    (it takes minutes).
    """
    if cfg.pipeline_timings:
        try:
            return pipeline_overhead(cfg.pipeline_timings)
        except TimingError as exc:  # the user's file: fail the run, not just the section
            raise BenchmarkError(f"--pipeline-timings: {exc}") from None
    if cfg.extra.get("quick"):
        return {"status": "skipped in quick mode (the local DAG run takes minutes)"}
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # its own sqlite

    def run_dag(name: str, *extra: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "pipelines", "run-local", "--no-cache", "--json",
               "--workdir", str(work / name)]
        for param in (*PIPELINE_PARAMS, *extra):
            cmd += ["--param", param]
        return _run_json(cmd, "local pipeline run", env=env)

    runs, summaries = [], []
    for r in range(max(cfg.pipeline_runs, 1)):
        _logger.info("pipeline: make run's DAG under kfp.local (run %d/%d)", r + 1,
                     cfg.pipeline_runs)
        summary = run_dag(f"pipeline-{r}")
        if "error" in summary:
            return summary
        if not summary.get("overhead"):
            return {"error": "the local pipeline run timed no task (all from the cache?)"}
        runs.append(summary["overhead"])
        summaries.append(summary)
    runs.sort(key=lambda o: o["overhead_frac"])
    median = runs[len(runs) // 2]  # whole runs: the split shown is one run's
    _logger.info("pipeline: the same DAG without the teacher (the distillation gain)")
    alone = run_dag("pipeline-no-teacher", "enable_distill=false")
    top1 = sorted(s["top1"] for s in summaries)[len(summaries) // 2]
    distill = {"student_top1": top1, "teacher_top1": summaries[0].get("teacher_top1"),
               "without_teacher_top1": alone.get("top1"), "error": alone.get("error"),
               "without_teacher_wall_s": (alone.get("overhead") or {}).get("total_wall_s")}
    if alone.get("top1") is not None:
        distill["gain_points"] = top1 - alone["top1"]
    return {**median, "params": list(PIPELINE_PARAMS),
            "runs": [{k: o[k] for k in ("total_wall_s", "compute_s", "overhead_s",
                                         "overhead_frac")} for o in runs],
            "top1_runs": [s["top1"] for s in summaries], "distillation": distill,
            "noop_floor": kfp_task_floor(len(median["steps"]), work / "noop")}


_NOOP_PIPELINE = """
import json, sys, time
from kfp import dsl, local

@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def noop(x: int) -> int:
    return x + 1

@dsl.pipeline(name="noop-chain")
def chain(tasks: int = 1):
    task = noop(x=0)
    for _ in range(int(sys.argv[2]) - 1):
        task = noop(x=task.output)

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[1],
           enable_caching=False)
start = time.monotonic()
chain()
print(json.dumps({"seconds": time.monotonic() - start}))
"""


def kfp_task_floor(tasks: int, work: Path) -> dict[str, Any]:
    """Wall time of a chain of ``tasks`` empty KFP components under kfp.local: the runner's own
    cost per task (a Python process, the KFP executor, artifact bookkeeping), which no step
    can go below."""
    import sys

    work.mkdir(parents=True, exist_ok=True)
    script = work / "noop_chain.py"
    script.write_text(_NOOP_PIPELINE)
    out = _run_json([sys.executable, str(script), str(work / "kfp"), str(tasks)],
                    "empty-task pipeline")
    if "error" in out:
        return out
    return {"tasks": tasks, "total_s": out["seconds"], "per_task_s": out["seconds"] / tasks}


def _run_json(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; the JSON object on its last stdout line, or ``{"error": ...}`` naming
    ``what`` failed and its last output line."""
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"{what} failed: {tail[0]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- scaling section


def bench_scaling(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """``torchrun --nproc_per_node N gpunet train`` for each N; aggregate img/s of the warm epoch."""
    per_epoch = cfg.train_batch * cfg.train_steps * max(cfg.scaling_procs, default=1)
    data = make_jpeg_dataset(work / f"scaling-{cfg.scaling_img_size}", images=per_epoch,
                             classes=10, val_images=10, seed=3,
                             size=(cfg.scaling_img_size * 5 // 4, cfg.scaling_img_size))
    rows = []
    for nproc in cfg.scaling_procs:
        _logger.info("scaling: torchrun with %d process(es)", nproc)
        out = work / f"scaling-run-{nproc}"
        argv = train_argv(data, out, model=cfg.train_models[0] if cfg.train_models else
                          "gpunet_0", img_size=cfg.scaling_img_size, batch=cfg.train_batch,
                          epochs=2, workers=cfg.train_workers)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "gpunet_core", "train", *argv]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        summary = out / "summary.csv"
        if proc.returncode != 0 or not summary.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            rows.append({"procs": nproc, "error": f"exit {proc.returncode}: {tail}"})
            continue
        last = _summary_rows(summary)[-1]
        rows.append({"procs": nproc, "img_per_sec": float(last["img_per_sec"]),
                     "data_wait_frac": float(last["data_wait_frac"]), "wall_s": wall,
                     "threads_per_proc": "torchrun default (OMP_NUM_THREADS=1 when N > 1)"})
    ok = {r["procs"]: r["img_per_sec"] for r in rows if "img_per_sec" in r}
    result: dict[str, Any] = {"model": cfg.train_models[0] if cfg.train_models else "gpunet_0",
                              "img_size": cfg.scaling_img_size, "batch_per_proc": cfg.train_batch,
                              "rows": rows}
    if 1 in ok:
        result["efficiency"] = {str(n): ok[n] / (n * ok[1]) for n in ok if n != 1}
    return result


# --------------------------------------------------------------------------- search section


def _search_data(cfg: BenchConfig, work: Path) -> Path:
    """The digits dataset at the search's size, prepared in the bench's work dir."""
    from gpunet_core.data.prepare import prepare_digits

    data = work / f"search-digits-{cfg.search_img_size}-{cfg.search_digits_per_class or 'all'}"
    prepare_digits(data, img_size=cfg.search_img_size, per_class=cfg.search_digits_per_class)
    return data


def _proxy_config(cfg: BenchConfig):
    from gpunet_core.search.proxy import ProxyConfig

    return ProxyConfig(epochs=cfg.search_proxy_epochs, train_images=cfg.search_proxy_images)


def _search_config(cfg: BenchConfig, data: Path, out: Path, *, budget_ms: float, trials: int,
                   workers: int, references: bool):
    """What ``gpunet search DATA --out OUT --img-size N --budget-ms ... --trials ...
    --workers ...`` would run (its defaults otherwise)."""
    from gpunet_core.search.study import SearchConfig

    return SearchConfig(data=str(data), out=str(out), budget_ms=budget_ms,
                        backend="onnxruntime", trials=trials, workers=workers,
                        resolutions=(cfg.search_img_size,), iterations=cfg.search_iterations,
                        threads=cfg.threads, references=references, proxy=_proxy_config(cfg))


def _budget_latency(cfg: BenchConfig, num_classes: int) -> dict[str, Any]:
    """GPUNet-0's latency at the search's size, measured exactly as a candidate is
    (``measure_latency``, the search's backend, iterations and threads); ``cache``: the
    measurement under its key, for :func:`_seed_latency`."""
    from gpunet_core.search.driver import reference_spec
    from gpunet_core.search.measure import MemoryCache, measure_latency

    cache = MemoryCache()
    spec = reference_spec("gpunet_0", cfg.search_img_size, num_classes)
    result = measure_latency(spec, backend="onnxruntime", iterations=cfg.search_iterations,
                             threads=cfg.threads, cache=cache, name="gpunet_0")
    return {"model": "gpunet_0", "img_size": cfg.search_img_size, "backend": "onnxruntime",
            "latency_ms": result["latency_ms"], "p90_ms": result.get("p90_ms"),
            "iterations": cfg.search_iterations, "cache": cache.entries}


def _seed_latency(search_cfg, entries: dict[str, dict[str, Any]]) -> None:
    """Put measured latencies into ``search_cfg``'s (new) study, where the search looks them
    up: the search's GPUNet-0 reference row is then the budget's own measurement (a cache
    hit), so GPUNet-0 sits exactly at the budget instead of one noisy re-measurement either
    side of it."""
    from gpunet_core.search import study as studies
    from gpunet_core.search.space import load_space

    cache = studies.StudyCache(studies.open_study(search_cfg, load_space(search_cfg.space)))
    for key, value in entries.items():
        cache.put(key, value)


def _timed_search(search_cfg) -> dict[str, Any]:
    """``driver.search`` (``gpunet search``) timed end to end, plus the span from its first
    trial's start to its last trial's end (read back from the study)."""
    import optuna

    from gpunet_core.search.driver import search
    from gpunet_core.search.study import quiet_optuna

    t0 = time.perf_counter()
    result = search(search_cfg, progress=False)
    wall = time.perf_counter() - t0
    quiet_optuna()
    study = optuna.load_study(study_name=search_cfg.study_name, storage=search_cfg.storage_url)
    ended = [t for t in study.get_trials(deepcopy=False)
             if t.datetime_start is not None and t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)
            ).total_seconds() if ended else None
    return {"result": result, "wall_s": wall, "trials_span_s": span, "trials_ended": len(ended),
            "in_budget": _in_budget(study)}


def _in_budget(study) -> list[dict[str, Any]]:
    """The study's candidates measured within its budget (trained to the end, or pruned after
    an epoch), one per architecture: trial, spec and latency."""
    from optuna.trial import TrialState

    rows, seen = [], set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        if a.get("constraint", 1.0) > 0 or "skipped" in a or "spec" not in a \
                or a.get("spec_hash") in seen:
            continue
        seen.add(a.get("spec_hash"))
        rows.append({"trial": t.number, "spec": a["spec"], "latency_ms": a["latency_ms"],
                     "pruned": t.state == TrialState.PRUNED})
    return rows


def _entry(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: row.get(k) for k in keys if k in row}


FRONT_KEYS = ("trial", "proxy_top1", "latency_ms", "params", "gmacs", "spec_hash", "spec_path")
REFERENCE_KEYS = ("name", "display", "proxy_top1", "latency_ms", "params", "gmacs",
                  "within_budget", "skipped")


def versus_published(result: dict[str, Any]) -> dict[str, Any]:
    """The front (of a ``pareto.json``) against the best published GPUNet within the same
    budget (by proxy top-1): the members beating it on top-1, those matching it (at most
    :data:`TARGETS`' points lower) at no more than its fraction of its latency, and whether
    the target holds (``None``: no published GPUNet was trained within the budget)."""
    budget = result["budget_ms"]
    front = [r for r in result["front"]
             if r.get("proxy_top1") is not None and r["latency_ms"] <= budget]
    refs = [r for r in result.get("references") or []
            if r.get("proxy_top1") is not None and r.get("within_budget")]
    best_front = max(front, key=lambda r: (r["proxy_top1"], -r["latency_ms"]), default=None)
    best_ref = max(refs, key=lambda r: (r["proxy_top1"], -r["latency_ms"]), default=None)
    out: dict[str, Any] = {
        "budget_ms": budget, "best_front": None if best_front is None
        else _entry(best_front, *FRONT_KEYS),
        "best_published": None if best_ref is None else _entry(best_ref, *REFERENCE_KEYS),
        "beating": [], "matching": [], "holds": None}
    if best_ref is None:
        out["why"] = ("no published GPUNet measured and trained within the budget "
                      "(references off, or all over it)")
        return out
    points = TARGETS["search_match_top1_points"]
    frac = TARGETS["search_match_latency_frac"]
    out["beating"] = [r["trial"] for r in front if r["proxy_top1"] > best_ref["proxy_top1"]]
    out["matching"] = [r["trial"] for r in front
                       if r["proxy_top1"] >= best_ref["proxy_top1"] - points
                       and r["latency_ms"] <= frac * best_ref["latency_ms"]]
    out["holds"] = bool(out["beating"] or out["matching"])
    if best_front is not None:
        out["top1_gain_points"] = best_front["proxy_top1"] - best_ref["proxy_top1"]
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Spearman's rank correlation of ``a`` and ``b`` (ties: average ranks): scipy's when it
    is installed, else the Pearson correlation of numpy ranks (no p-value). ``rho`` is None
    when either side is constant (no ranking to compare)."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) < 2:
        raise BenchmarkError(f"spearman needs two equal-length series of >= 2, got {len(x)} "
                             f"and {len(y)}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "p_value": None, "n": len(x), "method": "constant input",
                "why": "one side is constant: nothing to rank"}
    try:
        from scipy.stats import spearmanr
    except ImportError:
        def ranks(v):
            order = v.argsort(kind="mergesort")
            r = np.empty(len(v))
            r[order] = np.arange(1, len(v) + 1)
            for value in np.unique(v):  # ties: the average of their ranks
                tied = v == value
                r[tied] = r[tied].mean()
            return r

        rx, ry = ranks(x), ranks(y)
        return {"rho": float(np.corrcoef(rx, ry)[0, 1]), "p_value": None, "n": len(x),
                "method": "numpy ranks (scipy not installed)"}
    res = spearmanr(x, y)
    return {"rho": float(res.statistic), "p_value": float(res.pvalue), "n": len(x),
            "method": "scipy.stats.spearmanr"}


def _spread(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """``k`` of ``items`` (sorted by latency) spread evenly over them, ends included."""
    items = sorted(items, key=lambda r: r["latency_ms"])
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return items
    if k == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _rank_correlation(cfg: BenchConfig, data: Path, budget_ms: float,
                      candidates: list[dict[str, Any]], front: set[int]) -> dict[str, Any]:
    """``search_rank_archs`` architectures within the budget, each trained with the proxy's
    settings and with ``search_rank_epochs_factor`` times its epochs on ``search_rank_images``
    training images (0: all), both by ``train_proxy`` and scored on the validation split: the
    proxy's Spearman rank correlation with the longer training.

    The architectures: up to half from the search's front (trials in ``front``), the rest
    from its other candidates within the budget (``candidates``: trained or pruned), both
    spread over their latency range; when the study had too few, seeded uniform samples of the
    space that fit the resolution and measure within the budget (at most
    ``search_rank_draws`` drawn)."""
    from dataclasses import replace

    from gpunet_core.search import proxy as proxies
    from gpunet_core.search.measure import MemoryCache, measure_latency, model_cost
    from gpunet_core.search.space import RandomChooser, fits_resolution, load_space, spec_hash

    short_cfg = _proxy_config(cfg)
    long_cfg = replace(short_cfg, epochs=short_cfg.epochs * cfg.search_rank_epochs_factor,
                       train_images=cfg.search_rank_images)
    short_data = proxies.ProxyData.load(data, cfg.search_img_size, short_cfg)
    long_data = proxies.ProxyData.load(data, cfg.search_img_size, long_cfg)
    wanted = cfg.search_rank_archs
    on_front = [c for c in candidates if c["trial"] in front]
    picks = [{**c, "source": "front"} for c in _spread(on_front, wanted // 2)]
    others = [c for c in candidates if c["trial"] not in front]
    picks += [{**c, "source": "study (pruned)" if c.get("pruned") else "study"}
              for c in _spread(others, wanted - len(picks))]
    picks = [{"name": f"trial-{c['trial']}", "source": c["source"], "spec": c["spec"],
              "latency_ms": c["latency_ms"]} for c in picks]
    seen = {spec_hash(c["spec"]) for c in candidates}
    space, cache = load_space(), MemoryCache()
    seed, rejected = 0, {"does_not_fit": 0, "over_budget": 0}
    while len(picks) < wanted and seed < cfg.search_rank_draws:
        spec = space.sample(RandomChooser(seed), num_classes=short_data.num_classes,
                            resolutions=[cfg.search_img_size])
        seed += 1
        if spec_hash(spec) in seen:
            continue
        seen.add(spec_hash(spec))
        if fits_resolution(spec):
            rejected["does_not_fit"] += 1
            continue
        latency = measure_latency(spec, backend="onnxruntime", iterations=cfg.search_iterations,
                                  threads=cfg.threads, cache=cache, name=f"sample-{seed - 1}")
        if latency["latency_ms"] > budget_ms:
            rejected["over_budget"] += 1
            continue
        picks.append({"name": f"sample-{seed - 1}", "source": "random", "spec": spec,
                      "latency_ms": latency["latency_ms"]})
    rows = []
    for pick in picks:
        spec = pick.pop("spec")
        _logger.info("search: rank correlation, training %s with the proxy's settings and "
                     "%dx longer", pick["name"], cfg.search_rank_epochs_factor)
        short = proxies.train_proxy(spec, short_data, short_cfg)
        long = proxies.train_proxy(spec, long_data, long_cfg)
        rows.append({**pick, "spec_hash": spec_hash(spec), **model_cost(spec),
                     "proxy_top1": short["top1"], "long_top1": long["top1"],
                     "proxy_s": short["seconds"], "long_s": long["seconds"]})
    result: dict[str, Any] = {"proxy": asdict(short_cfg), "long": asdict(long_cfg),
                              "train_images": {"proxy": len(short_data.train_y),
                                               "long": len(long_data.train_y)},
                              "val_images": len(short_data.val_y), "wanted": wanted,
                              "study_candidates": len(candidates), "random_draws": seed,
                              "rejected": rejected, "rows": rows}
    if len(rows) >= 2:
        result.update(spearman([r["proxy_top1"] for r in rows], [r["long_top1"] for r in rows]))
    else:
        result.update(rho=None, why=f"only {len(rows)} architecture(s) within the budget")
    return result


def _guarded(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # one part failing must not lose the others' figures
        _logger.exception("search: %s failed", what)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def bench_search(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """``gpunet search`` on digits with the ONNX Runtime CPU backend, in three parts under one
    budget (GPUNet-0's latency at the search's size, measured in this run):

    - ``versus_published``: a ``search_trials`` study with NVIDIA's seven GPUNets measured and
      proxy-trained the same way; its front against the best of them within the budget;
    - ``throughput``: candidates evaluated per minute by a fresh ``search_throughput_trials``
      study for each of ``search_workers``, and the ratio to the first;
    - ``rank``: the proxy's Spearman rank correlation with a longer training.

    A failing part is recorded; the others still run.
    """
    import shutil

    from gpunet_core.search.driver import num_classes

    data = _search_data(cfg, work)
    root = work / "search"
    shutil.rmtree(root, ignore_errors=True)  # a kept --work-dir: fresh studies, never resumed
    classes = num_classes(str(data))
    _logger.info("search: measuring GPUNet-0 at %d px (the budget)", cfg.search_img_size)
    budget = _budget_latency(cfg, classes)
    seeded = budget.pop("cache")
    budget_ms = budget["latency_ms"]
    proxy = _proxy_config(cfg)
    out: dict[str, Any] = {
        "dataset": {"name": "digits", "path": str(data), "img_size": cfg.search_img_size,
                    "per_class": cfg.search_digits_per_class, "classes": classes},
        "backend": "onnxruntime", "precision": "fp32", "batch": 1,
        "iterations": cfg.search_iterations, "proxy": asdict(proxy), "budget": budget}

    study: dict[str, Any] = {"candidates": [], "front": set()}  # for the rank correlation

    def versus() -> dict[str, Any]:
        search_cfg = _search_config(cfg, data, root / "versus-published", budget_ms=budget_ms,
                                    trials=cfg.search_trials, workers=1,
                                    references=cfg.search_references)
        _seed_latency(search_cfg, seeded)
        _logger.info("search: %d trials within %.3f ms%s", cfg.search_trials, budget_ms,
                     ", with the seven published GPUNets" if cfg.search_references else "")
        run = _timed_search(search_cfg)
        result = run["result"]
        study.update(candidates=run["in_budget"], front={r["trial"] for r in result["front"]})
        return {"trials": cfg.search_trials, "with_references": cfg.search_references,
                "out": search_cfg.out, "wall_s": run["wall_s"],
                "trials_counted": result["trials_counted"],
                "trained_in_budget": result["trained_in_budget"],
                "fastest_in_space_ms": result.get("fastest_in_space_ms"),
                "front": [_entry(r, *FRONT_KEYS) for r in result["front"]],
                "references": [_entry(r, *REFERENCE_KEYS) for r in result["references"]],
                **versus_published(result)}

    def throughput() -> dict[str, Any]:
        rows = []
        for workers in cfg.search_workers:
            search_cfg = _search_config(cfg, data, root / f"throughput-{workers}w",
                                        budget_ms=budget_ms, trials=cfg.search_throughput_trials,
                                        workers=workers, references=False)
            _logger.info("search: throughput, %d trials with %d worker(s)",
                         cfg.search_throughput_trials, workers)
            run = _timed_search(search_cfg)
            result, span = run["result"], run["trials_span_s"]
            rows.append({"workers": workers, "trials_counted": result["trials_counted"],
                         "trials_ended": run["trials_ended"],
                         "trained_in_budget": result["trained_in_budget"],
                         "wall_s": run["wall_s"], "trials_span_s": span,
                         "per_min": 60.0 * result["trials_counted"] / run["wall_s"],
                         "per_min_span": 60.0 * run["trials_ended"] / span if span else None})
        base = rows[0] if rows else None
        return {"trials": cfg.search_throughput_trials, "references": False, "rows": rows,
                "ratio": {str(r["workers"]): r["per_min"] / base["per_min"]
                          for r in rows[1:]} if base else {},
                "ratio_span": {str(r["workers"]): r["per_min_span"] / base["per_min_span"]
                               for r in rows[1:] if r["per_min_span"] and base["per_min_span"]}
                if base else {}}

    out["versus_published"] = _guarded("the search against the published GPUNets", versus)
    out["throughput"] = _guarded("throughput", throughput) if cfg.search_workers else None
    out["rank"] = _guarded("rank correlation", lambda: _rank_correlation(
        cfg, data, budget_ms, study["candidates"], study["front"])) \
        if cfg.search_rank_archs else None
    return out


# --------------------------------------------------------------------------- the run


def host_name() -> str:
    return (platform.node() or "host").split(".")[0] or "host"


def results_path(results_dir: str | Path, when: dt.datetime | None = None,
                 host: str | None = None, suffix: str = "") -> Path:
    """``<results_dir>/<date>-<host><suffix>.json``."""
    when = when or dt.datetime.now()
    return Path(results_dir) / f"{when:%Y-%m-%d}-{host or host_name()}{suffix}.json"


def run_all(cfg: BenchConfig) -> dict[str, Any]:
    """Run the configured sections; a failing section is recorded, the others still run."""
    from gpunet_core.inference.latency import fingerprint

    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        raise BenchmarkError(f"unknown section(s) {unknown}: use {', '.join(SECTIONS)}")
    from gpunet_core.models.factory import list_models

    unknown = sorted(set(cfg.models) - set(list_models()))
    if unknown:
        raise BenchmarkError(f"unknown model(s) {unknown} for --models: use names from "
                             "`gpunet models`")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with contextlib.ExitStack() as stack:
        if cfg.work_dir:
            work = Path(cfg.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpunet-bench-")))
        started = time.perf_counter()
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        sections: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for name in SECTIONS:
            if name not in cfg.sections:
                continue
            t0 = time.perf_counter()
            try:
                if name == "pipeline":
                    sections[name] = bench_pipeline(cfg, work)
                else:
                    fn = {"train": bench_train, "data": bench_data,
                          "inference": bench_inference, "quantization": bench_quantization,
                          "scaling": bench_scaling, "search": bench_search}[name]
                    sections[name] = fn(cfg, work)
            except BenchmarkError:
                raise
            except Exception as exc:
                _logger.exception("section %s failed", name)
                sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
            timings[name] = time.perf_counter() - t0
    config = asdict(cfg)
    config.pop("pipeline_timings", None)
    return {"schema": PERF_SCHEMA,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": host_name(), "quick": cfg.extra.get("quick", False),
            "fingerprint": fingerprint(), "config": config, "targets": TARGETS,
            "section_seconds": timings, "total_seconds": time.perf_counter() - started,
            # other processes on the machine skew every figure: a load above the core count
            # while measuring means the run should be repeated on an idle machine
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]
                                  if hasattr(os, "getloadavg") else None},
            "sections": sections}


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: float | None, target: float | None = None, higher_is_better: bool = True) -> str:
    if value is None:
        return "–"
    text = f"{value:.2f}"
    if target is not None:
        ok = value >= target if higher_is_better else value <= target
        if f"{value:.2f}" == f"{target:.2f}":  # 0.949 vs 0.95: show why it misses (or not)
            text = f"{value:.3f}"
        text += " ✅" if ok else " ❌"
    return text


def _load(results: dict[str, Any]) -> str:
    load = results.get("load_average_1min") or {}
    return " / ".join(_fmt(load.get(k), 2) for k in ("start", "end"))


def _cell_text(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    if "median" in stats:
        return f"{stats['median']:,.1f}"
    if "skipped" in stats:
        return "skip"
    return "error"


QUANT_LABELS = {"fp32": "FP32 (the export)", "int8_cpu": "INT8 `--target cpu` (ORT QOperator)",
                "fp16": "FP16 (ModelOpt AutoCast)",
                "int8_tensorrt": "INT8 `--target tensorrt` (ModelOpt Q/DQ)"}


def _paired(row: dict[str, Any]) -> dict[str, float]:
    """A latency row's paired ratios to FP32 (computed from its rounds in a JSON written before
    they were stored)."""
    if "vs_fp32_paired" in row:
        return row["vs_fp32_paired"]
    rounds = row.get("vs_fp32_rounds") or {}
    return {k: statistics.median(rounds[k]) if rounds.get(k) else v
            for k, v in row["vs_fp32"].items()}


def _at_most(value: float | None, target: float, text: str) -> str:
    return "–" if value is None else f"{text} {'✅' if value <= target else '❌'}"


def _error_text(entry: dict[str, Any]) -> str:
    return f"error: {entry['error'][:120]}"


def _quantization_markdown(q: dict[str, Any]) -> list[str]:
    """The quantization section's tables: latency per model, CPU INT8 variants, accuracy."""
    lines: list[str] = []
    rows = q.get("rows") or []
    rounds = " / ".join(str(r["latency_ms"]["fp32"]["rounds"]) for r in rows
                        if "latency_ms" in r) or "–"
    native = all(r.get("img_size") == r.get("native_img_size") for r in rows if "error" not in r)
    lines += [f"Median ms at batch {q['batch']}, {q['threads']} ONNX Runtime threads, random "
              "weights, each model at "
              + ("its native resolution" if native else "the px column's size (not native)")
              + ". A model's four graphs are timed side by side: rounds (per model here: "
              f"{rounds}) in which every graph gets a block of {q.get('block', '–')} calls in "
              "a row, the order rotating, so machine noise hits all four. Ratios to FP32: the "
              "median of the rounds' ratios (each from adjacent blocks: paired, so load that "
              "lasts seconds cancels), the rounds' spread and the ratio of the two medians "
              "over all rounds beside it. INT8 `--target cpu` "
              "is the graph for this runtime; target: ≤ 0.50 of FP32. FP16 and the Q/DQ graph "
              "are for TensorRT; ONNX Runtime's x86 CPU provider has no fast FP16 path and runs "
              "the symmetric Q/DQ graph without its fastest (u8 QOperator) kernels, so ~1.0x or "
              "slower is expected here (information only). Calibration: "
              f"{q['calibration']['latency_models']}.", "",
              "| model | px | FP32 ms | INT8 cpu ms | INT8 cpu / FP32 (≤ 0.50) | rounds "
              "min–max | ratio of the medians | FP16 ms | FP16 / FP32 | INT8 Q/DQ ms | "
              "Q/DQ / FP32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | – | {_error_text(r)} |" + " – |" * 8)
            continue
        lat, vs = r["latency_ms"], _paired(r)
        by_round = (r.get("vs_fp32_rounds") or {}).get("int8_cpu")
        spread = f"{min(by_round):.2f}–{max(by_round):.2f}" if by_round else "–"

        def ms(key: str, lat: dict[str, Any] = lat) -> str:
            return _cell_text(lat.get(key)) if key in lat else "error"

        lines.append(
            f"| {r['model']} | {r['img_size']} | {ms('fp32')} | {ms('int8_cpu')} | "
            f"{_ratio(vs.get('int8_cpu'), TARGETS['int8_cpu_vs_fp32_b1'], False)} | {spread} | "
            f"{_ratio(r['vs_fp32'].get('int8_cpu'))} | "
            f"{ms('fp16')} | {_ratio(vs.get('fp16'))} | {ms('int8_tensorrt')} | "
            f"{_ratio(vs.get('int8_tensorrt'))} |")
    failed = [f"{r['model']} {k}: {g['error']}" for r in rows for k, g in
              (r.get("graphs") or {}).items() if "error" in g]
    if failed:
        lines += ["", "Not written: " + "; ".join(failed)]
    lines.append("")

    v = q.get("variants")
    if v and "error" in v:
        lines += [f"CPU INT8 variants: failed: {v['error']}", ""]
    elif v:
        has_acc = "digits_fp32_top1" in v
        lines += [f"CPU INT8 variants (`CpuInt8`) of {v['model']} at {v['img_size']} px, batch "
                  f"{v['batch']}, each timed side by side with FP32 "
                  f"({_cell_text(v['fp32_latency_ms'])} ms)"
                  + (f"; the same variant of the digits model below, top-1 points lost against "
                     f"its FP32 {v['digits_fp32_top1']:.2f} %" if has_acc else "") + ".", "",
                  "| variant | ms | vs FP32 (median of rounds) | ratio of the medians |"
                  + (" digits top-1 drop (points) |" if has_acc else ""),
                  "|---|---:|---:|---:|" + ("---:|" if has_acc else "")]
        for r in v["rows"]:
            if "error" in r:
                cells = [_error_text(r), "–", "–"]
            else:
                paired = r.get("vs_fp32_paired")
                if paired is None and "round_medians" in r["latency_ms"]:
                    paired = statistics.median(_round_ratios(r["latency_ms"],
                                                             v["fp32_latency_ms"]))
                cells = [_cell_text(r["latency_ms"]), _ratio(paired), _ratio(r["vs_fp32"])]
            if has_acc:
                cells.append(f"{r['digits_drop_points']:.2f}" if "digits_drop_points" in r
                             else "error" if "digits_error" in r or "error" in r else "–")
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")

    a = q.get("accuracy")
    if a and "error" in a:
        lines += [f"Accuracy: failed: {a['error']}", ""]
    elif a:
        g = a["graphs"]
        fp32 = g.get("fp32", {})
        scale = next((x["logits_max_abs"] for x in g.values() if "logits_max_abs" in x), None)
        calib = next((x["calibration_images"] for x in g.values() if "calibration_images" in x),
                     "–")
        lines += [f"Accuracy: a {a['model']} trained in the bench (`gpunet train`, {a['epochs']} "
                  f"epochs at {a['img_size']} px, {a['train']['wall_s']:.0f} s), exported, "
                  f"quantized by `gpunet quantize` ({calib} calibration images of the train "
                  "split) "
                  f"and validated in ONNX Runtime on the digits validation split "
                  f"({fp32.get('images', '–')} images). Drop: points below FP32 (target for "
                  "INT8 cpu: ≤ 0.5). Logit diff: max |graph - FP32| over every validation "
                  f"image (FP32 logits reach {_fmt(scale, 2)}; target for FP16: ≤ 1e-2).", "",
                  "| graph | top-1 % | drop (points) | max abs logit diff | top-1 agreement "
                  "with FP32 |", "|---|---:|---:|---:|---:|"]
        for key, row in g.items():
            label = QUANT_LABELS.get(key, key)
            if "error" in row:
                lines.append(f"| {label} | {_error_text(row)} | – | – | – |")
                continue
            drop = row.get("drop_points")
            drop_text = "–" if key == "fp32" else \
                _at_most(drop, TARGETS["int8_top1_drop_points"], f"{drop:.2f}") \
                if key == "int8_cpu" else f"{drop:.2f}"
            diff = row.get("logits_max_abs_diff")
            diff_text = "–" if diff is None else \
                _at_most(diff, TARGETS["fp16_logits_max_abs_diff"], f"{diff:.2e}") \
                if key == "fp16" else f"{diff:.2e}"
            agree = row.get("top1_agreement")
            lines.append(f"| {label} | {row['top1']:.2f} | {drop_text} | {diff_text} | "
                         f"{'–' if agree is None else f'{100 * agree:.1f} %'} |")
        lines.append("")
    return lines


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _verdict(holds: bool | None) -> str:
    return "not judged" if holds is None else "✅ met" if holds else "❌ not met"


def _search_markdown(sr: dict[str, Any]) -> list[str]:
    """The search section: the front against the published GPUNets, throughput by workers,
    the proxy's rank correlation."""
    b, px, proxy = sr["budget"], sr["dataset"]["img_size"], sr["proxy"]
    images = "all" if not proxy["train_images"] else f"a fixed {proxy['train_images']}"
    lines = [f"`gpunet search` on digits at {px} px ({sr['dataset'].get('per_class') or 'all'} "
             f"per class), {sr['backend']} on this CPU, {sr['precision']}, batch {sr['batch']}: "
             f"every candidate's latency measured (median of {sr['iterations']} runs), the "
             f"accuracy proxy {_epochs(proxy['epochs'])} on {images} training images, top-1 on "
             f"the validation split. Budget: GPUNet-0's latency at {px} px, measured in this "
             f"run: {b['latency_ms']:.3f} ms (the search's own GPUNet-0 row is the same "
             "measurement).", ""]
    v = sr.get("versus_published")
    if v and "error" in v:
        lines += [f"Against the published GPUNets: failed: {v['error']}", ""]
    elif v:
        best, ref = v.get("best_front"), v.get("best_published")
        target = (f"a front member above its top-1, or within "
                  f"{TARGETS['search_match_top1_points']:g} points at ≤ "
                  f"{TARGETS['search_match_latency_frac']:g}x its latency")
        lines += [f"Against NVIDIA's GPUNets: a {v['trials']}-trial study (1 worker, "
                  f"{v['wall_s']:.0f} s, {v['trained_in_budget']} candidates trained within the "
                  "budget)" + (", the seven published GPUNets measured and proxy-trained the same "
                               "way" if v.get("with_references") else ", no references") + ".",
                  "",
                  "- best front member within the budget: " + (
                      f"trial {best['trial']}, {best['proxy_top1']:.2f} % at "
                      f"{best['latency_ms']:.3f} ms" if best else "none"),
                  "- best published GPUNet within the budget: " + (
                      f"{ref['display']}, {ref['proxy_top1']:.2f} % at {ref['latency_ms']:.3f} ms"
                      if ref else v.get("why", "none")),
                  f"- target ({target}): **{_verdict(v.get('holds'))}**"
                  + (f" (beating it: trials {v['beating'] or 'none'}; matching it faster: "
                     f"trials {v['matching'] or 'none'})" if v.get("holds") is not None else ""),
                  "", "| architecture | latency ms | proxy top-1 % | params M | GMACs | within "
                  "budget |", "|---|---:|---:|---:|---:|---|"]

        def row(label: str, r: dict, within: str) -> str:
            return (f"| {label} | {r['latency_ms']:.3f} | {r['proxy_top1']:.2f} | "
                    f"{_fmt((r.get('params') or 0) / 1e6, 2)} | {_fmt(r.get('gmacs'), 3)} | "
                    f"{within} |")

        lines += [row(f"front: trial {r['trial']}", r, "yes") for r in v["front"]]
        for r in v["references"]:
            if r.get("proxy_top1") is None:
                lines.append(f"| {r['display']} | – | – | – | – | "
                             f"{r.get('skipped') or 'not measured'} |")
            else:
                lines.append(row(f"{r['display']} (published)", r,
                                 "yes" if r.get("within_budget") else "no"))
        lines.append("")
    th = sr.get("throughput")
    if th and "error" in th:
        lines += [f"Search throughput: failed: {th['error']}", ""]
    elif th and th["rows"]:
        first = th["rows"][0]["workers"]
        lines += [f"Search throughput: a fresh {th['trials']}-trial study per worker count "
                  "(same budget, no references); candidates evaluated (measured, and trained "
                  "when within the budget) per minute of the whole `gpunet search` run, and per "
                  "minute from the first trial's start to the last one's end. Workers share "
                  "this machine's cores, and a candidate measured while another trains reads "
                  "slower (so more fall over the budget and are not trained: see that column).",
                  "", f"| workers | trials | trained within budget | wall s | per min | vs "
                  f"{first} | trials span s | per min (span) | vs {first} (span) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in th["rows"]:
            key = str(r["workers"])
            same = r["workers"] == first
            lines.append(
                f"| {r['workers']} | {r['trials_counted']} | {r['trained_in_budget']} | "
                f"{r['wall_s']:.0f} | {r['per_min']:.2f} | "
                f"{'1.00' if same else _ratio(th['ratio'].get(key))} | "
                f"{_fmt(r.get('trials_span_s'), 0)} | {_fmt(r.get('per_min_span'), 2)} | "
                f"{'1.00' if same else _ratio(th['ratio_span'].get(key))} |")
        lines.append("")
    rk = sr.get("rank")
    if rk and "error" in rk:
        lines += [f"Proxy rank correlation: failed: {rk['error']}", ""]
    elif rk:
        rho = rk.get("rho")
        shown = "–" if rho is None else f"{rho:.2f}"
        pval = f", p = {rk['p_value']:.3f}" if rk.get("p_value") is not None else ""
        lines += [f"Proxy rank correlation: {len(rk['rows'])} architectures within the budget "
                  "(up to half from the front, the rest the study's other candidates within it, "
                  "both spread over their latency; seeded uniform samples of the space measured "
                  "within the budget when the study had too few), "
                  f"each trained by `train_proxy` with the proxy's settings "
                  f"({_epochs(rk['proxy']['epochs'])}, {rk['train_images']['proxy']} images) and "
                  f"longer ({_epochs(rk['long']['epochs'])}, {rk['train_images']['long']} images), "
                  f"top-1 on the {rk['val_images']} validation images: **Spearman ρ = {shown}**"
                  f"{pval}" + (f" ({rk['why']})" if rk.get("why") else
                               f" ({rk.get('method')})") + ".", "",
                  "| architecture | from | params M | proxy top-1 % | longer top-1 % | proxy s "
                  "| longer s |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in rk["rows"]:
            lines.append(f"| {r['name']} | {r['source']} | {_fmt(r['params'] / 1e6, 2)} | "
                         f"{r['proxy_top1']:.2f} | {r['long_top1']:.2f} | {r['proxy_s']:.0f} | "
                         f"{r['long_s']:.0f} |")
        lines.append("")
    return lines


def render_markdown(results: dict[str, Any], source: str | None = None,
                    notes: str = "") -> str:
    """``BENCHMARKS.md`` from a results dict (everything in it comes from the JSON)."""
    fp = results.get("fingerprint", {})
    s = results.get("sections", {})
    gpu = fp.get("gpu")
    lines = ["# Benchmarks", "",
             "Generated by `make bench` from "
             f"`{source or 'the results JSON'}` -- do not edit by hand; every ratio is measured "
             "in the same run, so machine noise cancels. Targets (issue 9) are marked ✅/❌.", "",
             f"- measured: {results.get('timestamp')} on `{results.get('host')}`"
             f"{' (quick mode: smoke figures only)' if results.get('quick') else ''}",
             f"- CPU: {fp.get('cpu')} ({fp.get('cpu_affinity')} usable cores), "
             f"GPU: {gpu['name'] if gpu else 'none'}",
             f"- torch {fp.get('torch')} ({fp.get('torch_threads')} threads), onnxruntime "
             f"{fp.get('onnxruntime')}, TensorRT {fp.get('tensorrt') or 'not installed'}",
             f"- total benchmark time: {_fmt(results.get('total_seconds'), 0)} s; 1-min load "
             f"average at start / end: {_load(results)} (a load above the core count means "
             "other processes shared the CPU and the figures are noisy)", ""]

    t = s.get("train")
    if t:
        lines += ["## Training step throughput", ""]
        if "error" in t:
            lines += [f"Failed: {t['error']}", ""]
        else:
            sources = ", ".join(f"{ds['image_size'][0]}x{ds['image_size'][1]} JPEGs for "
                                f"{px} px" for px, ds in t.get("datasets", {}).items())
            lines += ["EMA on, rmsproptf, label smoothing 0.1; absolute numbers are this "
                      "machine's. `gpunet train` runs the full recipe in-process with its own "
                      f"loader (-j {t['workers']}, RandAugment, random erasing"
                      f"{'; rendered ' + sources if sources else ''}), 3 epochs, the warm "
                      "epochs 2-3 averaged; the bare loop "
                      "reuses one synthetic batch. Bare and `gpunet train` runs alternate (bare, "
                      f"train, bare, ...) for {t.get('rounds', 1)} round(s); each round's ratio "
                      "is against the mean of the bare runs on either side, and the median "
                      "round is shown (bare loop img/s: the mean of all bare runs).", "",
                      "| model | px / batch / steps | params | bare loop img/s | gpunet train "
                      "img/s | ratio (≥ 0.95) | ratio by round | data-wait (< 5 %) | fwd+bwd / "
                      "optimizer / EMA ms per step |", "|---|---|---:|---:|---:|---:|---|---:|---|"]
            for r in t["models"]:
                b, o, ms = r["bare"], r["gpunet_train"], r["bare"]["ms_per_step"]
                by_round = " / ".join(f"{x:.2f}" for x in r.get("ratio_rounds", [r["ratio"]]))
                size = (f"{r.get('img_size', t['img_size'])} / {r.get('batch', t['batch'])} / "
                        f"{r.get('steps_per_epoch', t['steps_per_epoch'])}")
                lines.append(
                    f"| {r['model']} | {size} | {b['params'] / 1e6:.1f} M | "
                    f"{_fmt(b['img_per_sec'])} | {_fmt(o['img_per_sec'])} | "
                    f"{_ratio(r['ratio'], TARGETS['train_vs_bare'])} | {by_round} | "
                    f"{100 * o['data_wait_frac']:.1f} %"
                    f"{' ✅' if o['data_wait_frac'] < TARGETS['data_wait_frac'] else ' ❌'} | "
                    f"{ms['fwd_bwd']:.0f} / {ms['optimizer']:.0f} / {ms['ema']:.0f} |")
            if t.get("variants"):
                base = t["variants"][0]["img_per_sec"]
                lines += ["", f"Hot-path variants of the bare loop ({t['variants'][0]['model']}, "
                          f"{t['img_size']} px, batch {t['batch']}, same run):", "",
                          "| variant | img/s | vs first row | optimizer ms/step |",
                          "|---|---:|---:|---:|"]
                for v in t["variants"]:
                    lines.append(f"| {v['variant']} | {_fmt(v['img_per_sec'])} | "
                                 f"{v['img_per_sec'] / base:.2f} | "
                                 f"{v['ms_per_step']['optimizer']:.1f} |")
            lines.append("")

    d = s.get("data")
    if d:
        lines += ["## Input pipeline", ""]
        if "error" in d:
            lines += [f"Failed: {d['error']}", ""]
        else:
            ds = d["dataset"]
            lines += [f"Training pipeline ({d['pipeline']}) at {d['img_size']} px, batch "
                      f"{d['batch']}, on {ds['files']} rendered "
                      f"{ds['image_size'][0]}x{ds['image_size'][1]} JPEGs (mean "
                      f"{ds['mean_kib']} KiB, ImageNet-like).", "",
                      "| backend | device | workers | img/s | img/s per worker |",
                      "|---|---|---:|---:|---:|"]
            for r in d["rows"]:
                if "skipped" in r or "error" in r:
                    lines.append(f"| {r['backend']} | – | – | {r.get('skipped') or r['error']} "
                                 "| – |")
                else:
                    lines.append(f"| {r['backend']} | {r['device']} | {r['workers']} | "
                                 f"{_fmt(r['images_per_s'])} | "
                                 f"{_fmt(r['images_per_s_per_worker'])} |")
            lines.append("")

    inf = s.get("inference")
    if inf:
        lines += ["## Inference latency", ""]
        if "error" in inf:
            lines += [f"Failed: {inf['error']}", ""]
        else:
            batches = [str(b) for b in inf["batches"]]
            backends = inf["backends"]
            lines += [f"Median ms per batch at native resolution, {inf['torch_threads']} "
                      "threads, random weights. `skip`: not measured (see the JSON for why: "
                      "too slow for this CPU under --max-call-s, or no GPU). ORT/eager ≤ 1.00 "
                      "at batch 1 is the target. Published: NVIDIA's TensorRT FP16 figures "
                      "(A100 / V100, batch 1).", ""]
            head = ["model", "px"] + [f"{b} b{n}" for n in batches for b in backends] + \
                ["ORT/eager b1", "published A100 / V100"]
            lines += ["| " + " | ".join(head) + " |",
                      "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
            for r in inf["rows"]:
                lat = r["latency_ms"]
                cells = [_cell_text(lat.get(b, {}).get(n)) for n in batches for b in backends]
                eager = lat.get("eager", {}).get("1", {}).get("median")
                ort = lat.get("onnxruntime", {}).get("1", {}).get("median")
                ratio = _ratio(ort / eager, TARGETS["ort_vs_eager_b1"], False) \
                    if eager and ort else "–"
                pub = r["published_fp16_ms"]
                lines.append(f"| {r['model']} | {r['img_size']} | " + " | ".join(cells) +
                             f" | {ratio} | {pub['a100']} / {pub['v100']} |")
            lines.append("")

    q = s.get("quantization")
    if q:
        lines += ["## Quantization (ONNX Runtime, CPU)", ""]
        if "error" in q:
            lines += [f"Failed: {q['error']}", ""]
        else:
            lines += _quantization_markdown(q)

    p = s.get("pipeline")
    if p:
        lines += ["## Pipeline overhead", ""]
        if p.get("status") == "measured":
            runs = p.get("runs") or []
            of_runs = (f"{len(runs)} runs, everything else / total: "
                       + " / ".join(f"{r['overhead_frac']:.3f}" for r in runs)
                       + "; the median run is shown") if len(runs) > 1 else "one run"
            lines += [f"`make run` DAG under kfp.local "
                      f"({', '.join(p.get('params') or []) or 'the defaults of make run'}; "
                      f"{of_runs}): ",
                      f"Total {p['total_wall_s']:.1f} s, the steps' own work "
                      f"{p['compute_s']:.1f} s, everything else {p['overhead_s']:.1f} s = "
                      f"{_ratio(p['overhead_frac'], TARGETS['pipeline_overhead_frac'], False)} "
                      "of the total (target < 0.10). Each task's process is timed from the "
                      "runner's side (from kfp.local starting it to its exit), each step logs its "
                      "own work. Of everything else: "
                      f"{p.get('runner_s', 0.0):.1f} s in the runner between the task processes "
                      "(walking the DAG, cache look-ups), the rest inside them (interpreter and "
                      "KFP executor start, library imports, artifact and MLflow I/O, exit), "
                      "which a clock outside the step cannot split further.",
                      "", "| step | task process s | work s | overhead s |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {st['name']} | {st['wall_s']:.1f} | {st['compute_s']:.1f} | "
                      f"{st['overhead_s']:.1f} |" for st in p["steps"]]
            d = p.get("distillation") or {}
            if d.get("gain_points") is not None:
                lines += ["", f"Distillation (the same DAG, `enable_distill=false` once): the "
                          f"student reaches {d['student_top1']:.2f} % top-1 with the teacher "
                          f"({_fmt(d.get('teacher_top1'), 2)} %), "
                          f"{d['without_teacher_top1']:.2f} % without it: "
                          f"{d['gain_points']:+.2f} points (runs without the teacher take "
                          f"{_fmt(d.get('without_teacher_wall_s'))} s)."]
            elif d.get("error"):
                lines += ["", f"Distillation gain not measured: {d['error']}"]
            floor = p.get("noop_floor") or {}
            if floor.get("total_s"):
                lines += ["", f"Floor: a chain of {floor['tasks']} *empty* KFP components under "
                          f"kfp.local takes {floor['total_s']:.1f} s ({floor['per_task_s']:.2f} s "
                          "per task: a Python process, the KFP executor, artifact bookkeeping); "
                          "that part of the overhead is the runner's, whatever the steps do. "
                          f"It alone is {floor['total_s'] / p['total_wall_s']:.2f} of this run."]
            elif floor.get("error"):
                lines += ["", f"Floor: {floor['error']}"]
        else:
            lines.append(p.get("status") or p.get("error", ""))
        lines.append("")

    sc = s.get("scaling")
    if sc:
        lines += ["## Scaling (torchrun)", ""]
        if "error" in sc:
            lines += [f"Failed: {sc['error']}", ""]
        else:
            lines += [f"`gpunet train` {sc['model']} at {sc['img_size']} px, batch "
                      f"{sc['batch_per_proc']} per process, aggregate img/s of the warm epoch.",
                      "", "| processes | img/s | efficiency | data-wait |", "|---:|---:|---:|---:|"]
            eff = sc.get("efficiency", {})
            for r in sc["rows"]:
                if "error" in r:
                    lines.append(f"| {r['procs']} | error: {r['error'][:120]} | – | – |")
                    continue
                e = "1.00" if r["procs"] == 1 else _ratio(eff.get(str(r["procs"])))
                lines.append(f"| {r['procs']} | {_fmt(r['img_per_sec'])} | {e} | "
                             f"{100 * r['data_wait_frac']:.1f} % |")
            lines.append("")
    sr = s.get("search")
    if sr:
        lines += ["## Architecture search (ONNX Runtime, CPU)", ""]
        if "error" in sr:
            lines += [f"Failed: {sr['error']}", ""]
        else:
            lines += _search_markdown(sr)
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(results: dict[str, Any], path: str | Path, source: str | None = None,
                   notes: str = "") -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_markdown(results, source, notes))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise BenchmarkError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="bench/run.py", description="Measure training, input pipeline, inference, "
        "quantization, pipeline overhead, scaling and the architecture search side by side; write bench/results/<date>-<host>.json and "
        "regenerate BENCHMARKS.md from it.")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run (tiny sizes, gpunet_0 only, no torchrun, no "
                        "quantization, no search; named in --sections, those run tiny)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; "
                        "--quick: all but scaling, quantization and search)")
    p.add_argument("--search-trials", type=int, default=None,
                   help="trials of the search section's study against the published GPUNets "
                        "(default 40; --quick: 4)")
    p.add_argument("--models", default="", help="inference models (default: all 7)")
    p.add_argument("--train-models", default=None,
                   help="training comparison models (default gpunet_0,efficientnet_b0)")
    p.add_argument("--inference-backends", default=None,
                   help=f"subset of {','.join(INFERENCE_BACKENDS)}")
    p.add_argument("--batches", default=None, help="inference batch sizes (default 1,32)")
    p.add_argument("--compile-batches", default=None,
                   help="batch sizes that torch.compile is timed at (default 1: compiling costs "
                        "about a minute per model and shape on a small CPU)")
    p.add_argument("--compile-models", default=None,
                   help="models that torch.compile is timed for (default gpunet_0; 'all' for "
                        "every model: about 2 minutes of compiling each on a 2-core CPU)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="timed seconds per latency cell; iterations adapt (default 2)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a latency cell whose single call is predicted (from batch 1) to "
                        "take longer than this (default 6)")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT CPU threads")
    p.add_argument("--work-dir", default=None,
                   help="keep generated data/exports here (default: a temp dir, removed)")
    p.add_argument("--pipeline-timings", default=None,
                   help="JSON list of {name, wall_s, compute_s}, one per task of a run measured "
                        "elsewhere (wall_s: the task's process, compute_s: its step's work); "
                        "split instead of running the DAG")
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--output", default=None, help="results JSON (default: "
                   "<results-dir>/<date>-<host>.json, -quick.json with --quick)")
    p.add_argument("--markdown", default=None,
                   help="markdown to regenerate ('' to skip; default BENCHMARKS.md, or "
                        "<results-dir>/quick.md with --quick)")
    p.add_argument("--notes", default=str(REPO / "bench" / "notes.md"),
                   help="markdown appended to BENCHMARKS.md when it exists")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only regenerate the markdown from this results JSON")
    return p


def config_from_args(args: Any) -> BenchConfig:
    overrides: dict[str, Any] = {}
    if args.sections:
        overrides["sections"] = _csv(args.sections)
    if args.models:
        overrides["models"] = _csv(args.models)
    if args.train_models is not None:
        overrides["train_models"] = _csv(args.train_models)
    if args.inference_backends:
        overrides["inference_backends"] = _csv(args.inference_backends)
    if args.batches:
        overrides["batches"] = _ints(args.batches)
    if args.compile_models is not None:
        overrides["compile_models"] = () if args.compile_models == "all" \
            else _csv(args.compile_models)
    if args.compile_batches is not None:
        overrides["compile_batches"] = _ints(args.compile_batches)
    for key in ("time_budget_s", "max_call_s", "threads", "work_dir", "search_trials"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.pipeline_timings:
        try:
            overrides["pipeline_timings"] = json.loads(Path(args.pipeline_timings).read_text())
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"cannot read --pipeline-timings {args.pipeline_timings}: "
                                 f"{exc}") from None
        try:  # now, not after the other sections have run for minutes
            pipeline_overhead(overrides["pipeline_timings"])
        except TimingError as exc:
            raise BenchmarkError(f"--pipeline-timings: {exc}") from None
    overrides["extra"] = {"quick": bool(args.quick)}
    return BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    from gpunet_core.utils.errors import GpunetError
    from gpunet_core.utils.files import write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        notes_path = Path(args.notes) if args.notes else None
        notes = notes_path.read_text() if notes_path and notes_path.exists() else ""
        if args.render:
            results = json.loads(Path(args.render).read_text())
            source = args.render
        else:
            results = run_all(config_from_args(args))
            out = Path(args.output) if args.output else \
                results_path(args.results_dir, suffix="-quick" if args.quick else "")
            write_json(results, out)
            print(f"results: {out}")
            source = out
        if args.markdown is None:
            args.markdown = str(Path(args.results_dir) / "quick.md") if args.quick \
                else str(REPO / "BENCHMARKS.md")
        if args.markdown:
            shown = Path(source)
            with contextlib.suppress(ValueError):
                shown = shown.resolve().relative_to(REPO)
            print(f"markdown: {write_markdown(results, args.markdown, str(shown), notes)}")
    except GpunetError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
