"""Process-level helpers for the command line and the pipeline steps."""

from __future__ import annotations

import atexit
import gc
import os
import time
from pathlib import Path

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


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
