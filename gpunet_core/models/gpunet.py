"""The GPUNet model family: blocks, the JSON-spec builder, and timm-style entry points.

The builder reproduces NVIDIA's reference ``GPUNet_Builder`` exactly (see ARCHITECTURE.md):
module names, parameter shapes, BN eps per family, activations, SE width, the stride-2 fused-block
padding quirk, residual rules and the drop-path schedule. Module names are NVIDIA's own
(``network.stage: 2 layer5.conv_exp.weight``), so NVIDIA's published checkpoints and the project's
own load without key conversion; :mod:`gpunet_core.models.checkpoint` handles containers and prefixes.

Public entry points: :func:`create_model`, :func:`list_models`, :func:`build_model`; the seven
``gpunet_*`` names are also in timm's model registry once timm is imported (building a GPUNet
does not import timm).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpunet_core.models.spec import MODEL_INFO, ArchSpec, load_spec
from gpunet_core.utils.errors import UnknownModelError

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DROP_RATE = 0.2
DEFAULT_DROP_PATH_RATE = 0.2  # non-D family only; the D family has no drop path upstream
BN_EPS = {False: 1e-3, True: 1e-5}  # keyed by ``distill`` (block family)

NGC_VERSION = "21.12.0_amp"


def list_models() -> list[str]:
    """Names of the shipped GPUNet models, in NVIDIA's README order."""
    return list(MODEL_INFO)


def spec_path(name: str) -> Path:
    """Path of the packaged JSON spec of a shipped model."""
    info = _model_info(name)
    return Path(str(resources.files("gpunet_core.models") / "configs" / info["config"]))


def _model_info(name: str) -> dict[str, Any]:
    if name not in MODEL_INFO:
        raise UnknownModelError(
            f"unknown model {name!r}: valid names are {', '.join(MODEL_INFO)} "
            "(or pass the path of a GPUNet JSON spec)")
    return MODEL_INFO[name]


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _act(name: str, inplace: bool = True) -> nn.Module:
    return nn.SiLU(inplace=inplace) if name == "swish" else nn.ReLU(inplace=inplace)


def _symmetric_pad(kernel_size: int, stride: int) -> int:
    return ((stride - 1) + (kernel_size - 1)) // 2


# --------------------------------------------------------------------------- non-D family blocks


class Prologue(nn.Module):
    """Stem: conv3x3 stride 2, BN, activation (``head``)."""

    def __init__(self, in_chs: int, out_chs: int, act: str, bn_eps: float, inplace: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, 2, 1, bias=False),
            nn.BatchNorm2d(out_chs, eps=bn_eps),
            _act(act, inplace),
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


class ConvBnAct(nn.Module):
    """``conv`` layer: conv, BN, act. Never residual, whatever its shape."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, act: str,
                 bn_eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride,
                              _symmetric_pad(kernel_size, stride), bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act1 = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class SqueezeExcite(nn.Module):
    """timm's SE: mean over H,W, 1x1 reduce (bias), act, 1x1 expand (bias), sigmoid gate."""

    def __init__(self, chs: int, rd_chs: int, act: str):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1, bias=True)
        self.act1 = _act(act)
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * s.sigmoid()


