"""``gpunet train``'s settings: one typed :class:`TrainConfig`, its flags and its argv (no torch).

Every flag of ``gpunet train`` is a field of :class:`TrainConfig` (NVIDIA's names and meanings,
plus this project's additions); the parser (:func:`add_arguments`), the checks and the argv of a
torchrun or cluster launch (:func:`to_argv`) are all generated from those fields, so a setting
has one path from the command line, a pipeline step or a TrainJob to the loop. Settings are
layered *defaults < ``--preset`` values < explicit flags* (:meth:`TrainConfig.resolve`). Parsing,
``--help`` and bad values cost no torch import; :func:`check_runtime` runs the checks that need
torch and timm or the network (optimizer and scheduler names, the S3 buckets of the data,
output and checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpunet_core.models.spec import check_img_size, model_name
from gpunet_core.training.presets import PRESETS, load_preset
from gpunet_core.utils import storage
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import check_output_dir


class TrainError(GpunetError):
    """Bad training configuration, caught before any training starts."""


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


@dataclass(frozen=True)
class Flag:
    """How a :class:`TrainConfig` field is spelled on the command line.

    ``kind``: ``value`` (``--flag VALUE``), ``toggle`` (``--flag`` / ``--no-flag``), ``bool``
    (NVIDIA's ``--flag True|False``), ``pair`` (``--flag A B``), ``append`` (repeatable) or
    ``positional``.
    """

    names: tuple[str, ...]
    kind: str = "value"
    parse: Callable[[str], Any] = str
    help: str = ""
    group: str = ""
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        """The flag as messages name it (``-b/--batch-size``)."""
        return "/".join(self.names) if self.names else "DATA"

    @property
    def long(self) -> str:
        return self.names[-1]


_MODEL, _OPTIM, _DATA, _DISTILL, _OUTPUTS = ("model", "optimisation", "data", "distillation",
                                             "outputs")


def _flag(default: Any, *names: str, group: str, help: str = "", kind: str = "value",
          parse: Callable[[str], Any] = str, choices: tuple[str, ...] | None = None,
          metavar: str | tuple[str, ...] | None = None) -> Any:
    meta = {"flag": Flag(names, kind, parse, help, group, choices, metavar)}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run, checked on construction (a :class:`TrainError` names
    the flag). Build it with :meth:`resolve` (or :func:`parse`) to layer a preset; the
    constructor takes the final values."""

    data: str = field(metadata={"flag": Flag((), "positional", help="dataset root holding "
                                                                    "train/ and val/ ImageFolders")})
    preset: str | None = _flag(None, "--preset", group="", choices=tuple(sorted(PRESETS)),
                               help="load NVIDIA's hyper-parameters for this model (flags "
                                    "override)")
    # ---- model
    model: str = _flag("gpunet_0", "--model", group=_MODEL,
                       help="model name or GPUNet JSON spec, a .json path or s3:// URI (default "
                            "gpunet_0; a spec trains as <file stem>-<8 hex of its SHA-256>); "
                            "other timm model names train from scratch (e.g. efficientnet_b0, "
                            "for comparisons)")
    num_classes: int | None = _flag(None, "--num-classes", group=_MODEL, parse=int,
                                    help="classes (default: the dataset's)")
    drop: float | None = _flag(None, "--drop", group=_MODEL, parse=float,
                               help="classifier dropout (default 0.2, NVIDIA's hard-coded value)")
    drop_connect: float | None = _flag(None, "--drop-connect", group=_MODEL, parse=float,
                                       help="drop-path base rate, block i of N gets rate*i/N "
                                            "(default 0.2; 0 for D)")
    img_size: int | None = _flag(None, "--img-size", group=_MODEL, parse=int,
                                 help="train/eval resolution (default: the model's)")
    crop_pct: float | None = _flag(None, "--crop-pct", group=_MODEL, parse=float,
                                   help="eval crop (default: the model's)")
    initial_checkpoint: str | None = _flag(None, "--initial-checkpoint", group=_MODEL,
                                           help="start from these weights (e.g. NVIDIA's "
                                                "published file)")
    trust_checkpoint: bool = _flag(False, "--trust-checkpoint", group=_MODEL, kind="toggle",
                                   help="allow checkpoints holding pickled Python objects "
                                        "(trusted sources only)")
    # ---- optimisation
    batch_size: int = _flag(32, "-b", "--batch-size", group=_OPTIM, parse=int,
                            help="batch per process")
    epochs: int = _flag(10, "--epochs", group=_OPTIM, parse=int)
    opt: str = _flag("rmsproptf", "--opt", group=_OPTIM, help="timm optimizer name")
    opt_eps: float = _flag(1e-3, "--opt-eps", group=_OPTIM, parse=float)
    momentum: float = _flag(0.9, "--momentum", group=_OPTIM, parse=float)
    lr: float = _flag(0.06, "--lr", group=_OPTIM, parse=float)
    weight_decay: float = _flag(1e-5, "--weight-decay", group=_OPTIM, parse=float)
    sched: str = _flag("step", "--sched", group=_OPTIM, help="timm scheduler")
    decay_epochs: float = _flag(2.4, "--decay-epochs", group=_OPTIM, parse=float)
    decay_rate: float = _flag(0.97, "--decay-rate", group=_OPTIM, parse=float)
    warmup_lr: float = _flag(1e-6, "--warmup-lr", group=_OPTIM, parse=float)
    warmup_epochs: int = _flag(3, "--warmup-epochs", group=_OPTIM, parse=int)
    min_lr: float = _flag(1e-5, "--min-lr", group=_OPTIM, parse=float)
    smoothing: float = _flag(0.1, "--smoothing", group=_OPTIM, parse=float,
                             help="label smoothing")
    model_ema: bool = _flag(False, "--model-ema", group=_OPTIM, kind="toggle",
                            help="keep an EMA of the weights")
    model_ema_decay: float = _flag(0.9998, "--model-ema-decay", group=_OPTIM, parse=float)
    amp: bool = _flag(False, "--amp", group=_OPTIM, kind="toggle",
                      help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    channels_last: bool = _flag(False, "--channels-last", group=_OPTIM, kind="toggle")
    compile: bool = _flag(False, "--compile", group=_OPTIM, kind="toggle",
                          help="torch.compile the model")
    seed: int = _flag(42, "--seed", group=_OPTIM, parse=int)
    max_steps: int | None = _flag(None, "--max-steps", group=_OPTIM, parse=int,
                                  help="stop after this many optimizer steps in total (smoke "
                                       "runs)")
    # ---- data
    workers: int = _flag(4, "-j", "--workers", group=_DATA, parse=int,
                         help="loader workers per process")
    data_backend: str = _flag("pil", "--data-backend", group=_DATA,
                              choices=("auto", "pil", "dali"))
    aa: str = _flag("rand-m9-mstd0.5", "--aa", group=_DATA,
                    help="timm auto-augment policy ('' for none)")
    scale: tuple[float, float] = _flag((0.08, 1.0), "--scale", group=_DATA, kind="pair",
                                       parse=float, metavar=("MIN", "MAX"),
                                       help="random-resized-crop area range")
    reprob: float = _flag(0.2, "--reprob", group=_DATA, parse=float, help="random erasing prob")
    hflip: float = _flag(0.5, "--hflip", group=_DATA, parse=float,
                         help="horizontal flip probability (0 for mirror-sensitive classes "
                              "such as digits or text)")
    remode: str = _flag("pixel", "--remode", group=_DATA, help="random erasing mode")
    # ---- distillation
    enable_distill: bool = _flag(False, "--enable-distill", group=_DISTILL, kind="bool",
                                 parse=_bool, metavar="True|False")
    teacher: str | None = _flag(None, "--teacher", group=_DISTILL,
                                help="timm model name of the teacher")
    teacher_checkpoint: str | None = _flag(None, "--teacher-checkpoint", group=_DISTILL,
                                           help="teacher weights (timm or gpunet)")
    teacher_img_size: int | None = _flag(None, "--teacher-img-size", group=_DISTILL, parse=int,
                                         help="teacher resolution; the student sees a bicubic "
                                              "downsample")
    test_teacher: bool = _flag(False, "--test-teacher", group=_DISTILL, kind="bool", parse=_bool,
                               metavar="True|False", help="validate the teacher once before "
                                                          "training")
    kd_weight: float = _flag(1.0, "--kd-weight", group=_DISTILL, parse=float)
    kd_temperature: float = _flag(1.0, "--kd-temperature", group=_DISTILL, parse=float)
    # ---- outputs
    output: str = _flag("runs/train", "--output", group=_OUTPUTS,
                        help="output directory, created if missing (or s3:// prefix)")
    resume: str | None = _flag(None, "--resume", group=_OUTPUTS,
                               help="resume from this checkpoint")
    auto_resume: bool = _flag(False, "--auto-resume", group=_OUTPUTS, kind="toggle",
                              help="resume from <output>/last.pth.tar when it exists")
    log_interval: int = _flag(50, "--log-interval", group=_OUTPUTS, parse=int)
    mlflow: bool = _flag(False, "--mlflow", group=_OUTPUTS, kind="toggle",
                         help="track the run in MLflow (MLFLOW_TRACKING_URI)")
    log_model: bool = _flag(True, "--log-model", group=_OUTPUTS, kind="toggle",
                            help="with --mlflow: log the best checkpoint's model to the run as "
                                 "an MLflow model (pytorch flavor), which registration reuses")
    experiment: str = _flag("gpunet", "--experiment", group=_OUTPUTS,
                            help="MLflow experiment name")
    mlflow_run_id: str = _flag("", "--mlflow-run-id", group=_OUTPUTS,
                               help="with --mlflow: log into this existing run instead of "
                                    "creating one (default: $MLFLOW_RUN_ID, which KFP's MLflow "
                                    "plugin sets per task)")
    system_metrics_interval: float = _flag(10.0, "--system-metrics-interval", group=_OUTPUTS,
                                           parse=float,
                                           help="with --mlflow: seconds between system-metric "
                                                "samples (CPU, memory, disk, network, GPU) "
                                                "per node; 0 turns them off")
    run_tag: tuple[str, ...] = _flag((), "--run-tag", group=_OUTPUTS, kind="append",
                                     metavar="KEY=VALUE",
                                     help="extra MLflow run tag (repeatable), e.g. "
                                          "kfp_run_id=...")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f, getattr(self, f.name)))
        _check(self)

    @classmethod
    def resolve(cls, **explicit: Any) -> TrainConfig:
        """Layer *defaults < ``preset``'s values < ``explicit``* (None means not given)."""
        unknown = sorted(set(explicit) - set(FIELDS))
        if unknown:
            raise TrainError(f"unknown training settings {unknown}: valid names are the "
                             f"fields of TrainConfig ({', '.join(FIELDS)})")
        explicit = {k: v for k, v in explicit.items() if v is not None}
        if "data" not in explicit:
            raise TrainError("no dataset: pass DATA (the folder holding train/ and val/)")
        return cls(**{**preset_values(explicit.get("preset")), **explicit})


