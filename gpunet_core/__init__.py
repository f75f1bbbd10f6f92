"""gpunet_core: the library behind gpunet-pipeline (models, data, training, export, pipeline).

Importing the package is cheap: its public names load their module on first use, so pipeline
steps that need neither torch nor timm (dataset prep, reports, launching training) do not pay
for them. The seven GPUNet models join timm's registry whenever timm is imported, before or
after this package, so ``timm.create_model("gpunet_0")`` works as well as
:func:`create_model`; building a GPUNet does not import timm by itself.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "ArchSpec": "gpunet_core.models.spec",
    "load_spec": "gpunet_core.models.spec",
    "CheckpointError": "gpunet_core.utils.errors",
    "GpunetError": "gpunet_core.utils.errors",
    "SpecError": "gpunet_core.utils.errors",
    "UnknownModelError": "gpunet_core.utils.errors",
    "GPUNet": "gpunet_core.models.gpunet",
    "build_model": "gpunet_core.models.gpunet",
    "create_model": "gpunet_core.models.gpunet",
    "list_models": "gpunet_core.models.gpunet",
    "load_checkpoint": "gpunet_core.models.checkpoint",
    "save_checkpoint": "gpunet_core.models.checkpoint",
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


def _register_with_timm() -> None:
    try:
        importlib.import_module("gpunet_core.models.gpunet").register_with_timm()
    except Exception as exc:  # never break `import timm` over our registration
        import logging

        logging.getLogger(__name__).warning("gpunet_* models not registered with timm: %s", exc)


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Import hook: once timm has been imported (by anyone), register the GPUNet models."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate timm
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            _register_with_timm()

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
