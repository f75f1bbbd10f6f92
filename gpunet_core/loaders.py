"""Input pipelines: evaluation/training transforms and data loaders over an ImageFolder tree.

The evaluation preprocessing is NVIDIA's (timm's): bicubic resize of the shorter side to
``img_size / crop_pct``, center crop ``img_size``, ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from gpunet_core.errors import GpunetError
from gpunet_core.model import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation preprocessing of a model (from its ``pretrained_cfg``, with overrides)."""

    img_size: int
    crop_pct: float
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_model(cls, model: torch.nn.Module, img_size: int | None = None,
                  crop_pct: float | None = None) -> EvalConfig:
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        pct = crop_pct if crop_pct is not None else float(cfg.get("crop_pct", 0.875))
        if size < 8:
            raise GpunetError(f"--img-size must be >= 8, got {size}")
        if not 0.0 < pct <= 1.0:
            raise GpunetError(f"--crop-pct must be in (0, 1], got {pct}")
        return cls(size, pct, cfg.get("interpolation", "bicubic"),
                   tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def eval_transform(cfg: EvalConfig):
    """PIL image -> normalized tensor, exactly as NVIDIA's validate/eval scripts do it."""
    return create_transform(input_size=cfg.img_size, is_training=False,
                            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                            crop_pct=cfg.crop_pct)


def open_image_folder(root: str | Path, transform=None) -> ImageFolder:
    """An ImageFolder with a clear error when the directory is missing or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise GpunetError(f"dataset directory not found: {root} (expected <root>/<class>/<images>)")
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise GpunetError(f"no images found under {root}: {exc}") from None


def build_eval_loader(root: str | Path, cfg: EvalConfig, *, batch_size: int = 256,
                      workers: int = 4) -> torch.utils.data.DataLoader:
    """Ordered (unshuffled) evaluation loader over ``root`` with the PIL backend."""
    if batch_size < 1:
        raise GpunetError(f"batch size must be >= 1, got {batch_size}")
    dataset = open_image_folder(root, eval_transform(cfg))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, drop_last=False)
