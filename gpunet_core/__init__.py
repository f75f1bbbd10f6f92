"""gpunet_core: the library behind gpunet-pipeline (models, data, training, export, pipeline).

Importing the package is cheap: its public names load their module (torch, timm) on first use,
so pipeline steps that need neither (dataset prep, reports, launching training) do not pay for
them. Importing :mod:`gpunet_core.model`, or first use of :func:`create_model` and friends,
registers the seven GPUNet models with timm, so ``timm.create_model("gpunet_0")`` works as well;
when timm is already imported, ``import gpunet_core`` registers them at once.
"""

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "ArchSpec": "gpunet_core.spec",
    "load_spec": "gpunet_core.spec",
    "CheckpointError": "gpunet_core.errors",
    "GpunetError": "gpunet_core.errors",
    "SpecError": "gpunet_core.errors",
    "UnknownModelError": "gpunet_core.errors",
    "GPUNet": "gpunet_core.model",
    "build_model": "gpunet_core.model",
    "create_model": "gpunet_core.model",
    "list_models": "gpunet_core.model",
    "load_checkpoint": "gpunet_core.checkpoint",
    "save_checkpoint": "gpunet_core.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """PEP 562: load a public name's module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpunet_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if "timm" in sys.modules:  # timm users get the gpunet_* names registered right away
    importlib.import_module("gpunet_core.model")
