"""gpunet_core: the library behind gpunet-pipeline (models, data, training, export, pipeline).

Importing it registers the seven GPUNet models with timm, so ``timm.create_model("gpunet_0")``
works as well as :func:`create_model`.
"""

from gpunet_core.checkpoint import load_checkpoint, save_checkpoint
from gpunet_core.errors import CheckpointError, GpunetError, SpecError, UnknownModelError
from gpunet_core.model import GPUNet, build_model, create_model, list_models
from gpunet_core.spec import ArchSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "CheckpointError",
    "GPUNet",
    "GpunetError",
    "SpecError",
    "UnknownModelError",
    "build_model",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_spec",
    "save_checkpoint",
]
