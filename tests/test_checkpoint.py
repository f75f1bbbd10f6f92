"""Checkpoint loading: NVIDIA's container styles, safe loading, mismatches, fine-tuning heads."""

from __future__ import annotations

import argparse
import logging
import zipfile

import pytest
import torch

import gpunet_core
from gpunet_core.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from gpunet_core.models.pretrained import find_pretrained
from gpunet_core.utils.errors import CheckpointError

MODELS = gpunet_core.list_models()
# Container styles of NVIDIA's files and of the project's own checkpoints.
STYLES = ["plain", "state_dict", "state_dict_ema", "model_ema", "model", "module_prefix"]


def random_state_dict(model):
    """Distinct random values in the model's (NVIDIA-named) layout."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.long:
            out[k] = torch.randint(0, 100, v.shape, generator=gen)
        else:
            out[k] = torch.randn(v.shape, generator=gen)
    return out


def wrap(style, sd):
    if style == "plain":
        return sd
    if style == "module_prefix":
        return {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    if style == "state_dict_ema":
        # EMA weights must win over the raw ones, as in timm's load_checkpoint(use_ema=True)
        raw = {k: torch.zeros_like(v) for k, v in sd.items()}
        return {"state_dict": raw, "state_dict_ema": sd, "epoch": 7, "version": 2}
    return {style: sd, "epoch": 1}


@pytest.mark.parametrize("name", MODELS)
def test_nvidia_layout_round_trips(tmp_path, name):
    model = gpunet_core.create_model(name)
    sd = random_state_dict(model)
    style = STYLES[MODELS.index(name) % len(STYLES)]
    path = tmp_path / f"{name}.pth.tar"
    torch.save(wrap(style, sd), path)
    loaded = gpunet_core.create_model(name, checkpoint=path)
    got = loaded.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("style", STYLES)
def test_every_container_style(tmp_path, style):
    model = gpunet_core.create_model("gpunet_d1")
    sd = random_state_dict(model)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(style, sd), path)
    report = load_checkpoint(model, path)
    assert report.loaded == len(sd)
    assert torch.equal(model.state_dict()["network.tail:.net.8.weight"],
                       sd["network.tail:.net.8.weight"])


def test_use_ema_false_takes_raw_weights(tmp_path):
    model = gpunet_core.create_model("gpunet_p0")
    sd = random_state_dict(model)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap("state_dict_ema", sd), path)
    report = load_checkpoint(model, path, use_ema=False)
    assert report.container_key == "state_dict"
    assert float(model.state_dict()["network.head: 2.net.0.weight"].abs().sum()) == 0.0


@pytest.fixture(scope="module")
def g0_sd():
    return random_state_dict(gpunet_core.create_model("gpunet_0"))


@pytest.mark.parametrize("break_it,message", [
    (lambda sd: sd.pop("network.stage: 4 layer10.conv_dw.weight"),
     r"1 missing keys, first: \['network.stage: 4 layer10.conv_dw.weight'\]"),
    (lambda sd: sd.__setitem__("network.extra.weight", torch.zeros(1)),
     r"1 unexpected keys, first: \['network.extra.weight'\]"),
    (lambda sd: sd.__setitem__("network.head: 2.net.0.weight", torch.zeros(16, 3, 3, 3)),
     r"1 shape mismatches, first: \['network.head: 2.net.0.weight: checkpoint \[16, 3, 3, 3\] "
     r"vs model \[32, 3, 3, 3\]'\]"),
])
def test_missing_extra_misshaped_keys_fail_clearly(tmp_path, g0_sd, break_it, message):
    sd = dict(g0_sd)
    break_it(sd)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict_ema": sd}, path)
    with pytest.raises(CheckpointError, match=message):
        gpunet_core.create_model("gpunet_0", checkpoint=path)


def test_wrong_architecture_names_the_right_one(tmp_path):
    torch.save(random_state_dict(gpunet_core.create_model("gpunet_1")), tmp_path / "g1.pth")
    with pytest.raises(CheckpointError) as info:
        gpunet_core.create_model("gpunet_0", checkpoint=tmp_path / "g1.pth")
    text = str(info.value)
    assert "does not fit this model (gpunet_0)" in text
    assert "missing keys" in text and "unexpected keys" in text
    assert "the checkpoint fits model 'gpunet_1': pass --model gpunet_1" in text


def test_pickled_objects_need_trust(tmp_path, g0_sd):
    path = tmp_path / "0.65ms.pth.tar"
    args = argparse.Namespace(model="gpunet_0", lr=0.06)
    torch.save({"epoch": 449, "arch": "gpunet_0", "state_dict": g0_sd, "state_dict_ema": g0_sd,
                "args": args, "version": 2, "metric": 78.9}, path)
    with pytest.raises(CheckpointError, match=r"stores pickled Python objects.*argparse.*"
                                              r"trusted=True \(CLI: --trust-checkpoint\)"):
        gpunet_core.create_model("gpunet_0", checkpoint=path)
    model = gpunet_core.create_model("gpunet_0", checkpoint=path, trusted=True)
    assert torch.equal(model.state_dict()["network. layer15.net.6.bias"],
                       g0_sd["network. layer15.net.6.bias"])


def test_ngc_zip_archive_loads(tmp_path, g0_sd):
    inner = tmp_path / "0.65ms.pth.tar"
    torch.save({"state_dict_ema": g0_sd}, inner)
    archive = tmp_path / "gpunet_0_pyt_ckpt.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(inner, "0.65ms.pth.tar")
    model = gpunet_core.create_model("gpunet_0", checkpoint=archive)
    assert torch.equal(model.state_dict()["network.head: 2.net.0.weight"],
                       g0_sd["network.head: 2.net.0.weight"])


def test_unreadable_files(tmp_path, g0_sd):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    good = tmp_path / "good.pth"
    torch.save(g0_sd, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        read_checkpoint(text)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        gpunet_core.create_model("gpunet_0", checkpoint=tmp_path / "list.pth")


def test_other_num_classes_loads_all_but_classifier(tmp_path, g0_sd, caplog):
    path = tmp_path / "imagenet.pth"
    torch.save(g0_sd, path)
    with caplog.at_level(logging.INFO, logger="gpunet_core.models.checkpoint"):
        model = gpunet_core.create_model("gpunet_0", num_classes=10, checkpoint=path)
    assert model.get_classifier().out_features == 10
    own = model.state_dict()
    assert torch.equal(own["network. layer15.net.0.weight"], g0_sd["network. layer15.net.0.weight"])
    assert "except the classifier" in caplog.text and "1000 classes, the model 10" in caplog.text


def test_project_checkpoint_round_trip_is_weights_only(tmp_path):
    model = gpunet_core.create_model("gpunet_p1", num_classes=10)
    path = save_checkpoint({"state_dict": model.state_dict(), "epoch": 2, "arch": "gpunet_p1",
                            "args": {"lr": 0.08}}, tmp_path / "sub" / "last.pth")
    assert not list(path.parent.glob("*.tmp"))
    obj = read_checkpoint(path)  # weights_only=True must succeed
    assert obj["epoch"] == 2
    clone = gpunet_core.create_model("gpunet_p1", num_classes=10, checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_pretrained_lookup(tmp_path, monkeypatch, g0_sd):
    monkeypatch.setenv("GPUNET_PRETRAINED_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"nvidia/dle/gpunet_0_pyt_ckpt version 21.12.0_amp"):
        find_pretrained("gpunet_0")
    torch.save({"state_dict_ema": g0_sd}, tmp_path / "0.65ms.pth.tar")
    import timm

    model = timm.create_model("gpunet_0", pretrained=True)
    assert torch.equal(model.state_dict()["network. layer15.net.6.bias"],
                       g0_sd["network. layer15.net.6.bias"])


def test_checkpoint_from_s3(s3_env, tmp_path, g0_sd):
    local = tmp_path / "last.pth.tar"
    torch.save({"state_dict": g0_sd, "epoch": 1}, local)
    s3_env.client().upload_file(str(local), s3_env.bucket, "runs/a/last.pth.tar")
    uri = f"s3://{s3_env.bucket}/runs/a/last.pth.tar"
    model = gpunet_core.create_model("gpunet_0", checkpoint=uri)
    assert torch.equal(model.state_dict()["network. layer15.net.6.bias"],
                       g0_sd["network. layer15.net.6.bias"])
    # same size, new content: a fresh fetch, not a stale cached copy
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in g0_sd.items()}
    torch.save({"state_dict": changed, "epoch": 2}, local)
    s3_env.client().upload_file(str(local), s3_env.bucket, "runs/a/last.pth.tar")
    model = gpunet_core.create_model("gpunet_0", checkpoint=uri)
    assert torch.equal(model.state_dict()["network. layer15.net.6.bias"],
                       changed["network. layer15.net.6.bias"])
    with pytest.raises(gpunet_core.GpunetError, match="s3://.*/runs/missing.pth"):
        gpunet_core.create_model("gpunet_0", checkpoint=f"s3://{s3_env.bucket}/runs/missing.pth")


def test_checkpoint_sizes_the_classifier(tmp_path):
    small = gpunet_core.create_model("gpunet_d1", num_classes=10)
    torch.save(small.state_dict(), tmp_path / "d1_10.pth")
    model = gpunet_core.create_model("gpunet_d1", checkpoint=tmp_path / "d1_10.pth")
    assert model.num_classes == 10
