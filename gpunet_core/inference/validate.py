"""Validation of a GPUNet on a labelled ImageFolder: top-1/top-5, loss, speed, per-class numbers.

:func:`load_inference_model` builds a model in eval mode from a shipped name or spec plus an
optional checkpoint (NVIDIA's or the project's), sizing the classifier from the checkpoint so a
10-class fine-tune is not silently loaded into a fresh 1000-class head. :func:`validate` runs the
evaluation loop of NVIDIA's ``validate.py`` (timm's) and returns a JSON-able dict that the CLI
writes with :func:`gpunet_core.utils.files.write_json`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from gpunet_core.data.cache import local_dataset
from gpunet_core.data.loaders import EvalConfig, build_eval_loader
from gpunet_core.data.prepare import dataset_identity
from gpunet_core.inference.metrics import top_classes, topk_hits
from gpunet_core.models.factory import create_model
from gpunet_core.models.gpunet import GPUNet
from gpunet_core.models.spec import check_img_size
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import MANIFEST_FILE, RESULTS_SCHEMA

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
    data_dir = local_dataset(data_dir, progress=progress)  # s3://: its verified local copy
    if (data_dir / MANIFEST_FILE).is_file() and (data_dir / "val").is_dir():
        data_dir = data_dir / "val"  # a prepared dataset's root: its validation split

    cfg = EvalConfig.for_model(model, img_size, crop_pct)
    loader = build_eval_loader(data_dir, cfg, batch_size=batch_size, workers=workers)
    classes: list[str] = list(loader.dataset.classes)
    num_classes = int(getattr(model, "num_classes", len(classes)))
    if len(classes) != num_classes:
        raise GpunetError(
            f"{data_dir} has {len(classes)} class folders but the model's classifier has "
            f"{num_classes} outputs: validate with the checkpoint trained on this dataset, or a "
            f"directory with exactly {num_classes} class folders")
    model = model.eval().to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    topk = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False)
    for images, targets in bar:
        images = images.to(dev, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(dev)
        with autocast_context(dev, amp):
            logits = model(images)
        logits = logits.float()
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
        "img_size": cfg.img_size,
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        "batch_size": batch_size,
        "amp": amp,
        "amp_dtype": None if not amp else ("float16" if dev.type == "cuda" else "bfloat16"),
        "channels_last": channels_last,
        "device": str(dev),
        "torch": torch.__version__,
        "dataset": dataset_identity(data_dir),  # what promotion compares champions on
    }
