"""The JSON-spec builder: NVIDIA's ``GPUNet_Builder`` rules, and the geometry a spec implies.

:func:`build_network` reproduces the reference exactly (see ARCHITECTURE.md): module names, BN eps
per family, activations, SE width, the stride-2 fused-block padding quirk, residual rules and the
drop-path schedule. The geometry helpers (:func:`feature_stages`, :func:`feature_map_size`,
:func:`head_names`) read the same rules off the spec, so configs and checkpoint checks need no model.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

from torch import nn

from gpunet_core.models.blocks import (
    ConvBnAct,
    EdgeResidual,
    Epilogue,
    EpilogueD,
    FusedIRBD,
    InvertedResidual,
    InvertedResidualD,
    Prologue,
    PrologueLarge,
)
from gpunet_core.models.layers import POOL_TYPES, fused_pad, symmetric_pad
from gpunet_core.models.spec import ArchSpec
from gpunet_core.utils.errors import ModelConfigError

DEFAULT_DROP_RATE = 0.2
DEFAULT_DROP_PATH_RATE = 0.2  # non-D family only; the D family has no drop path upstream
BN_EPS = {False: 1e-3, True: 1e-5}  # keyed by ``distill`` (block family)


def resolve_args(arch: ArchSpec, *, num_classes: int | None = None, in_chans: int = 3,
                 drop_rate: float | None = None, drop_path_rate: float | None = None,
                 global_pool: str = "avg") -> dict[str, Any]:
    """Fill NVIDIA's defaults and check ranges; raises :class:`ModelConfigError` naming the argument.

    ``num_classes`` defaults to the spec's tail (0: no classifier, timm's convention);
    ``drop_rate`` to 0.2; ``drop_path_rate`` to 0.2 for the non-D family, 0 for the D family.
    """
    num_classes = arch.num_classes if num_classes is None else num_classes
    drop_rate = DEFAULT_DROP_RATE if drop_rate is None else drop_rate
    if drop_path_rate is None:
        drop_path_rate = 0.0 if arch.distill else DEFAULT_DROP_PATH_RATE
    check_num_classes(num_classes)
    if not _is_int(in_chans) or in_chans < 1:
        raise ModelConfigError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
            raise ModelConfigError(f"{name} must be in [0, 1), got {value!r}")
    check_global_pool(global_pool, num_classes)
    return dict(num_classes=int(num_classes), in_chans=int(in_chans), drop_rate=float(drop_rate),
                drop_path_rate=float(drop_path_rate), global_pool=global_pool)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_num_classes(num_classes: int, minimum: int = 0, flag: str = "") -> None:
    """``num_classes`` must be an integer ``>= minimum`` (0 allowed by default: no classifier)."""
    name = f"num_classes{f' ({flag})' if flag else ''}"
    if not _is_int(num_classes):
        raise ModelConfigError(f"{name} must be an integer, got {num_classes!r}")
    if num_classes < minimum:
        hint = " (0: no classifier)" if minimum == 0 else ""
        raise ModelConfigError(f"{name} must be >= {minimum}{hint}, got {num_classes}")


def check_global_pool(global_pool: str, num_classes: int) -> None:
    """A known pool; no pool (``""``) only without a classifier, which needs pooled features."""
    if global_pool not in POOL_TYPES:
        raise ModelConfigError(f"global_pool must be one of {', '.join(map(repr, POOL_TYPES))}, "
                               f"got {global_pool!r}")
    if global_pool == "" and num_classes:
        raise ModelConfigError(f"global_pool='' (no pooling) needs num_classes=0, got "
                               f"{num_classes}: the classifier takes pooled features")


def child_name(entry: dict[str, Any], position: int, distill: bool) -> str:
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


def child_names(arch: ArchSpec) -> list[str]:
    """Names of the network's children (stem, blocks, tail), in order."""
    return [child_name(e, i + 1, arch.distill) for i, e in enumerate(arch.layers)
            if e["layer_type"] != "data"]


