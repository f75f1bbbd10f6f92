"""Process-level helpers for the command line and the pipeline steps."""

from __future__ import annotations

import atexit
import gc
import os
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
    """Seconds since this process started (Linux /proc, 10 ms resolution), None elsewhere.

    Both ends are measured from boot (``/proc/uptime``), not from the wall clock: the boot time
    in ``/proc/stat`` is rounded to the second, which would add up to 1 s per step.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
