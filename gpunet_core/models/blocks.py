"""GPUNet's blocks, one class per NVIDIA module, with NVIDIA's attribute names.

The attribute names (``net``, ``conv_pw``, ``body``, ...) are state-dict keys of NVIDIA's published
checkpoints, so they never change. The tails (``Epilogue``/``EpilogueD``) keep NVIDIA's single
``net`` Sequential and index into it for timm's split into ``forward_features`` (up to the last
1x1 conv, BN, ReLU) and ``forward_head`` (pool ... classifier).

Kept free of ``from __future__ import annotations``: TorchScript reads the class annotations.
"""

import torch
from torch import nn

from gpunet_core.models.layers import (
    SqueezeExcite,
    create_act,
    create_classifier,
    create_flatten,
    create_pool,
    drop_path,
    fused_pad,
    make_divisible,
    symmetric_pad,
)

# --------------------------------------------------------------------------- stems


class Prologue(nn.Module):
    """Stem: conv3x3 stride 2, BN, activation (``head``)."""

    def __init__(self, in_chs: int, out_chs: int, act: str, bn_eps: float, inplace: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, 2, 1, bias=False),
            nn.BatchNorm2d(out_chs, eps=bn_eps),
            create_act(act, inplace),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PrologueLarge(nn.Module):
    """D-family large stem (``head_large``): three conv3x3-BN-ReLU, the first with stride 2."""

    def __init__(self, in_chs: int, out_chs: int, bn_eps: float):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_chs if i == 0 else out_chs, out_chs, 3, 2 if i == 0 else 1, 1,
                          bias=False),
                nn.BatchNorm2d(out_chs, eps=bn_eps),
                nn.ReLU(inplace=False),
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- non-D family blocks


