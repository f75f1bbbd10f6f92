"""Small building pieces of GPUNet blocks (the counterpart of ``timm.layers``, without timm).

Kept free of ``from __future__ import annotations``: TorchScript reads these modules' annotations.
"""

import torch
from torch import nn

from gpunet_core.utils.errors import ModelConfigError

# Global pools a GPUNet tail supports; all keep the channel count, so the classifier (and
# NVIDIA's weights) fit whichever is chosen. "" means no pooling (unpooled features out).
POOL_TYPES = ("avg", "max", "")


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def create_act(name: str, inplace: bool = True) -> nn.Module:
    """NVIDIA's ``get_act``: ``"swish"`` is SiLU, anything the spec allows otherwise is ReLU."""
    return nn.SiLU(inplace=inplace) if name == "swish" else nn.ReLU(inplace=inplace)


def symmetric_pad(kernel_size: int, stride: int) -> int:
    """timm's static symmetric padding, used by ``conv`` layers and depthwise convs."""
    return ((stride - 1) + (kernel_size - 1)) // 2


def fused_pad(kernel_size: int, stride: int) -> int:
    """Padding of a non-D ``fused_irb`` expand conv: "same" for stride 1, none for stride 2.

    Upstream asks for "same" padding, which is static only for stride 1; for stride 2 it builds a
    plain conv with padding 0 and never pads (GPUNet-0: 160 -> 79 -> 39). The checkpoints match it.
    """
    return (kernel_size - 1) // 2 if stride == 1 else 0


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's ``drop_path``: same draws, same scaling)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = [x.shape[0]] + [1] * (x.dim() - 1)  # a list, not a tuple: TorchScript needs it
    mask = x.new_empty(shape).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class SqueezeExcite(nn.Module):
    """timm's SE: mean over H,W, 1x1 reduce (bias), act, 1x1 expand (bias), sigmoid gate."""

    def __init__(self, chs: int, rd_chs: int, act: str):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1, bias=True)
        self.act1 = create_act(act)
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * s.sigmoid()


def create_pool(pool_type: str) -> nn.Module:
    """The tail's global pool: NVIDIA's ``AdaptiveAvgPool2d(1)`` for ``"avg"``; no params either way."""
    if pool_type == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pool_type == "max":
        return nn.AdaptiveMaxPool2d(1)
    if pool_type == "":
        return nn.Identity()
    raise ModelConfigError(f"global_pool must be one of {', '.join(map(repr, POOL_TYPES))}, "
                           f"got {pool_type!r}")


def create_flatten(pool_type: str) -> nn.Module:
    """Flatten after a pool; with no pool the features stay NCHW."""
    return nn.Flatten() if pool_type else nn.Identity()


def create_classifier(in_features: int, num_classes: int) -> nn.Module:
    """timm's convention: ``num_classes=0`` means no classifier (the pooled features come out)."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def feature_take_indices(num_features: int,
                         indices: int | list[int] | tuple[int, ...] | None = None
                         ) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: ``None`` all, ``int`` the last n, a sequence as given.

    Returns the absolute indices and the largest; raises :class:`ModelConfigError` when out of range.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ModelConfigError(f"indices: last-n ({indices}) must be in [1, {num_features}]")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ModelConfigError(f"indices: feature index {i} must be in "
                                       f"[{-num_features}, {num_features - 1}]")
            take.append(idx)
    if not take:
        raise ModelConfigError("indices: select at least one feature level")
    return take, max(take)
