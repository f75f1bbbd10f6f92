"""Input pipelines: evaluation/training transforms and data loaders over an ImageFolder tree.

The evaluation preprocessing is NVIDIA's (timm's): bicubic resize of the shorter side to
``img_size / crop_pct``, center crop ``img_size``, ImageNet mean/std. Training follows
NVIDIA's recipe (their ``*.train.params``): RandomResizedCrop with random interpolation,
horizontal flip, RandAugment ``rand-m9-mstd0.5`` and random erasing (``--reprob 0.2
--remode pixel``).

Two backends give the same batches -- ``(images float32 [B, 3, H, W] normalised with
mean/std, labels int64 [B])``: ``pil`` (torch DataLoader + PIL transforms, portable)
and ``dali`` (NVIDIA DALI; GPU nvJPEG decode when a GPU is present, else DALI's CPU-only
mode). ``auto`` picks DALI when it imports and a GPU is present, else PIL. Class indices come
from the dataset's ``manifest.json`` when there is one, so a split that lacks a class keeps
the same indices.

Evaluation needs neither timm nor torchvision (about 3 s of imports in every validation
process): :class:`EvalTransform` and :class:`ImageFolderDataset` follow their rules exactly,
and ``tests/test_loaders.py`` checks them against both, tensor for tensor. Training uses timm's
transform factory (imported on use).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpunet_core.errors import GpunetError
from gpunet_core.model import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

BACKENDS = ("pil", "dali", "auto")


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
# torchvision's ImageFolder extensions (matched case-insensitively)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        import numpy as np

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


def load_rgb(path: str | Path):
    """The image at ``path`` as an RGB PIL image (torchvision's ``pil_loader``)."""
    from PIL import Image

    with open(path, "rb") as fh:
        return Image.open(fh).convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(image, class index)`` samples of a ``<root>/<class>/.../<image>`` tree.

    torchvision's ``ImageFolder`` rules: classes are the sorted sub-directory names (or the
    given list), files are walked in sorted order (symlinks followed) and kept when their
    extension is in :data:`IMG_EXTENSIONS`. Raises ``FileNotFoundError`` for a tree without
    class folders, or for a class without images unless ``allow_empty`` (a split that lacks
    a class of the manifest).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 classes: list[str] | None = None, allow_empty: bool = False):
        self.root, self.transform, self.loader = str(root), transform, load_rgb
        if classes is None:
            classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {self.root}.")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in sorted(self.class_to_idx):
            found = 0
            class_dir = os.path.join(self.root, name)
            if os.path.isdir(class_dir):
                for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
                    for fname in sorted(files):
                        if fname.lower().endswith(IMG_EXTENSIONS):
                            self.samples.append((os.path.join(dirpath, fname),
                                                 self.class_to_idx[name]))
                            found += 1
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        return (self.transform(img) if self.transform is not None else img), target


def manifest_classes(root: str | Path) -> list[str] | None:
    """Class list (index order) from ``manifest.json`` next to a split directory, if any."""
    root = Path(root)
    for candidate in (root / "manifest.json", root.parent / "manifest.json"):
        if candidate.is_file():
            try:
                return list(json.loads(candidate.read_text())["classes"])
            except (ValueError, KeyError, TypeError):
                raise GpunetError(f"{candidate} is not a valid dataset manifest; re-run "
                                  "gpunet prepare") from None
    return None


def open_image_folder(root: str | Path, transform=None,
                      classes: list[str] | None = None) -> ImageFolderDataset:
    """An ImageFolder with a clear error when the directory is missing or holds no images.

    Class indices follow ``classes`` or the dataset's manifest.json when present, else the
    sorted sub-directory names (torchvision's rule).
    """
    root = Path(root)
    if not root.is_dir():
        raise GpunetError(f"dataset directory not found: {root} (expected <root>/<class>/<images>)")
    classes = classes or manifest_classes(root)
    try:
        dataset = ImageFolderDataset(root, transform, classes or None,
                                     allow_empty=bool(classes))
    except (FileNotFoundError, RuntimeError) as exc:
        raise GpunetError(f"no images found under {root}: {exc}") from None
    if len(dataset) == 0:
        raise GpunetError(f"no images found under {root} (expected <root>/<class>/<images>)")
    return dataset


@dataclass(frozen=True)
class TrainConfig:
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
                  **overrides: Any) -> TrainConfig:
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        return cls(img_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                   std=tuple(cfg.get("std", IMAGENET_STD)), **overrides)


