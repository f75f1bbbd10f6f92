"""Training: presets, argument checks, KD loss, and real torchrun runs on the digits set."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from gpunet_core import steps
from gpunet_core.models.checkpoint import read_checkpoint
from gpunet_core.training.config import parse
from gpunet_core.training.distill import kd_loss
from gpunet_core.training.presets import PRESETS, load_preset
from tests import mlflow_server as mlflow_server_helper
from tests.train_helpers import FAST, REPO, gpunet_cmd, read_summary, run, torchrun_cmd

COMMON = {"sched": "step", "decay_epochs": 2.4, "decay_rate": 0.97, "opt": "rmsproptf",
          "opt_eps": 0.001, "workers": 8, "epochs": 450, "warmup_lr": 1e-6,
          "weight_decay": 1e-5, "drop": 0.3, "drop_connect": 0.2, "model_ema": True,
          "model_ema_decay": 0.9999, "aa": "rand-m9-mstd0.5", "remode": "pixel", "reprob": 0.2,
          "num_classes": 1000, "amp": True}
# NVIDIA's train_params table (ARCHITECTURE.md section 3): b, lr, img, crop, distill, teacher, t-img
TABLE = {
    "gpunet_0": (192, 0.06, 320, 1.0, False, None, None),
    "gpunet_1": (192, 0.06, 288, 1.0, False, None, None),
    "gpunet_2": (192, 0.06, 384, 1.0, False, None, None),
    "gpunet_d1": (192, 0.06, 456, 1.0, True, "tf_efficientnet_b5_ns", 456),
    "gpunet_d2": (128, 0.06, 528, 1.0, True, "tf_efficientnet_b6_ns", 528),
    "gpunet_p0": (256, 0.08, 224, 0.875, True, "tf_efficientnet_b2", 260),
    "gpunet_p1": (256, 0.08, 224, 0.875, True, "tf_efficientnet_b2", 260),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_reproduce_train_params(name):
    preset = load_preset(name)
    b, lr, img, crop, distill, teacher, timg = TABLE[name]
    assert preset["model"] == name
    assert (preset["batch_size"], preset["lr"], preset["img_size"], preset["crop_pct"]) == (
        b, lr, img, crop)
    assert preset["enable_distill"] is distill
    assert preset.get("teacher") == teacher and preset.get("teacher_img_size") == timg
    for key, value in COMMON.items():
        assert preset[key] == value, (name, key)
    cfg = parse(["data", "--preset", name])
    assert (cfg.batch_size, cfg.lr, cfg.img_size, cfg.model_ema) == (b, lr, img, True)


def test_explicit_flags_override_preset():
    cfg = parse(["data", "--preset", "gpunet_p0", "-b", "8", "--lr", "0.01"])
    assert (cfg.batch_size, cfg.lr, cfg.teacher, cfg.crop_pct) == (
        8, 0.01, "tf_efficientnet_b2", 0.875)
    assert set(PRESETS) == set(TABLE)


def test_kd_loss_is_soft_target_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    p = F.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    kl = F.kl_div(F.log_softmax(s, -1), p, reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, 1.0), kl + entropy, atol=1e-6)
    p2 = F.softmax(t / 2, -1)
    expected = (-(p2 * F.log_softmax(s / 2, -1)).sum(-1)).mean() * 4
    assert torch.allclose(kd_loss(s, t, 2.0), expected, atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--enable-distill", "True", "--teacher", "resnet10t", "--img-size", "64",
      "--teacher-img-size", "32"], "--teacher-img-size 32 is smaller than --img-size 64"),
    (["--enable-distill", "True", "--teacher", "no_such_net"], "unknown teacher 'no_such_net'"),
    (["--enable-distill", "True"], "--enable-distill True needs --teacher"),
    (["--num-classes", "7"], "--num-classes 7 but"),
    (["--drop", "1.5"], "--drop must be < 1"),
    (["--model", "gpunet_7"], "unknown model 'gpunet_7'"),
])
def test_bad_arguments_fail_before_training(digits_small, tmp_path, extra, message):
    out = tmp_path / "run"
    result = run(gpunet_cmd("train", str(digits_small), "--output", str(out), "--epochs", "1",
                            *FAST, *extra), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written: not even the output folder


def test_negative_batch_is_a_usage_error(digits_small):
    result = run(gpunet_cmd("train", str(digits_small), "-b", "0"))
    assert result.returncode == 2 and "-b/--batch-size must be >= 1, got 0" in result.stderr


def test_step_says_why_training_failed(digits_small, tmp_path, monkeypatch):
    # a check that needs timm runs in the training process; the step reports its message
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    cfg = steps.train_config(digits_small, tmp_path / "run", model="gpunet_0", epochs=1,
                             batch_size=8, img_size=32, opt="adamw9")
    with pytest.raises(steps.StepError, match=r"training failed \(exit code 2\): --opt "
                                              r"'adamw9' is not usable"):
        steps.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_workers_learn_and_stay_in_sync(digits_small, tmp_path):
    out = tmp_path / "ddp"
    result = run(torchrun_cmd(2, "train", str(digits_small), "--model", "gpunet_0",
                              "--epochs", "3", "--model-ema", "--model-ema-decay", "0.5",
                              "--output", str(out), *FAST), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(out / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert float(rows[-1]["top1"]) > 30.0, rows  # chance is 10 %
    ckpt = read_checkpoint(out / "last.pth.tar")
    for row in ckpt["history"]:
        sums = row["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], "DDP ranks diverged"
        # the two ranks split the 320 training images: each sample in exactly one shard
        assert row["shards"] == {"ranks": 2, "samples": 320, "per_rank": 160, "missing": 0,
                                 "duplicated": 0}
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and (out / "model_best.pth.tar").exists()
    # result.json: what the pipeline's launcher reads instead of unpickling the checkpoint
    summary = steps.train_result(out)
    assert summary["epochs"] == 3 and summary["steps"] == ckpt["steps"]
    assert summary["top1"] == ckpt["history"][-1]["top1"]
    assert summary["best_top1"] == ckpt["best_top1"]
    assert (out / "args.yaml").read_text().count("model: gpunet_0") == 1
    # the project's checkpoints load through the foundation loader (EMA preferred)
    import gpunet_core

    model = gpunet_core.create_model("gpunet_0", num_classes=10, checkpoint=out / "last.pth.tar")
    assert torch.equal(model.state_dict()["network. layer15.net.6.bias"],
                       ckpt["state_dict_ema"]["network. layer15.net.6.bias"])
    assert math.isfinite(float(rows[-1]["img_per_sec"]))


@pytest.mark.slow
def test_distillation_teacher_sees_its_resolution(digits_small, tmp_path):
    import timm

    from gpunet_core.data import loaders, transforms
    from gpunet_core.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10)
    cfg = transforms.AugmentConfig(img_size=48, auto_augment=None, reprob=0.0, scale=(0.5, 1.0))
    loader = loaders.build_train_loader(digits_small / "train", cfg, batch_size=32, workers=0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    for _ in range(2):
        for images, target in loader:
            assert images.shape[-1] == 48
            loss = F.cross_entropy(teacher(images), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = save_checkpoint({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pth")

    out = tmp_path / "kd"
    result = run(gpunet_cmd("train", str(digits_small), "--model", "gpunet_0", "--epochs", "2",
                            "--output", str(out), *FAST, "--enable-distill", "True",
                            "--teacher", "resnet10t", "--teacher-checkpoint", str(ckpt),
                            "--teacher-img-size", "48", "--kd-weight", "0.5",
                            "--test-teacher", "True"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher resnet10t sees 48 px, student 32 px" in result.stderr
    assert "teacher resnet10t: top1" in result.stderr
    history = read_checkpoint(out / "last.pth.tar")["history"]
    assert all(row["teacher_px"] == 48 and row["student_px"] == 32 for row in history)
    rows = read_summary(out / "summary.csv")
    for row in rows:
        kd, ce, total = float(row["train_kd"]), float(row["train_ce"]), float(row["train_loss"])
        assert kd > 0
        assert total == pytest.approx(ce + 0.5 * kd, rel=1e-4)


@pytest.fixture
def mlflow_server(tmp_path):
    server = mlflow_server_helper.start(tmp_path / "mlflow")
    yield server
    server.stop()


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_artifacts(digits_small, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "tracked"
    result = run(gpunet_cmd("train", str(digits_small), "--model", "gpunet_0", "--epochs", "2",
                            "--output", str(out), "--mlflow", "--experiment", "digits-test",
                            *FAST), timeout=900, MLFLOW_TRACKING_URI=mlflow_server.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "mlflow_spool.jsonl").exists()
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("digits-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    data = runs[0].data
    assert data.params["model"] == "gpunet_0" and data.params["lr"] == "0.002"
    assert int(data.params["model_params"]) > 10_000_000
    assert len(data.params["dataset_manifest_sha256"]) == 64
    assert data.tags["model"] == "gpunet_0" and "git_sha" in data.tags
    history = client.get_metric_history(runs[0].info.run_id, "top1")
    assert [m.step for m in history] == [0, 1]
    for key in ("train_loss", "train_ce", "eval_loss", "top5", "lr", "img_per_sec"):
        assert len(client.get_metric_history(runs[0].info.run_id, key)) == 2, key
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"summary.csv", "args.yaml", "model_best.pth.tar"} <= artifacts
    assert runs[0].info.status == "FINISHED"
    # a model-training experiment, with the node's system metrics in the run
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert client.get_metric_history(runs[0].info.run_id, key), key
    # the best checkpoint's model, as a LoggedModel of the run that registration completes
    import mlflow.pytorch
    import torch

    from gpunet_core.inference.validate import load_inference_model
    from gpunet_core.mlops import registry
    from gpunet_core.utils.files import sha256_file

    best = out / "model_best.pth.tar"
    (model,) = client.search_logged_models([exp.experiment_id])
    assert (out / "mlflow_model_id").read_text() == model.model_id
    assert model.source_run_id == runs[0].info.run_id and str(model.status) == "READY"
    assert model.tags[registry.CHECKPOINT_TAG] == sha256_file(best)
    assert model.tags[registry.IMG_SIZE_TAG] == FAST[FAST.index("--img-size") + 1]
    best_epoch = max(history, key=lambda m: m.value).step
    linked = {m.key: m for m in model.metrics}
    assert linked["top1"].step == best_epoch  # the best epoch's figures are the model's
    assert not [k for k in linked if k.startswith("system/")]  # the run's, not the model's
    assert [o.model_id for o in client.get_run(runs[0].info.run_id).outputs.model_outputs] == [
        model.model_id]
    assert model.params["lr"] == "0.002"
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    try:
        logged = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(logged(x), load_inference_model("gpunet_0", best)(x))
