"""Pretrained configs of the shipped models, and where their weights are found on disk.

The configs are plain dicts of timm ``PretrainedCfg`` fields (timm registers them as they are),
so this module never imports timm. NVIDIA publishes the weights on NGC, which needs a login:
there is no download URL, and ``pretrained=True`` looks for the file NGC ships in
``$GPUNET_PRETRAINED_DIR`` (default ``~/.cache/gpunet/pretrained``) instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpunet_core.models.builder import feature_map_size, head_names
from gpunet_core.models.spec import ArchSpec, model_info, shipped_spec
from gpunet_core.utils.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NGC_VERSION = "21.12.0_amp"
PRETRAINED_DIR_ENV = "GPUNET_PRETRAINED_DIR"
ORIGIN_URL = "https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/GPUNet"
PAPER_NAME = "Searching the Deployable Convolution Neural Networks for GPUs"
PAPER_IDS = "arXiv:2205.00841"


def _input_cfg(arch: ArchSpec, in_chans: int) -> dict[str, Any]:
    res = arch.img_resolution
    pool = feature_map_size(arch, res)
    first_conv, classifier = head_names(arch)
    return {
        "input_size": (in_chans, res, res),
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": arch.num_classes,
        "pool_size": (pool, pool),
        "first_conv": first_conv,
        "classifier": classifier,
    }


def spec_cfg(arch: ArchSpec, in_chans: int = 3) -> dict[str, Any]:
    """The config of a model built from any spec: no weights, timm's default eval crop."""
    return {"architecture": "custom", **_input_cfg(arch, in_chans), "spec_source": arch.source}


def checkpoint_file(name: str) -> str:
    """File name of NVIDIA's weights inside the NGC archive, e.g. ``0.65ms.pth.tar``."""
    return f"{model_info(name)['config'].removesuffix('.json')}.pth.tar"


def default_cfg(name: str) -> dict[str, Any]:
    """timm ``PretrainedCfg`` fields of a shipped model (what ``timm.get_pretrained_cfg`` gives).

    ``file`` is the bare name NGC ships: :func:`find_pretrained` resolves it when the model is
    created, so ``$GPUNET_PRETRAINED_DIR`` counts as set then, not at registration.
    """
    info = model_info(name)
    return {
        "file": checkpoint_file(name),
        "architecture": name,
        "custom_load": False,
        **_input_cfg(shipped_spec(name), 3),
        "crop_pct": info["crop_pct"],
        "num_classes": 1000,
        "origin_url": ORIGIN_URL,
        "paper_name": PAPER_NAME,
        "paper_ids": PAPER_IDS,
        "notes": (f"weights: NGC model nvidia/dle/{name}_pyt_ckpt version {NGC_VERSION} (NGC needs "
                  f"a login, so there is no download URL); put {checkpoint_file(name)} or "
                  f"{name}_pyt_ckpt.zip in ${PRETRAINED_DIR_ENV} for pretrained=True",),
    }


def published_metadata(name: str) -> dict[str, Any]:
    """NVIDIA's published facts of a shipped model, beyond timm's fields (kept in ``pretrained_cfg``)."""
    info = model_info(name)
    return {
        "ngc_model": f"nvidia/dle/{name}_pyt_ckpt",
        "ngc_version": NGC_VERSION,
        "checkpoint_file": checkpoint_file(name),
        "teacher": info["teacher"],
        "published_top1": info["top1"],
        "published_latency_ms": {"a100_trt_fp16": info["latency_ms_a100"],
                                 "v100_trt_fp16": info["latency_ms_v100"]},
        "spec_file": info["config"],
    }


def pretrained_cfg_for(name: str) -> dict[str, Any]:
    """A shipped model's ``pretrained_cfg``: timm's fields plus NVIDIA's published metadata."""
    return {**default_cfg(name), **published_metadata(name)}


def pretrained_dir() -> Path:
    return Path(os.environ.get(PRETRAINED_DIR_ENV, Path.home() / ".cache" / "gpunet" / "pretrained"))


def find_pretrained(name: str, overlay: Mapping[str, Any] | None = None) -> Path:
    """Local copy of NVIDIA's published weights for ``name`` (NGC needs a login, so no download).

    An ``overlay["file"]`` that exists (or is absolute) is used as is; a bare name is looked up in
    :func:`pretrained_dir`, as are NGC's file name and its zip archive when no file is given.
    """
    folder = pretrained_dir()
    file = (overlay or {}).get("file")
    if file:
        path = Path(file)
        if path.exists() or path.is_absolute():
            return path
        candidates = [folder / path]
    else:
        candidates = [folder / checkpoint_file(name), folder / f"{name}_pyt_ckpt.zip"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    meta = published_metadata(name)
    raise CheckpointError(
        f"no local copy of NVIDIA's {name} weights in {folder}: download the NGC model "
        f"{meta['ngc_model']} version {meta['ngc_version']} (e.g. `ngc registry model "
        f"download-version {meta['ngc_model']}:{meta['ngc_version']}`) and put "
        f"{candidates[0].name} or the zip in {folder} (or set {PRETRAINED_DIR_ENV})")
