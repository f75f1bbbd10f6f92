"""User-facing errors.

Every error a user can cause (bad spec, unknown model, unreadable checkpoint, bad flag)
is a :class:`GpunetError` whose message says what is wrong, where, and how to fix it.
The CLI prints these without a traceback and exits non-zero.
"""

from __future__ import annotations


class GpunetError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 2


class SpecError(GpunetError, ValueError):
    """A GPUNet JSON architecture spec is malformed or inconsistent."""


class UnknownModelError(GpunetError, ValueError):
    """A model name that is neither registered nor a spec file."""


class ModelConfigError(GpunetError, ValueError):
    """A model argument out of its range (num_classes, drop rates, global_pool, feature indices)."""


class CheckpointError(GpunetError):
    """A checkpoint cannot be read, is untrusted, or does not fit the model."""


class DataError(GpunetError):
    """A dataset source, layout or content problem (missing archive, bad labels, empty class)."""


class StorageError(GpunetError):
    """An object-store (S3) problem: bad URI, missing bucket, denied access, wrong credentials."""


class ExportError(GpunetError):
    """An ONNX/Triton export failed, is corrupt, is not a GPUNet export, or fails its parity check."""


class BenchmarkError(GpunetError):
    """A latency benchmark cannot run (missing backend, GPU, binary) or produced no result."""


class OutputPathError(GpunetError):
    """An output path that cannot be written: its folder is missing, is a file or is not
    writable, or the path is a file where a folder is wanted (or the other way round)."""
