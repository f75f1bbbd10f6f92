"""ONNX export: all seven models, parity in ONNX Runtime, dynamic batch, sidecar, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gpunet_core.cli import main as cli_main
from gpunet_core.inference.export import (
    check_parity,
    export_onnx,
    fixed_input,
    inspect_onnx,
    onnxruntime_session,
    sidecar_path,
)
from gpunet_core.inference.validate import load_inference_model
from gpunet_core.models.checkpoint import save_checkpoint
from gpunet_core.models.factory import create_model, list_models
from gpunet_core.utils.errors import CheckpointError, ExportError

REPO = Path(__file__).resolve().parents[1]
IMG = 64


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpunet_core", *argv], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_with_parity_and_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name).eval()
    out = tmp_path / f"{name}.onnx"
    sidecar = export_onnx(model, out, model_name=name, img_size=IMG, dynamic_batch=True)

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert json.loads(sidecar_path(out).read_text()) == sidecar
    assert sidecar["model"] == name and sidecar["opset"] == 17
    assert sidecar["input_shape"] == ["batch", 3, IMG, IMG]
    assert set(sidecar["parity_by_batch"]) == {"1", "4"}
    assert sidecar["onnx_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    info = inspect_onnx(out)
    assert (info.model, info.num_classes, info.img_size, info.batch) == (name, 1000, IMG, None)

    # independent parity check at both batch sizes, relative to the logits' own scale
    session = onnxruntime_session(out)
    for batch in (1, 4):
        x = fixed_input(batch, IMG, seed=batch)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.inference_mode():
            want = model(x).numpy()
        assert got.shape == (batch, 1000)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # eval-mode export: no Dropout node anywhere
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "Dropout"]


def test_static_batch_cli_export_with_checkpoint_records_checksum(tmp_path):
    model = create_model("gpunet_0", num_classes=10)
    ckpt = save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "ten.pth")
    out = tmp_path / "g0.onnx"
    proc = run_cli("export-onnx", "--model", "gpunet_0", "--checkpoint", str(ckpt), "--img-size",
                   str(IMG), "--batch", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sidecar["num_classes"] == 10 and sidecar["input_shape"] == [2, 3, IMG, IMG]
    assert sidecar["parity_max_abs_diff"] < 1e-4
    session = onnxruntime_session(out)
    assert session.get_inputs()[0].shape == [2, 3, IMG, IMG]
    assert session.get_outputs()[0].shape == [2, 10]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"input": fixed_input(1, IMG).numpy()})


def test_parity_check_detects_a_different_model(tmp_path):
    model = create_model("gpunet_p0").eval()
    out = tmp_path / "p0.onnx"
    export_onnx(model, out, model_name="gpunet_p0", img_size=IMG)
    with torch.no_grad():
        model.get_classifier().bias += 0.05
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(out, model, fixed_input(1, IMG))


def test_inspect_rejects_corrupt_and_foreign_onnx(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        inspect_onnx(corrupt)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(foreign), dynamo=True,
                      verbose=False)
    with pytest.raises(ExportError, match="not a GPUNet export"):
        inspect_onnx(foreign)
    with pytest.raises(ExportError, match="not found"):
        inspect_onnx(tmp_path / "missing.onnx")


def test_dynamo_exporter_dynamic_batch(tmp_path):
    model = create_model("gpunet_0").eval()
    out = tmp_path / "g0_dynamo.onnx"
    sidecar = export_onnx(model, out, model_name="gpunet_0", img_size=IMG, dynamic_batch=True,
                          exporter="dynamo", opset=18)
    assert sidecar["exporter"] == "torch.onnx.export(dynamo=True)" and sidecar["opset"] == 18
    assert set(sidecar["parity_by_batch"]) == {"1", "4"} and sidecar["parity_max_abs_diff"] < 1e-6
    assert inspect_onnx(out).batch is None


def test_checkpoint_model_mismatch_is_a_clear_cli_error(tmp_path, capsys):
    ckpt = save_checkpoint(create_model("gpunet_0").state_dict(), tmp_path / "g0.pth")
    with pytest.raises(CheckpointError, match="fits model 'gpunet_0'"):
        load_inference_model("gpunet_1", ckpt)
    code = cli_main(["export-onnx", "--model", "gpunet_1", "--checkpoint", str(ckpt),
                     "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "gpunet export-onnx: error:" in err and "does not fit" in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint", "s3://no-such-bucket/key.pth"], "s3://no-such-bucket/key.pth"),
    (["--opset", "12"], "--opset 12 is not supported by the torchscript exporter"),
    (["--opset", "17", "--exporter", "dynamo"], "--opset 17 is not supported by the dynamo"),
    (["--img-size", "16"], "--img-size must be >= 32"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, s3_env, flags, message):
    code = cli_main(["export-onnx", "--model", "gpunet_0", "-o", str(tmp_path / "x.onnx"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
