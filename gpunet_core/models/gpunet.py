"""GPUNet as a timm model: the ``nn.Module`` with timm's model API, and its seven entry points.

Module names are NVIDIA's own (``network.stage: 2 layer5.conv_exp.weight``), so NVIDIA's published
checkpoints and the project's own load without key conversion. On top, :class:`GPUNet` has what
timm's models have: ``forward_features``/``forward_head``, ``reset_classifier``, ``feature_info``,
``forward_intermediates``, gradient checkpointing, ``group_matcher``; it scripts and FX-traces.

The entry points (``gpunet_0`` ... ``gpunet_d2``) and :data:`default_cfgs` follow timm's own model
modules; :func:`register_models` adds them to timm's registry (``gpunet_core.models`` arranges that
when timm is imported). They build through timm's ``build_model_with_cfg`` (features_only, cfg
overlays), so they import timm; :func:`build_model` and ``gpunet_core.models.create_model`` do not.

Kept free of ``from __future__ import annotations``: TorchScript reads the annotations.
"""

import dataclasses
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpunet_core.models.blocks import IdentityTail
from gpunet_core.models.builder import (
    build_network,
    check_global_pool,
    check_num_classes,
    feature_stages,
    resolve_args,
)
from gpunet_core.models.checkpoint import load_checkpoint
from gpunet_core.models.layers import feature_take_indices
from gpunet_core.models.pretrained import (
    default_cfg,
    find_pretrained,
    published_metadata,
    spec_cfg,
)
from gpunet_core.models.spec import MODEL_INFO, ArchSpec, load_spec, shipped_spec
from gpunet_core.utils.errors import ModelConfigError

SpecLike = str | Path | dict | list | ArchSpec

__all__ = ["GPUNet", "build_model", "register_models", *MODEL_INFO]


