"""Transforms: NVIDIA's (timm's) evaluation preprocessing and training augmentation.

The evaluation preprocessing is NVIDIA's (timm's): bicubic resize of the shorter side to
``img_size / crop_pct``, center crop ``img_size``, ImageNet mean/std, written here without timm
or torchvision (about 3 s of imports in every validation process); ``tests/test_loaders.py``
checks it against timm's, tensor for tensor. Training follows NVIDIA's recipe (their
``*.train.params``): RandomResizedCrop with random interpolation, horizontal flip, RandAugment
``rand-m9-mstd0.5`` and random erasing (``--reprob 0.2 --remode pixel``), through timm's
transform factory (imported on use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpunet_core.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from gpunet_core.utils.errors import GpunetError


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


# PIL's resampling filters by timm's interpolation names
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
@dataclass(frozen=True)
class EvalTransform:
    """PIL image -> normalized float tensor ``[3, S, S]``: NVIDIA's (timm's) evaluation transform.

    Resize the shorter side to ``floor(S / crop_pct)`` (aspect kept, the longer side truncated
    as torchvision does), center crop ``S``, scale to [0, 1], subtract mean, divide by std:
    the same PIL and torch operations, in the same order, as timm's
    ``create_transform(is_training=False)``, so the tensors are identical.
    """

    cfg: EvalConfig

    def __post_init__(self) -> None:
        if self.cfg.interpolation not in PIL_RESAMPLE:
            raise GpunetError(f"interpolation {self.cfg.interpolation!r} is not one of "
                              f"{', '.join(PIL_RESAMPLE)}")

    def __call__(self, img) -> torch.Tensor:
        size = self.cfg.img_size
        short_target = math.floor(size / self.cfg.crop_pct)
        w, h = img.size
        if w <= h:
            new_w, new_h = short_target, int(short_target * h / w)
        else:
            new_w, new_h = int(short_target * w / h), short_target
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), PIL_RESAMPLE[self.cfg.interpolation])
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        mean = torch.tensor(self.cfg.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.cfg.std, dtype=torch.float32)[:, None, None]
        return x.sub_(mean).div_(std)


def eval_transform(cfg: EvalConfig) -> EvalTransform:
    """PIL image -> normalized tensor, exactly as NVIDIA's validate/eval scripts do it."""
    return EvalTransform(cfg)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (NVIDIA's recipe by default; fields mirror timm's train.py flags)."""

    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5"
    color_jitter: float = 0.4
    interpolation: str = "random"
    reprob: float = 0.2
    remode: str = "pixel"
    recount: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.img_size < 8:
            raise GpunetError(f"--img-size must be >= 8, got {self.img_size}")
        if not 0.0 <= self.reprob <= 1.0:
            raise GpunetError(f"--reprob must be in [0, 1], got {self.reprob}")
        if not 0.0 <= self.hflip <= 1.0:
            raise GpunetError(f"--hflip must be in [0, 1], got {self.hflip}")
        if self.remode not in ("pixel", "rand", "const"):
            raise GpunetError(f"--remode must be pixel, rand or const, got {self.remode!r}")

    @classmethod
    def for_model(cls, model: torch.nn.Module, img_size: int | None = None,
                  **overrides: Any) -> AugmentConfig:
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        return cls(img_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                   std=tuple(cfg.get("std", IMAGENET_STD)), **overrides)


def train_transform(cfg: AugmentConfig):
    """PIL image -> augmented, normalized tensor through timm's transform factory."""
    from timm.data import create_transform

    return create_transform(input_size=cfg.img_size, is_training=True, scale=cfg.scale,
                            ratio=cfg.ratio, hflip=cfg.hflip, vflip=0.0,
                            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
                            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
