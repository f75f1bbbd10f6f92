"""A run's resumable state: counters, best epoch, history and RNGs, saved with the weights.

``last.pth.tar`` holds everything :func:`restore_state` needs for ``--auto-resume`` to continue
exactly as an uninterrupted run (model, EMA, optimizer, AMP scaler, RNG states); each epoch
also reseeds from (seed, rank, epoch), so a resume at an epoch boundary is bit-identical.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpunet_core.models.checkpoint import load_state_dict_strict, read_checkpoint, save_checkpoint
from gpunet_core.training.config import TrainConfig, TrainError
from gpunet_core.training.distributed import DistEnv, unwrap
from gpunet_core.utils import storage
from gpunet_core.utils.files import LAST_CHECKPOINT


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    steps: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


def run_result(state: RunState, last: dict[str, Any] | None) -> dict[str, Any]:
    """What a run returns and writes to ``result.json``: epochs, steps, best and last epoch."""
    return {"epochs": state.epoch, "steps": state.steps, "best_top1": state.best_top1,
            "best_epoch": state.best_epoch, "last": last}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[1][-1],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": np_state[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, *, cfg: TrainConfig, model: nn.Module, ema, optimizer, scaler,
               state: RunState, extra: dict[str, Any] | None = None) -> None:
    ckpt = {
        "epoch": state.epoch,
        "steps": state.steps,
        "arch": cfg.model,
        "version": 2,
        "state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "rng": _rng_state(),
        "args": {k: v for k, v in vars(cfg).items()
                 if isinstance(v, (str, int, float, bool, type(None)))},
    }
    if ema is not None:
        ckpt["state_dict_ema"] = unwrap(ema.module).state_dict()
    if scaler is not None:
        ckpt[scaler.state_dict_key] = scaler.state_dict()
    ckpt.update(extra or {})
    save_checkpoint(ckpt, path)


def restore_state(path: Path, *, model: nn.Module, ema, optimizer, scaler,
                  trusted: bool) -> RunState:
    ckpt = read_checkpoint(path, trusted=trusted)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
        raise TrainError(f"cannot resume from {path}: it is not a training checkpoint of this "
                         "project (needs state_dict, optimizer, epoch); use --initial-checkpoint "
                         "to start from plain weights")
    load_state_dict_strict(unwrap(model), ckpt["state_dict"], source=str(path))
    if ema is not None and "state_dict_ema" in ckpt:
        load_state_dict_strict(unwrap(ema.module), ckpt["state_dict_ema"], source=f"{path} [ema]")
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and scaler.state_dict_key in ckpt:
        scaler.load_state_dict(ckpt[scaler.state_dict_key])
    if "rng" in ckpt:
        _set_rng_state(ckpt["rng"])
    return RunState(epoch=int(ckpt["epoch"]), steps=int(ckpt.get("steps", 0)),
                    best_top1=float(ckpt.get("best_top1", -1.0)),
                    best_epoch=int(ckpt.get("best_epoch", -1)),
                    history=list(ckpt.get("history", [])))


def resume_source(cfg: TrainConfig, output: Path, env: DistEnv) -> Path | None:
    """The checkpoint to resume from: ``--resume``, or with ``--auto-resume`` the output's
    ``last.pth.tar`` (fetched from S3 for an ``s3://`` output) when there is one."""
    if cfg.resume:
        return storage.fetch_file(cfg.resume, output / f".resume-rank{env.rank}")
    if not cfg.auto_resume:
        return None
    if storage.is_s3_uri(cfg.output):
        remote = f"{cfg.output.rstrip('/')}/{LAST_CHECKPOINT}"
        if storage.object_exists(storage.parse_s3_uri(remote)):
            return storage.fetch_file(remote, output / f".resume-rank{env.rank}")
        return None
    last = output / LAST_CHECKPOINT
    return last if last.exists() else None
