"""Data loaders over an ImageFolder tree (transforms: :mod:`gpunet_core.data.transforms`).

Two backends give the same batches -- ``(images float32 [B, 3, H, W] normalised with
mean/std, labels int64 [B])``: ``pil`` (torch DataLoader + PIL transforms, portable)
and ``dali`` (NVIDIA DALI; GPU nvJPEG decode when a GPU is present, else DALI's CPU-only
mode). ``auto`` picks DALI when it imports and a GPU is present, else PIL. Evaluation needs
neither timm nor torchvision (:mod:`gpunet_core.data.folder`, :mod:`~gpunet_core.data.transforms`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from gpunet_core.data.folder import open_image_folder
from gpunet_core.data.transforms import (
    AugmentConfig,
    EvalConfig,
    eval_transform,
    train_transform,
)
from gpunet_core.utils.errors import GpunetError

log = logging.getLogger(__name__)

BACKENDS = ("pil", "dali", "auto")


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
                      rank: int = 0, world_size: int = 1, classes: list[str] | None = None):
    """Ordered (unshuffled) evaluation loader over ``root``: every image exactly once.

    Yields ``(images float32 [B, 3, S, S], labels int64 [B])`` with ``S = cfg.img_size``.
    With ``world_size > 1`` each rank gets a disjoint share (no padding, so sums over ranks
    count every image once). ``classes``: the class list (index order) to label by, e.g. the
    training split's, so that a validation split lacking a class keeps its indices (default:
    the dataset's manifest, else ``root``'s own sub-directories).
    """
    _check_batch(batch_size)
    if not 0 <= rank < world_size:
        raise GpunetError(f"rank {rank} is outside world size {world_size}")
    if resolve_backend(backend) == "dali":
        # nvidia.dali: only for the DALI backend (GPU machines)
        from gpunet_core.data.dali import DaliLoader

        return DaliLoader(root, cfg, train=False, batch_size=batch_size, workers=workers,
                          shard_id=rank, num_shards=world_size, device=dali_device,
                          classes=classes)
    dataset = open_image_folder(root, eval_transform(cfg), classes=classes)
    if world_size > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, drop_last=False)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` (e.g. run seed, epoch, sample index)."""
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


def build_train_loader(root: str | Path, cfg: AugmentConfig, *, batch_size: int = 256,
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
        # nvidia.dali: only for the DALI backend (GPU machines)
        from gpunet_core.data.dali import DaliLoader

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


def shard_indices(loader) -> list[int] | None:
    """The sample indices this rank's loader reads in the current epoch (None: not a
    :func:`build_train_loader` PIL loader, e.g. DALI, whose readers shard internally)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, _EpochIndexSampler):
        return list(sampler.sampler)
    return None


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle for ``epoch`` (DistributedSampler.set_epoch, or the DALI loader's)."""
    target = getattr(loader, "sampler", None) or loader
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def measure_throughput(loader, *, max_batches: int = 50, warmup: int = 2) -> dict[str, float]:
    """Images/s of a loader (after ``warmup`` batches, over at most ``max_batches``)."""
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
