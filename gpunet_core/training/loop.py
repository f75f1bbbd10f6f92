"""``gpunet train``: NVIDIA's GPUNet training recipe under ``torchrun`` (or a single process).

A plain, readable loop in the spirit of torchvision's ``references/classification`` and timm's
``train.py`` (which NVIDIA's script forks), reusing timm for the optimizer (``rmsproptf``, no weight
decay on 1-D params), the step scheduler with warm-up, ``ModelEmaV3``, label-smoothing CE and the
``NativeScaler`` AMP helper. Flags keep NVIDIA's names and meanings; ``--preset gpunet_X`` loads
the matching ``train_params`` file (explicit flags win).

Devices: CUDA + NCCL + fp16 autocast with a GradScaler when GPUs exist; CPU + gloo + bf16
autocast otherwise. Distillation: the loader produces teacher-resolution batches, the teacher sees
them as they are and the student sees a bicubic downsample (what NVIDIA's README describes).
Outputs (rank 0): ``last.pth.tar``, ``model_best.pth.tar``, ``summary.csv``, ``args.yaml`` and
``result.json`` (the run so far: what :func:`train` returns, readable without torch); all written
atomically; ``--auto-resume`` continues from ``last.pth.tar`` with every state restored.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from gpunet_core.inference.validate import autocast_context
from gpunet_core.training.config import (  # noqa: F401  (the training API in one place)
    TrainError,
    add_arguments,
    build_parser,
    resolve_args,
)
from gpunet_core.utils.files import atomic_write, write_json

_logger = logging.getLogger("gpunet_core.training.loop")

RESULT_FILE = "result.json"
SUMMARY_FIELDS = ("epoch", "train_loss", "train_ce", "train_kd", "eval_loss", "top1", "top5",
                  "lr", "img_per_sec", "data_wait_frac")


# --------------------------------------------------------------------------- devices & ranks


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                store=_rendezvous_store(rank, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(minutes=10))
    return DistEnv(rank, world_size, local_rank, device)


def _rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """The torchrun store, namespaced by restart round.

    torchrun's agent keeps one TCPStore across worker restarts; without a per-round prefix the
    restarted workers read the peer addresses the killed round left there and gloo's mesh
    connect hangs or is refused.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store,
                          timeout=timedelta(minutes=10))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"gpunet/restart{restart}", store)


# --------------------------------------------------------------------------- losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy (NVIDIA's KD term); T² scaling keeps gradients comparable."""
    t = temperature
    soft = F.softmax(teacher_logits.float() / t, dim=-1)
    loss = torch.sum(-soft * F.log_softmax(student_logits.float() / t, dim=-1), dim=-1).mean()
    return loss * (t * t) if t != 1.0 else loss