class GPUNet(nn.Module):
    """A GPUNet: one ``nn.Sequential`` called ``network`` whose children carry NVIDIA's names.

    ``network`` is the stem, the blocks and the tail. timm's split: ``forward_features`` runs the
    stem, the blocks and the tail's 1x1 conv-BN-ReLU (``num_features`` channels, unpooled);
    ``forward_head`` the pool (the D family's pooled 1x1 conv-ReLU too: ``head_hidden_size``),
    dropout and classifier. ``feature_info`` lists the last layer at each output stride.
    """

    __jit_unused_properties__ = ["tail", "classifier_name"]  # Python-side helpers only

    def __init__(self, spec: SpecLike, num_classes: int | None = None, in_chans: int = 3,
                 drop_rate: float | None = None, drop_path_rate: float | None = None,
                 global_pool: str = "avg", device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        arch = load_spec(spec)
        args = resolve_args(arch, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                            drop_path_rate=drop_path_rate, global_pool=global_pool)
        with torch.device(device) if device is not None else nullcontext():
            self.network = build_network(arch, **args)
        if dtype is not None:
            self.network.to(dtype=dtype)
        self.spec = arch
        self.img_resolution = arch.img_resolution
        self.num_classes = args["num_classes"]
        self.in_chans = args["in_chans"]
        self.drop_rate = args["drop_rate"]
        self.global_pool = global_pool
        self.num_features = self.tail.num_features
        self.head_hidden_size = self.tail.head_hidden_size
        self.feature_info = feature_stages(arch)
        self.stage_ends = [info["stage"] for info in self.feature_info]
        self.num_blocks = len(self.network) - 1  # stem and blocks: all but the tail
        self.grad_checkpointing = False
        self.pretrained_cfg = spec_cfg(arch, self.in_chans)
        self.default_cfg = self.pretrained_cfg  # timm's older name

    # ------------------------------------------------------------------ naming

    @property
    def tail(self) -> nn.Module:
        return self.network[-1]

    @property
    def classifier_name(self) -> str:
        """State-dict prefix of the final Linear, e.g. ``network. layer15.net.6``."""
        return f"network.{self._names()[-1]}.net.{self.tail.classifier_index}"

    def _names(self) -> list[str]:
        return [name for name, _ in self.network.named_children()]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer decay): stem, each block (or spec stage), head conv."""
        return dict(
            stem=r"^network\.head:",
            blocks=[
                (r"^network\.stage: (\d+) " if coarse else r"^network\.stage: (\d+) [a-z_]+?(\d+)\.",
                 None),
                (r"^network\.(?: layer\d+|tail:)\.net\.[0-5]\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in backward (``torch.utils.checkpoint``) instead of storing it."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ classifier

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.tail.net[self.tail.classifier_index]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none); ``global_pool`` ``""``: no pooling.

        ``pretrained_cfg`` still describes the source weights, as in timm.
        """
        pool = self.global_pool if global_pool is None else global_pool
        check_num_classes(num_classes)
        check_global_pool(pool, num_classes)
        if isinstance(self.tail, IdentityTail):
            if num_classes or pool:
                raise ModelConfigError("the head was pruned (prune_intermediate_layers): "
                                       "reset_classifier accepts only num_classes=0, global_pool=''")
            return
        self.tail.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = pool

    # ------------------------------------------------------------------ forward

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing:
            return checkpoint(layer, x, use_reentrant=False)  # keeps the drop-path RNG state
        return layer(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than via _layer: TorchScript cannot pass a module to a method, and
        # it unrolls this loop over the Sequential (a slice of it would not script).
        for i, layer in enumerate(self.network):
            if i < self.num_blocks:  # the tail contributes only its head conv
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(layer, x, use_reentrant=False)
                else:
                    x = layer(x)
        return self.network[-1].forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify; ``pre_logits`` returns the pooled features the classifier takes."""
        return self.network[-1].forward_head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The ``feature_info`` levels picked by ``indices`` (timm's semantics), and the features.

        ``indices``: None all, an int the last n, a sequence those levels. ``norm`` is accepted
        for the API (a GPUNet has no final norm). Returns the list with ``intermediates_only``,
        else ``(forward_features output, list)``; ``stop_early`` stops after the last level.
        """
        if output_fmt != "NCHW":
            raise ModelConfigError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_layers = {self.stage_ends[i] for i in take}
        if self.stage_ends[max_index] >= self.num_blocks:
            raise ModelConfigError(f"indices: level {max_index} was pruned "
                                   "(prune_intermediate_layers)")
        last = self.stage_ends[max_index] if stop_early or intermediates_only \
            else self.num_blocks - 1
        intermediates = []
        for i, layer in enumerate(self.network):
            if i > last:
                break
            x = self._layer(layer, x)
            if i in take_layers:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if last == self.num_blocks - 1:
            x = self.tail.forward_features(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the layers after the last level picked by ``indices``, and the head unless kept.

        Remaining state-dict keys are unchanged. Returns the absolute indices kept (timm's API).
        """
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        end = self.stage_ends[max_index]
        if end < self.num_blocks - 1 or prune_head:
            names = self._names()
            for name in names[end + 1:]:
                delattr(self.network, name)
            num_chs = self.feature_info[max_index]["num_chs"]
            self.network.add_module(names[-1], IdentityTail(num_chs))
            self.num_blocks = end + 1
            self.num_features = self.head_hidden_size = num_chs
            self.num_classes = 0
            self.global_pool = ""
        return take


def build_model(spec: SpecLike, *, num_classes: int | None = None,
                drop_rate: float | None = None, drop_path_rate: float | None = None,
                in_chans: int = 3, global_pool: str = "avg",
                pretrained_cfg: Mapping[str, Any] | None = None) -> GPUNet:
    """Build a GPUNet from a JSON spec (path, list, ``{"layers": [...]}`` or :class:`ArchSpec`).

    ``num_classes`` defaults to the spec's tail value; ``drop_rate`` to 0.2 (the tail dropout);
    ``drop_path_rate`` to 0.2 for the non-D family (entry ``i`` of ``N`` gets ``rate*i/(N-1)``)
    and 0 for the D family, as in NVIDIA's reference. ``pretrained_cfg`` entries override the
    spec's config. The model is returned in train mode; timm is not imported.
    """
    model = GPUNet(spec, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                   drop_path_rate=drop_path_rate, global_pool=global_pool)
    model.pretrained_cfg.update(pretrained_cfg or {})
    return model


# --------------------------------------------------------------------------- timm entry points

# timm's create_model applies these itself (set_layer_config); GPUNet's layers have no variants.
_LAYER_CONFIG_KWARGS = ("scriptable", "exportable", "no_jit")
_ENTRYPOINTS: list[Callable[..., nn.Module]] = []


def _timm_cfg(cfg: Any) -> Any:
    """A ``pretrained_cfg`` dict as timm takes it: only ``PretrainedCfg`` fields (ours carry more)."""
    if not isinstance(cfg, Mapping):
        return cfg
    from timm.models import PretrainedCfg

    names = {f.name for f in dataclasses.fields(PretrainedCfg)}
    return {k: v for k, v in cfg.items() if k in names}


def _create_gpunet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a shipped GPUNet through timm's ``build_model_with_cfg``.

    Weights load through the project's loader (NVIDIA's containers, NGC zip, ``trusted`` for
    pickled files, ``use_ema``) inside the model constructor, so timm's ``features_only`` wrappers
    get the loaded model; the file is :func:`find_pretrained`'s (``pretrained_cfg_overlay`` or
    ``pretrained_cfg`` ``file`` first).
    """
    from timm.models import build_model_with_cfg

    for key in _LAYER_CONFIG_KWARGS:
        kwargs.pop(key, None)
    trusted = kwargs.pop("trusted", False)
    use_ema = kwargs.pop("use_ema", True)
    pretrained_cfg = _timm_cfg(kwargs.pop("pretrained_cfg", None))
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    feature_cfg = {"flatten_sequential": True, **(kwargs.pop("feature_cfg", None) or {})}
    source = None
    if pretrained:
        explicit = overlay.get("file") or (
            pretrained_cfg.get("file") if isinstance(pretrained_cfg, Mapping)
            else getattr(pretrained_cfg, "file", None))
        source = find_pretrained(variant, {"file": explicit} if explicit else None)
        overlay["file"] = str(source)
    spec = shipped_spec(variant)

    def gpunet(**model_kwargs: Any) -> GPUNet:
        model = GPUNet(spec, **model_kwargs)
        if source is not None:
            load_checkpoint(model, source, trusted=trusted, use_ema=use_ema)
        return model

    model = build_model_with_cfg(gpunet, variant, False, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=overlay, feature_cfg=feature_cfg, **kwargs)
    model.pretrained_cfg.update(published_metadata(variant))
    return model


def _entrypoint(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Collect an entry point for :func:`register_models` (timm's ``@register_model``, deferred)."""
    _ENTRYPOINTS.append(fn)
    return fn


@_entrypoint
def gpunet_0(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-0: NVIDIA's 0.65ms.json, 320 px, 78.9 % top-1."""
    return _create_gpunet("gpunet_0", pretrained, **kwargs)


@_entrypoint
def gpunet_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-1: NVIDIA's 0.85ms.json, 288 px, 80.5 % top-1."""
    return _create_gpunet("gpunet_1", pretrained, **kwargs)


@_entrypoint
def gpunet_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-2: NVIDIA's 1.75ms.json, 384 px, 82.2 % top-1."""
    return _create_gpunet("gpunet_2", pretrained, **kwargs)


@_entrypoint
def gpunet_p0(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-P0: NVIDIA's 0.5ms-D.json, 224 px, 80.3 % top-1 (distilled from tf_efficientnet_b2)."""
    return _create_gpunet("gpunet_p0", pretrained, **kwargs)


@_entrypoint
def gpunet_p1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-P1: NVIDIA's 0.8ms-D.json, 224 px, 81.1 % top-1 (distilled from tf_efficientnet_b2)."""
    return _create_gpunet("gpunet_p1", pretrained, **kwargs)


@_entrypoint
def gpunet_d1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-D1: NVIDIA's 1.25ms-D.json, 456 px, 82.5 % top-1 (tf_efficientnet_b5_ns teacher)."""
    return _create_gpunet("gpunet_d1", pretrained, **kwargs)


@_entrypoint
def gpunet_d2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GPUNet-D2: NVIDIA's 2.25ms-D.json, 528 px, 83.6 % top-1 (tf_efficientnet_b6_ns teacher)."""
    return _create_gpunet("gpunet_d2", pretrained, **kwargs)


_registered = False


def register_models() -> None:
    """Add the seven entry points and :data:`default_cfgs` to timm's registry now (once).

    Imports timm; ``gpunet_core.models.timm_hook.register_with_timm`` calls this as soon as timm
    is loaded, so importing the models package costs no timm import by itself.
    """
    global _registered, default_cfgs
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model

    default_cfgs = generate_default_cfgs({name: default_cfg(name) for name in MODEL_INFO})
    for fn in _ENTRYPOINTS:
        register_model(fn)  # reads this module's default_cfgs, as for timm's own models
    _registered = True


def __getattr__(name: str) -> Any:
    """``default_cfgs`` (timm's ``DefaultCfg`` table) exists once timm is loaded: build it then."""
    if name == "default_cfgs":
        register_models()
        return globals()["default_cfgs"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
