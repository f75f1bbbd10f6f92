"""TrainConfig: the one typed path from flags, presets and pipeline parameters to the loop.

The argv a launch generates parses back to the same settings for every flag and every preset;
NVIDIA's train_params files resolve as they did before the TrainConfig refactor (the fixture
was produced by the code at c1cfe40); bad values are a TrainError naming the flag, raised
without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpunet_core import cli, steps
from gpunet_core.training.config import (
    FIELDS,
    TrainConfig,
    TrainError,
    from_namespace,
    parse,
    to_argv,
)
from gpunet_core.training.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
BEFORE = json.loads((REPO / "tests" / "data" / "train_settings_c1cfe40.json").read_text())
ADDED_SINCE = {"mlflow_run_id", "system_metrics_interval",  # issue 18
               "hflip"}  # issue 20
DEFAULTS = TrainConfig(data="d")

# one value unlike the default for each field, plus the settings it needs
NON_DEFAULT: dict[str, tuple[object, dict[str, object]]] = {
    "data": ("-odd data dir", {}),
    "preset": ("gpunet_p1", {}),
    "model": ("gpunet_d1", {}),
    "num_classes": (7, {}),
    "drop": (0.0, {}),
    "drop_connect": (0.55, {}),
    "img_size": (40, {}),
    "crop_pct": (0.5, {}),
    "initial_checkpoint": ("s3://bucket/w.pth", {}),
    "trust_checkpoint": (True, {}),
    "batch_size": (3, {}),
    "epochs": (1, {}),
    "opt": ("adamw", {}),
    "opt_eps": (1e-8, {}),
    "momentum": (-0.25, {}),
    "lr": (0.0, {}),
    "weight_decay": (0.05, {}),
    "sched": ("cosine", {}),
    "decay_epochs": (1.0, {}),
    "decay_rate": (1.0, {}),
    "warmup_lr": (0.1, {}),
    "warmup_epochs": (0, {}),
    "min_lr": (0.0, {}),
    "smoothing": (0.0, {}),
    "model_ema": (True, {}),
    "model_ema_decay": (0.5, {}),
    "amp": (True, {}),
    "channels_last": (True, {}),
    "compile": (True, {}),
    "seed": (-3, {}),
    "max_steps": (5, {}),
    "workers": (0, {}),
    "data_backend": ("auto", {}),
    "aa": ("", {}),
    "scale": ((0.5, 0.75), {}),
    "reprob": (0.0, {}),
    "hflip": (0.0, {}),
    "remode": ("const", {}),
    "enable_distill": (True, {"teacher": "resnet10t"}),
    "teacher": ("resnet10t", {}),
    "teacher_checkpoint": ("teacher dir/last.pth.tar", {}),
    "teacher_img_size": (1024, {}),
    "test_teacher": (True, {}),
    "kd_weight": (0.25, {}),
    "kd_temperature": (4.0, {}),
    "output": ("-out", {}),
    "resume": ("runs/x/last.pth.tar", {}),
    "auto_resume": (True, {}),
    "log_interval": (1, {}),
    "mlflow": (True, {}),
    "log_model": (False, {}),
    "experiment": ("digits test", {}),
    "mlflow_run_id": ("0123456789abcdef", {}),
    "system_metrics_interval": (0.5, {}),
    "run_tag": (("kfp_run_id=abc", "-odd=key", "empty="), {}),
}


def roundtrip(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` through the launch argv and back, by both parsers (``gpunet train`` and the CLI's)."""
    argv = to_argv(cfg)
    assert all(isinstance(a, str) for a in argv)
    again = parse(argv)
    assert from_namespace(cli.build_parser().parse_args(["train", *argv])) == again
    return again


def as_json(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)  # ints and floats stay apart


def test_every_field_is_a_flag_with_a_non_default_case():
    assert set(NON_DEFAULT) == set(FIELDS)
    for name, (value, _) in NON_DEFAULT.items():
        assert value != getattr(DEFAULTS, name), name


