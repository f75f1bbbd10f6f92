"""gpunet_core: the library behind gpunet-pipeline (models, data, training, export, pipeline).

Importing the package is cheap: its public names load their module on first use, so pipeline
steps that need neither torch nor timm (dataset prep, reports, launching training) do not pay
for them. Importing :mod:`gpunet_core.models` (done here) registers the seven GPUNet models with
timm whenever timm is imported, before or after this package, so ``timm.create_model("gpunet_0")``
works as well as :func:`create_model`; building a GPUNet does not import timm by itself.
"""

import gpunet_core.models  # noqa: F401  (registers gpunet_* with timm, now or on timm's import)
from gpunet_core.utils.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ArchSpec": "gpunet_core.models.spec",
    "load_spec": "gpunet_core.models.spec",
    "CheckpointError": "gpunet_core.utils.errors",
    "GpunetError": "gpunet_core.utils.errors",
    "ModelConfigError": "gpunet_core.utils.errors",
    "SpecError": "gpunet_core.utils.errors",
    "UnknownModelError": "gpunet_core.utils.errors",
    "GPUNet": "gpunet_core.models.gpunet",
    "build_model": "gpunet_core.models.gpunet",
    "create_model": "gpunet_core.models.factory",
    "list_models": "gpunet_core.models.factory",
    "load_checkpoint": "gpunet_core.models.checkpoint",
    "save_checkpoint": "gpunet_core.models.checkpoint",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
