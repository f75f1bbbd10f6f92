"""Reading, filtering, loading and saving GPUNet checkpoints.

Handles NVIDIA's published files (a timm training-script dict with ``state_dict_ema`` or a plain
state dict for P0/P1, optionally still inside NGC's zip) and the project's own checkpoints:

* safe by default: ``torch.load(weights_only=True)``; files holding pickled Python objects
  (e.g. argparse ``args``) need ``trusted=True`` (CLI ``--trust-checkpoint``);
* container keys are searched like timm's ``load_checkpoint(use_ema=True)``:
  ``state_dict_ema`` > ``model_ema`` > ``state_dict`` > ``model`` > the file itself;
* ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped;
* a 3-channel first conv is adapted to a model with other ``in_chans`` (timm's rule);
* loading is strict; a mismatch reports counts and the first keys of each kind, and which
  shipped model the file does fit, if any.

Only the spec and the builder sit below this module: the model class and the factories load
through it, never the other way round.
"""

from __future__ import annotations

import io
import logging
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpunet_core.models.builder import build_network, head_names
from gpunet_core.models.spec import MODEL_INFO, shipped_spec
from gpunet_core.utils.errors import CheckpointError
from gpunet_core.utils.files import atomic_write
from gpunet_core.utils.storage import (
    check_bucket,
    default_cache_dir,
    fetch_file,
    is_s3_uri,
    parse_s3_uri,
)

_logger = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    source: str
    container_key: str | None
    loaded: int
    skipped: list[str] = field(default_factory=list)


def _open_ngc_zip(path: Path) -> io.BytesIO | None:
    """If ``path`` is NGC's download archive (a zip holding ``<latency>.pth.tar``), read the member."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return None  # torch's own zip serialization format
        members = [n for n in names if n.endswith((".pth.tar", ".pth", ".pt"))]
        if len(members) != 1:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is a zip archive with {len(members)} checkpoint "
                f"files ({', '.join(members) or 'none'}); unzip it and pass one .pth.tar file")
        return io.BytesIO(zf.read(members[0]))


def read_checkpoint(path: str | Path, *, trusted: bool = False) -> Any:
    """``torch.load`` a checkpoint (path or ``s3://`` URI) onto the CPU, weights-only unless ``trusted``."""
    if not is_s3_uri(path):
        return _load(Path(path), trusted, Path(path))
    # a private copy per call: torchrun's local ranks fetching one URI into a shared cache file
    # would delete each other's copy mid-read
    check_bucket(parse_s3_uri(str(path)))  # a wrong bucket/endpoint leaves no cache folder
    cache = default_cache_dir() / "files"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".checkpoint-", dir=cache) as tmp:
        return _load(fetch_file(path, tmp), trusted, path)


def _load(path: Path, trusted: bool, name: str | Path) -> Any:
    """:func:`read_checkpoint` of a local file; messages name ``name`` (the URI, for S3)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {name}; check the path (a local "
                              ".pth/.pth.tar file or an s3:// URI)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {name} is a directory; pass the .pth/.pth.tar file")
    try:
        source: Any = _open_ngc_zip(path) or path
        return torch.load(source, map_location="cpu", weights_only=not trusted)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        if trusted:
            raise CheckpointError(f"cannot read checkpoint {name}: corrupt pickle data ({exc})") from None
        detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), "")
        raise CheckpointError(
            f"checkpoint {name} stores pickled Python objects"
            f"{f' ({detail})' if detail else ''}, e.g. a training script's argparse args, so it "
            "was not loaded: unpickling can run arbitrary code. If you trust where the file came "
            "from, pass trusted=True (CLI: --trust-checkpoint)") from None
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {name}: permission denied") from None
    except Exception as exc:  # torch raises many types for damaged files (KeyError, EOFError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {name}: truncated, corrupt or not a PyTorch checkpoint; "
            f"copy or download it again (torch.load: {first})") from None


def extract_state_dict(obj: Any, *, use_ema: bool = True,
                       source: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the weights in a checkpoint object; returns ``(state_dict, container key or None)``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    keys = CONTAINER_KEYS if use_ema else CONTAINER_KEYS[2:] + CONTAINER_KEYS[:2]
    for key in keys:
        if isinstance(obj.get(key), Mapping):
            state_dict, container = obj[key], key
            break
    else:
        state_dict, container = obj, None
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {source}{f' [{container}]' if container else ''} is not a state dict: "
            f"{len(bad)} entries are not tensors (first: {bad[:3]})")
    return dict(state_dict), container


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's stem adaptation of RGB weights: summed for 1 channel, else repeated and rescaled."""
    dtype, weight = weight.dtype, weight.float()
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)
    else:
        repeat = -(-in_chans // weight.shape[1])
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)
    return weight.to(dtype)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm-style filter: strip wrapper prefixes, drop a classifier sized for other classes, and
    adapt an RGB first conv to the model's ``in_chans``."""
    state_dict = strip_prefixes(state_dict)
    classifier = getattr(model, "classifier_name", None)
    if classifier:
        weight = state_dict.get(f"{classifier}.weight")
        if weight is not None and weight.shape[0] != model.num_classes:
            state_dict.pop(f"{classifier}.weight")
            state_dict.pop(f"{classifier}.bias", None)
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    in_chans = getattr(model, "in_chans", 3)
    weight = state_dict.get(f"{first_conv}.weight")
    if weight is not None and weight.ndim == 4 and weight.shape[1] == 3 != in_chans:
        state_dict[f"{first_conv}.weight"] = adapt_input_conv(weight, in_chans)
    return state_dict


