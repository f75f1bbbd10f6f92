"""GPUNet architecture specs: loading and validating NVIDIA's JSON format.

A spec is a JSON list. Entry 0 is ``{"layer_type": "data", "img_resolution": R, "distill": B}``;
``distill`` selects the block family (``False``: timm-style blocks of GPUNet-0/1/2/P0/P1,
``True``: the "D" blocks of GPUNet-D1/D2). Entry 1 is the stem (``head`` or ``head_large``),
then blocks (``conv``, ``irb``, ``fused_irb``), and the last entry is the ``tail``.
See ``ARCHITECTURE.md`` of NVIDIA's reference for the semantics the builder reproduces.

:func:`load_spec` validates a spec and raises :class:`~gpunet_core.utils.errors.SpecError` naming the
entry index and field of the first problem. The seven shipped specs (:data:`MODEL_INFO`) are
packaged with the library: :func:`spec_path`, :func:`spec_json`, :func:`shipped_spec`.

Any other spec (an architecture search's, an edited one) is given by location, a ``.json`` path
or an ``s3://`` URI (:func:`fetch_spec`), and goes by a name of its own (:func:`model_name`):
``<file stem>-<8 hex of its content's SHA-256>``, valid where MLflow, ONNX metadata and Triton
want a model name, and resolved (:func:`resolve_spec`) from the verified copy that
:func:`model_name` keeps in the local spec store (:func:`spec_store`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from gpunet_core.utils import storage
from gpunet_core.utils.errors import GpunetError, SpecError, UnknownModelError
from gpunet_core.utils.files import write_text

LAYER_TYPES = ("data", "head", "head_large", "conv", "irb", "fused_irb", "tail")
ACTIVATIONS = ("swish", "relu")
BLOCK_TYPES = ("conv", "irb", "fused_irb")

# The shipped family: NVIDIA's config file, eval crop, published figures (README of
# NVIDIA/DeepLearningExamples GPUNet): ImageNet top-1 and TensorRT8 FP16 batch-1 latency in ms.
MODEL_INFO: dict[str, dict[str, Any]] = {
    "gpunet_0": dict(display="GPUNet-0", config="0.65ms.json", crop_pct=1.0, top1=78.9,
                     latency_ms_a100=0.46, latency_ms_v100=0.63, teacher=None),
    "gpunet_1": dict(display="GPUNet-1", config="0.85ms.json", crop_pct=1.0, top1=80.5,
                     latency_ms_a100=0.59, latency_ms_v100=0.82, teacher=None),
    "gpunet_2": dict(display="GPUNet-2", config="1.75ms.json", crop_pct=1.0, top1=82.2,
                     latency_ms_a100=1.25, latency_ms_v100=1.68, teacher=None),
    "gpunet_p0": dict(display="GPUNet-P0", config="0.5ms-D.json", crop_pct=0.875, top1=80.3,
                      latency_ms_a100=0.45, latency_ms_v100=0.63, teacher="tf_efficientnet_b2"),
    "gpunet_p1": dict(display="GPUNet-P1", config="0.8ms-D.json", crop_pct=0.875, top1=81.1,
                      latency_ms_a100=0.61, latency_ms_v100=0.96, teacher="tf_efficientnet_b2"),
    "gpunet_d1": dict(display="GPUNet-D1", config="1.25ms-D.json", crop_pct=1.0, top1=82.5,
                      latency_ms_a100=0.94, latency_ms_v100=1.24, teacher="tf_efficientnet_b5_ns"),
    "gpunet_d2": dict(display="GPUNet-D2", config="2.25ms-D.json", crop_pct=1.0, top1=83.6,
                      latency_ms_a100=1.40, latency_ms_v100=2.17, teacher="tf_efficientnet_b6_ns"),
}

# Largest input resolution a command accepts: GPUNets run at 224-560 px; far larger values are
# typos that would only exhaust memory (100000 px is 120 GB per image).
MAX_IMG_SIZE = 2048


def check_img_size(value: int | None, flag: str = "--img-size", minimum: int = 8) -> None:
    """A resolution flag must be ``None`` (the model's own) or in ``[minimum, MAX_IMG_SIZE]``."""
    if value is not None and not minimum <= value <= MAX_IMG_SIZE:
        raise GpunetError(f"{flag} must be in [{minimum}, {MAX_IMG_SIZE}] pixels, got {value}; "
                          "leave it out to use the model's own resolution")


# Fields each layer type needs, per family (False: non-D, True: D family).
_REQUIRED: dict[bool, dict[str, tuple[str, ...]]] = {
    False: {
        "head": ("num_in_channels", "num_out_channels"),
        "conv": ("num_in_channels", "num_out_channels", "stride", "kernel_size", "act", "stage"),
        "irb": ("num_in_channels", "num_out_channels", "stride", "expansion", "kernel_size",
                "act", "use_se", "stage"),
        "fused_irb": ("num_in_channels", "num_out_channels", "stride", "expansion",
                      "kernel_size", "act", "use_se", "stage"),
        "tail": ("num_in_channels", "num_out_channels", "num_classes"),
    },
    True: {
        "head": ("num_in_channels", "num_out_channels"),
        "head_large": ("num_in_channels", "num_out_channels"),
        "irb": ("num_in_channels", "num_out_channels", "stride", "expansion", "kernel_size",
                "stage"),
        "fused_irb": ("num_in_channels", "num_out_channels", "stride", "expansion",
                      "kernel_size", "stage"),
        "tail": ("num_in_channels", "num_out_channels", "num_classes"),
    },
}


@dataclass(frozen=True)
class ArchSpec:
    """A validated GPUNet architecture spec."""

    layers: tuple[dict[str, Any], ...]
    source: str

    @property
    def img_resolution(self) -> int:
        return int(self.layers[0]["img_resolution"])

    @property
    def distill(self) -> bool:
        """True for the "D" block family (GPUNet-D1/D2)."""
        return bool(self.layers[0]["distill"])

    @property
    def num_classes(self) -> int:
        return int(self.layers[-1]["num_classes"])

    def to_json(self) -> list[dict[str, Any]]:
        return [dict(layer) for layer in self.layers]


def _fail(source: str, index: int | None, field: str | None, problem: str, fix: str = "") -> SpecError:
    where = source
    if index is not None:
        where += f", entry {index}"
    if field is not None:
        where += f", field '{field}'"
    msg = f"invalid GPUNet spec ({where}): {problem}"
    if fix:
        msg += f". {fix}"
    return SpecError(msg)


def _read(spec: str | Path | dict | list) -> tuple[Any, str]:
    if isinstance(spec, (list, tuple)):
        return list(spec), "<list>"
    if isinstance(spec, dict):
        if "layers" not in spec:
            raise _fail("<dict>", None, "layers", "a dict spec needs a 'layers' list",
                        "Pass the JSON list itself or {'layers': [...]}")
        return spec["layers"], "<dict>"
    path = Path(spec)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(source, None, None, "file not found", "Check the path") from None
    except IsADirectoryError:
        raise _fail(source, None, None, "is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(source, None, None, f"cannot read file ({exc})") from None
    return _parse(text, source), source


def _parse(text: str, source: str) -> Any:
    """The layer list of a spec file's text: the JSON list itself or ``{"layers": [...]}``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, None, None,
                    f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict) and "layers" in data:
        data = data["layers"]
    return data


def _check_int(source: str, i: int, entry: dict, field: str, *, minimum: int = 1) -> int:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, i, field, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _fail(source, i, field, f"must be >= {minimum}, got {value}")
    return value


def _check_entry(source: str, i: int, entry: dict, distill: bool) -> None:
    layer_type = entry["layer_type"]
    family = "D" if distill else "non-D"
    required = _REQUIRED[distill].get(layer_type)
    if required is None:
        raise _fail(source, i, "layer_type",
                    f"layer type '{layer_type}' is not supported by the {family} block family "
                    f"(distill={str(distill).lower()})",
                    f"Use one of {sorted(_REQUIRED[distill])} or change 'distill' in entry 0")
    for field in required:
        if field not in entry:
            raise _fail(source, i, field, f"missing required field for layer_type '{layer_type}'")
    for field in ("num_in_channels", "num_out_channels", "num_classes"):
        if field in entry:
            _check_int(source, i, entry, field)
    if "stride" in entry and _check_int(source, i, entry, "stride") not in (1, 2):
        raise _fail(source, i, "stride", f"must be 1 or 2, got {entry['stride']}")
    if "kernel_size" in entry and _check_int(source, i, entry, "kernel_size") % 2 == 0:
        raise _fail(source, i, "kernel_size", f"must be odd, got {entry['kernel_size']}")
    if "stage" in entry:
        _check_int(source, i, entry, "stage", minimum=0)
    if "expansion" in entry:
        exp = entry["expansion"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp) or exp <= 0:
            raise _fail(source, i, "expansion", f"expected a positive number, got {exp!r}")
        if distill and float(exp * entry["num_in_channels"]).is_integer() is False:
            raise _fail(source, i, "expansion",
                        f"D-family blocks need num_in_channels*expansion to be an integer, got "
                        f"{entry['num_in_channels']}*{exp}")
    if "act" in entry and entry["act"] not in ACTIVATIONS:
        raise _fail(source, i, "act", f"unknown activation {entry['act']!r}",
                    f"Use one of {list(ACTIVATIONS)}")
    if "use_se" in entry and not isinstance(entry["use_se"], bool):
        raise _fail(source, i, "use_se", f"expected true or false, got {entry['use_se']!r}")
    if "groups" in entry:
        groups = _check_int(source, i, entry, "groups")
        cin, cout = entry["num_in_channels"], entry["num_out_channels"]
        mid = int(round(cin * entry.get("expansion", 1)))
        for name, ch in (("num_in_channels", cin), ("num_out_channels", cout), ("expanded width", mid)):
            if ch % groups:
                raise _fail(source, i, "groups", f"{groups} does not divide {name} {ch}")


def validate_spec(data: Any, source: str = "<spec>") -> ArchSpec:
    """Validate parsed JSON data and return an :class:`ArchSpec`."""
    if not isinstance(data, list) or not data:
        raise _fail(source, None, None, "a spec must be a non-empty JSON list of layer entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _fail(source, i, None, f"expected a JSON object, got {type(entry).__name__}")
        if "layer_type" not in entry:
            raise _fail(source, i, "layer_type", "missing required field")
        if entry["layer_type"] not in LAYER_TYPES:
            raise _fail(source, i, "layer_type", f"unknown layer type {entry['layer_type']!r}",
                        f"Use one of {list(LAYER_TYPES)}")

    first = data[0]
    if first["layer_type"] != "data":
        raise _fail(source, 0, "layer_type", f"the first entry must be the 'data' entry, got "
                    f"{first['layer_type']!r}", "Add {\"layer_type\": \"data\", \"img_resolution\": "
                    "224, \"distill\": false} as entry 0")
    for field in ("img_resolution", "distill"):
        if field not in first:
            raise _fail(source, 0, field, "missing required field of the 'data' entry")
    _check_int(source, 0, first, "img_resolution", minimum=8)
    if not isinstance(first["distill"], bool):
        raise _fail(source, 0, "distill", f"expected true or false, got {first['distill']!r}")
    distill = first["distill"]

    if len(data) < 3:
        raise _fail(source, None, None, "a spec needs at least a data, a head and a tail entry")
    for i, entry in enumerate(data[1:], start=1):
        if entry["layer_type"] == "data":
            raise _fail(source, i, "layer_type", "'data' may only be entry 0")
        if entry["layer_type"] in ("head", "head_large") and i != 1:
            raise _fail(source, i, "layer_type", f"'{entry['layer_type']}' (the stem) must be entry 1")
        if entry["layer_type"] == "tail" and i != len(data) - 1:
            raise _fail(source, i, "layer_type", "'tail' must be the last entry")
    if data[1]["layer_type"] not in ("head", "head_large"):
        raise _fail(source, 1, "layer_type", f"entry 1 must be the stem ('head' or 'head_large'), "
                    f"got {data[1]['layer_type']!r}")
    if data[-1]["layer_type"] != "tail":
        raise _fail(source, len(data) - 1, "layer_type",
                    f"the last entry must be the 'tail', got {data[-1]['layer_type']!r}")

    for i, entry in enumerate(data[1:], start=1):
        _check_entry(source, i, entry, distill)
    for i in range(2, len(data)):
        prev_out = data[i - 1]["num_out_channels"]
        cin = data[i]["num_in_channels"]
        if cin != prev_out:
            raise _fail(source, i, "num_in_channels",
                        f"channel mismatch: {cin} but entry {i - 1} ({data[i - 1]['layer_type']}) "
                        f"outputs {prev_out}", "Make consecutive layers' channels agree")
    return ArchSpec(layers=tuple(dict(e) for e in data), source=source)


def load_spec(spec: str | Path | dict | list | ArchSpec) -> ArchSpec:
    """Load and validate a spec from a JSON file path, a list of entries or ``{"layers": [...]}``."""
    if isinstance(spec, ArchSpec):
        return spec
    data, source = _read(spec)
    return validate_spec(data, source)


def model_info(name: str) -> dict[str, Any]:
    """:data:`MODEL_INFO` entry of a shipped model; the error lists the valid names."""
    if name not in MODEL_INFO:
        raise UnknownModelError(
            f"unknown model {name!r}: valid names are {', '.join(MODEL_INFO)} "
            "(or pass a GPUNet JSON spec: its .json path or s3:// URI)")
    return MODEL_INFO[name]


def spec_path(name: str) -> Path:
    """Path of the packaged JSON spec of a shipped model."""
    info = model_info(name)
    return Path(str(resources.files("gpunet_core.models") / "configs" / info["config"]))


def spec_json(name: str) -> list[dict[str, Any]]:
    """The raw JSON spec of a shipped model (a copy you may edit and pass to create_model)."""
    return json.loads(spec_path(name).read_text())


@cache
def shipped_spec(name: str) -> ArchSpec:
    """The validated spec of a shipped model, read once per process (builders never mutate it)."""
    return load_spec(spec_path(name))


def resolve_spec(name_or_spec: str | Path | dict | list | ArchSpec) -> tuple[ArchSpec, str | None]:
    """Resolve a model name or spec to ``(ArchSpec, shipped name or None)``.

    Strings: a shipped name; an ``s3://`` URI of a JSON spec (:func:`fetch_spec`); a ``.json`` or
    existing path; a custom spec's name (:func:`model_name`), from the local spec store. A string
    that is none of these is a mistyped name, so the error lists the valid names instead of
    reporting a missing file.
    """
    if isinstance(name_or_spec, str) and name_or_spec in MODEL_INFO:
        return shipped_spec(name_or_spec), name_or_spec
    if isinstance(name_or_spec, str) and storage.is_s3_uri(name_or_spec):
        return fetch_spec(name_or_spec), None
    if isinstance(name_or_spec, (str, Path)):
        text = str(name_or_spec)
        if not (text.endswith(".json") or Path(text).exists()):
            if isinstance(name_or_spec, str) and is_custom_name(text):
                return stored_spec(text), None
            model_info(text)  # raises the "unknown model" error listing valid names
    return load_spec(name_or_spec), None


# --------------------------------------------------------------------------- custom specs

# a custom spec's name: its label (file stem) and 8 hex digits of its content's SHA-256; only
# letters, digits, '_' and '-', as MLflow's LoggedModel names and Triton's model names require
_CUSTOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}-([0-9a-f]{8})")
# a GPUNet spec is a few KB (the largest shipped one, GPUNet-2, 9 KB); far larger is not one
MAX_SPEC_BYTES = 1 << 20
SPECS_DIR = "specs"  # the spec store, under the cache folder


def is_spec_location(value: str | Path) -> bool:
    """Whether ``value`` gives a spec by location (an ``s3://`` URI, a ``.json`` or existing
    path) rather than by name (shipped, custom, or another library's such as timm's)."""
    if isinstance(value, Path):
        return True
    return bool(value) and value not in MODEL_INFO and (
        storage.is_s3_uri(value) or value.endswith(".json") or Path(value).exists())


def is_custom_name(name: str) -> bool:
    """Whether ``name`` has the form of a custom spec's name (:func:`custom_name`)."""
    return bool(_CUSTOM_NAME.fullmatch(name))


def spec_digest(arch: ArchSpec) -> str:
    """SHA-256 (hex) of the spec's canonical JSON: key order and layout do not count."""
    canonical = json.dumps(arch.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def custom_name(arch: ArchSpec, label: str) -> str:
    """``<label>-<8 hex of spec_digest>``, ``label`` reduced to letters, digits, '_' and '-'
    (48 at most). A label that already ends with the spec's own digest is kept as it is, so the
    stored copy of a spec (``<name>.json``) is known by the same name again."""
    digest = spec_digest(arch)[:8]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_-")
    if stem.endswith(f"-{digest}") and is_custom_name(stem):
        return stem
    return f"{stem[:48].rstrip('_-') or 'spec'}-{digest}"


def spec_store() -> Path:
    """The local spec store: ``<cache>/specs`` (``$GPUNET_CACHE_DIR``, ``~/.cache/gpunet``)."""
    return storage.default_cache_dir() / SPECS_DIR


def fetch_spec(location: str | Path) -> ArchSpec:
    """Read and validate the JSON spec at ``location``: a path, or an ``s3://`` object (one
    GET, no file written). Every problem is one line: a :class:`SpecError` for a missing
    object or an invalid spec, a :class:`~gpunet_core.utils.errors.StorageError` for the store
    (bucket, credentials, endpoint)."""
    if not storage.is_s3_uri(location):
        return load_spec(location)
    uri = storage.parse_s3_uri(str(location))
    if not uri.key or uri.key.endswith("/"):
        raise _fail(str(uri), None, None, "an s3:// URI of a spec names one object",
                    "Pass s3://bucket/path/spec.json")
    client = storage.s3_client()
    storage.check_bucket(uri, client)  # a wrong bucket, credentials or endpoint: said as such
    if not storage.object_exists(uri, client):
        raise _fail(str(uri), None, None, f"no such object in bucket {uri.bucket!r}",
                    "Check the URI (the architecture search writes one .json object per spec)")
    body = storage.with_retries("read", uri, lambda: client.get_object(
        Bucket=uri.bucket, Key=uri.key)["Body"].read(MAX_SPEC_BYTES + 1))
    if len(body) > MAX_SPEC_BYTES:
        raise _fail(str(uri), None, None, f"larger than {MAX_SPEC_BYTES >> 20} MiB: not a GPUNet "
                    "spec")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(str(uri), None, None, "not a UTF-8 text file") from None
    return validate_spec(_parse(text, str(uri)), str(uri))


def stored_spec(name: str) -> ArchSpec:
    """The spec of custom name ``name`` from the local spec store, checked against the
    digest in its name."""
    path = spec_store() / f"{name}.json"
    if not path.is_file():
        raise UnknownModelError(
            f"unknown model {name!r}: it names a custom GPUNet spec, and none of that name is "
            f"in the spec store {spec_store()} of this machine; pass the spec itself (its "
            f".json path or s3:// URI) instead")
    arch = load_spec(path)
    if not name.endswith(f"-{spec_digest(arch)[:8]}"):
        raise SpecError(f"{path} does not hold spec {name}: its content's SHA-256 starts with "
                        f"{spec_digest(arch)[:8]}; delete the file and pass the spec itself "
                        "(its .json path or s3:// URI) again")
    return arch


def model_name(name_or_spec: str | Path, *, label: str | None = None) -> str:
    """The name a model goes by (MLflow's run and LoggedModel, ONNX metadata, registry tags).

    A model name (shipped, custom, another library's) is returned as it is: whether it exists
    is for the factory to say, except that a custom name must be in the spec store. A spec
    given by location (:func:`is_spec_location`) is read and validated (:func:`fetch_spec`: an
    ``s3://`` object is fetched once, here), its verified copy is written to the spec store,
    and its :func:`custom_name` (``label``, by default the file's stem) is returned: the name
    every process using that store (torchrun's ranks, later steps) builds the model by.
    """
    if isinstance(name_or_spec, str) and not is_spec_location(name_or_spec):
        if is_custom_name(name_or_spec) and name_or_spec not in MODEL_INFO:
            stored_spec(name_or_spec)  # fails here, not in the middle of a run
        return name_or_spec
    arch = fetch_spec(name_or_spec)
    stem = PurePosixPath(storage.parse_s3_uri(name_or_spec).key).stem \
        if storage.is_s3_uri(name_or_spec) else Path(name_or_spec).stem
    name = custom_name(arch, label or stem)
    # atomically: ranks and steps sharing the store may write the same copy at once
    write_text(spec_store() / f"{name}.json", json.dumps(arch.to_json(), indent=1) + "\n")
    return name


def stored_spec_path(name: str) -> Path:
    """The verified stored copy of custom spec ``name`` (see :func:`stored_spec`)."""
    stored_spec(name)
    return spec_store() / f"{name}.json"
