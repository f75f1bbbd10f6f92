"""The GPUNet architecture search space, as data (``space.yaml``), and its sampler.

A point of the space is one choice per stage (depth, width, block type, expansion, kernel,
activation, SE, the first block's stride) plus the family, the head, the tail width and the
input resolution; :meth:`SearchSpace.sample` turns the choices of a :class:`Chooser` (Optuna's
trial in a study, a seeded RNG in tests) into a JSON spec that
:func:`~gpunet_core.models.spec.load_spec` accepts. :meth:`SearchSpace.violations` says why a
spec (a published one, say) lies outside the space.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from gpunet_core.models.spec import ACTIVATIONS, ArchSpec, load_spec, spec_digest
from gpunet_core.utils.errors import GpunetError

BLOCKS_WITH_EXPANSION = ("irb", "fused_irb")


class SearchSpaceError(GpunetError):
    """A search-space file that does not hold a valid space, or an impossible request."""


@dataclass(frozen=True)
class Grid:
    """Integers ``min..max``; the sampler draws ``min, min+step, ..., <= max``."""

    min: int
    max: int
    step: int = 1

    def values(self) -> list[int]:
        return list(range(self.min, self.max + 1, self.step))

    def __contains__(self, value: float) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class StageSpace:
    stage: int
    types: tuple[str, ...]
    depth: tuple[int, int]
    width: Grid
    stride: tuple[int, ...]
    kernel: tuple[int, ...]
    act: tuple[str | None, ...]
    se: tuple[bool, ...]
    expansion: tuple[float, ...] | None  # None: the family's


@dataclass(frozen=True)
class FamilySpace:
    name: str
    distill: bool
    head_types: tuple[str, ...]
    head_width: Grid
    head_act: tuple[str | None, ...]
    expansion: tuple[float, float]
    expansion_choices: tuple[float, ...]
    stages: tuple[StageSpace, ...]
    tail_width: tuple[int, ...]


class Chooser(Protocol):
    """Where the sampler's choices come from: Optuna's trial, or a seeded RNG."""

    def choice(self, name: str, options: list[Any]) -> Any: ...

    def integer(self, name: str, low: int, high: int, step: int = 1) -> int: ...


class RandomChooser:
    """Uniform choices from a seeded :class:`random.Random` (tests, the budget check)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def choice(self, name: str, options: list[Any]) -> Any:
        return self.rng.choice(options)

    def integer(self, name: str, low: int, high: int, step: int = 1) -> int:
        return self.rng.randrange(low, high + 1, step)


class SmallestChooser:
    """Always the first option and the lowest integer: the cheapest point of a family."""

    def choice(self, name: str, options: list[Any]) -> Any:
        return options[0]

    def integer(self, name: str, low: int, high: int, step: int = 1) -> int:
        return low


# ---------------------------------------------------------------- loading and validating