def _guess_architecture(keys: set[str], shapes: Mapping[str, torch.Size]) -> str | None:
    """The shipped model whose layout the keys and shapes fit (the classifier may differ)."""
    for name in MODEL_INFO:
        arch = shipped_spec(name)
        with torch.device("meta"):
            ref = build_network(arch).state_dict(prefix="network.")
        classifier = head_names(arch)[1]
        if set(ref) == keys and all(ref[k].shape == shapes[k] for k in keys
                                    if not k.startswith(f"{classifier}.")):
            return name
    return None


def _mismatch_error(source: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    missing: list[str], unexpected: list[str], misshaped: list[str]) -> CheckpointError:
    own = model.state_dict()
    lines = [f"checkpoint {source} does not fit this model "
             f"({getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)}):"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {label} keys, first: {keys[:5]}")
    if misshaped:
        shown = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
                 for k in misshaped[:5]]
        lines.append(f"  {len(misshaped)} shape mismatches, first: {shown}")
    guess = _guess_architecture(set(state_dict), {k: v.shape for k, v in state_dict.items()})
    if guess:
        lines.append(f"  the checkpoint fits model '{guess}': pass --model {guess}")
    else:
        lines.append("  was it saved from a different architecture or spec? pass the --model "
                     "(name or JSON spec) it was trained with")
    return CheckpointError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "<state_dict>") -> LoadReport:
    """Load a (filtered) state dict; every tensor must be consumed, the classifier may be skipped."""
    filtered = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    skipped = [k for k in strip_prefixes(state_dict) if k not in filtered]
    missing = [k for k in own if k not in filtered and k not in skipped]
    unexpected = [k for k in filtered if k not in own]
    misshaped = [k for k in filtered if k in own and filtered[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise _mismatch_error(source, model, strip_prefixes(state_dict), missing, unexpected,
                              misshaped)
    model.load_state_dict(filtered, strict=not skipped)
    if skipped:
        _logger.info("loaded %s except the classifier (%s): the checkpoint has %d classes, the "
                     "model %d; the classifier keeps its fresh initialisation",
                     source, ", ".join(skipped), state_dict_classes(state_dict, model),
                     model.num_classes)
    return LoadReport(source=source, container_key=None, loaded=len(filtered), skipped=skipped)


def state_dict_classes(state_dict: Mapping[str, torch.Tensor],
                       classifier: str | nn.Module) -> int | None:
    """Classes of the checkpoint's classifier (a model or its classifier prefix); None if absent."""
    name = classifier if isinstance(classifier, str) else classifier.classifier_name
    weight = strip_prefixes(state_dict).get(f"{name}.weight")
    return None if weight is None else int(weight.shape[0])


def load_checkpoint(model: nn.Module, path: str | Path, *, use_ema: bool = True,
                    trusted: bool = False) -> LoadReport:
    """Load NVIDIA's or the project's checkpoint file into ``model`` (strict, EMA preferred)."""
    obj = read_checkpoint(path, trusted=trusted)
    state_dict, container = extract_state_dict(obj, use_ema=use_ema, source=str(path))
    report = load_state_dict_strict(model, state_dict, source=str(path))
    report.container_key = container
    _logger.info("loaded %d tensors from %s%s", report.loaded, path,
                 f" [{container}]" if container else "")
    return report


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Save atomically: write a temp file beside ``path``, fsync, then rename over it."""
    with atomic_write(path, "wb", fsync=True) as fh:
        torch.save(dict(obj), fh)
    return Path(path)