FIELDS: dict[str, Flag] = {f.name: f.metadata["flag"] for f in dataclasses.fields(TrainConfig)}


def preset_values(name: str | None) -> dict[str, Any]:
    """``{field: value}`` of NVIDIA's train_params file for preset ``name`` ({} for none)."""
    if not name:
        return {}
    if name not in PRESETS:
        raise TrainError(f"--preset {name!r}: valid presets are {', '.join(sorted(PRESETS))}")
    values = load_preset(name)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TrainError(f"preset {name} sets unknown flags {unknown}")
    return values


# --------------------------------------------------------------------------- checks


def _typed(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type (ints for float fields become floats); TrainError if not."""
    flag: Flag = f.metadata["flag"]
    if value is None and f.default is None:
        return None
    if flag.kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TrainError(f"{flag.label} takes two numbers (MIN MAX), got {value!r}")
        return tuple(_scalar(flag, float, v) for v in value)
    if flag.kind == "append":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TrainError(f"{flag.label} takes a list of KEY=VALUE strings, got {value!r}")
        return tuple(_scalar(flag, str, v) for v in value)
    kind = bool if flag.kind in ("toggle", "bool") else flag.parse
    return _scalar(flag, kind, value)


def _scalar(flag: Flag, kind: Callable[[str], Any], value: Any) -> Any:
    if kind is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected, what = {int: (int, "an integer"), float: (float, "a number"),
                      str: (str, "a string"), bool: (bool, "True or False")}[kind]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TrainError(f"{flag.label} must be {what}, got {value!r}")
    return value


def _at_least(cfg: TrainConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if value is not None and not (math.isfinite(value) and value >= low):
        what = "a finite number " if isinstance(value, float) else ""
        raise TrainError(f"{FIELDS[name].label} must be {what}>= {low}, got {value}")


def _check(cfg: TrainConfig) -> None:
    """The value checks that need neither torch nor timm; each error names its flag."""
    for name in ("num_classes", "batch_size", "epochs", "max_steps", "log_interval"):
        _at_least(cfg, name, 1)
    for name in ("drop", "drop_connect", "lr", "weight_decay", "smoothing", "reprob",
                 "kd_weight", "warmup_lr", "min_lr", "warmup_epochs", "workers"):
        _at_least(cfg, name, 0)
    for name in ("img_size", "teacher_img_size"):
        try:
            check_img_size(getattr(cfg, name), FIELDS[name].label)
        except GpunetError as exc:
            raise TrainError(str(exc)) from None
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise TrainError(f"--preset {cfg.preset!r}: valid presets are "
                         f"{', '.join(sorted(PRESETS))}")
    if cfg.data_backend not in FIELDS["data_backend"].choices:
        raise TrainError(f"--data-backend {cfg.data_backend!r}: valid backends are "
                         f"{', '.join(FIELDS['data_backend'].choices)}")
    for name in ("drop", "drop_connect"):
        value = getattr(cfg, name)
        if value is not None and value >= 1:
            raise TrainError(f"{FIELDS[name].label} must be < 1, got {value}")
    if not (math.isfinite(cfg.system_metrics_interval) and cfg.system_metrics_interval >= 0):
        raise TrainError(f"--system-metrics-interval must be a number of seconds >= 0 (0: off), "
                         f"got {cfg.system_metrics_interval}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise TrainError(f"--crop-pct must be in (0, 1], got {cfg.crop_pct}")
    low, high = cfg.scale
    if not 0 < low <= high <= 1:
        raise TrainError(f"--scale {low:g} {high:g}: the random-resized-crop area range needs "
                         "0 < MIN <= MAX <= 1 (default 0.08 1.0)")
    if not (math.isfinite(cfg.decay_epochs) and cfg.decay_epochs > 0):
        raise TrainError(f"--decay-epochs must be > 0, got {cfg.decay_epochs}")
    if not 0 < cfg.decay_rate <= 1:
        raise TrainError(f"--decay-rate must be in (0, 1], got {cfg.decay_rate}")
    if not 0 <= cfg.model_ema_decay < 1:
        raise TrainError(f"--model-ema-decay must be in [0, 1), got {cfg.model_ema_decay}")
    if not (math.isfinite(cfg.kd_temperature) and cfg.kd_temperature > 0):
        raise TrainError(f"--kd-temperature must be > 0, got {cfg.kd_temperature}")
    if cfg.enable_distill:
        if not cfg.teacher:
            raise TrainError("--enable-distill True needs --teacher NAME (a timm model name)")
        if cfg.teacher_img_size is not None and cfg.img_size is not None \
                and cfg.teacher_img_size < cfg.img_size:
            raise TrainError(f"--teacher-img-size {cfg.teacher_img_size} is smaller than "
                             f"--img-size {cfg.img_size}: the student batch is a downsample of "
                             "the teacher batch, so the teacher's size must be >= the student's")
    for tag in cfg.run_tag:
        if "=" not in tag or not tag.split("=", 1)[0]:
            raise TrainError(f"--run-tag {tag!r}: expected KEY=VALUE")
    if cfg.resume and cfg.auto_resume:
        raise TrainError("use either --resume PATH or --auto-resume, not both")


def with_model_name(cfg: TrainConfig, *, label: str | None = None) -> TrainConfig:
    """``cfg`` with ``--model`` as the name the run goes by. A GPUNet JSON spec given by
    location (a path or ``s3://`` URI) is read, validated and stored once, here, and the run
    trains it by its custom name (:func:`~gpunet_core.models.spec.model_name`; ``label``: its
    first part, default the file's stem): the name MLflow's run and LoggedModel, the ONNX
    export and the registry show, which every rank builds the model from. A missing or invalid
    spec fails here (``SpecError``, ``StorageError``), before any data or model work."""
    name = model_name(cfg.model, label=label)
    return cfg if name == cfg.model else dataclasses.replace(cfg, model=name)


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are legal but most likely not meant, each as a message naming its flags
    (``gpunet train`` logs them and goes on)."""
    out = []
    if cfg.warmup_epochs > 0 and cfg.epochs <= cfg.warmup_epochs:
        out.append(f"--epochs {cfg.epochs} is not longer than --warmup-epochs "
                   f"{cfg.warmup_epochs}: the run never leaves warm-up, so the learning rate "
                   f"never reaches --lr {cfg.lr:g}; lower --warmup-epochs (0: none) or raise "
                   "--epochs")
    return out


def check_runtime(cfg: TrainConfig) -> None:
    """The checks that need torch/timm or the network, run before any data, model or output
    work: values that would otherwise surface as a timm traceback or a late S3 failure."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    probe = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(probe, opt=cfg.opt, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                        eps=cfg.opt_eps)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise TrainError(f"--opt {cfg.opt!r} is not usable ({exc}); use a timm optimizer name "
                         "such as rmsproptf (NVIDIA's), adamw or sgd") from None
    try:
        create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                            decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                            warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                            min_lr=cfg.min_lr, updates_per_epoch=1)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise TrainError(f"--sched {cfg.sched!r} is not usable ({exc}); use a timm scheduler "
                         "name such as step (NVIDIA's), cosine or multistep") from None
    # a local output folder that cannot be made (below a file, not writable, itself a file)
    check_output_dir(cfg.output, "--output", error=TrainError)
    # S3 data, output and checkpoints: a wrong bucket, refused credentials or an unreachable
    # endpoint fail now with one line, not after a download, a model build or the first epoch
    remote = {}
    for value in (cfg.data, cfg.output, cfg.initial_checkpoint, cfg.teacher_checkpoint,
                  cfg.resume):
        if value and storage.is_s3_uri(value):
            uri = storage.parse_s3_uri(value)
            remote.setdefault(uri.bucket, uri)
    if remote:
        client = storage.s3_client()
        for uri in remote.values():
            storage.check_bucket(uri, client)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every :class:`TrainConfig` field as a flag, defaults suppressed: the namespace holds
    only what was given, which :func:`from_namespace` layers over the defaults and the preset."""
    groups: dict[str, Any] = {"": parser}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, flag in FIELDS.items():
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        group = groups[flag.group]
        helptext = flag.help
        default = defaults[name]
        if flag.kind != "positional" and "default" not in helptext \
                and default not in (None, False, ()):
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            helptext = f"{helptext} (default {shown})".lstrip()
        kwargs: dict[str, Any] = {"help": helptext or None, "default": argparse.SUPPRESS}
        if flag.kind == "positional":
            group.add_argument(name, help=helptext)
            continue
        if flag.kind == "toggle":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif flag.kind == "append":
            kwargs.update(action="append", metavar=flag.metavar)
        else:
            kwargs.update(type=flag.parse, metavar=flag.metavar, choices=flag.choices)
            if flag.kind == "pair":
                kwargs["nargs"] = 2
        group.add_argument(*flag.names, dest=name, **kwargs)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="gpunet train", description="NVIDIA's GPUNet training recipe under torchrun "
                                         "(or a single process)."))


def from_namespace(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of a namespace parsed by :func:`add_arguments`' flags."""
    return TrainConfig.resolve(**{k: v for k, v in vars(args).items() if k in FIELDS})


def parse(argv: Sequence[str]) -> TrainConfig:
    """``gpunet train``'s argv (without the ``train``) as a :class:`TrainConfig`."""
    return from_namespace(build_parser().parse_args(list(argv)))


def _option(flag: Flag, value: Any) -> list[str]:
    """``[--flag, VALUE]``, or ``[--flag=VALUE]`` when VALUE starts with a dash."""
    text = "True" if value is True else "False" if value is False else str(value)
    return [f"{flag.long}={text}"] if text.startswith("-") else [flag.long, text]


def to_argv(cfg: TrainConfig) -> list[str]:
    """``gpunet train``'s argv for ``cfg`` (``parse(to_argv(cfg)) == cfg``): the preset, then
    each setting that differs from the defaults and the preset."""
    base = preset_values(cfg.preset)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    argv: list[str] = []
    for name, flag in FIELDS.items():
        value = getattr(cfg, name)
        if flag.kind == "positional" or value == base.get(name, defaults[name]):
            continue
        if value is None:
            raise TrainError(f"{flag.label} cannot be unset on the command line once preset "
                             f"{cfg.preset} sets it; pass a value")
        if flag.kind == "toggle":
            argv.append(flag.long if value else f"--no-{flag.long[2:]}")
        elif flag.kind == "pair":
            argv += [flag.long, *map(str, value)]
        elif flag.kind == "append":
            argv += [part for v in value for part in _option(flag, v)]
        else:
            argv += _option(flag, value)
    return [*argv, "--", cfg.data] if cfg.data.startswith("-") else [cfg.data, *argv]