def _get(data: dict, key: str, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise SearchSpaceError(f"search space {where}: missing field '{key}'")
    return data[key]


def _grid(data: Any, where: str) -> Grid:
    if not isinstance(data, dict):
        raise SearchSpaceError(f"search space {where}: expected {{min, max, step}}, got {data!r}")
    values = [_get(data, k, where) for k in ("min", "max")] + [data.get("step", 1)]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SearchSpaceError(f"search space {where}: min, max and step must be integers, "
                               f"got {data!r}")
    low, high, step = values
    if not 1 <= low <= high or step < 1:
        raise SearchSpaceError(f"search space {where}: need 1 <= min <= max and step >= 1, "
                               f"got {data!r}")
    return Grid(low, high, step)


def _options(data: Any, where: str, allowed: tuple | None = None) -> tuple:
    if not isinstance(data, list) or not data:
        raise SearchSpaceError(f"search space {where}: expected a non-empty list, got {data!r}")
    if allowed is not None:
        bad = [v for v in data if v not in allowed]
        if bad:
            raise SearchSpaceError(f"search space {where}: {bad} not among {list(allowed)}")
    return tuple(data)


def _stage(data: dict, where: str, distill: bool) -> StageSpace:
    depth = _get(data, "depth", where)
    if (not isinstance(depth, list) or len(depth) != 2
            or not all(isinstance(d, int) for d in depth) or not 0 <= depth[0] <= depth[1]):
        raise SearchSpaceError(f"search space {where}.depth: expected [min, max] with "
                               f"0 <= min <= max, got {depth!r}")
    types = ("irb", "fused_irb") if distill else ("conv", "irb", "fused_irb")
    expansion = data.get("expansion")
    return StageSpace(
        stage=_get(data, "stage", where),
        types=_options(_get(data, "types", where), f"{where}.types", types),
        depth=(depth[0], depth[1]),
        width=_grid(_get(data, "width", where), f"{where}.width"),
        stride=_options(_get(data, "stride", where), f"{where}.stride", (1, 2)),
        kernel=_options(_get(data, "kernel", where), f"{where}.kernel", (1, 3, 5, 7, 9)),
        act=(None,) if distill else _options(_get(data, "act", where), f"{where}.act",
                                             ACTIVATIONS),
        se=(False,) if distill else _options(_get(data, "se", where), f"{where}.se",
                                             (False, True)),
        expansion=None if expansion is None else _options(expansion, f"{where}.expansion"),
    )


def _family(name: str, data: dict) -> FamilySpace:
    where = f"families.{name}"
    distill = _get(data, "distill", where)
    if not isinstance(distill, bool):
        raise SearchSpaceError(f"search space {where}.distill: expected true or false")
    head = _get(data, "head", where)
    exp = _get(data, "expansion", where)
    low, high = _get(exp, "min", f"{where}.expansion"), _get(exp, "max", f"{where}.expansion")
    choices = _options(_get(exp, "choices", f"{where}.expansion"), f"{where}.expansion.choices")
    if not all(low <= c <= high for c in choices):
        raise SearchSpaceError(f"search space {where}.expansion.choices {list(choices)} must lie "
                               f"in [{low}, {high}]")
    stages = tuple(_stage(s, f"{where}.stages[{i}]", distill)
                   for i, s in enumerate(_get(data, "stages", where)))
    numbers = [s.stage for s in stages]
    if numbers != sorted(set(numbers)):
        raise SearchSpaceError(f"search space {where}.stages: stage numbers must increase, "
                               f"got {numbers}")
    return FamilySpace(
        name=name, distill=distill,
        head_types=_options(_get(head, "types", f"{where}.head"), f"{where}.head.types",
                            ("head", "head_large")),
        head_width=_grid(_get(head, "width", f"{where}.head"), f"{where}.head.width"),
        head_act=(None,) if distill else _options(_get(head, "act", f"{where}.head"),
                                                  f"{where}.head.act", ACTIVATIONS),
        expansion=(low, high), expansion_choices=choices, stages=stages,
        tail_width=_options(_get(_get(data, "tail", where), "width", f"{where}.tail"),
                            f"{where}.tail.width"))


@dataclass(frozen=True)
class SearchSpace:
    resolution: Grid
    families: dict[str, FamilySpace]
    source: str

    # ------------------------------------------------------------------ sampling

    def sample(self, choose: Chooser, *, num_classes: int = 1000,
               resolutions: list[int] | None = None, families: list[str] | None = None
               ) -> list[dict[str, Any]]:
        """One point of the space as a JSON spec (uniform choices within each stage)."""
        names = families or list(self.families)
        family = self.families[choose.choice("family", names)]
        sizes = resolutions or self.resolution.values()
        res = sizes[0] if len(sizes) == 1 else choose.choice("resolution", sizes)
        f = family.name
        head_type = family.head_types[0] if len(family.head_types) == 1 \
            else choose.choice(f"{f}.head", list(family.head_types))
        width = choose.integer(f"{f}.head_width", family.head_width.min, family.head_width.max,
                               family.head_width.step)
        head = {"layer_type": head_type, "num_in_channels": 3, "num_out_channels": width}
        if not family.distill:
            head["act"] = choose.choice(f"{f}.head_act", list(family.head_act))
        layers: list[dict[str, Any]] = [
            {"layer_type": "data", "img_resolution": res, "distill": family.distill}, head]
        for st in family.stages:
            p = f"{f}.s{st.stage}"
            depth = choose.integer(f"{p}.depth", *st.depth)
            if depth == 0:
                continue
            kind = st.types[0] if len(st.types) == 1 else choose.choice(f"{p}.type", list(st.types))
            out = choose.integer(f"{p}.width", st.width.min, st.width.max, st.width.step)
            stride = st.stride[0] if len(st.stride) == 1 else choose.choice(f"{p}.stride",
                                                                             list(st.stride))
            kernel = st.kernel[0] if len(st.kernel) == 1 else choose.choice(f"{p}.kernel",
                                                                             list(st.kernel))
            block: dict[str, Any] = {"layer_type": kind, "kernel_size": kernel,
                                     "stage": st.stage}
            if kind in BLOCKS_WITH_EXPANSION:
                options = list(st.expansion or family.expansion_choices)
                block["expansion"] = options[0] if len(options) == 1 \
                    else choose.choice(f"{p}.expansion", options)
            if not family.distill:
                block["act"] = st.act[0] if len(st.act) == 1 else choose.choice(f"{p}.act",
                                                                                 list(st.act))
                if kind in BLOCKS_WITH_EXPANSION:
                    block["use_se"] = st.se[0] if len(st.se) == 1 \
                        else choose.choice(f"{p}.se", list(st.se))
            else:
                block["groups"] = 1
            for i in range(depth):
                cin = layers[-1]["num_out_channels"]
                layers.append({"layer_type": kind, "num_in_channels": cin,
                               "num_out_channels": out, "stride": stride if i == 0 else 1,
                               **{k: v for k, v in block.items() if k != "layer_type"}})
        tail = family.tail_width[0] if len(family.tail_width) == 1 \
            else choose.choice(f"{f}.tail_width", list(family.tail_width))
        layers.append({"layer_type": "tail", "num_in_channels": layers[-1]["num_out_channels"],
                       "num_out_channels": tail, "num_classes": num_classes})
        return layers

    def smallest(self, family: str, *, num_classes: int, resolution: int) -> list[dict[str, Any]]:
        """The family's cheapest point (fewest, narrowest, smallest-kernel layers)."""
        return self.sample(SmallestChooser(), num_classes=num_classes, resolutions=[resolution],
                           families=[family])

    # ------------------------------------------------------------------ containment

    def violations(self, spec: str | Path | list | ArchSpec) -> list[str]:
        """Why ``spec`` lies outside the space ([] when inside). Range-based: a published
        net's off-grid width (67) or expansion (7.67) is inside its stage's range."""
        arch = load_spec(spec)
        layers = arch.layers
        fam = next((f for f in self.families.values() if f.distill == arch.distill), None)
        if fam is None:
            return [f"no family with distill={arch.distill}"]
        problems = []
        if arch.img_resolution not in self.resolution:
            problems.append(f"resolution {arch.img_resolution} outside "
                            f"[{self.resolution.min}, {self.resolution.max}]")
        head = layers[1]
        if head["layer_type"] not in fam.head_types:
            problems.append(f"head type {head['layer_type']} not in {list(fam.head_types)}")
        if head["num_out_channels"] not in fam.head_width:
            problems.append(f"head width {head['num_out_channels']} outside {fam.head_width}")
        if not fam.distill and head.get("act", "swish") not in fam.head_act:
            problems.append(f"head act {head.get('act', 'swish')} not in {list(fam.head_act)}")
        by_stage: dict[int, list[dict[str, Any]]] = {}
        order = []
        for layer in layers[2:-1]:
            if layer["stage"] not in by_stage:
                order.append(layer["stage"])
            by_stage.setdefault(layer["stage"], []).append(layer)
        if order != sorted(order) or any(
                [x["stage"] for x in layers[2:-1]].count(s) != len(by_stage[s]) for s in order):
            problems.append(f"stages must appear in increasing order, got {order}")
        stages = {s.stage: s for s in fam.stages}
        for number in order:
            if number not in stages:
                problems.append(f"stage {number} is not in the {fam.name} family")
        for st in fam.stages:
            blocks = by_stage.get(st.stage, [])
            where = f"stage {st.stage}"
            if not st.depth[0] <= len(blocks) <= st.depth[1]:
                problems.append(f"{where}: {len(blocks)} layers outside {list(st.depth)}")
            for j, b in enumerate(blocks):
                if b["layer_type"] not in st.types:
                    problems.append(f"{where} layer {j}: type {b['layer_type']} not in "
                                    f"{list(st.types)}")
                if b["num_out_channels"] not in st.width:
                    problems.append(f"{where} layer {j}: width {b['num_out_channels']} outside "
                                    f"[{st.width.min}, {st.width.max}]")
                allowed_strides = st.stride if j == 0 else (1,)
                if b["stride"] not in allowed_strides:
                    problems.append(f"{where} layer {j}: stride {b['stride']} not in "
                                    f"{list(allowed_strides)} (only a stage's first block "
                                    "strides)")
                if b["kernel_size"] not in st.kernel:
                    problems.append(f"{where} layer {j}: kernel {b['kernel_size']} not in "
                                    f"{list(st.kernel)}")
                if "expansion" in b:
                    low, high = (min(st.expansion), max(st.expansion)) if st.expansion \
                        else fam.expansion
                    if not low <= b["expansion"] <= high:
                        problems.append(f"{where} layer {j}: expansion {b['expansion']} outside "
                                        f"[{low}, {high}]")
                if not fam.distill and b.get("act") not in st.act:
                    problems.append(f"{where} layer {j}: act {b.get('act')} not in "
                                    f"{list(st.act)}")
                if not fam.distill and b.get("use_se", False) not in st.se:
                    problems.append(f"{where} layer {j}: use_se {b.get('use_se')} not in "
                                    f"{list(st.se)}")
        if layers[-1]["num_out_channels"] not in fam.tail_width:
            problems.append(f"tail width {layers[-1]['num_out_channels']} not in "
                            f"{list(fam.tail_width)}")
        return problems


def default_space_path() -> Path:
    return Path(str(resources.files("gpunet_core.search") / "space.yaml"))


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file (default: the packaged ``space.yaml``)."""
    path = Path(path) if path else default_space_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchSpaceError(f"search space file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SearchSpaceError(f"cannot read search space {path}: {exc}") from None
    families = _get(data, "families", str(path))
    if not isinstance(families, dict) or not families:
        raise SearchSpaceError(f"search space {path}: 'families' must be a non-empty mapping")
    return SearchSpace(resolution=_grid(_get(data, "resolution", str(path)), "resolution"),
                       families={n: _family(n, f) for n, f in families.items()},
                       source=str(path))


def spec_hash(spec: list[dict[str, Any]] | ArchSpec) -> str:
    """16 hex digits naming an architecture (:func:`~gpunet_core.models.spec.spec_digest`)."""
    arch = spec if isinstance(spec, ArchSpec) else ArchSpec(tuple(spec), "<search>")
    return spec_digest(arch)[:16]


def fits_resolution(spec: list[dict[str, Any]] | ArchSpec) -> str | None:
    """Why the feature map vanishes at the spec's resolution, or None when it fits.

    Stride-2 fused blocks of the non-D family pad 0 (NVIDIA's quirk, ARCHITECTURE.md 1a), so at
    tiny resolutions their input can be smaller than their kernel.
    """
    arch = spec if isinstance(spec, ArchSpec) else load_spec(list(spec))
    size = (arch.img_resolution - 1) // 2 + 1  # the 3x3 stride-2 stem, padding 1
    for i, layer in enumerate(arch.layers[2:-1], start=2):
        k, s = layer["kernel_size"], layer["stride"]
        if layer["layer_type"] == "fused_irb" and s == 2 and not arch.distill:
            pad = 0
        elif arch.distill:
            pad = k // 2
        else:
            pad = ((s - 1) + (k - 1)) // 2
        size = (size + 2 * pad - k) // s + 1
        if size < 1:
            return (f"entry {i} ({layer['layer_type']}, kernel {k}, stride {s}) leaves no "
                    f"pixels at {arch.img_resolution} px")
    return None
