"""GPUNet models: the JSON spec, layers and blocks, the builder, checkpoints and timm entry points.

Layout (each concept in one module, imports only pointing down the list):
``spec`` (JSON specs), ``layers``, ``blocks``, ``builder`` (NVIDIA's builder rules),
``pretrained`` (published configs, local weights), ``checkpoint`` (reading and loading),
``gpunet`` (the timm-style ``GPUNet`` and its timm entry points), ``factory`` (``create_model``).

Importing the package is cheap (public names load on first use) and registers the seven models
with timm now if timm is loaded, else right after timm's import: see :mod:`.timm_hook`.
"""

from gpunet_core.models.timm_hook import register_with_timm
from gpunet_core.utils.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

register_with_timm()