# --------------------------------------------------------------------------- state


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def weights_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights, to check that DDP ranks agree."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in _unwrap(model).parameters()))


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``summary.csv`` from the run history (one row per epoch, atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    _atomic_write_text(path, buf.getvalue())


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


# --------------------------------------------------------------------------- the run


def _check_args(args: argparse.Namespace) -> None:
    if args.enable_distill:
        if not args.teacher:
            raise TrainError("--enable-distill True needs --teacher NAME (a timm model name)")
        if args.teacher_img_size is not None and args.img_size is not None \
                and args.teacher_img_size < args.img_size:
            raise TrainError(f"--teacher-img-size {args.teacher_img_size} is smaller than "
                             f"--img-size {args.img_size}: the student batch is a downsample of "
                             "the teacher batch, so the teacher's size must be >= the student's")
        if args.kd_temperature <= 0:
            raise TrainError(f"--kd-temperature must be > 0, got {args.kd_temperature}")
    for flag in ("drop", "drop_connect"):
        value = getattr(args, flag)
        if value is not None and value >= 1:
            raise TrainError(f"--{flag.replace('_', '-')} must be < 1, got {value}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise TrainError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.workers < 0:
        raise TrainError(f"-j/--workers must be >= 0, got {args.workers}")
    for tag in args.run_tag:
        if "=" not in tag or not tag.split("=", 1)[0]:
            raise TrainError(f"--run-tag {tag!r}: expected KEY=VALUE")
    if args.resume and args.auto_resume:
        raise TrainError("use either --resume PATH or --auto-resume, not both")


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """Frozen, eval-mode teacher from timm (pretrained hub weights) or ``--teacher-checkpoint``."""
    import timm

    import gpunet_core.models.gpunet  # noqa: F401  (registers gpunet_* with timm)
    from gpunet_core.models.checkpoint import (
        extract_state_dict,
        load_state_dict_strict,
        read_checkpoint,
    )

    if not timm.is_model(args.teacher):
        raise TrainError(f"unknown teacher {args.teacher!r}: not a timm model name "
                         "(see timm.list_models())")
    pretrained = args.teacher_checkpoint is None
    try:
        teacher = timm.create_model(args.teacher, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:  # hub download failures come in many types
        raise TrainError(f"cannot fetch pretrained weights of teacher {args.teacher!r} ({exc}); "
                         "pass --teacher-checkpoint PATH") from None
    if args.teacher_checkpoint:
        path = args.teacher_checkpoint
        obj = read_checkpoint(path, trusted=args.trust_checkpoint)
        state_dict, _ = extract_state_dict(obj, source=str(path))
        load_state_dict_strict(teacher, state_dict, source=str(path))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def output_dir(requested: str) -> Path:
    """Where outputs are written: the directory itself, or a local staging copy of an s3:// one."""
    from gpunet_core.utils import storage

    if not storage.is_s3_uri(requested):
        return Path(requested)
    src = storage.parse_s3_uri(requested)
    return storage.default_cache_dir() / "outputs" / src.bucket / src.key


def _resume_source(args: argparse.Namespace, output: Path, env: DistEnv) -> Path | None:
    from gpunet_core.utils import storage

    if args.resume:
        return storage.fetch_file(args.resume, output / f".resume-rank{env.rank}")
    if not args.auto_resume:
        return None
    if storage.is_s3_uri(args.output):
        remote = f"{args.output.rstrip('/')}/last.pth.tar"
        if storage.object_exists(storage.parse_s3_uri(remote)):
            return storage.fetch_file(remote, output / f".resume-rank{env.rank}")
        return None
    last = output / "last.pth.tar"
    return last if last.exists() else None


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    steps: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] | None = None


def run_result(state: RunState, last: dict[str, Any] | None) -> dict[str, Any]:
    """What a run returns and writes to ``result.json``: epochs, steps, best and last epoch."""
    return {"epochs": state.epoch, "steps": state.steps, "best_top1": state.best_top1,
            "best_epoch": state.best_epoch, "last": last}


def save_state(path: Path, *, args, model, ema, optimizer, scaler, state: RunState,
               extra: dict[str, Any] | None = None) -> None:
    from gpunet_core.models.checkpoint import save_checkpoint

    ckpt = {
        "epoch": state.epoch,
        "steps": state.steps,
        "arch": args.model,
        "version": 2,
        "state_dict": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "history": state.history or [],
        "rng": _rng_state(),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    if ema is not None:
        ckpt["state_dict_ema"] = _unwrap(ema.module).state_dict()
    if scaler is not None:
        ckpt[scaler.state_dict_key] = scaler.state_dict()
    ckpt.update(extra or {})
    save_checkpoint(ckpt, path)


def restore_state(path: Path, *, model, ema, optimizer, scaler, trusted: bool) -> RunState:
    from gpunet_core.models.checkpoint import load_state_dict_strict, read_checkpoint

    ckpt = read_checkpoint(path, trusted=trusted)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
        raise TrainError(f"cannot resume from {path}: it is not a training checkpoint of this "
                         "project (needs state_dict, optimizer, epoch); use --initial-checkpoint "
                         "to start from plain weights")
    load_state_dict_strict(_unwrap(model), ckpt["state_dict"], source=str(path))
    if ema is not None and "state_dict_ema" in ckpt:
        load_state_dict_strict(_unwrap(ema.module), ckpt["state_dict_ema"], source=f"{path} [ema]")
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and scaler.state_dict_key in ckpt:
        scaler.load_state_dict(ckpt[scaler.state_dict_key])
    if "rng" in ckpt:
        _set_rng_state(ckpt["rng"])
    return RunState(epoch=int(ckpt["epoch"]), steps=int(ckpt.get("steps", 0)),
                    best_top1=float(ckpt.get("best_top1", -1.0)),
                    best_epoch=int(ckpt.get("best_epoch", -1)),
                    history=list(ckpt.get("history", [])))


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, amp: bool, channels_last: bool,
             criterion: nn.Module) -> dict[str, float]:
    """Loss/top-1/top-5 over this rank's shard, summed over all ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    for images, target in loader:
        images, target = images.to(env.device), target.to(env.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(env.device, amp):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        topk = output.topk(k, dim=1).indices
        hits = topk.eq(target[:, None])
        totals += torch.tensor([float(criterion(output, target)) * target.numel(),
                                float(hits[:, 0].sum()), float(hits.any(dim=1).sum()),
                                float(target.numel())], dtype=torch.float64)
    if env.distributed:
        totals = totals.to(env.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    n = max(totals[3].item(), 1.0)
    return {"eval_loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n,
            "top5": 100 * totals[2].item() / n}


class _Progress:
    """tqdm bar on a TTY, plain log lines otherwise; rank 0 only."""

    def __init__(self, total: int, epoch: int, enabled: bool, interval: int):
        self.enabled, self.interval, self.epoch, self.total = enabled, interval, epoch, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False)

    def due(self, step: int) -> bool:
        """Whether ``step`` shows figures (every ``interval`` steps and the last)."""
        return step % self.interval == 0 or step == self.total

    def tick(self) -> None:
        """Advance the bar without figures (no host sync)."""
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def update(self, step: int, loss: float, img_per_sec: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{img_per_sec:.0f}")
        elif self.due(step):
            _logger.info("epoch %d step %d/%d loss %.4f %.1f img/s", self.epoch, step,
                         self.total, loss, img_per_sec)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_finite(sums: torch.Tensor, epoch: int, step: int) -> None:
    """Stop on a non-finite loss; checked when logging, not per step (that would sync)."""
    if not torch.isfinite(sums).all():
        raise TrainError(f"loss became {sums[0].item()} in epoch {epoch} (by step {step}): "
                         "lower --lr or disable --amp")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole training job; returns the final summary (rank 0's view)."""
    import timm.optim
    import timm.scheduler
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.utils import ModelEmaV3, NativeScaler

    from gpunet_core.data import loaders
    from gpunet_core.models.gpunet import count_parameters, create_any_model

    _check_args(args)
    env = setup_distributed()
    seed_everything(args.seed + env.rank)
    output = output_dir(args.output)  # created once the arguments, data and models check out

    # ---- data (class count checked before any model work)
    train_root, val_root = Path(args.data) / "train", Path(args.data) / "val"
    classes = loaders.open_image_folder(train_root).classes
    num_classes = args.num_classes or len(classes)
    if num_classes != len(classes):
        raise TrainError(f"--num-classes {num_classes} but {train_root} has {len(classes)} classes "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")

    model = create_any_model(args.model, num_classes=num_classes, drop_rate=args.drop,
                             drop_path_rate=args.drop_connect)
    if args.initial_checkpoint:
        from gpunet_core.models.checkpoint import load_checkpoint

        load_checkpoint(model, args.initial_checkpoint, trusted=args.trust_checkpoint)
    img_size = args.img_size or model.pretrained_cfg["input_size"][-1]
    crop_pct = args.crop_pct if args.crop_pct is not None else model.pretrained_cfg["crop_pct"]
    teacher = None
    loader_size = img_size
    if args.enable_distill:
        teacher_size = args.teacher_img_size or img_size
        if teacher_size < img_size:
            raise TrainError(f"--teacher-img-size {teacher_size} is smaller than the student's "
                             f"{img_size}")
        teacher = build_teacher(args, num_classes, env.device)
        loader_size = teacher_size

    train_cfg = loaders.AugmentConfig.for_model(model, img_size=loader_size,
                                              auto_augment=args.aa or None, reprob=args.reprob,
                                              remode=args.remode, scale=tuple(args.scale))
    backend = loaders.resolve_backend(args.data_backend)
    if env.is_main and args.data_backend == "auto":
        _logger.info("data backend: %s", backend)
    train_loader = loaders.build_train_loader(
        train_root, train_cfg, batch_size=args.batch_size, workers=args.workers, rank=env.rank,
        world_size=env.world_size, seed=args.seed, backend=backend)
    eval_cfg = loaders.EvalConfig.for_model(model, img_size=img_size, crop_pct=crop_pct)
    val_loader = loaders.build_eval_loader(val_root, eval_cfg, batch_size=args.batch_size,
                                           workers=args.workers, rank=env.rank,
                                           world_size=env.world_size, backend=backend)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainError(f"batch size {args.batch_size} x {env.world_size} processes is larger "
                         f"than the training set: lower -b")

    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        eps=args.opt_eps)
    scaler = NativeScaler(device="cuda") if args.amp and env.device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr, updates_per_epoch=steps_per_epoch)

    output.mkdir(parents=True, exist_ok=True)
    state = RunState(history=[])
    resume = _resume_source(args, output, env)
    if resume:
        state = restore_state(resume, model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                              trusted=args.trust_checkpoint)
        if env.is_main:
            _logger.info("resumed from %s after epoch %d (%d steps)", resume, state.epoch,
                         state.steps)
    state.history = [row for row in (state.history or []) if row["epoch"] < state.epoch]
    if state.epoch > 0:
        scheduler.step(state.epoch)

    train_model: nn.Module = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 \
        else nn.CrossEntropyLoss()
    eval_criterion = nn.CrossEntropyLoss()

    tracker = None
    if env.is_main:
        _atomic_write_text(output / "args.yaml", yaml.safe_dump(
            {k: v for k, v in vars(args).items() if not k.startswith("_")}, sort_keys=True))
        if args.mlflow:
            from gpunet_core.mlops.tracking import RunTracker

            tracker = RunTracker.start(args, output, params={
                "model_params": count_parameters(model), "num_classes": num_classes,
                "world_size": env.world_size, "img_size": img_size,
                "dataset_manifest_sha256": _manifest_checksum(Path(args.data))})

    if teacher is not None and args.test_teacher and state.epoch == 0:
        teacher_cfg = loaders.EvalConfig.for_model(teacher, img_size=loader_size,
                                                   crop_pct=crop_pct)
        metrics = evaluate(teacher, loaders.build_eval_loader(
            val_root, teacher_cfg, batch_size=args.batch_size, workers=args.workers,
            rank=env.rank, world_size=env.world_size, backend=backend), env, False, False,
            eval_criterion)
        if env.is_main:
            _logger.info("teacher %s: top1 %.2f top5 %.2f", args.teacher, metrics["top1"],
                         metrics["top5"])

    max_steps = args.max_steps or math.inf
    last_metrics: dict[str, Any] = {}
    for epoch in range(state.epoch, num_epochs):
        if state.steps >= max_steps:
            break
        loaders.set_epoch(train_loader, epoch)
        # every epoch starts from RNG states set by (seed, rank, epoch): a run resumed at an
        # epoch boundary continues exactly as an uninterrupted one (dropout, drop-path)
        seed_everything(loaders.derive_seed(args.seed, env.rank, epoch))
        train_model.train()
        # loss, ce, kd per-sample sums, kept on the device: read (a host sync) only when logging
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)
        input_px: dict[str, int] = {}
        seen, data_wait, t_epoch = 0, 0.0, time.perf_counter()
        progress = _Progress(steps_per_epoch, epoch, env.is_main, args.log_interval)
        t_data = time.perf_counter()
        for step, (images, target) in enumerate(train_loader, start=1):
            data_wait += time.perf_counter() - t_data
            images = images.to(env.device, non_blocking=True)
            target = target.to(env.device, non_blocking=True)
            teacher_images = images
            if images.shape[-1] != img_size:
                images = F.interpolate(images, size=(img_size, img_size), mode="bicubic",
                                       align_corners=False)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(env.device, args.amp):
                output_logits = train_model(images)
                ce = criterion(output_logits.float(), target)
            loss = ce
            kd = torch.zeros((), device=env.device)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(teacher_images)
                if step == 1:
                    input_px = {"teacher_px": teacher_images.shape[-1],
                                "student_px": images.shape[-1]}
                    if env.is_main and epoch == state.epoch:
                        _logger.info("distillation: teacher %s sees %d px, student %d px "
                                     "(bicubic downsample)", args.teacher,
                                     input_px["teacher_px"], input_px["student_px"])
                kd = kd_loss(output_logits, teacher_logits, args.kd_temperature)
                loss = ce + args.kd_weight * kd
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler(loss, optimizer, parameters=model.parameters())
            else:
                loss.backward()
                optimizer.step()
            state.steps += 1
            if ema is not None:
                ema.update(model, step=state.steps)
            scheduler.step_update(state.steps)
            n = target.shape[0]
            seen += n
            sums += torch.stack([loss.detach(), ce.detach(), kd.detach()]).double() * n
            if progress.due(step):
                _check_finite(sums, epoch, step)
                progress.update(step, sums[0].item() / seen,
                                seen * env.world_size / (time.perf_counter() - t_epoch))
            else:
                progress.tick()
            t_data = time.perf_counter()
            if state.steps >= max_steps:
                break
        progress.close()
        _check_finite(sums, epoch, step)
        elapsed = time.perf_counter() - t_epoch
        if env.distributed:
            red = torch.tensor([*sums.tolist(), seen], dtype=torch.float64, device=env.device)
            dist.all_reduce(red)
            sums, seen_all = red[:3].cpu(), int(red[3].item())
        else:
            seen_all = seen
        eval_model = ema.module if ema is not None else model
        metrics = evaluate(eval_model, val_loader, env, args.amp, args.channels_last,
                           eval_criterion)
        scheduler.step(epoch + 1, metrics["top1"])
        checksum = weights_checksum(model)
        checksums = [checksum]
        if env.distributed:
            gathered: list[Any] = [None] * env.world_size
            dist.all_gather_object(gathered, checksum)
            checksums = gathered
        row = {"epoch": epoch, "train_loss": sums[0].item() / max(seen_all, 1),
               "train_ce": sums[1].item() / max(seen_all, 1),
               "train_kd": sums[2].item() / max(seen_all, 1), **metrics,
               "lr": optimizer.param_groups[0]["lr"], "img_per_sec": seen_all / elapsed,
               "data_wait_frac": data_wait / elapsed, "rank_checksums": checksums,
               **input_px}
        state.history.append(row)
        state.epoch = epoch + 1
        is_best = metrics["top1"] > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = metrics["top1"], epoch
        if env.is_main:
            save_state(output / "last.pth.tar", args=args, model=model, ema=ema,
                       optimizer=optimizer, scaler=scaler, state=state)
            if is_best:
                save_state(output / "model_best.pth.tar", args=args, model=model, ema=ema,
                           optimizer=optimizer, scaler=scaler, state=state)
            write_summary(output / "summary.csv", state.history)
            write_json(run_result(state, row), output / RESULT_FILE)
            _logger.info("epoch %d: loss %.4f (ce %.4f kd %.4f) | %s top1 %.2f top5 %.2f | "
                         "%.1f img/s | ranks in sync: %s", epoch, row["train_loss"],
                         row["train_ce"], row["train_kd"], "ema" if ema else "model",
                         metrics["top1"], metrics["top5"], row["img_per_sec"],
                         len(set(checksums)) == 1)
            if tracker is not None:
                tracker.log_epoch(row, step=epoch)
                tracker.log_artifacts(output, ["summary.csv", "args.yaml"])
            _sync_output(args.output, output)
        if env.distributed:
            dist.barrier()
        last_metrics = row
    result = run_result(state, last_metrics)
    if tracker is not None:
        if (output / "model_best.pth.tar").exists():
            tracker.log_artifacts(output, ["model_best.pth.tar"])
            if args.log_model:
                tracker.log_model(output / "model_best.pth.tar", args.model, img_size)
        tracker.finish(result)
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _manifest_checksum(root: Path) -> str:
    import hashlib

    manifest = root / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else ""


def _sync_output(requested: str, local: Path) -> None:
    """Mirror the staging directory to an ``s3://`` output (uploads are verified)."""
    from gpunet_core.utils import storage

    if storage.is_s3_uri(requested):
        files = [(p, p.relative_to(local).as_posix()) for p in sorted(local.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.name != "mlflow.db"]
        # checkpoints keep their size from epoch to epoch: never skip by size here
        storage.upload_files(files, storage.parse_s3_uri(requested), skip_existing=False,
                             progress=False)
