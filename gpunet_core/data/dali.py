"""The DALI input pipeline: same batches as the PIL backend, decoded by NVIDIA DALI.

On a GPU the JPEGs are decoded by nvJPEG (``device="mixed"``) and augmented on the GPU; without
one DALI runs in CPU-only mode (``device_id=None``, CPU operators). The train path follows
NVIDIA's recipe with DALI's own operators: random-resized-crop (fused into the decoder), random
bilinear/bicubic interpolation, horizontal flip, RandAugment from :mod:`nvidia.dali.auto_aug`
(n=2, m=9 of 10; DALI has no magnitude noise, so timm's ``mstd0.5`` is not reproduced) and
pixel-mode random erasing (one box of 2-33% area, aspect 0.3-3.3, filled with N(0, 1) noise in
normalised space). Eval resizes the shorter side to ``floor(size / crop_pct)`` (bicubic) and
center-crops. Outputs: float32 ``[B, 3, S, S]`` normalised with mean/std, labels int64 ``[B]``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from gpunet_core.data.folder import open_image_folder
from gpunet_core.data.transforms import AugmentConfig, EvalConfig
from gpunet_core.utils.errors import GpunetError

DALI_DEVICES = ("auto", "cpu", "gpu")


def _resolve_device(device: str) -> str:
    if device not in DALI_DEVICES:
        raise GpunetError(f"DALI device must be one of {', '.join(DALI_DEVICES)}, got {device!r}")
    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise GpunetError("DALI GPU decoding was requested but no CUDA GPU is visible; use the "
                          "DALI CPU mode (device cpu/auto) or run on a GPU node")
    return "gpu" if device == "auto" and has_gpu else ("cpu" if device == "auto" else device)


def _rand_augment_args(policy: str | None) -> tuple[int, int] | None:
    """timm's ``rand-mM-nN-...`` string -> (n, m) on timm's 0..10 magnitude scale."""
    if not policy:
        return None
    if not policy.startswith("rand"):
        raise GpunetError(f"the DALI backend supports RandAugment ('rand-...') only, got "
                          f"{policy!r}; use --data-backend pil")
    n, m = 2, 9
    for part in policy.split("-")[1:]:
        if part.startswith("m") and part[1:].isdigit():
            m = int(part[1:])
        elif part.startswith("n") and part[1:].isdigit():
            n = int(part[1:])
    return n, min(m, 10)


def build_pipeline(files: list[str], labels: list[int], root: str, cfg: AugmentConfig | EvalConfig,
                   *, train: bool, batch_size: int, workers: int, shard_id: int = 0,
                   num_shards: int = 1, seed: int = 0, device: str = "cpu"):
    """The DALI pipeline (not yet built) for one shard of ``files``."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    size = cfg.img_size
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * s for s in cfg.std]
    augment = _rand_augment_args(cfg.auto_augment) if train else None
    op_device = "gpu" if device == "gpu" else "cpu"
    decode_device = "mixed" if device == "gpu" else "cpu"

    @pipeline_def(enable_conditionals=augment is not None)
    def pipe():
        jpegs, label = fn.readers.file(file_root=root, files=files, labels=labels,
                                       shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=train, pad_last_batch=not train,
                                       name="Reader")
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_device, output_type=types.RGB,
                random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio),
                num_attempts=10)
            if cfg.interpolation == "random":  # timm: bilinear or bicubic per sample
                interp = fn.cast(fn.random.choice([int(types.INTERP_LINEAR),
                                                   int(types.INTERP_CUBIC)]),
                                 dtype=types.INTERP_TYPE)
            else:
                interp = _interp(cfg.interpolation, types)
            images = fn.resize(images, device=op_device, size=[size, size], interp_type=interp)
            if augment is not None:

                n, m = augment
                with warnings.catch_warnings():  # DALI's own use of deprecated aliases
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from nvidia.dali.auto_aug import rand_augment

                    images = rand_augment.rand_augment(images, n=n, m=m, num_magnitude_bins=11,
                                                       shape=[size, size])
            mirror = fn.random.coin_flip(probability=cfg.hflip)
            images = fn.crop_mirror_normalize(images, device=op_device, dtype=types.FLOAT,
                                              output_layout="CHW", mean=mean, std=std,
                                              mirror=mirror)
            if cfg.reprob > 0:
                images = _random_erase(images, cfg.reprob, cfg.remode, fn, dmath, types)
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, device=op_device,
                               resize_shorter=math.floor(size / cfg.crop_pct),
                               interp_type=_interp(cfg.interpolation, types))
            images = fn.crop_mirror_normalize(images, device=op_device, dtype=types.FLOAT,
                                              output_layout="CHW", crop=(size, size),
                                              mean=mean, std=std)
        if device == "gpu":
            label = label.gpu()
        return images, label

    return pipe(batch_size=batch_size, num_threads=max(1, workers), seed=seed + shard_id,
                device_id=torch.cuda.current_device() if device == "gpu" else None,
                prefetch_queue_depth=2)


def _interp(name: str, types):
    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN}.get(name, types.INTERP_CUBIC)


def _random_erase(images, prob: float, mode: str, fn, dmath, types):
    """timm's RandomErasing (one box) on normalised CHW floats, as a noise/mask blend."""
    area = fn.random.uniform(range=[0.02, 1 / 3])
    aspect = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(1 / 0.3)]))
    h = dmath.min(dmath.sqrt(area * aspect), 1.0)
    w = dmath.min(dmath.sqrt(area / aspect), 1.0)
    anchor = fn.stack(fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h),
                      fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w))
    ones = images * 0.0 + 1.0
    keep = fn.erase(ones, anchor=anchor, shape=fn.stack(h, w), axis_names="HW",
                    normalized_anchor=True, normalized_shape=True, fill_value=0.0)
    apply = fn.cast(fn.random.coin_flip(probability=prob), dtype=types.FLOAT)
    erased = (1.0 - keep) * apply
    fill = fn.random.normal(images) if mode == "pixel" else images * 0.0
    return images * (1.0 - erased) + fill * erased


class DaliLoader:
    """Iterates ``(images, labels)`` torch batches from a DALI pipeline over an ImageFolder.

    Class indices are the same as the PIL backend's (taken from the ImageFolder/manifest).
    Train: this shard's samples, incomplete last batch dropped. Eval: every sample once.
    """

    def __init__(self, root: str | Path, cfg: AugmentConfig | EvalConfig, *, train: bool,
                 batch_size: int, workers: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, device: str = "auto", classes: list[str] | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.device = _resolve_device(device)
        folder = open_image_folder(root, classes=classes)
        root = Path(root)
        files = [Path(p).relative_to(root).as_posix() for p, _ in folder.samples]
        labels = [int(t) for _, t in folder.samples]
        self.dataset_size = len(files)
        self.batch_size = batch_size
        self.pipeline = build_pipeline(files, labels, str(root), cfg, train=train,
                                       batch_size=batch_size, workers=workers,
                                       shard_id=shard_id, num_shards=num_shards, seed=seed,
                                       device=self.device)
        self.pipeline.build()
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self._iter = DALIGenericIterator([self.pipeline], ["images", "labels"],
                                         reader_name="Reader", last_batch_policy=policy,
                                         auto_reset=True)

    def __len__(self) -> int:
        return len(self._iter)

    def __iter__(self):
        for batch in self._iter:
            out = batch[0]
            yield out["images"], out["labels"].reshape(-1).long()

    def set_epoch(self, epoch: int) -> None:
        """DALI's reader reshuffles every epoch by itself; nothing to do."""