def _se_width(mid: int, expansion: float) -> int:
    # timm passes rd_ratio = se_ratio / exp_ratio to the SE of the expanded width.
    return round(mid * (0.25 / expansion))


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's ``drop_path``: same draws, same scaling)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


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
        self.act1 = _act(act)
        self.conv_dw = nn.Conv2d(mid, mid, kernel_size, stride, _symmetric_pad(kernel_size, stride),
                                 groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.act2 = _act(act)
        self.se = SqueezeExcite(mid, _se_width(mid, expansion), act) if use_se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return self._add_skip(out, x)


class EdgeResidual(_Residual):
    """``fused_irb`` of the non-D family (timm FusedMBConv).

    Quirk reproduced: upstream asks for "same" padding, which is static only for stride 1; for
    stride 2 it builds a plain conv with padding 0 and never pads (GPUNet-0: 160 -> 79 -> 39).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float, act: str, use_se: bool, bn_eps: float, drop_path_rate: float):
        super().__init__()
        mid = make_divisible(in_chs * expansion)
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path_rate = drop_path_rate
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        self.conv_exp = nn.Conv2d(in_chs, mid, kernel_size, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.act1 = _act(act)
        self.se = SqueezeExcite(mid, _se_width(mid, expansion), act) if use_se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.act1(self.bn1(self.conv_exp(x))))
        out = self.bn2(self.conv_pwl(out))
        return self._add_skip(out, x)


class Epilogue(nn.Module):
    """Non-D ``tail``: conv1x1, BN, ReLU (always), pool, flatten, dropout, linear."""

    classifier_index = 6

    def __init__(self, in_chs: int, out_chs: int, num_classes: int, drop_rate: float,
                 bn_eps: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs, eps=bn_eps),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(drop_rate),
            nn.Linear(out_chs, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


class EpilogueD(nn.Module):
    """D-family ``tail``: conv1x1 -> 1152, BN, ReLU, pool, conv1x1 -> C (no BN), ReLU, linear."""

    classifier_index = 8
    hidden = 1152

    def __init__(self, in_chs: int, out_chs: int, num_classes: int, drop_rate: float,
                 bn_eps: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, self.hidden, 1, bias=False),
            nn.BatchNorm2d(self.hidden, eps=bn_eps),
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(self.hidden, out_chs, 1, bias=False),
            nn.ReLU(inplace=False),
            nn.Flatten(),
            nn.Dropout(drop_rate),
            nn.Linear(out_chs, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- the network


class GPUNet(nn.Module):
    """A GPUNet: one ``nn.Sequential`` called ``network`` whose children carry NVIDIA's names."""

    def __init__(self, network: nn.Sequential, spec: ArchSpec, num_classes: int,
                 pretrained_cfg: dict[str, Any]):
        super().__init__()
        self.network = network
        self.spec = spec
        self.num_classes = num_classes
        self.img_resolution = spec.img_resolution
        self.pretrained_cfg = pretrained_cfg
        self.default_cfg = pretrained_cfg  # timm's older name
        self.num_features = self.tail.net[self.tail.classifier_index].in_features

    @property
    def tail(self) -> nn.Module:
        return self.network[-1]

    @property
    def classifier_name(self) -> str:
        """State-dict prefix of the final Linear, e.g. ``network. layer15.net.6``."""
        return f"network.{self._names()[-1]}.net.{self.tail.classifier_index}"

    def _names(self) -> list[str]:
        return [name for name, _ in self.network.named_children()]

    def get_classifier(self) -> nn.Linear:
        return self.tail.net[self.tail.classifier_index]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh Linear for ``num_classes`` outputs."""
        old = self.get_classifier()
        self.tail.net[self.tail.classifier_index] = nn.Linear(old.in_features, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network[:-1](x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def _build_layer(entry: dict[str, Any], distill: bool, drop_path_rate: float, drop_rate: float,
                 num_classes: int, in_chans: int) -> nn.Module:
    kind = entry["layer_type"]
    eps = BN_EPS[distill]
    cin, cout = entry["num_in_channels"], entry["num_out_channels"]
    if kind in ("head", "head_large"):
        cin = in_chans
        if kind == "head_large":
            return PrologueLarge(cin, cout, eps)
        if distill:
            return Prologue(cin, cout, "relu", eps, inplace=False)
        return Prologue(cin, cout, entry.get("act", "swish"), eps)
    if kind == "tail":
        tail_cls = EpilogueD if distill else Epilogue
        return tail_cls(cin, cout, num_classes, drop_rate, eps)
    k, s = entry["kernel_size"], entry["stride"]
    if distill:
        groups = entry.get("groups", 1)
        if kind == "irb":
            return InvertedResidualD(cin, cout, k, s, entry["expansion"], groups, eps,
                                     drop_path_rate)
        return FusedIRBD(cin, cout, k, s, entry["expansion"], groups, drop_path_rate)
    if kind == "conv":
        return ConvBnAct(cin, cout, k, s, entry["act"], eps)
    block_cls = InvertedResidual if kind == "irb" else EdgeResidual
    return block_cls(cin, cout, k, s, entry["expansion"], entry["act"], entry["use_se"], eps,
                     drop_path_rate)


def _child_name(entry: dict[str, Any], position: int, distill: bool) -> str:
    """NVIDIA's child name; ``position`` is 1-based, counting the ``data`` entry as 1."""
    kind = entry["layer_type"]
    if distill:
        if kind in ("head", "head_large"):
            return "head:"
        if kind == "tail":
            return "tail:"
        return f"stage: {entry['stage']} {kind}{position}"
    if kind == "head":
        return f"head: {position}"
    if kind == "tail":
        return f" layer{position}"
    return f"stage: {entry['stage']} layer{position}"


def build_model(spec: str | Path | dict | list | ArchSpec, *, num_classes: int | None = None,
                drop_rate: float | None = None, drop_path_rate: float | None = None,
                in_chans: int = 3, pretrained_cfg: dict[str, Any] | None = None) -> GPUNet:
    """Build a GPUNet from a JSON spec (path, list, ``{"layers": [...]}`` or :class:`ArchSpec`).

    ``num_classes`` defaults to the spec's tail value; ``drop_rate`` to 0.2 (the tail dropout);
    ``drop_path_rate`` to 0.2 for the non-D family (entry ``i`` of ``N`` gets ``rate*i/(N-1)``)
    and 0 for the D family, as in NVIDIA's reference. The model is returned in train mode.
    """
    arch = load_spec(spec)
    distill = arch.distill
    num_classes = arch.num_classes if num_classes is None else int(num_classes)
    drop_rate = DEFAULT_DROP_RATE if drop_rate is None else float(drop_rate)
    if drop_path_rate is None:
        drop_path_rate = 0.0 if distill else DEFAULT_DROP_PATH_RATE
    _check_rate("drop_rate", drop_rate)
    _check_rate("drop_path_rate", drop_path_rate)
    if num_classes < 1:
        raise UnknownModelError(f"num_classes (--num-classes) must be >= 1, got {num_classes}")

    network = nn.Sequential()
    last = len(arch.layers) - 1
    for index, entry in enumerate(arch.layers):
        if entry["layer_type"] == "data":
            continue
        layer = _build_layer(entry, distill, drop_path_rate * index / last, drop_rate,
                             num_classes, in_chans)
        network.add_module(_child_name(entry, index + 1, distill), layer)

    cfg = {
        "architecture": "custom",
        "num_classes": num_classes,
        "input_size": (in_chans, arch.img_resolution, arch.img_resolution),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "spec_source": arch.source,
    }
    cfg.update(pretrained_cfg or {})
    model = GPUNet(network, arch, num_classes, cfg)
    model.pretrained_cfg["first_conv"] = f"network.{model._names()[0]}.net.0"
    model.pretrained_cfg["classifier"] = model.classifier_name
    return model


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UnknownModelError(f"{name} must be in [0, 1), got {value}")


def pretrained_cfg_for(name: str) -> dict[str, Any]:
    """timm-style pretrained config of a shipped model (no download URL: NGC needs a login)."""
    info = _model_info(name)
    latency = info["config"].removesuffix(".json")
    return {
        "architecture": name,
        "crop_pct": info["crop_pct"],
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": 1000,
        "ngc_model": f"nvidia/dle/{name}_pyt_ckpt",
        "ngc_version": NGC_VERSION,
        "checkpoint_file": f"{latency}.pth.tar",
        "teacher": info["teacher"],
        "published_top1": info["top1"],
        "published_latency_ms": {"a100_trt_fp16": info["latency_ms_a100"],
                                 "v100_trt_fp16": info["latency_ms_v100"]},
        "spec_file": info["config"],
    }


def load_model_spec(name_or_spec: str | Path | dict | list | ArchSpec) -> tuple[ArchSpec, str | None]:
    """Resolve a model name or spec to ``(ArchSpec, registered name or None)``."""
    if isinstance(name_or_spec, str) and name_or_spec in MODEL_INFO:
        return load_spec(spec_path(name_or_spec)), name_or_spec
    if isinstance(name_or_spec, (str, Path)):
        text = str(name_or_spec)
        if not (text.endswith(".json") or Path(text).exists()):
            _model_info(text)  # raises the "unknown model" error listing valid names
    return load_spec(name_or_spec), None


def create_model(name_or_spec: str | Path | dict | list | ArchSpec, *,
                 num_classes: int | None = None, checkpoint: str | Path | None = None,
                 drop_rate: float | None = None, drop_path_rate: float | None = None,
                 trusted: bool = False, use_ema: bool = True, in_chans: int = 3,
                 pretrained_cfg_overlay: dict[str, Any] | None = None, **kwargs: Any) -> GPUNet:
    """Create a GPUNet by registered name (see :func:`list_models`) or from a JSON spec.

    ``num_classes`` defaults to the checkpoint's classifier size when ``checkpoint`` is given,
    else to the spec's (1000 for the shipped family). ``checkpoint`` (a path or ``s3://`` URI)
    loads NVIDIA's published files or the project's own; with an explicit ``num_classes`` other
    than the checkpoint's, everything but the classifier is loaded.
    Pickled (non-weights-only) checkpoints load only with ``trusted=True``.
    """
    unknown = {k for k, v in kwargs.items() if v is not None}
    if unknown:
        raise TypeError(f"create_model() got unexpected keyword arguments: {sorted(unknown)}")
    arch, name = load_model_spec(name_or_spec)
    cfg = pretrained_cfg_for(name) if name else {}
    cfg.update(pretrained_cfg_overlay or {})
    state_dict = None
    if checkpoint is not None:
        from gpunet_core.models import checkpoint as ckpt

        obj = ckpt.read_checkpoint(checkpoint, trusted=trusted)
        state_dict, container = ckpt.extract_state_dict(obj, use_ema=use_ema, source=str(checkpoint))
        if num_classes is None:  # size the classifier like the checkpoint's
            with torch.device("meta"):
                probe = build_model(arch)
            num_classes = ckpt.state_dict_classes(state_dict, probe)
    model = build_model(arch, num_classes=num_classes, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, in_chans=in_chans, pretrained_cfg=cfg)
    if state_dict is not None:
        ckpt.load_state_dict_strict(model, state_dict, source=str(checkpoint))
        _logger.info("loaded %s%s into %s (%d classes)", checkpoint,
                     f" [{container}]" if container else "", name or arch.source,
                     model.num_classes)
    return model


def create_any_model(name_or_spec: str | Path | dict | list | ArchSpec, *,
                     num_classes: int | None = None, drop_rate: float | None = None,
                     drop_path_rate: float | None = None) -> nn.Module:
    """A GPUNet (name or spec, see :func:`create_model`), else timm's model of that name.

    The timm fallback (random weights) lets ``gpunet train`` and ``make bench`` run the
    GPUNet paper's comparison models, e.g. ``efficientnet_b0``, under the same recipe.
    """
    if isinstance(name_or_spec, str) and name_or_spec not in MODEL_INFO \
            and not name_or_spec.endswith(".json") and not Path(name_or_spec).exists():
        import timm

        if timm.is_model(name_or_spec):
            kwargs = {k: v for k, v in (("drop_rate", drop_rate),
                                        ("drop_path_rate", drop_path_rate)) if v is not None}
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            return timm.create_model(name_or_spec, pretrained=False, **kwargs)
    return create_model(name_or_spec, num_classes=num_classes, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(name: str) -> dict[str, Any]:
    """The facts ``gpunet models`` shows for one shipped model (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name)
    info = MODEL_INFO[name]
    return {
        "name": name,
        "display_name": info["display"],
        "family": "D" if model.spec.distill else "non-D",
        "params": count_parameters(model),
        "input_size": list(model.pretrained_cfg["input_size"]),
        "crop_pct": info["crop_pct"],
        "interpolation": "bicubic",
        "published_top1": info["top1"],
        "published_latency_ms_a100_trt_fp16": info["latency_ms_a100"],
        "published_latency_ms_v100_trt_fp16": info["latency_ms_v100"],
        "teacher": info["teacher"],
        "spec_file": info["config"],
    }


# --------------------------------------------------------------------------- timm registration

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "cache_dir", "features_only", "scriptable", "exportable",
                     "no_jit")


def _timm_entry(name: str) -> Callable[..., GPUNet]:
    def entry(pretrained: bool = False, **kwargs: Any) -> GPUNet:
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            from gpunet_core.models.checkpoint import find_pretrained

            kwargs.setdefault("checkpoint", find_pretrained(name, kwargs.get("pretrained_cfg_overlay")))
        return create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"{MODEL_INFO[name]['display']} from NVIDIA's {MODEL_INFO[name]['config']}."
    return entry


for _name in MODEL_INFO:
    globals()[_name] = _timm_entry(_name)

_registered_with_timm = False


def register_with_timm() -> None:
    """Add the seven ``gpunet_*`` entry points to timm's model registry (once).

    ``gpunet_core/__init__`` calls it when timm is already loaded, and otherwise from an import
    hook right after timm's own import, so building a GPUNet never imports timm (and
    torchvision, ~3 s) by itself.
    """
    global _registered_with_timm
    if _registered_with_timm:
        return
    from timm.models import register_model

    for name in MODEL_INFO:
        register_model(globals()[name])
    _registered_with_timm = True



def spec_json(name: str) -> list[dict[str, Any]]:
    """The raw JSON spec of a shipped model (a copy you may edit and pass to create_model)."""
    return json.loads(spec_path(name).read_text())


def describe_layers(model: GPUNet) -> list[dict[str, Any]]:
    """One row per network child (like NVIDIA's block tables): widths, kernel, stride, residual."""
    rows = []
    for name, module in model.network.named_children():
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        spatial = [c for c in convs if c.kernel_size != (1, 1)] or convs
        main = spatial[0] if isinstance(module, (Prologue, PrologueLarge, ConvBnAct)) else spatial[-1]
        se = getattr(module, "se", None)
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "in": convs[0].in_channels,
            "out": convs[-1].out_channels if not hasattr(module, "classifier_index")
            else module.net[module.classifier_index].out_features,
            "kernel": main.kernel_size[0],
            "stride": main.stride[0],
            "padding": main.padding[0],
            "se": se.conv_reduce.out_channels if isinstance(se, SqueezeExcite) else None,
            "residual": bool(getattr(module, "has_skip", False)),
            "drop_path": round(float(getattr(module, "drop_path_rate", 0.0)), 4),
            "params": sum(p.numel() for p in module.parameters()),
        })
    return rows
