"""The accuracy proxy: a short, fixed training of a candidate, to rank candidates cheaply.

Every candidate of a study trains on the same fixed subset of the training split, decoded once
into memory at the search resolution, with the same seed, optimizer (AdamW, cosine schedule)
and number of epochs, and is scored by top-1 on the validation split; optionally distilled
from a trained teacher whose logits are computed once. ``on_epoch`` is called after every
epoch so that a study can stop hopeless candidates (pruning) by raising from it.
The proxy ranks, it does not predict: ``make bench`` measures its rank correlation with
longer training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from gpunet_core.data.cache import local_dataset
from gpunet_core.data.folder import open_image_folder
from gpunet_core.data.transforms import EvalConfig, eval_transform
from gpunet_core.models.factory import create_model
from gpunet_core.training.distill import kd_loss
from gpunet_core.utils.errors import GpunetError


@dataclass(frozen=True)
class ProxyConfig:
    """How every candidate of a study is trained (the same for all, so ranks compare)."""

    epochs: int = 3
    train_images: int = 640  # fixed subset of the training split (0: all)
    batch_size: int = 32  # 64 left large candidates at chance on digits within 3 epochs
    lr: float = 3e-3
    weight_decay: float = 0.02
    seed: int = 0
    teacher: str | None = None  # model name or spec of the teacher
    teacher_checkpoint: str | None = None
    teacher_img_size: int | None = None

    def check(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("train_images", 0)):
            if getattr(self, name) < low:
                raise GpunetError(f"--proxy-{name.replace('_', '-')} must be >= {low}, got "
                                  f"{getattr(self, name)}")
        if not self.lr > 0:
            raise GpunetError(f"--proxy-lr must be > 0, got {self.lr}")
        if self.teacher_checkpoint and not self.teacher:
            raise GpunetError("--teacher-checkpoint needs --teacher (the teacher's model name "
                              "or spec)")


def _load_split(root: Path, img_size: int, limit: int, seed: int,
                classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    dataset = open_image_folder(root, eval_transform(EvalConfig(img_size, crop_pct=1.0)),
                                classes=classes)
    indices = list(range(len(dataset)))
    if limit and limit < len(indices):
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(len(indices), generator=generator)[:limit].tolist())
    images, labels = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels), list(dataset.classes)


@dataclass
class ProxyData:
    """The fixed subset and the validation split, in memory at one resolution."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    img_size: int
    teacher_logits: torch.Tensor | None = None

    @classmethod
    def load(cls, data: str | Path, img_size: int, cfg: ProxyConfig) -> ProxyData:
        root = local_dataset(data, progress=False)
        train_x, train_y, classes = _load_split(root / "train", img_size, cfg.train_images,
                                                cfg.seed)
        val_x, val_y, _ = _load_split(root / "val", img_size, 0, cfg.seed, classes)
        if len(classes) < 2:
            raise GpunetError(f"{root}: the search needs at least 2 classes, found {classes}")
        out = cls(train_x, train_y, val_x, val_y, classes, img_size)
        if cfg.teacher:
            out.teacher_logits = _teacher_logits(root, cfg, len(classes), train_x, train_y)
        return out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _teacher_logits(root: Path, cfg: ProxyConfig, num_classes: int, train_x: torch.Tensor,
                    train_y: torch.Tensor) -> torch.Tensor:
    teacher = create_model(cfg.teacher, checkpoint=cfg.teacher_checkpoint,
                           num_classes=num_classes).eval()
    size = cfg.teacher_img_size or train_x.shape[-1]
    if size != train_x.shape[-1]:  # the same subset, decoded at the teacher's resolution
        train_x, labels, _ = _load_split(root / "train", size, cfg.train_images, cfg.seed)
        if not torch.equal(labels, train_y):
            raise GpunetError("teacher subset differs from the student's (dataset changed?)")
    with torch.no_grad():
        return torch.cat([teacher(x) for x in train_x.split(256)])


def evaluate_top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum())
                      for xb, yb in zip(x.split(256), y.split(256), strict=True))
    return 100.0 * correct / len(y)


def train_proxy(spec: list[dict[str, Any]] | str, data: ProxyData, cfg: ProxyConfig, *,
                on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``spec`` under ``cfg`` on ``data``; returns top-1 (last epoch), per-epoch top-1
    and the seconds it took. ``on_epoch(epoch, top1)`` may raise to stop (pruning)."""
    torch.manual_seed(cfg.seed)
    model = create_model(spec, num_classes=data.num_classes)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(data.train_y) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, steps_per_epoch // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=generator)
        for batch in order.split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            logits = model(data.train_x[batch])
            loss = F.cross_entropy(logits, data.train_y[batch])
            if data.teacher_logits is not None:
                loss = loss + kd_loss(logits, data.teacher_logits[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if not torch.isfinite(loss):
            raise GpunetError(f"proxy training diverged (loss {float(loss)}) at epoch {epoch}")
        top1 = evaluate_top1(model, data.val_x, data.val_y)
        history.append(top1)
        if on_epoch is not None:
            on_epoch(epoch, top1)
    return {"top1": history[-1], "epoch_top1": history,
            "seconds": time.perf_counter() - start}