def train_transform(cfg: TrainConfig):
    """PIL image -> augmented, normalized tensor through timm's transform factory."""
    from timm.data import create_transform

    return create_transform(input_size=cfg.img_size, is_training=True, scale=cfg.scale,
                            ratio=cfg.ratio, hflip=cfg.hflip, vflip=0.0,
                            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
                            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime inside the wheel
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``pil``/``dali``/``auto`` -> the backend that will run.

    ``auto`` picks DALI only when it is installed *and* a CUDA GPU is present: DALI's win is
    nvJPEG decode on the GPU; in CPU mode it is 2-3x slower than pil (BENCHMARKS.md).
    """
    if backend not in BACKENDS:
        raise GpunetError(f"--data-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        chosen = "dali" if dali_available() and torch.cuda.is_available() else "pil"
        log.info("data backend: %s (auto)", chosen)
        return chosen
    if backend == "dali" and not dali_available():
        raise GpunetError("--data-backend dali needs NVIDIA DALI: pip install "
                          "nvidia-dali-cuda120 (Linux x86_64), or use --data-backend pil")
    return backend


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise GpunetError(f"batch size must be >= 1, got {batch_size}")


def build_eval_loader(root: str | Path, cfg: EvalConfig, *, batch_size: int = 256,
                      workers: int = 4, backend: str = "pil", dali_device: str = "auto",
                      rank: int = 0, world_size: int = 1):
    """Ordered (unshuffled) evaluation loader over ``root``: every image exactly once.

    Yields ``(images float32 [B, 3, S, S], labels int64 [B])`` with ``S = cfg.img_size``.
    With ``world_size > 1`` each rank gets a disjoint share (no padding, so sums over ranks
    count every image once).
    """
    _check_batch(batch_size)
    if not 0 <= rank < world_size:
        raise GpunetError(f"rank {rank} is outside world size {world_size}")
    if resolve_backend(backend) == "dali":
        from gpunet_core.dali_loader import DaliLoader

        return DaliLoader(root, cfg, train=False, batch_size=batch_size, workers=workers,
                          shard_id=rank, num_shards=world_size, device=dali_device)
    dataset = open_image_folder(root, eval_transform(cfg))
    if world_size > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, drop_last=False)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` (e.g. run seed, epoch, sample index)."""
    import hashlib

    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _EpochIndexSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` from a DistributedSampler so each sample knows its epoch."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededSamples(torch.utils.data.Dataset):
    """Augments sample ``i`` of epoch ``e`` with RNGs seeded from ``(seed, e, i)``.

    The random crops/flips/RandAugment/erasing a sample gets then depend on nothing else: not
    on the number of loader workers, not on which worker process or rank loads it, not on
    whether the run was restarted. A run resumed at an epoch boundary thus sees exactly the
    batches of an uninterrupted one. In the main process (``workers=0``) the global RNG states
    are restored afterwards, so model-side randomness (dropout, drop-path) is untouched.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        import random

        import numpy as np

        epoch, index = key
        seed = derive_seed(self.seed, epoch, index)
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(),
                                         torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU generator only: the transforms draw nothing on a GPU, and torch.manual_seed
        # (which also queues seeds for every accelerator backend) costs ~0.2 ms per sample
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def build_train_loader(root: str | Path, cfg: TrainConfig, *, batch_size: int = 256,
                       workers: int = 4, rank: int = 0, world_size: int = 1, seed: int = 0,
                       drop_last: bool = True, backend: str = "pil",
                       dali_device: str = "auto"):
    """Shuffled, augmented training loader for one DDP rank.

    Sharding has ``DistributedSampler`` semantics: each of ``world_size`` ranks sees a
    disjoint ``1/world_size`` share of a per-epoch permutation (padded to equal length);
    call :func:`set_epoch` at the start of every epoch to reshuffle. With the pil backend the
    order and each sample's augmentation are functions of ``(seed, epoch, index)`` only.
    """
    _check_batch(batch_size)
    if not 0 <= rank < world_size:
        raise GpunetError(f"rank {rank} is outside world size {world_size}")
    if resolve_backend(backend) == "dali":
        from gpunet_core.dali_loader import DaliLoader

        return DaliLoader(root, cfg, train=True, batch_size=batch_size, workers=workers,
                          shard_id=rank, num_shards=world_size, seed=seed, device=dali_device)
    dataset = open_image_folder(root, train_transform(cfg))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=False)
    return torch.utils.data.DataLoader(
        _SeededSamples(dataset, seed), batch_size=batch_size,
        sampler=_EpochIndexSampler(sampler), num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        drop_last=drop_last, generator=torch.Generator().manual_seed(seed))


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle for ``epoch`` (DistributedSampler.set_epoch, or the DALI loader's)."""
    target = getattr(loader, "sampler", None) or loader
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def measure_throughput(loader, *, max_batches: int = 50, warmup: int = 2) -> dict[str, float]:
    """Images/s of a loader (after ``warmup`` batches, over at most ``max_batches``)."""
    import time

    images, batches, start = 0, 0, None
    for i, (x, _) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            images += x.shape[0]
            batches += 1
        if batches >= max_batches:
            break
    if start is None or images == 0:
        raise GpunetError(f"too few batches to time (need more than {warmup}); use a smaller "
                          "--batch-size or a bigger dataset")
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}
