"""Validation of a GPUNet on a labelled ImageFolder: top-1/top-5, loss, speed, per-class numbers.

:func:`load_inference_model` builds a model in eval mode from a shipped name or spec plus an
optional checkpoint (NVIDIA's or the project's), sizing the classifier from the checkpoint so a
10-class fine-tune is not silently loaded into a fresh 1000-class head. :func:`validate` runs the
evaluation loop of NVIDIA's ``validate.py`` (timm's) and returns a JSON-able dict that the CLI
writes with :func:`gpunet_core.utils.files.write_json`. :func:`validate_onnx` runs the same loop,
transform and metrics on an ONNX file in ONNX Runtime (one shared loop, :func:`_evaluate`), so a
deployed (exported or quantized) graph's accuracy is measured, not assumed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpunet_core.data.cache import local_dataset
from gpunet_core.data.loaders import EvalConfig, build_eval_loader
from gpunet_core.data.prepare import dataset_identity
from gpunet_core.inference.export import (
    MAX_BATCH,
    OnnxInfo,
    inspect_onnx,
    onnx_providers,
    onnxruntime_session,
)
from gpunet_core.inference.metrics import top_classes, topk_hits
from gpunet_core.models.factory import create_model
from gpunet_core.models.gpunet import GPUNet
from gpunet_core.models.spec import check_img_size
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import MANIFEST_FILE, RESULTS_SCHEMA, sha256_file

_logger = logging.getLogger(__name__)



def load_inference_model(model_name: str, checkpoint: str | Path | None = None, *,
                         num_classes: int | None = None, use_ema: bool = True,
                         trusted: bool = False) -> GPUNet:
    """An eval-mode GPUNet; its classifier is sized like the checkpoint's unless ``num_classes``."""
    return create_model(model_name, num_classes=num_classes, checkpoint=checkpoint,
                        use_ema=use_ema, trusted=trusted).eval()


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a conv folded into it.

    Traces the eval-mode model with ``torch.fx``; a ``BatchNorm2d`` whose input is a ``Conv2d``
    used nowhere else becomes part of that conv's weight and bias (``fuse_conv_bn_eval``), so
    eager inference runs one kernel instead of two. Outputs match the original to float
    rounding; ``model`` itself is left untouched. (ONNX Runtime and TensorRT fold on their own.)
    """

    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    traced = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(traced.named_modules())

    def replace(target: str, new: torch.nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, new)

    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target],
                                                      torch.nn.BatchNorm2d):
            continue
        conv = node.args[0]
        if (isinstance(conv, torch.fx.Node) and conv.op == "call_module"
                and isinstance(modules[conv.target], torch.nn.Conv2d) and len(conv.users) == 1):
            fused = fuse_conv_bn_eval(modules[conv.target], modules[node.target])
            replace(conv.target, fused)
            modules[conv.target] = fused
            node.replace_all_uses_with(conv)
            traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def autocast_context(device: torch.device, amp: bool):
    """Mixed precision as in validation: fp16 autocast on CUDA, bf16 autocast on the CPU."""
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise GpunetError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GpunetError(f"device {device} requested but no CUDA GPU is available; use --device cpu")
    return device


def check_options(*, batch_size: int, workers: int, img_size: int | None,
                  crop_pct: float | None, device: str | torch.device | None) -> torch.device:
    """Validate the evaluation flags (before any model or data work); returns the device."""
    if batch_size < 1:
        raise GpunetError(f"-b/--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise GpunetError(f"-j/--workers must be >= 0 (0: load in this process), got {workers}")
    check_img_size(img_size)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise GpunetError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    return _device(device)


def _resolve_data(data_dir: str | Path, progress: bool) -> Path:
    data_dir = local_dataset(data_dir, progress=progress)  # s3://: its verified local copy
    if (data_dir / MANIFEST_FILE).is_file() and (data_dir / "val").is_dir():
        data_dir = data_dir / "val"  # a prepared dataset's root: its validation split
    return data_dir


def _check_class_count(data_dir: Path, classes: list[str], num_classes: int) -> None:
    if len(classes) != num_classes:
        raise GpunetError(
            f"{data_dir} has {len(classes)} class folders but the model's classifier has "
            f"{num_classes} outputs: validate with the checkpoint trained on this dataset, or a "
            f"directory with exactly {num_classes} class folders")


def _evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable,
              classes: list[str], *, data_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The evaluation loop both runtimes share: ``predict`` maps a batch of eval-transformed
    images ``[B, 3, S, S]`` to float logits ``[B, num_classes]`` (on any device).

    Returns the runtime-independent part of the results: counts, loss, speed, per-class
    accuracy, confusion matrix (rows: true class, columns: predicted class), dataset identity.
    """
    num_classes = len(classes)
    topk = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False)
    for images, targets in bar:
        logits = predict(images).float()
        targets = targets.to(logits.device)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top = top_classes(logits, topk)
        hits1, hits5 = topk_hits(top, targets).tolist()
        correct1 += hits1
        correct5 += hits5
        seen += targets.numel()
        pairs = targets.cpu() * num_classes + top[:, 0].cpu()
        confusion += torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)
        bar.set_postfix(top1=f"{100.0 * correct1 / seen:.2f}")
    elapsed = time.perf_counter() - start
    if seen == 0:
        raise GpunetError(f"no images found under {data_dir}")
    per_class_total = confusion.sum(dim=1)
    per_class = {
        name: (float(confusion[i, i]) / float(per_class_total[i]) * 100.0
               if per_class_total[i] else None)
        for i, name in enumerate(classes)
    }
    return {
        "schema": RESULTS_SCHEMA,
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "topk": topk,
        "loss": loss_sum / seen,
        "images": seen,
        "seconds": elapsed,
        "images_per_second": seen / elapsed if elapsed > 0 else math.inf,
        "num_classes": num_classes,
        "classes": classes,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "dataset": dataset_identity(data_dir),  # what promotion compares champions on
    }


