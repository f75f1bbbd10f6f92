"""export-triton: repository layout and config.pbtxt, field by field."""

from __future__ import annotations

import re

import onnxruntime as ort
import pytest

from gpunet_core.cli import main as cli_main
from gpunet_core.inference.export import export_onnx, fixed_input
from gpunet_core.inference.triton import export_triton
from gpunet_core.models.factory import create_model
from gpunet_core.utils.errors import ExportError

IMG = 64
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<punct>[{}\[\]:,])|(?P<word>[^\s{}\[\]:,"]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> dict; every field is a list (repeated or not), as parsed."""
    tokens = []
    for m in _TOKEN.finditer(text):
        if m.group("str"):
            tokens.append(("str", m.group("str")[1:-1]))
        elif m.group("punct"):
            tokens.append(("p", m.group("punct")))
        elif m.group("word"):
            word = m.group("word")
            tokens.append(("num", int(word)) if re.fullmatch(r"-?\d+", word) else ("id", word))
    pos = 0

    def value():
        nonlocal pos
        kind, tok = tokens[pos]
        pos += 1
        if (kind, tok) == ("p", "{"):
            return message("}")
        if (kind, tok) == ("p", "["):
            items = []
            while tokens[pos] != ("p", "]"):
                items.append(value())
                if tokens[pos] == ("p", ","):
                    pos += 1
            pos += 1
            return items
        return tok

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != ("p", end):
            key = tokens[pos][1]
            pos += 1
            if tokens[pos] == ("p", ":"):
                pos += 1
            v = value()
            out.setdefault(key, []).extend(v if isinstance(v, list) else [v])
        pos += 1
        return out

    return message(None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    model = create_model("gpunet_p0", num_classes=10)
    dynamic, static = d / "dyn.onnx", d / "static.onnx"
    export_onnx(model, dynamic, model_name="gpunet_p0", img_size=IMG, dynamic_batch=True)
    export_onnx(model, static, model_name="gpunet_p0", img_size=IMG, batch=2)
    return dynamic, static


def test_repository_layout_and_config_fields(exports, tmp_path, capsys):
    dynamic, _ = exports
    repo = tmp_path / "repo"
    assert cli_main(["export-triton", "--onnx", str(dynamic), "-r", str(repo),
                     "--preferred-batch-size", "8", "16", "--max-queue-delay-us", "250",
                     "--tensorrt-accelerator"]) == 0
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["gpunet_p0/1/model.onnx", "gpunet_p0/config.pbtxt"]
    assert (repo / "gpunet_p0/1/model.onnx").read_bytes() == dynamic.read_bytes()

    cfg = parse_pbtxt((repo / "gpunet_p0/config.pbtxt").read_text())
    assert cfg["name"] == ["gpunet_p0"] and cfg["platform"] == ["onnxruntime_onnx"]
    assert cfg["max_batch_size"] == [64]
    (inp,), (out,) = cfg["input"], cfg["output"]
    assert inp == {"name": ["input"], "data_type": ["TYPE_FP32"], "dims": [3, IMG, IMG]}
    assert out == {"name": ["logits"], "data_type": ["TYPE_FP32"], "dims": [10]}
    assert cfg["dynamic_batching"] == [{"preferred_batch_size": [8, 16],
                                        "max_queue_delay_microseconds": [250]}]
    assert cfg["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"]}]
    accel = cfg["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"]
    # the precision is the graph's: an FP32 export is never served as FP16 behind its back
    assert accel == [{"name": ["tensorrt"],
                      "parameters": [{"key": ["precision_mode"], "value": ["FP32"]}]}]
    assert set(cfg) == {"name", "platform", "max_batch_size", "input", "output",
                        "dynamic_batching", "instance_group", "optimization"}

    # the config's tensor names and shapes are the model file's (what Triton checks on load)
    session = ort.InferenceSession(str(repo / "gpunet_p0/1/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == inp["name"]
    assert [o.name for o in session.get_outputs()] == out["name"]
    logits = session.run(None, {"input": fixed_input(3, IMG).numpy()})[0]
    assert list(logits.shape[1:]) == out["dims"]


def test_static_batch_cpu_and_versions(exports, tmp_path):
    dynamic, static = exports
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="fixed batch of 2"):
        export_triton(static, repo)
    result = export_triton(static, repo, name="p0_static", max_batch_size=0, kind="cpu",
                           instances=1)
    cfg = parse_pbtxt((repo / "p0_static/config.pbtxt").read_text())
    assert cfg["max_batch_size"] == [0] and "dynamic_batching" not in cfg
    assert cfg["input"][0]["dims"] == [2, 3, IMG, IMG] and cfg["output"][0]["dims"] == [2, 10]
    assert cfg["instance_group"] == [{"count": [1], "kind": ["KIND_CPU"]}]
    assert result["model_file"].endswith("p0_static/1/model.onnx")

    export_triton(dynamic, repo, name="p0")
    with pytest.raises(ExportError, match="already exists"):
        export_triton(dynamic, repo, name="p0")
    export_triton(dynamic, repo, name="p0", version=2)
    assert sorted(p.name for p in (repo / "p0").iterdir()) == ["1", "2", "config.pbtxt"]


def test_plan_and_bad_inputs(exports, tmp_path):
    dynamic, _ = exports
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"serialized engine bytes")
    result = export_triton(dynamic, tmp_path / "repo", plan=plan, max_batch_size=8)
    cfg = parse_pbtxt((tmp_path / "repo/gpunet_p0/config.pbtxt").read_text())
    assert cfg["platform"] == ["tensorrt_plan"] and cfg["max_batch_size"] == [8]
    assert result["model_file"].endswith("gpunet_p0/1/model.plan")
    with pytest.raises(ExportError, match="plan not found"):
        export_triton(dynamic, tmp_path / "r2", plan=tmp_path / "nope.plan")
    with pytest.raises(ExportError, match="exceed --max-batch-size"):
        export_triton(dynamic, tmp_path / "r2", preferred_batch_sizes=[128])
    with pytest.raises(ExportError, match="model name"):
        export_triton(dynamic, tmp_path / "r2", name="bad name/..")
    garbage = tmp_path / "x.onnx"
    garbage.write_text("not onnx")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        export_triton(garbage, tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
