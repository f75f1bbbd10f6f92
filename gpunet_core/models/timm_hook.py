"""Registering the GPUNets with timm whenever timm is imported, without importing it ourselves.

timm costs about 2 s to import, and validation processes import neither timm nor torchvision
(tests/test_startup.py), so :func:`register_with_timm` registers at once only when timm is loaded
already, and otherwise right after timm's own import, through a ``sys.meta_path`` finder.

The finder survives ``importlib.util.find_spec("timm")`` probes: a probe asks the finders for a
spec but never executes it, so the finder wraps each spec's ``exec_module`` and only leaves
``sys.meta_path`` once timm has really been executed. Standard library only: importing this
module costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

_logger = logging.getLogger(__name__)
_lock = threading.Lock()


def _register_now() -> None:
    try:
        importlib.import_module("gpunet_core.models.gpunet").register_models()
    except Exception as exc:  # never break `import timm` over our registration
        _logger.warning("gpunet_* models not registered with timm: %s", exc)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders and registers the models once timm has executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _remove_finder()
            _register_now()

        loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


def _remove_finder() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimm)]


def register_with_timm() -> None:
    """Register the seven ``gpunet_*`` models with timm now if it is loaded, else once it is."""
    if sys.modules.get("timm") is not None:  # None: an import blocked on purpose
        _remove_finder()
        _register_now()
        return
    with _lock:
        if not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterTimm())