def head_names(arch: ArchSpec) -> tuple[str, str]:
    """State-dict prefixes of the first conv and of the classifier (timm's cfg keys)."""
    names = child_names(arch)
    tail_cls = EpilogueD if arch.distill else Epilogue
    return f"network.{names[0]}.net.0", f"network.{names[-1]}.net.{tail_cls.classifier_index}"


def _build_layer(entry: dict[str, Any], distill: bool, drop_path_rate: float, drop_rate: float,
                 num_classes: int, in_chans: int, global_pool: str) -> nn.Module:
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
        return tail_cls(cin, cout, num_classes, drop_rate, eps, global_pool)
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


def build_network(arch: ArchSpec, **kwargs: Any) -> nn.Sequential:
    """NVIDIA's ``network`` Sequential for ``arch`` (arguments as :func:`resolve_args`).

    Entry ``i`` of ``N`` (0-based, counting ``data``) gets drop path ``rate * i / (N - 1)``.
    Built in train mode, with PyTorch's default init (the reference has none).
    """
    args = resolve_args(arch, **kwargs)
    network = nn.Sequential()
    last = len(arch.layers) - 1
    for index, entry in enumerate(arch.layers):
        if entry["layer_type"] == "data":
            continue
        layer = _build_layer(entry, arch.distill, args["drop_path_rate"] * index / last,
                             args["drop_rate"], args["num_classes"], args["in_chans"],
                             args["global_pool"])
        network.add_module(child_name(entry, index + 1, arch.distill), layer)
    return network


# --------------------------------------------------------------------------- geometry


def _convs(entry: dict[str, Any], distill: bool) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of the convs on a layer's main path that change its size."""
    kind = entry["layer_type"]
    if kind == "head":
        return [(3, 2, 1)]
    if kind == "head_large":
        return [(3, 2, 1), (3, 1, 1), (3, 1, 1)]
    if kind == "tail":
        return []
    k, s = entry["kernel_size"], entry["stride"]
    if distill:
        return [(k, s, k // 2)]
    return [(k, s, fused_pad(k, s) if kind == "fused_irb" else symmetric_pad(k, s))]


def _out(size: int, convs: list[tuple[int, int, int]]) -> int:
    for k, s, p in convs:
        size = (size + 2 * p - k) // s + 1
    return size


def feature_stages(arch: ArchSpec) -> list[dict[str, Any]]:
    """timm ``feature_info``: the last layer at each output stride (stem included).

    Each entry has ``num_chs``, ``reduction`` (nominal output stride), ``module`` (its name in the
    model) and ``stage`` (its position in ``network``, as timm's EfficientNet). GPUNet-0: reductions 2, 4, 8, 16, 32;
    P0/P1 have a sixth level at 64.
    """
    names = child_names(arch)
    layers = [e for e in arch.layers if e["layer_type"] != "data"][:-1]  # stem and blocks
    stages, reduction = [], 1
    for i, entry in enumerate(layers):
        reduction *= 2 if entry["layer_type"] in ("head", "head_large") else entry["stride"]
        last = i == len(layers) - 1
        if last or layers[i + 1].get("stride", 1) == 2:
            stages.append(dict(num_chs=entry["num_out_channels"], reduction=reduction,
                               module=f"network.{names[i]}", stage=i))
    return stages


def feature_map_size(arch: ArchSpec, img_size: int, upto: int | None = None) -> int:
    """Side of the feature map after network child ``upto`` (default: all but the tail).

    Follows the real paddings, e.g. GPUNet-0 at 320 px ends at 10, 160 -> 79 on the way.
    """
    layers = [e for e in arch.layers if e["layer_type"] != "data"]
    upto = len(layers) - 1 if upto is None else upto
    size = img_size
    for entry in layers[:upto + 1]:
        size = _out(size, _convs(entry, arch.distill))
    return size