@pytest.mark.parametrize("name", list(NON_DEFAULT))
def test_each_flag_round_trips_through_argv(name):
    value, needs = NON_DEFAULT[name]
    cfg = TrainConfig.resolve(**{"data": "d", **needs, name: value})
    assert getattr(cfg, name) == value
    assert roundtrip(cfg) == cfg and as_json(roundtrip(cfg)) == as_json(cfg)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_round_trips_alone_and_under_every_flag(preset):
    cfg = TrainConfig.resolve(data="d", preset=preset)
    assert to_argv(cfg) == ["d", "--preset", preset]
    assert roundtrip(cfg) == cfg
    # back to the defaults where the preset differs (switches off, NVIDIA's bools False)
    back = TrainConfig.resolve(data="d", preset=preset, amp=False, model_ema=False,
                               enable_distill=False, batch_size=DEFAULTS.batch_size,
                               lr=DEFAULTS.lr, workers=DEFAULTS.workers)
    assert "--no-amp" in to_argv(back) and roundtrip(back) == back
    for name, (value, needs) in NON_DEFAULT.items():
        if name == "preset":
            continue
        cfg = TrainConfig.resolve(**{"data": "d", "preset": preset, **needs, name: value})
        assert roundtrip(cfg) == cfg, (preset, name)


def test_all_flags_at_once_round_trip():
    settings = {name: value for name, (value, _) in NON_DEFAULT.items() if name != "resume"}
    cfg = TrainConfig.resolve(**settings)
    assert roundtrip(cfg) == cfg
    assert to_argv(cfg)[-2:] == ["--", "-odd data dir"]  # a dash-led positional stays one


@pytest.mark.parametrize("case", list(BEFORE["cases"]))
def test_argv_resolves_as_before_the_refactor(case):
    """NVIDIA's train.sh lines (train_params/*.params) and overrides: the settings the code
    before TrainConfig produced (tests/data/train_settings_c1cfe40.json)."""
    expected = BEFORE["cases"][case]
    cfg = parse(expected["argv"])
    got = json.loads(as_json(cfg))
    added = set(got) - set(expected["settings"])  # fields added since keep their defaults
    assert added == ADDED_SINCE
    assert all(got.pop(name) == getattr(DEFAULTS, name) for name in added)
    assert got == expected["settings"]
    assert json.dumps(got, sort_keys=True) == json.dumps(expected["settings"],
                                                         sort_keys=True)  # types too
    assert roundtrip(cfg) == cfg


def test_explicit_flags_override_the_preset_in_any_order():
    first = parse(["d", "-b", "8", "--preset", "gpunet_p0", "--no-amp"])
    assert first == parse(["d", "--preset", "gpunet_p0", "--no-amp", "--batch-size", "8"])
    assert (first.batch_size, first.amp, first.lr, first.teacher) == (
        8, False, 0.08, "tf_efficientnet_b2")
    assert first.preset == "gpunet_p0"


