"""``gpunet train``: NVIDIA's GPUNet training recipe under ``torchrun`` (or a single process).

A plain loop in the shape of torchvision's ``references/classification/train.py``:
:func:`train_one_epoch`, :func:`evaluate` and :func:`train`, which wires them. It reuses timm (as
NVIDIA's script, a fork of timm's ``train.py``, does) for the optimizer (``rmsproptf``, no
weight decay on 1-D params), the step scheduler with warm-up, ``ModelEmaV3``, label-smoothing
CE and the ``NativeScaler`` AMP helper. Settings come as a :class:`TrainConfig`
(:mod:`gpunet_core.training.config`: NVIDIA's flag names, ``--preset gpunet_X``).

Devices: CUDA + NCCL + fp16 autocast with a GradScaler when GPUs exist; CPU + gloo + bf16
autocast otherwise (:mod:`~gpunet_core.training.distributed`). Distillation
(:mod:`~gpunet_core.training.distill`): the loader produces teacher-resolution batches, the
teacher sees them as they are and the student sees a bicubic downsample (what NVIDIA's README
describes). Outputs (rank 0): ``last.pth.tar``, ``model_best.pth.tar``, ``summary.csv``,
``args.yaml`` and ``result.json`` (the run so far: what :func:`train` returns, readable without
torch); all written atomically; ``--auto-resume`` continues from ``last.pth.tar`` with every
state restored (:mod:`~gpunet_core.training.state`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gpunet_core.data import loaders
from gpunet_core.data.cache import local_dataset
from gpunet_core.inference.metrics import top_classes, topk_hits
from gpunet_core.inference.validate import autocast_context
from gpunet_core.mlops.tracking import RunTracker, start_system_metrics
from gpunet_core.models.checkpoint import load_checkpoint
from gpunet_core.models.factory import count_parameters, create_any_model
from gpunet_core.models.spec import is_custom_name, stored_spec_path
from gpunet_core.training.config import TrainConfig, TrainError, check_runtime, config_warnings
from gpunet_core.training.distill import build_teacher, kd_loss
from gpunet_core.training.distributed import (
    DistEnv,
    all_gather,
    node_position,
    setup_distributed,
    shard_report,
    weights_checksum,
)
from gpunet_core.training.outputs import (
    ARGS_FILE,
    manifest_checksum,
    output_dir,
    sync_output,
    write_args,
    write_summary,
)
from gpunet_core.training.state import (
    RunState,
    restore_state,
    resume_source,
    run_result,
    save_state,
    seed_everything,
)
from gpunet_core.utils import storage
from gpunet_core.utils.files import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RESULT_FILE,
    SUMMARY_FILE,
    remove_new_dirs_on_error,
    write_json,
)

_logger = logging.getLogger("gpunet_core.training.loop")


class _Progress:
    """tqdm bar on a TTY, plain log lines otherwise; rank 0 only."""

    def __init__(self, total: int, epoch: int, enabled: bool, interval: int):
        self.enabled, self.interval, self.epoch, self.total = enabled, interval, epoch, total
        self.bar = None
        if enabled and sys.stderr.isatty():
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


def train_one_epoch(model: nn.Module, train_model: nn.Module, criterion: nn.Module, optimizer,
                    scheduler, loader, env: DistEnv, epoch: int, state: RunState,
                    cfg: TrainConfig, *, img_size: int, teacher: nn.Module | None = None,
                    scaler=None, ema=None) -> dict[str, Any]:
    """One pass over this rank's shard (``train_model`` is ``model`` wrapped in DDP/compile);
    advances ``state.steps`` and returns the epoch's train figures, summed over all ranks."""
    max_steps = cfg.max_steps or math.inf
    train_model.train()
    # loss, ce, kd per-sample sums, kept on the device: read (a host sync) only when logging
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)
    input_px: dict[str, int] = {}
    seen, data_wait, t_epoch = 0, 0.0, time.perf_counter()
    progress = _Progress(len(loader), epoch, env.is_main, cfg.log_interval)
    t_data = time.perf_counter()
    for step, (images, target) in enumerate(loader, start=1):
        data_wait += time.perf_counter() - t_data
        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)
        teacher_images = images
        if images.shape[-1] != img_size:
            images = F.interpolate(images, size=(img_size, img_size), mode="bicubic",
                                   align_corners=False)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(env.device, cfg.amp):
            output = train_model(images)
            ce = criterion(output.float(), target)
        loss = ce
        kd = torch.zeros((), device=env.device)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(teacher_images)
            if step == 1:
                input_px = {"teacher_px": teacher_images.shape[-1], "student_px": images.shape[-1]}
                if env.is_main:
                    _logger.info("distillation: teacher %s sees %d px, student %d px (bicubic "
                                 "downsample)", cfg.teacher, input_px["teacher_px"],
                                 input_px["student_px"])
            kd = kd_loss(output, teacher_logits, cfg.kd_temperature)
            loss = ce + cfg.kd_weight * kd
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
        sums, seen = red[:3].cpu(), int(red[3].item())
    n = max(seen, 1)
    return {"train_loss": sums[0].item() / n, "train_ce": sums[1].item() / n,
            "train_kd": sums[2].item() / n, "img_per_sec": seen / elapsed,
            "data_wait_frac": data_wait / elapsed, **input_px}


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
        top1, top5 = topk_hits(top_classes(output, 5), target).tolist()
        totals += torch.tensor([float(criterion(output, target)) * target.numel(),
                                float(top1), float(top5), float(target.numel())],
                               dtype=torch.float64)
    if env.distributed:
        totals = totals.to(env.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    n = max(totals[3].item(), 1.0)
    return {"eval_loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n,
            "top5": 100 * totals[2].item() / n}


# a warning when the last incomplete batch, dropped every epoch, is more than this share of a
# process's training images
DROPPED_SHARE_WARNING = 0.25


def check_splits(train_set, val_set, train_root: Path, val_root: Path) -> None:
    """A training split with images of at least 2 classes, and a validation split without
    classes the training split lacks (TrainError naming them)."""
    present = sorted({train_set.classes[t] for t in set(train_set.targets)})
    if len(present) < 2:
        raise TrainError(f"the training split {train_root} has images of one class only "
                         f"({', '.join(present)}): a classifier needs at least 2 classes; add "
                         "a folder of images for each other class (train/<class>/<images>)")
    extra = sorted({val_set.classes[t] for t in set(val_set.targets)} - set(present))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise TrainError(f"the validation split {val_root} has class(es) {shown} that the "
                         f"training split {train_root} lacks: the model cannot learn them; add "
                         "training images of them, or remove them from the validation split")


def check_batch_size(images: int, batch_size: int, world_size: int,
                     train_root: Path) -> str | None:
    """TrainError when an epoch would have no step: each of ``world_size`` processes reads
    ``ceil(images / world_size)`` images (DistributedSampler pads to equal shares) in batches
    of ``batch_size``, the last incomplete one dropped. Returns a warning when that dropped
    batch is a large share of the images (None otherwise)."""
    per_process = -(-images // world_size)
    processes = f"{world_size} processes" if world_size > 1 else "1 process"
    if per_process < batch_size:
        raise TrainError(f"batch size {batch_size} (-b, per process) is larger than the "
                         f"training set: {train_root} has {images} images, {per_process} per "
                         f"process over {processes}, and the last incomplete batch is dropped, "
                         f"so an epoch would have no step; lower -b to at most {per_process}")
    dropped = per_process % batch_size
    if dropped > DROPPED_SHARE_WARNING * per_process:
        return (f"-b {batch_size} leaves out {dropped} of the {per_process} training images of "
                "each process every epoch (the last incomplete batch is dropped); a batch size "
                f"that divides {per_process} (or a smaller one) uses them all")
    return None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training job; returns the final summary (rank 0's view). A run that
    fails leaves no output folder behind that it created and did not fill."""
    check_runtime(cfg)
    env = setup_distributed()
    if env.is_main:
        for warning in config_warnings(cfg):
            _logger.warning("%s", warning)
    seed_everything(cfg.seed + env.rank)
    output = output_dir(cfg.output)  # created once the arguments, data and models check out
    with remove_new_dirs_on_error(output):
        return _train(cfg, env, output)


def _train(cfg: TrainConfig, env: DistEnv, output: Path) -> dict[str, Any]:
    import timm.optim
    import timm.scheduler
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.utils import ModelEmaV3, NativeScaler

    # ---- data (classes and batch size checked before any model work); an s3:// dataset is
    # read from its verified per-node cache copy: every rank asks, one per node downloads, the
    # others wait
    data_root = local_dataset(cfg.data, progress=env.is_main and sys.stderr.isatty())
    if env.is_main and storage.is_s3_uri(cfg.data):
        _logger.info("dataset %s: local copy at %s", cfg.data, data_root)
    train_root, val_root = data_root / "train", data_root / "val"
    train_set = loaders.open_image_folder(train_root)
    classes = train_set.classes
    check_splits(train_set, loaders.open_image_folder(val_root), train_root, val_root)
    warning = check_batch_size(len(train_set), cfg.batch_size, env.world_size, train_root)
    if warning and env.is_main:
        _logger.warning("%s", warning)
    num_classes = cfg.num_classes or len(classes)
    if num_classes != len(classes):
        raise TrainError(f"--num-classes {num_classes} but {train_root} has {len(classes)} classes "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")

    # ---- model (and teacher)
    model = create_any_model(cfg.model, num_classes=num_classes, drop_rate=cfg.drop,
                             drop_path_rate=cfg.drop_connect)
    if cfg.initial_checkpoint:

        load_checkpoint(model, cfg.initial_checkpoint, trusted=cfg.trust_checkpoint)
    img_size = cfg.img_size or model.pretrained_cfg["input_size"][-1]
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else model.pretrained_cfg["crop_pct"]
    teacher = None
    loader_size = img_size
    if cfg.enable_distill:
        teacher_size = cfg.teacher_img_size or img_size
        if teacher_size < img_size:
            raise TrainError(f"--teacher-img-size {teacher_size} is smaller than the student's "
                             f"{img_size}")
        teacher = build_teacher(cfg, num_classes, env.device)
        loader_size = teacher_size

    # ---- loaders
    augment = loaders.AugmentConfig.for_model(model, img_size=loader_size,
                                              auto_augment=cfg.aa or None, reprob=cfg.reprob,
                                              remode=cfg.remode, scale=cfg.scale,
                                              hflip=cfg.hflip)
    backend = loaders.resolve_backend(cfg.data_backend)
    if env.is_main and cfg.data_backend == "auto":
        _logger.info("data backend: %s", backend)
    shard = {"workers": cfg.workers, "rank": env.rank, "world_size": env.world_size,
             "backend": backend}
    train_loader = loaders.build_train_loader(train_root, augment, batch_size=cfg.batch_size,
                                              seed=cfg.seed, **shard)
    eval_cfg = loaders.EvalConfig.for_model(model, img_size=img_size, crop_pct=crop_pct)
    # the validation images labelled by the training split's class indices
    val_loader = loaders.build_eval_loader(val_root, eval_cfg, batch_size=cfg.batch_size,
                                           classes=classes, **shard)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainError(f"batch size {cfg.batch_size} x {env.world_size} processes is larger "
                         f"than the training set: lower -b")

    # ---- optimisation
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        eps=cfg.opt_eps)
    scaler = NativeScaler(device="cuda") if cfg.amp and env.device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr, updates_per_epoch=steps_per_epoch)

    # ---- resume
    output.mkdir(parents=True, exist_ok=True)
    state = RunState()
    resume = resume_source(cfg, output, env)
    if resume:
        state = restore_state(resume, model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                              trusted=cfg.trust_checkpoint)
        if env.is_main:
            _logger.info("resumed from %s after epoch %d (%d steps)", resume, state.epoch,
                         state.steps)
    state.history = [row for row in state.history if row["epoch"] < state.epoch]
    if state.epoch > 0:
        scheduler.step(state.epoch)

    train_model: nn.Module = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    criterion = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 \
        else nn.CrossEntropyLoss()
    eval_criterion = nn.CrossEntropyLoss()

    tracker = None
    if env.is_main:
        write_args(output / ARGS_FILE, cfg)
        if cfg.mlflow:
            tracker = RunTracker.start(cfg, output, params={
                "model_params": count_parameters(model), "num_classes": num_classes,
                "world_size": env.world_size, "img_size": img_size,
                "dataset_manifest_sha256": manifest_checksum(data_root)})
    node_tracker = monitor = None
    if cfg.mlflow:  # every rank: the run id is shared by a collective
        run_id = all_gather(env, tracker.run_id if tracker else None)[0]
        node_rank, nnodes = node_position(env)
        node_tracker, monitor = start_system_metrics(
            tracker, output=output, experiment=cfg.experiment, run_id=run_id,
            node_rank=node_rank, nnodes=nnodes, local_rank=env.local_rank,
            interval_s=cfg.system_metrics_interval)
        share_run_id = env.distributed and run_id is None  # MLflow down: share it later

    if teacher is not None and cfg.test_teacher and state.epoch == 0:
        teacher_cfg = loaders.EvalConfig.for_model(teacher, img_size=loader_size,
                                                   crop_pct=crop_pct)
        teacher_loader = loaders.build_eval_loader(val_root, teacher_cfg,
                                                   batch_size=cfg.batch_size, classes=classes,
                                                   **shard)
        metrics = evaluate(teacher, teacher_loader, env, False, False, eval_criterion)
        if env.is_main:
            _logger.info("teacher %s: top1 %.2f top5 %.2f", cfg.teacher, metrics["top1"],
                         metrics["top5"])

    # ---- the epochs
    max_steps = cfg.max_steps or math.inf
    last_metrics: dict[str, Any] = {}
    for epoch in range(state.epoch, num_epochs):
        if state.steps >= max_steps:
            break
        loaders.set_epoch(train_loader, epoch)
        shards = None
        if env.distributed and (indices := loaders.shard_indices(train_loader)) is not None:
            shards = shard_report(env, indices, len(train_loader.dataset))
            if env.is_main and epoch == state.epoch:
                _logger.info("data shards: %(ranks)d ranks x %(per_rank)d of %(samples)d "
                             "samples, %(missing)d missing, %(duplicated)d repeated (padding)",
                             shards)
        # every epoch starts from RNG states set by (seed, rank, epoch): a run resumed at an
        # epoch boundary continues exactly as an uninterrupted one (dropout, drop-path)
        seed_everything(loaders.derive_seed(cfg.seed, env.rank, epoch))
        figures = train_one_epoch(model, train_model, criterion, optimizer, scheduler,
                                  train_loader, env, epoch, state, cfg, img_size=img_size,
                                  teacher=teacher, scaler=scaler, ema=ema)
        eval_model = ema.module if ema is not None else model
        metrics = evaluate(eval_model, val_loader, env, cfg.amp, cfg.channels_last,
                           eval_criterion)
        scheduler.step(epoch + 1, metrics["top1"])
        checksums = all_gather(env, weights_checksum(model))
        row = {"epoch": epoch, **figures, **metrics, "lr": optimizer.param_groups[0]["lr"],
               "rank_checksums": checksums, **({"shards": shards} if shards else {})}
        state.history.append(row)
        state.epoch = epoch + 1
        is_best = metrics["top1"] > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = metrics["top1"], epoch
        if env.is_main:
            _save_epoch(output, cfg, row, state, is_best, model=model, ema=ema,
                        optimizer=optimizer, scaler=scaler, tracker=tracker)
        if env.distributed:
            dist.barrier()
        if cfg.mlflow and share_run_id:  # the other nodes' system metrics wait for the run
            run_id = all_gather(env, tracker.run_id if tracker else None)[0]
            share_run_id = run_id is None
            if node_tracker is not None and node_tracker.run_id is None:
                node_tracker.run_id = run_id
        last_metrics = row
    result = run_result(state, last_metrics)
    if monitor is not None:
        monitor.finish()  # its last sample goes out before the run ends
    if tracker is not None:
        if (output / BEST_CHECKPOINT).exists():
            tracker.log_artifacts(output, [BEST_CHECKPOINT])
            if is_custom_name(cfg.model):  # what rebuilds the model elsewhere (a champion)
                spec = stored_spec_path(cfg.model)
                tracker.log_artifacts(spec.parent, [spec.name])
            if cfg.log_model:
                tracker.log_model(output / BEST_CHECKPOINT, cfg.model, img_size,
                                  step=max(state.best_epoch, 0))
        tracker.finish(result)
        sync_output(cfg.output, output)  # the LoggedModel's id file beside the checkpoints
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _save_epoch(output: Path, cfg: TrainConfig, row: dict[str, Any], state: RunState,
                is_best: bool, *, model, ema, optimizer, scaler, tracker) -> None:
    """Rank 0's end of an epoch: checkpoints, summary, result, log line, MLflow, S3 mirror."""
    parts = {"cfg": cfg, "model": model, "ema": ema, "optimizer": optimizer, "scaler": scaler,
             "state": state}
    save_state(output / LAST_CHECKPOINT, **parts)
    if is_best:
        save_state(output / BEST_CHECKPOINT, **parts)
    write_summary(output / SUMMARY_FILE, state.history)
    write_json(run_result(state, row), output / RESULT_FILE)
    _logger.info("epoch %d: loss %.4f (ce %.4f kd %.4f) | %s top1 %.2f top5 %.2f | %.1f img/s | "
                 "ranks in sync: %s", row["epoch"], row["train_loss"], row["train_ce"],
                 row["train_kd"], "ema" if ema else "model", row["top1"], row["top5"],
                 row["img_per_sec"], len(set(row["rank_checksums"])) == 1)
    if tracker is not None:
        tracker.log_epoch(row, step=row["epoch"])
        tracker.log_artifacts(output, [SUMMARY_FILE, ARGS_FILE])
    sync_output(cfg.output, output)
