"""Process-level helpers for the command line and the pipeline steps."""

from __future__ import annotations

import atexit
import gc

_fast_exit_registered = False


def fast_exit() -> None:
    """Skip the interpreter's final garbage collection over the torch/timm/MLflow object graph.

    Registers :func:`gc.freeze` at exit (once per process): atexit handlers registered
    earlier (MLflow, torch) still run afterwards, refcounted objects are still released, only
    the cyclic collection over everything alive at that point is skipped, which saves about
    1 s per process that imported torch (``make bench``, pipeline overhead).
    """
    global _fast_exit_registered
    if not _fast_exit_registered:
        atexit.register(gc.freeze)
        _fast_exit_registered = True

