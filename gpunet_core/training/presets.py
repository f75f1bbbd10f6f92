"""Training presets: NVIDIA's ``train_params/GPUNet-*.train.params`` files, parsed as data.

Each file is the ``./train.sh 8 /root/data/imagenet/ --flag value ...`` command NVIDIA used to
train one model. :func:`load_preset` turns it into ``{flag: value}`` with argparse-style keys
(``--decay-epochs`` -> ``decay_epochs``), typed, ready for ``ArgumentParser.set_defaults``.
"""

from __future__ import annotations

import shlex
from importlib import resources
from typing import Any

from gpunet_core.utils.errors import GpunetError

PRESETS = {
    "gpunet_0": "GPUNet-0.train.params",
    "gpunet_1": "GPUNet-1.train.params",
    "gpunet_2": "GPUNet-2.train.params",
    "gpunet_p0": "GPUNet-P0.train.params",
    "gpunet_p1": "GPUNet-P1.train.params",
    "gpunet_d1": "GPUNet-D1.train.params",
    "gpunet_d2": "GPUNet-D2.train.params",
}
# Flags that take no value (store_true) in the training CLI.
_SWITCHES = {"model_ema", "amp"}
# Flags whose value is the string True/False in NVIDIA's files.
_BOOL_VALUES = {"enable_distill", "test_teacher"}
_SHORT = {"b": "batch_size", "j": "workers"}
_STRINGS = {"model", "sched", "opt", "aa", "remode", "teacher"}


def _typed(key: str, raw: str) -> Any:
    if key in _BOOL_VALUES:
        if raw not in ("True", "False"):
            raise GpunetError(f"preset flag --{key.replace('_', '-')}: expected True/False, got {raw!r}")
        return raw == "True"
    if key in _STRINGS:
        return raw
    try:
        return int(raw)
    except ValueError:
        return float(raw)


def parse_params(text: str, source: str = "<params>") -> dict[str, Any]:
    """Parse a ``train.sh`` command line into ``{dest: value}``."""
    tokens = shlex.split(text.replace("\\\n", " "))
    if tokens[:1] == ["./train.sh"]:
        tokens = tokens[3:]  # ./train.sh <num gpus> <data dir>
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-"):
            raise GpunetError(f"{source}: unexpected token {tok!r} (expected a --flag)")
        key = tok.lstrip("-").replace("-", "_")
        key = _SHORT.get(key, key)
        if key in _SWITCHES:
            out[key] = True
            i += 1
            continue
        if i + 1 >= len(tokens):
            raise GpunetError(f"{source}: flag {tok} has no value")
        out[key] = _typed(key, tokens[i + 1])
        i += 2
    return out


def load_preset(name: str) -> dict[str, Any]:
    """NVIDIA's hyper-parameters for ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise GpunetError(f"unknown preset {name!r}: valid presets are {', '.join(PRESETS)}")
    path = resources.files("gpunet_core.training") / "train_params" / PRESETS[name]
    return parse_params(path.read_text(), source=PRESETS[name])