@pytest.mark.parametrize("argv,message", [
    (["-b", "0"], "-b/--batch-size must be >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["-j", "-1"], "-j/--workers must be >= 0, got -1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
    (["--drop", "1.5"], "--drop must be < 1, got 1.5"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0.0"),
    (["--img-size", "100000"], "--img-size must be in [8, 2048] pixels, got 100000"),
    (["--teacher-img-size", "4"], "--teacher-img-size must be in [8, 2048] pixels, got 4"),
    (["--scale", "2", "1"], "--scale 2 1: the random-resized-crop area range needs"),
    (["--decay-epochs", "0"], "--decay-epochs must be > 0, got 0.0"),
    (["--decay-rate", "1.5"], "--decay-rate must be in (0, 1], got 1.5"),
    (["--model-ema-decay", "1"], "--model-ema-decay must be in [0, 1), got 1.0"),
    (["--kd-temperature", "0"], "--kd-temperature must be > 0, got 0.0"),
    (["--enable-distill", "True"], "--enable-distill True needs --teacher NAME"),
    (["--enable-distill", "True", "--teacher", "resnet10t", "--img-size", "64",
      "--teacher-img-size", "32"], "--teacher-img-size 32 is smaller than --img-size 64"),
    (["--preset", "gpunet_p0", "--img-size", "300"], "--teacher-img-size 260 is smaller than "
                                                      "--img-size 300"),
    (["--run-tag", "novalue"], "--run-tag 'novalue': expected KEY=VALUE"),
    (["--run-tag", "=v"], "--run-tag '=v': expected KEY=VALUE"),
    (["--resume", "x.pth", "--auto-resume"], "use either --resume PATH or --auto-resume"),
])
def test_bad_values_are_a_train_error_naming_the_flag(argv, message):
    with pytest.raises(TrainError) as exc:
        parse(["d", *argv])
    assert message in str(exc.value)


@pytest.mark.parametrize("settings,message", [
    ({"epochs": "3"}, "--epochs must be an integer, got '3'"),
    ({"batch_size": True}, "-b/--batch-size must be an integer, got True"),
    ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
    ({"amp": "yes"}, "--amp must be True or False, got 'yes'"),
    ({"scale": (0.5,)}, "--scale takes two numbers (MIN MAX)"),
    ({"run_tag": "a=b"}, "--run-tag takes a list of KEY=VALUE strings"),
    ({"preset": "gpunet_9"}, "--preset 'gpunet_9': valid presets are gpunet_0"),
    ({"data_backend": "fast"}, "--data-backend 'fast': valid backends are auto, pil, dali"),
    ({"nope": 1}, "unknown training settings ['nope']"),
])
def test_bad_settings_from_python_are_a_train_error(settings, message):
    with pytest.raises(TrainError) as exc:
        TrainConfig.resolve(data="d", **settings)
    assert message in str(exc.value)


def test_resolve_layers_and_coerces():
    cfg = TrainConfig.resolve(data=Path("d"), preset="gpunet_d1", kd_weight=1, lr=None,
                              scale=[0.5, 1], run_tag=["a=b"])
    assert (cfg.data, cfg.kd_weight, cfg.lr, cfg.scale, cfg.run_tag) == (
        "d", 1.0, 0.06, (0.5, 1.0), ("a=b",))
    assert isinstance(cfg.kd_weight, float) and cfg.img_size == 456
    with pytest.raises(TrainError, match="no dataset"):
        TrainConfig.resolve(epochs=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_a_setting_the_command_line_cannot_unset_is_refused():
    cfg = dataclasses.replace(TrainConfig.resolve(data="d", preset="gpunet_0"), img_size=None)
    with pytest.raises(TrainError, match="--img-size cannot be unset"):
        to_argv(cfg)


def test_pipeline_step_config():
    cfg = steps.train_config("data", Path("out"), augment="light", model="gpunet_1", epochs=2,
                             batch_size=8, img_size=32, lr=None, opt=None, kfp_run_id="run-1")
    assert (cfg.data, cfg.output, cfg.auto_resume, cfg.workers) == ("data", "out", True, 1)
    assert (cfg.aa, cfg.reprob, cfg.scale, cfg.lr, cfg.opt) == ("", 0.0, (0.8, 1.0), 0.06,
                                                                "rmsproptf")
    assert (cfg.hflip, cfg.smoothing) == (0.0, 0.0)  # digits are not mirror-symmetric
    assert cfg.sched == "cosine"  # NVIDIA's step decay is a constant LR over a few epochs
    assert cfg.run_tag == ("kfp_run_id=run-1",)
    # the recipe's 3 warmup epochs would outlast this 2-epoch run: none
    assert to_argv(cfg) == ["data", "--model", "gpunet_1", "--img-size", "32", "--batch-size",
                            "8", "--epochs", "2", "--sched", "cosine", "--warmup-epochs", "0",
                            "--smoothing", "0.0",
                            "--workers", "1", "--aa", "", "--scale", "0.8", "1.0", "--reprob",
                            "0.0", "--hflip", "0.0", "--output", "out", "--auto-resume",
                            "--run-tag", "kfp_run_id=run-1"]
    recipe = steps.train_config("data", "out", preset="gpunet_p0")
    assert (recipe.aa, recipe.batch_size, recipe.workers) == ("rand-m9-mstd0.5", 256, 1)
    assert (recipe.warmup_epochs, recipe.epochs, recipe.hflip) == (3, 450, 0.5)  # NVIDIA's
    # an explicit warmup is kept, even one as long as the run
    assert steps.train_config("data", "out", epochs=2, warmup_epochs=2).warmup_epochs == 2
    assert sorted(steps.AUGMENT) == ["light", "recipe"]
    with pytest.raises(steps.StepError, match=r"augment must be one of \['light', 'recipe'\]"):
        steps.train_config("data", "out", augment="heavy")


def test_flag_errors_and_help_import_no_torch():
    code = textwrap.dedent("""
        import argparse, sys
        from gpunet_core.cli import train
        from gpunet_core.training.config import TrainError, parse
        parser = argparse.ArgumentParser(prog="gpunet")
        train.add_parser(parser.add_subparsers())
        parser.format_help()
        try:
            train.run(parser.parse_args(["train", "d", "--lr", "nan"]))
        except TrainError as exc:
            print(exc)
        parse(["d", "--preset", "gpunet_d2"])
        print(sorted(m for m in ("torch", "timm") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["--lr must be a finite number >= 0, got nan", "[]"]