class ConvBnAct(nn.Module):
    """``conv`` layer: conv, BN, act. Never residual, whatever its shape."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, act: str,
                 bn_eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride,
                              symmetric_pad(kernel_size, stride), bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act1 = create_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


def se_width(mid: int, expansion: float) -> int:
    """SE bottleneck width: timm passes ``rd_ratio = se_ratio / exp_ratio`` at the expanded width."""
    return round(mid * (0.25 / expansion))


class _Residual(nn.Module):
    """Adds the block input back (with per-sample drop path in training) when shapes allow."""

    has_skip: bool
    drop_path_rate: float

    def _add_skip(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if not self.has_skip:
            return out
        if self.drop_path_rate > 0.0 and self.training:
            out = drop_path(out, self.drop_path_rate, self.training)
        return out + shortcut


class InvertedResidual(_Residual):
    """``irb`` of the non-D family (timm MBConv): pw-expand, dw, [SE], pw-project, residual."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float, act: str, use_se: bool, bn_eps: float, drop_path_rate: float):
        super().__init__()
        mid = make_divisible(in_chs * expansion)
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path_rate = drop_path_rate
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.act1 = create_act(act)
        self.conv_dw = nn.Conv2d(mid, mid, kernel_size, stride, symmetric_pad(kernel_size, stride),
                                 groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.act2 = create_act(act)
        self.se = SqueezeExcite(mid, se_width(mid, expansion), act) if use_se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return self._add_skip(out, x)


class EdgeResidual(_Residual):
    """``fused_irb`` of the non-D family (timm FusedMBConv); stride 2 pads 0 (see ``fused_pad``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float, act: str, use_se: bool, bn_eps: float, drop_path_rate: float):
        super().__init__()
        mid = make_divisible(in_chs * expansion)
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path_rate = drop_path_rate
        self.conv_exp = nn.Conv2d(in_chs, mid, kernel_size, stride,
                                  fused_pad(kernel_size, stride), bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.act1 = create_act(act)
        self.se = SqueezeExcite(mid, se_width(mid, expansion), act) if use_se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.act1(self.bn1(self.conv_exp(x))))
        out = self.bn2(self.conv_pwl(out))
        return self._add_skip(out, x)


# --------------------------------------------------------------------------- D family blocks


class InvertedResidualD(_Residual):
    """D-family ``irb``: 1x1 expand (even for expansion 1), dw kxk, 1x1 project; ReLU; no SE."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float, groups: int, bn_eps: float, drop_path_rate: float):
        super().__init__()
        mid = int(round(in_chs * expansion))
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path_rate = drop_path_rate
        self.body = nn.Sequential(
            nn.Conv2d(in_chs, mid, 1, groups=groups, bias=False),
            nn.BatchNorm2d(mid, eps=bn_eps),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, eps=bn_eps),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, out_chs, 1, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs, eps=bn_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_skip(self.body(x), x)


class FusedIRBD(_Residual):
    """D-family ``fused_irb`` (unused by D1/D2): conv kxk expand, 1x1 project; BN eps 1e-3."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float, groups: int, drop_path_rate: float):
        super().__init__()
        mid = int(round(in_chs * expansion))
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path_rate = drop_path_rate
        self.body = nn.Sequential(
            nn.Conv2d(in_chs, mid, kernel_size, stride, kernel_size // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(mid, eps=1e-3),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, out_chs, 1, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs, eps=1e-3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_skip(self.body(x), x)


# --------------------------------------------------------------------------- tails


class _Tail(nn.Module):
    """A tail whose ``net`` indices are NVIDIA's: only the pool, flatten and classifier swap."""

    pool_index: int
    flatten_index: int
    classifier_index: int
    num_features: int  # channels out of forward_features (unpooled)
    head_hidden_size: int  # width of the pooled pre-logits
    global_pool: str

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh classifier (``0``: none) and, if given, another global pool (``""``: none)."""
        ref = self.net[0].weight
        if global_pool is not None:
            self.net[self.pool_index] = create_pool(global_pool)
            self.net[self.flatten_index] = create_flatten(global_pool)
            self.global_pool = global_pool
        classifier = create_classifier(self.head_hidden_size, num_classes)
        self.net[self.classifier_index] = classifier.to(device=ref.device, dtype=ref.dtype)
        self.net.train(self.training)


class Epilogue(_Tail):
    """Non-D ``tail``: [0 conv1x1, 1 BN, 2 ReLU (always), 3 pool, 4 flatten, 5 dropout, 6 linear]."""

    pool_index = 3
    flatten_index = 4
    classifier_index = 6

    def __init__(self, in_chs: int, out_chs: int, num_classes: int, drop_rate: float,
                 bn_eps: float, global_pool: str = "avg"):
        super().__init__()
        self.num_features = self.head_hidden_size = out_chs
        self.global_pool = global_pool
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs, eps=bn_eps),
            nn.ReLU(inplace=True),
            create_pool(global_pool),
            create_flatten(global_pool),
            nn.Dropout(drop_rate),
            create_classifier(out_chs, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0](x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.net[4](self.net[3](x))
        if pre_logits:
            return x
        return self.net[6](self.net[5](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class EpilogueD(_Tail):
    """D-family ``tail``: [0 conv1x1 -> 1152, 1 BN, 2 ReLU, 3 pool, 4 conv1x1 -> C (no BN),
    5 ReLU, 6 flatten, 7 dropout, 8 linear]; the pooled conv makes C the pre-logits width."""

    pool_index = 3
    flatten_index = 6
    classifier_index = 8
    hidden = 1152

    def __init__(self, in_chs: int, out_chs: int, num_classes: int, drop_rate: float,
                 bn_eps: float, global_pool: str = "avg"):
        super().__init__()
        self.num_features = self.hidden
        self.head_hidden_size = out_chs
        self.global_pool = global_pool
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, self.hidden, 1, bias=False),
            nn.BatchNorm2d(self.hidden, eps=bn_eps),
            nn.ReLU(inplace=False),
            create_pool(global_pool),
            nn.Conv2d(self.hidden, out_chs, 1, bias=False),
            nn.ReLU(inplace=False),
            create_flatten(global_pool),
            nn.Dropout(drop_rate),
            create_classifier(out_chs, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0](x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.net[6](self.net[5](self.net[4](self.net[3](x))))
        if pre_logits:
            return x
        return self.net[8](self.net[7](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class IdentityTail(nn.Module):
    """What ``prune_intermediate_layers`` leaves instead of a tail: features pass through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = self.head_hidden_size = num_features
        self.global_pool = ""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
