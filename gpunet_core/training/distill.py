"""Knowledge distillation: NVIDIA's soft-target loss and the frozen teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpunet_core.models.checkpoint import (
    extract_state_dict,
    load_state_dict_strict,
    read_checkpoint,
)
from gpunet_core.training.config import TrainConfig, TrainError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy (NVIDIA's KD term); T² scaling keeps gradients comparable."""
    t = temperature
    soft = F.softmax(teacher_logits.float() / t, dim=-1)
    loss = torch.sum(-soft * F.log_softmax(student_logits.float() / t, dim=-1), dim=-1).mean()
    return loss * (t * t) if t != 1.0 else loss


def build_teacher(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """Frozen, eval-mode teacher from timm (pretrained hub weights) or ``--teacher-checkpoint``."""
    import timm

    if not timm.is_model(cfg.teacher):
        raise TrainError(f"unknown teacher {cfg.teacher!r}: not a timm model name "
                         "(see timm.list_models())")
    pretrained = cfg.teacher_checkpoint is None
    try:
        teacher = timm.create_model(cfg.teacher, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:  # hub download failures come in many types
        raise TrainError(f"cannot fetch pretrained weights of teacher {cfg.teacher!r} ({exc}); "
                         "pass --teacher-checkpoint PATH") from None
    if cfg.teacher_checkpoint:
        path = cfg.teacher_checkpoint
        obj = read_checkpoint(path, trusted=cfg.trust_checkpoint)
        state_dict, _ = extract_state_dict(obj, source=str(path))
        load_state_dict_strict(teacher, state_dict, source=str(path))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
