"""gpunet quantize: fp16 and int8 (tensorrt Q/DQ, cpu QOperator) graphs of a trained export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from gpunet_core.cli import main as cli_main
from gpunet_core.inference.export import inspect_onnx, sidecar_path
from gpunet_core.inference.quantize import quantize_onnx
from gpunet_core.inference.validate import validate_onnx

CALIB = 24


@pytest.fixture(scope="module")
def graphs(digits_onnx, tmp_path_factory):
    """The trained export rewritten three ways through the CLI."""
    root, _, _, files = digits_onnx
    out = tmp_path_factory.mktemp("quantized")
    made = {}
    for precision, target in (("int8", "tensorrt"), ("int8", "cpu"), ("fp16", "tensorrt")):
        path = out / f"{precision}-{target}.onnx"
        code = cli_main(["quantize", "--onnx", str(files["dynamic"]), "--calib-data", str(root),
                         "--precision", precision, "--target", target,
                         "--calib-samples", str(CALIB), "-o", str(path)])
        assert code == 0
        made[precision, target] = path
    return made


def test_every_graph_passes_the_checker_and_says_what_it_is(graphs, digits_onnx):
    root = digits_onnx[0]
    for (precision, target), path in graphs.items():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        info = inspect_onnx(path)
        assert (info.precision, info.target) == (precision, target)
        side = json.loads(sidecar_path(path).read_text())
        assert side["calibration"]["images"] == CALIB
        assert side["calibration"]["dir"] == str(root / "train")  # never the val split
        assert side["parity_vs_fp32"]["images"] == CALIB


def test_tensorrt_int8_is_symmetric_qdq_with_per_channel_weights(graphs):
    proto = onnx.load(str(graphs["int8", "tensorrt"]))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = proto.graph.node
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert q and len(q) == len(dq)
    consumers = {i for n in dq for i in n.input}
    assert all(n.output[0] in consumers for n in q)  # every Q feeds a DQ: pairs
    zero_points = [init[n.input[2]] for n in q if len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    convs = [n for n in nodes if n.op_type == "Conv"]
    weight_q = [n for n in q if n.input[0] in init and init[n.input[0]].ndim == 4]
    assert len(weight_q) >= len(convs) // 2
    assert all(init[n.input[1]].ndim == 1 and init[n.input[1]].size > 1 for n in weight_q)
    assert all({a.name: a.i for a in n.attribute}.get("axis", 1) == 0 for n in weight_q)


def test_cpu_int8_is_qoperator_u8_activations(graphs):
    ops = {n.op_type for n in onnx.load(str(graphs["int8", "cpu"])).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops


def test_fp16_keeps_fp32_io_and_close_logits(graphs):
    path = graphs["fp16", "tensorrt"]
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    parity = json.loads(sidecar_path(path).read_text())["parity_vs_fp32"]
    assert parity["logits_max_abs_diff"] <= 1e-2 * max(1.0, parity["logits_max_abs"])


def test_validate_onnx_gives_a_number_for_every_precision(graphs, digits_onnx):
    root = digits_onnx[0]
    fp32 = validate_onnx(digits_onnx[3]["dynamic"], root, batch_size=8, workers=0,
                         progress=False)
    for (precision, _), path in graphs.items():
        got = validate_onnx(path, root, batch_size=8, workers=0, progress=False)
        assert got["precision"] == precision and got["images"] == fp32["images"]
        assert abs(got["top1"] - fp32["top1"]) <= 20.0  # a working graph, not noise


def test_bad_inputs_are_clear_errors_and_leave_nothing(digits_onnx, graphs, tmp_path, capsys):
    root, _, _, files = digits_onnx
    out = tmp_path / "q.onnx"
    empty = tmp_path / "empty" / "a"
    empty.mkdir(parents=True)
    cases = [
        ({"--calib-data": str(tmp_path / "missing")}, "no such directory"),
        ({"--calib-data": str(empty.parent)}, "no images found"),
        ({"--onnx": str(graphs["int8", "cpu"])}, "already a int8 graph"),
        ({"--calib-samples": "0"}, "--calib-samples must be >= 1"),
        ({"-o": str(files["dynamic"])}, "is the input file"),
    ]
    for extra, message in cases:
        argv = {"--onnx": str(files["dynamic"]), "--calib-data": str(root),
                "--precision": "int8", "--target": "cpu", "-o": str(out), **extra}
        assert cli_main(["quantize", *[x for kv in argv.items() for x in kv]]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists() and not list(tmp_path.glob(".q.onnx*"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["quantize", "--onnx", str(files["dynamic"]), "--calib-data", str(root),
                  "--precision", "int4", "-o", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_conversion_leaves_no_output(digits_onnx, tmp_path, monkeypatch):
    root, _, _, files = digits_onnx
    out = tmp_path / "q.onnx"
    shutil.copy(files["dynamic"], tmp_path / "in.onnx")

    def broken(*_args, **_kw):
        raise RuntimeError("calibration crashed")

    monkeypatch.setattr("gpunet_core.inference.quantize.quantize_int8_cpu", broken)
    with pytest.raises(RuntimeError):
        quantize_onnx(tmp_path / "in.onnx", out, calib_data=root, precision="int8",
                      target="cpu", calib_samples=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_triton_serves_each_quantized_graph_as_it_is(graphs, tmp_path):
    from gpunet_core.inference.triton import export_triton
    from gpunet_core.utils.errors import ExportError
    from tests.test_triton import parse_pbtxt

    repo = tmp_path / "repo"
    fp16 = export_triton(graphs["fp16", "tensorrt"], repo, name="fp16",
                         tensorrt_accelerator=True)
    cfg = parse_pbtxt((repo / "fp16/config.pbtxt").read_text())
    accel = cfg["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"]
    assert accel[0]["parameters"] == [{"key": ["precision_mode"], "value": ["FP16"]}]
    assert Path(fp16["model_file"]).read_bytes() == graphs["fp16", "tensorrt"].read_bytes()
    # QLinearConv has CPU kernels only: a cpu-target graph is served by CPU instances
    with pytest.raises(ExportError, match="quantized for --target cpu.*--kind cpu"):
        export_triton(graphs["int8", "cpu"], repo, name="cpu_gpu")
    export_triton(graphs["int8", "cpu"], repo, name="int8cpu", kind="cpu")
    with pytest.raises(ExportError, match="--tensorrt-accelerator: .* int8 graph.*--plan"):
        export_triton(graphs["int8", "tensorrt"], repo, name="qdq", tensorrt_accelerator=True)
    export_triton(graphs["int8", "tensorrt"], repo, name="qdq")
    for name in ("fp16", "int8cpu", "qdq"):  # Triton checks these against the model file
        cfg = parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert cfg["input"][0]["data_type"] == ["TYPE_FP32"]
        assert cfg["output"][0]["data_type"] == ["TYPE_FP32"]
        session = ort.InferenceSession(str(repo / name / "1/model.onnx"),
                                       providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(float)"
        assert session.get_outputs()[0].type == "tensor(float)"
        assert session.get_inputs()[0].name == cfg["input"][0]["name"][0]
    assert not (repo / "cpu_gpu").exists()
