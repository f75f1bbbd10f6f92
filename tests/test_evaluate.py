"""validate: a GPUNet trained here on the digits split scores well above chance, reproducibly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from gpunet_core.cli import main as cli_main
from gpunet_core.data.prepare import prepare_digits
from gpunet_core.inference.validate import load_inference_model, validate
from gpunet_core.models.checkpoint import save_checkpoint
from gpunet_core.models.factory import create_model
from gpunet_core.utils.errors import GpunetError
from tests.train_helpers import train_briefly

IMG = 32
TIMING_KEYS = {"seconds", "images_per_second"}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """Digits train/val folders and a gpunet_0 trained on train for 40 plain AdamW steps of 16."""
    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root, img_size=IMG, per_class=60)  # 48 train / 12 val images per class
    val_dir = root / "val"
    model = train_briefly(root, IMG, steps=40)
    ckpt = save_checkpoint({"state_dict": model.state_dict(), "epoch": 0}, root / "digits.pth")
    return val_dir, ckpt


def run_validate(val_dir, ckpt, **kw):
    model = load_inference_model("gpunet_0", ckpt)
    return validate(model, val_dir, batch_size=32, workers=0, img_size=IMG, crop_pct=1.0,
                    progress=False, **kw)


def test_validate_is_sane_and_reproducible(digits_checkpoint):
    val_dir, ckpt = digits_checkpoint
    first, second = run_validate(val_dir, ckpt), run_validate(val_dir, ckpt)
    assert {k: v for k, v in first.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in second.items() if k not in TIMING_KEYS}

    assert first["images"] == 120 and first["num_classes"] == 10
    assert first["classes"] == [str(d) for d in range(10)]
    assert first["top1"] > 50.0  # chance is 10%
    assert first["top1"] <= first["top5"] <= 100.0
    assert 0.0 < first["loss"] < math.log(10)  # better than a uniform guess
    assert first["images_per_second"] > 0
    confusion = torch.tensor(first["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 120
    assert confusion.sum(dim=1).tolist() == [12] * 10
    assert first["top1"] == pytest.approx(100.0 * int(confusion.trace()) / 120)
    for i, name in enumerate(first["classes"]):
        assert first["per_class_accuracy"][name] == pytest.approx(100.0 * int(confusion[i, i]) / 12)


def test_cli_results_file_matches_library_and_amp_channels_last(digits_checkpoint, tmp_path,
                                                                capsys):
    val_dir, ckpt = digits_checkpoint
    reference = run_validate(val_dir, ckpt)
    out = tmp_path / "results.json"
    common = [str(val_dir), "--model", "gpunet_0", "--checkpoint", str(ckpt), "-b", "32", "-j",
              "0", "--img-size", str(IMG), "--crop-pct", "1.0", "--no-progress"]
    assert cli_main(["validate", *common, "--results-file", str(out)]) == 0
    saved = json.loads(out.read_text())
    for key in ("top1", "top5", "loss", "confusion_matrix", "per_class_accuracy", "images"):
        assert saved[key] == reference[key]
    assert saved["model"] == "gpunet_0" and saved["checkpoint"] == str(ckpt)
    assert json.loads(capsys.readouterr().out)["top1"] == reference["top1"]

    # bf16 autocast is emulated (slow) on CPUs without bf16 units: a 3-per-class subset
    mini = tmp_path / "mini"
    for class_dir in sorted(val_dir.iterdir()):
        (mini / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:3]:
            shutil.copy(image, mini / class_dir.name / image.name)
    fp32 = run_validate(mini, ckpt)
    out_amp = tmp_path / "amp.json"
    common[0] = str(mini)
    assert cli_main(["validate", *common, "--amp", "--channels-last",
                     "--results-file", str(out_amp)]) == 0
    amp = json.loads(out_amp.read_text())
    assert amp["amp"] and amp["amp_dtype"] == "bfloat16" and amp["channels_last"]
    assert amp["images"] == 30
    assert abs(amp["top1"] - fp32["top1"]) <= 10.0  # bf16 may flip a close call (1 in 30 = 3.3)
    assert amp["loss"] == pytest.approx(fp32["loss"], rel=0.1, abs=0.05)


def test_class_count_mismatch_and_missing_dir_are_clear(digits_checkpoint, tmp_path, capsys):
    val_dir, _ = digits_checkpoint
    with pytest.raises(GpunetError, match="10 class folders but the model's classifier has 1000"):
        validate(create_model("gpunet_0"), val_dir, workers=0, img_size=IMG, progress=False)
    code = cli_main(["validate", str(tmp_path / "nope"), "--model", "gpunet_0", "-j", "0"])
    assert code == 2 and "dataset directory not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpunet_0", "gpunet_d1"])
def test_fold_batchnorm_keeps_outputs_and_removes_every_bn(name):
    from gpunet_core.inference.validate import fold_batchnorm
    from gpunet_core.models.factory import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    for mod in model.modules():  # statistics far from the identity, so folding matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    folded = fold_batchnorm(model)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5)
    count = lambda m: sum(isinstance(q, torch.nn.BatchNorm2d) for q in m.modules())  # noqa: E731
    assert count(folded) == 0 and count(model) > 20  # the original is left as it was


@pytest.mark.parametrize("name,crop", [("gpunet_p0", 0.875), ("gpunet_0", 1.0)])
def test_pipeline_validate_step_uses_the_models_own_crop(digits_tiny, tmp_path, name, crop):
    """The DAG's validate step crops like `gpunet validate` does: the model's own crop_pct."""
    from gpunet_core import steps

    with torch.device("meta"):
        assert create_model(name).pretrained_cfg["crop_pct"] == crop
    ckpt = save_checkpoint({"state_dict": create_model(name, num_classes=10).state_dict()},
                           tmp_path / "ckpt.pth")
    out = steps.validate(digits_tiny / "val", ckpt, model=name, img_size=IMG, batch_size=32)
    assert out["crop_pct"] == crop and out["images"] == 32