def _preprocessing(cfg: EvalConfig, batch_size: int) -> dict[str, Any]:
    return {"img_size": cfg.img_size, "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "batch_size": batch_size}


@torch.inference_mode()
def validate(model: nn.Module, data_dir: str | Path, *, batch_size: int = 256, workers: int = 4,
             img_size: int | None = None, crop_pct: float | None = None, amp: bool = False,
             channels_last: bool = False, device: str | torch.device | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``data_dir`` (``<class>/<image>`` folders, sorted class order; a
    prepared dataset's root means its ``val/``; ``s3://`` datasets go through their local cache).

    Returns top-1/top-5 (percent), mean cross-entropy loss, images per second (wall time of the
    whole loop, data loading included, as timm's validate reports it), per-class accuracy and
    the confusion matrix (rows: true class, columns: predicted class).
    """
    dev = check_options(batch_size=batch_size, workers=workers, img_size=img_size,
                        crop_pct=crop_pct, device=device)
    data_dir = _resolve_data(data_dir, progress)
    cfg = EvalConfig.for_model(model, img_size, crop_pct)
    loader = build_eval_loader(data_dir, cfg, batch_size=batch_size, workers=workers)
    classes: list[str] = list(loader.dataset.classes)
    _check_class_count(data_dir, classes, int(getattr(model, "num_classes", len(classes))))
    model = model.eval().to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def predict(images: torch.Tensor) -> torch.Tensor:
        images = images.to(dev, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(dev, amp):
            return model(images)

    results = _evaluate(predict, loader, classes, data_dir=data_dir, progress=progress)
    dataset = results.pop("dataset")
    return {
        **results,
        **_preprocessing(cfg, batch_size),
        "amp": amp,
        "amp_dtype": None if not amp else ("float16" if dev.type == "cuda" else "bfloat16"),
        "channels_last": channels_last,
        "device": str(dev),
        "torch": torch.__version__,
        "dataset": dataset,
    }


def onnx_eval_config(info: OnnxInfo, crop_pct: float | None = None) -> EvalConfig:
    """The eval preprocessing of an ONNX export: the graph's input size and the crop,
    interpolation and mean/std the export recorded from the model's ``pretrained_cfg``.

    Values the metadata lacks (None, or an empty mean/std) fall back exactly as
    :meth:`EvalConfig.for_model` falls back for a model without them, so an export validates
    with the transform its checkpoint gets in PyTorch at the same ``--img-size``.
    """
    cfg: dict[str, Any] = {"input_size": (3, info.img_size, info.img_size)}
    for key in ("crop_pct", "interpolation", "mean", "std"):
        value = info.metadata.get(key)
        if value is not None and value != [] and value != "":
            cfg[key] = value
    # EvalConfig.for_model reads only ``pretrained_cfg``: one home for the defaults
    return EvalConfig.for_model(SimpleNamespace(pretrained_cfg=cfg), info.img_size, crop_pct)


def validate_onnx(onnx_path: str | Path, data_dir: str | Path, *, batch_size: int = 256,
                  workers: int = 4, img_size: int | None = None, crop_pct: float | None = None,
                  threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate an ONNX file (an FP32 export, or an FP16/INT8 graph from ``gpunet quantize``)
    with ONNX Runtime on ``data_dir``, through the same eval transform, loader and metrics as
    :func:`validate`: the deployed graph's accuracy, measured.

    The preprocessing comes from the file's metadata (:func:`onnx_eval_config`); ``img_size``
    may only repeat the graph's input size, ``crop_pct`` overrides the recorded crop. A graph
    with a fixed batch size is fed chunks of that size (the last one zero-padded, its padded
    logits dropped). ``threads``: ONNX Runtime intra-op threads (default: the runtime's).
    """
    import onnxruntime

    check_options(batch_size=batch_size, workers=workers, img_size=img_size,
                  crop_pct=crop_pct, device="cpu")
    if threads is not None and threads < 1:
        raise GpunetError(f"--threads must be >= 1, got {threads} (leave it out for ONNX "
                          "Runtime's default)")
    info = inspect_onnx(onnx_path)
    if img_size is not None and img_size != info.img_size:
        raise GpunetError(f"--img-size {img_size} does not match {info.path}: its graph takes "
                          f"{info.img_size}x{info.img_size} inputs; leave --img-size out, or "
                          f"re-export with `gpunet export-onnx --img-size {img_size}`")
    data_dir = _resolve_data(data_dir, progress)
    cfg = onnx_eval_config(info, crop_pct)
    loader = build_eval_loader(data_dir, cfg, batch_size=batch_size, workers=workers)
    classes: list[str] = list(loader.dataset.classes)
    _check_class_count(data_dir, classes, info.num_classes)

    session = onnxruntime_session(info.path, onnx_providers(), threads)
    feed_type = next((i.type for i in session.get_inputs() if i.name == info.input_name), "")
    feed_dtype = np.float16 if feed_type == "tensor(float16)" else np.float32
    chunk = info.batch or MAX_BATCH

    def predict(images: torch.Tensor) -> torch.Tensor:
        array = images.numpy().astype(feed_dtype, copy=False)
        outputs = []
        for begin in range(0, len(array), chunk):
            part = array[begin:begin + chunk]
            real = len(part)
            if info.batch and real < info.batch:  # a fixed-batch graph: pad the last chunk
                pad = np.zeros((info.batch - real, *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            out = session.run([info.output_name], {info.input_name: part})[0]
            outputs.append(np.asarray(out[:real], dtype=np.float32))
        return torch.from_numpy(np.concatenate(outputs))

    results = _evaluate(predict, loader, classes, data_dir=data_dir, progress=progress)
    dataset = results.pop("dataset")
    providers = session.get_providers()
    return {
        **results,
        **_preprocessing(cfg, batch_size),
        "amp": False,
        "amp_dtype": None,
        "channels_last": False,
        "device": "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu",
        "torch": torch.__version__,
        "dataset": dataset,
        "model": info.model,
        "onnx": str(info.path),
        "onnx_sha256": sha256_file(info.path),
        "precision": info.precision,
        "target": info.target,
        "runtime": "onnxruntime",
        "providers": providers,
        "intra_op_num_threads": threads,
        "onnxruntime": onnxruntime.__version__,
    }
