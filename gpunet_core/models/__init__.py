"""GPUNet models: the JSON spec, layers and blocks, the builder, checkpoints and timm entry points.

Layout (each concept in one module, imports only pointing down the list):
``spec`` (JSON specs), ``layers``, ``blocks``, ``builder`` (NVIDIA's builder rules),
``pretrained`` (published configs, local weights), ``checkpoint`` (reading and loading),
``gpunet`` (the timm-style ``GPUNet`` and its timm entry points), ``factory`` (``create_model``).

Importing the package is cheap (public names load on first use) and registers the seven models
with timm now if timm is loaded, else right after timm's import: see :mod:`.timm_hook`.
"""

import importlib

from gpunet_core.models.timm_hook import register_with_timm

_EXPORTS = {
    "ArchSpec": "gpunet_core.models.spec",
    "MODEL_INFO": "gpunet_core.models.spec",
    "load_spec": "gpunet_core.models.spec",
    "spec_json": "gpunet_core.models.spec",
    "spec_path": "gpunet_core.models.spec",
    "GPUNet": "gpunet_core.models.gpunet",
    "build_model": "gpunet_core.models.gpunet",
    "create_model": "gpunet_core.models.factory",
    "create_any_model": "gpunet_core.models.factory",
    "list_models": "gpunet_core.models.factory",
    "count_parameters": "gpunet_core.models.factory",
    "model_summary": "gpunet_core.models.factory",
    "describe_layers": "gpunet_core.models.factory",
    "load_checkpoint": "gpunet_core.models.checkpoint",
    "save_checkpoint": "gpunet_core.models.checkpoint",
    "read_checkpoint": "gpunet_core.models.checkpoint",
    "find_pretrained": "gpunet_core.models.pretrained",
    "pretrained_cfg_for": "gpunet_core.models.pretrained",
    **{name: "gpunet_core.models.gpunet" for name in (
        "gpunet_0", "gpunet_1", "gpunet_2", "gpunet_p0", "gpunet_p1", "gpunet_d1", "gpunet_d2")},
}

__all__ = sorted([*_EXPORTS, "register_with_timm"])


def __getattr__(name: str):
    """PEP 562: load a public name's module on first access (torch only when a model is needed)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpunet_core.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


register_with_timm()
