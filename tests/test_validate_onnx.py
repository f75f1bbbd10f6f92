"""validate --onnx: an ONNX export scores exactly what its checkpoint scores in PyTorch."""

from __future__ import annotations

import dataclasses
import json
import shutil

import onnx
import pytest
import torch

from gpunet_core.cli import main as cli_main
from gpunet_core.data.transforms import EvalConfig
from gpunet_core.inference.export import METADATA_KEY, inspect_onnx
from gpunet_core.inference.validate import (
    onnx_eval_config,
    validate,
    validate_onnx,
)
from gpunet_core.utils.errors import ExportError, GpunetError

IMG = 32
SAME = ("top1", "top5", "topk", "images", "num_classes", "classes", "confusion_matrix",
        "per_class_accuracy", "img_size", "crop_pct", "interpolation", "dataset")


@pytest.fixture(scope="module")
def exported(digits_onnx):
    return digits_onnx


def torch_reference(model, data, **kw):
    return validate(model, data, batch_size=7, workers=0, img_size=IMG, progress=False, **kw)


def assert_same_counts(got, want):
    for key in SAME:
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5)


def test_onnx_scores_exactly_what_pytorch_scores(exported):
    root, _, model, files = exported
    want = torch_reference(model, root)  # a prepared dataset's root: its val/ split
    assert want["images"] == 40 and want["crop_pct"] == 1.0  # gpunet_0's own crop, not 0.875
    confusion = torch.tensor(want["confusion_matrix"])
    assert 20.0 <= want["top1"] < 100.0 and int((confusion.sum(dim=0) > 0).sum()) >= 3

    got = validate_onnx(files["dynamic"], root, batch_size=7, workers=0, progress=False)
    assert_same_counts(got, want)
    assert got["model"] == "gpunet_0" and got["onnx"] == str(files["dynamic"])
    assert got["precision"] == "fp32" and got["target"] is None
    assert got["runtime"] == "onnxruntime" and got["providers"][-1] == "CPUExecutionProvider"
    assert got["device"] == "cpu" and not got["amp"] and not got["channels_last"]
    assert len(got["onnx_sha256"]) == 64 and got["onnxruntime"]
    assert set(want) <= set(got)

    # an overridden crop reaches both paths alike (and changes what the model sees)
    want_crop = torch_reference(model, root / "val", crop_pct=0.5)
    got_crop = validate_onnx(files["dynamic"], root / "val", batch_size=7, workers=0,
                             crop_pct=0.5, threads=1, progress=False)
    assert got_crop["crop_pct"] == 0.5
    assert_same_counts(got_crop, want_crop)
    assert got_crop["confusion_matrix"] != got["confusion_matrix"]


@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_batch_graph_is_fed_in_chunks(exported, batch):
    root, _, model, files = exported
    assert inspect_onnx(files[batch]).batch == batch
    want = torch_reference(model, root / "val")
    # 40 images in loader batches of 7 (last one 5); batch 3: chunks 3, 3, 1 + 2 padding
    got = validate_onnx(files[batch], root / "val", batch_size=7, workers=0, progress=False)
    assert_same_counts(got, want)


def test_preprocessing_comes_from_the_file_with_for_models_fallbacks(exported):
    _, _, model, files = exported
    info = inspect_onnx(files["dynamic"])
    assert onnx_eval_config(info) == EvalConfig.for_model(model, IMG)
    assert onnx_eval_config(info, 0.9).crop_pct == 0.9
    bare = dataclasses.replace(info, metadata={**info.metadata, "crop_pct": None,
                                               "interpolation": None, "mean": [], "std": []})
    assert onnx_eval_config(bare) == EvalConfig.for_model(torch.nn.Identity(), IMG)
    with pytest.raises(GpunetError, match="--img-size 64 does not match .* 32x32"):
        validate_onnx(files["dynamic"], files["dynamic"].parent, img_size=64, workers=0,
                      progress=False)


def test_quantized_metadata_is_reported(exported, tmp_path):
    root, _, model, files = exported
    proto = onnx.load(str(files["dynamic"]))
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), "precision": "int8",
                                     "target": "cpu"})
    onnx.save(proto, str(tmp_path / "q.onnx"))
    got = validate_onnx(tmp_path / "q.onnx", root, batch_size=16, workers=0, progress=False)
    assert (got["precision"], got["target"]) == ("int8", "cpu")
    assert_same_counts(got, torch_reference(model, root))


def test_cli_onnx_results_file_matches_library(exported, tmp_path, capsys):
    root, _, _, files = exported
    want = validate_onnx(files[3], root / "val", batch_size=8, workers=0, progress=False)
    out = tmp_path / "results.json"
    code = cli_main(["validate", str(root / "val"), "--onnx", str(files[3]), "-b", "8", "-j",
                     "0", "--threads", "2", "--no-progress", "--results-file", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert_same_counts(saved, want)
    assert saved["onnx"] == str(files[3]) and saved["model"] == "gpunet_0"
    assert saved["intra_op_num_threads"] == 2 and saved["schema"] == want["schema"]
    printed = json.loads(capsys.readouterr().out)
    assert (printed["onnx"], printed["precision"]) == (str(files[3]), "fp32")
    assert printed["top1"] == want["top1"]


def test_cli_help_describes_both_modes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["validate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--onnx FILE" in text and "--model" in text and "ONNX Runtime" in text
    assert "--threads" in text


def test_cli_bad_inputs_are_clear_and_write_nothing(exported, tmp_path, capsys):
    root, ckpt, _, files = exported
    out = tmp_path / "results.json"
    val = str(root / "val")
    few = tmp_path / "three_classes"  # 3 class folders for a 10-class graph
    for class_dir in sorted((root / "val").iterdir())[:3]:
        shutil.copytree(class_dir, few / class_dir.name)
    missing = tmp_path / "nope.onnx"
    cases = [
        ([val, "--onnx", str(missing)], str(missing)),
        ([val, "--onnx", str(files[1]), "--checkpoint", str(ckpt)], "--checkpoint"),
        ([val, "--onnx", str(files[1]), "--amp"], "--amp"),
        ([val, "--onnx", str(files[1]), "--device", "cpu"], "--device"),
        ([val, "--onnx", str(files[1]), "--model", "gpunet_0"], "exclude each other"),
        ([val], "exactly one of --model"),
        ([val, "--model", "gpunet_0", "--threads", "2"], "--threads"),
        ([val, "--onnx", str(files[1]), "--threads", "0"], "--threads must be >= 1"),
        ([val, "--onnx", str(files[1]), "--img-size", "64"], "--img-size 64"),
        ([str(few), "--onnx", str(files[1])], "3 class folders but the model's classifier has "
                                               "10 outputs"),
        ([val, "--onnx", str(ckpt)], "not a readable ONNX model"),
    ]
    for argv, message in cases:
        code = cli_main(["validate", *argv, "-j", "0", "--no-progress",
                         "--results-file", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert message in err and len(err.splitlines()) == 1, (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".results.json*")), argv
    with pytest.raises(ExportError, match="ONNX file not found"):
        validate_onnx(missing, val, workers=0, progress=False)
