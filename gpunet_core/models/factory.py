"""The project's model factory: GPUNets by name or spec, with checkpoints, and what the CLI shows.

:func:`create_model` never imports timm (validation processes must not pay for it);
:func:`create_any_model` falls back to timm for the paper's comparison models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpunet_core.models import checkpoint as ckpt
from gpunet_core.models.blocks import ConvBnAct, Prologue, PrologueLarge
from gpunet_core.models.builder import check_num_classes, head_names
from gpunet_core.models.gpunet import GPUNet, build_model
from gpunet_core.models.layers import SqueezeExcite
from gpunet_core.models.pretrained import find_pretrained, pretrained_cfg_for
from gpunet_core.models.spec import MODEL_INFO, ArchSpec, resolve_spec
from gpunet_core.utils.errors import ModelConfigError

_logger = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names of the shipped GPUNet models, in NVIDIA's README order."""
    return list(MODEL_INFO)


def create_model(name_or_spec: str | Path | dict | list | ArchSpec, *,
                 num_classes: int | None = None, checkpoint: str | Path | None = None,
                 pretrained: bool = False, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, trusted: bool = False, use_ema: bool = True,
                 in_chans: int = 3, global_pool: str = "avg",
                 pretrained_cfg_overlay: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> GPUNet:
    """Create a GPUNet by registered name (see :func:`list_models`) or from a JSON spec.

    ``num_classes`` defaults to the checkpoint's classifier size when ``checkpoint`` is given,
    else to the spec's (1000 for the shipped family). ``checkpoint`` (a path or ``s3://`` URI)
    loads NVIDIA's published files or the project's own; ``pretrained=True`` loads NVIDIA's file
    found by :func:`~gpunet_core.models.pretrained.find_pretrained`. With an explicit
    ``num_classes`` other than the checkpoint's, everything but the classifier is loaded.
    Pickled (non-weights-only) checkpoints load only with ``trusted=True``. Other keyword
    arguments are accepted only as ``None`` (timm's convention for unset options).
    """
    unknown = {k for k, v in kwargs.items() if v is not None}
    if unknown:
        raise TypeError(f"create_model() got unexpected keyword arguments: {sorted(unknown)}")
    arch, name = resolve_spec(name_or_spec)
    if num_classes is not None:
        check_num_classes(num_classes, minimum=1, flag="--num-classes")
    if pretrained:
        if name is None:
            raise ModelConfigError("pretrained=True needs a shipped model name "
                                   f"({', '.join(MODEL_INFO)}); pass checkpoint= for a spec")
        checkpoint = checkpoint or find_pretrained(name, pretrained_cfg_overlay)
    # a shipped model's config is its published one (as timm's); a spec's starts from the spec
    cfg = {**(pretrained_cfg_for(name) if name else {}), **(pretrained_cfg_overlay or {})}
    state_dict = None
    if checkpoint is not None:
        obj = ckpt.read_checkpoint(checkpoint, trusted=trusted)
        state_dict, container = ckpt.extract_state_dict(obj, use_ema=use_ema, source=str(checkpoint))
        if num_classes is None:  # size the classifier like the checkpoint's
            num_classes = ckpt.state_dict_classes(state_dict, head_names(arch)[1])
        if pretrained:
            cfg["file"] = str(checkpoint)
    model = build_model(arch, num_classes=num_classes, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, in_chans=in_chans, global_pool=global_pool,
                        pretrained_cfg=cfg)
    if name:
        model.pretrained_cfg = model.default_cfg = cfg
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
