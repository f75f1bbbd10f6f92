"""TensorRT 11 (strongly typed only): network flags, trtexec version and command, precision from
the ONNX graph on every backend. No GPU and no tensorrt package needed: the library-free helpers
are tested directly, the TensorRT calls against a stand-in module, trtexec as a stand-in script."""

from __future__ import annotations

import inspect
import json
import os
import types
from pathlib import Path

import onnx
import pytest
import torch

from gpunet_core.inference import latency
from gpunet_core.inference import tensorrt as trtb
from gpunet_core.inference.export import METADATA_KEY, export_onnx, inspect_onnx
from gpunet_core.inference.latency import parse_trtexec_version, run_benchmark
from gpunet_core.inference.tensorrt import network_flags, strong_typing_problem, tensorrt_major
from gpunet_core.models.factory import create_model
from gpunet_core.utils.errors import BenchmarkError

TRTEXEC_LOG = Path(__file__).parent / "data" / "trtexec10_gpunet0_fp16.txt"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the GPU-less path")
IMG = 64


# --------------------------------------------------------------------------- network flags


def test_tensorrt_major():
    assert tensorrt_major("10.13.3.9") == 10
    assert tensorrt_major("11.1.0") == 11 and tensorrt_major("11") == 11
    with pytest.raises(BenchmarkError, match="cannot read a TensorRT version"):
        tensorrt_major("unknown")


def test_tensorrt_before_10_12_is_refused():
    with pytest.raises(BenchmarkError, match=r"TensorRT 10\.8\.0 is too old(.|\n)*>= 10\.12"):
        network_flags("10.8.0", 1)
    assert "10.12" in strong_typing_problem("10.11.0")
    assert "too old" in strong_typing_problem("8.6.1")
    assert strong_typing_problem("10.12.0") is None and strong_typing_problem("11.1.0") is None


@pytest.mark.parametrize(("version", "flag", "expected"), [
    ("10.12.0", 1, 1 << 1),   # 10.x: EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1, opt-in
    ("10.13.3", 1, 1 << 1),
    ("11.0.0", 0, 0),         # 11.x: STRONGLY_TYPED = 0, deprecated and ignored: always on
    ("11.1.0", 0, 0),
    ("11.1.0", None, 0),      # a later 11.x without the member at all
])
def test_network_flags_are_strongly_typed(version, flag, expected):
    assert network_flags(version, flag) == expected


def test_network_flags_on_10x_need_the_strongly_typed_member():
    with pytest.raises(BenchmarkError, match="STRONGLY_TYPED"):
        network_flags("10.13.3", None)


def test_weak_typing_is_gone_from_the_tensorrt_module():
    assert not hasattr(trtb, "INT8_DUMMY_RANGE")
    assert "precision" not in inspect.signature(trtb.build_engine).parameters
    source = inspect.getsource(trtb)
    code = source.split('"""', 2)[2]  # below the module docstring, which names what was removed
    for gone in ("set_dynamic_range", "BuilderFlag", "set_flag("):
        assert gone not in code, gone


def _fake_trt(version: str, strongly_typed: int | None):
    """A stand-in ``tensorrt`` module recording what build_engine asks of it."""
    calls: dict = {"set_flag": [], "create_network": []}

    class Network:
        def get_input(self, _i):
            return types.SimpleNamespace(shape=(-1, 3, IMG, IMG))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def set_flag(self, flag):
            calls["set_flag"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shape

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shape = (name, lo, opt, hi)

    class Builder:
        def __init__(self, _logger):
            pass

        def create_network(self, flags):
            calls["create_network"].append(flags)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, _network, _config):
            return b"plan"

    class Parser:
        def __init__(self, _network, _logger):
            pass

        def parse_from_file(self, _path):
            return True

    class Logger:
        WARNING = 2

        def __init__(self, _severity):
            pass

    members = {} if strongly_typed is None else {"STRONGLY_TYPED": strongly_typed}
    fake = types.SimpleNamespace(
        __version__=version, Logger=Logger,
        Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(**members),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    return fake, calls


@pytest.mark.parametrize(("version", "member", "flags"), [
    ("10.13.3", 1, 2), ("11.1.0", 0, 0), ("11.4.0", None, 0)])
def test_build_engine_creates_a_strongly_typed_network_without_precision_flags(
        monkeypatch, tmp_path, version, member, flags):
    fake, calls = _fake_trt(version, member)
    monkeypatch.setattr(trtb, "_trt", lambda: fake)
    plan = trtb.build_engine(tmp_path / "m.onnx", input_name="input", input_shape=(4, 3, IMG, IMG),
                             workspace_mib=256)
    assert plan == b"plan"
    assert calls["create_network"] == [flags]
    assert calls["set_flag"] == []  # no FP16/INT8 builder flags: the graph's precision
    assert calls["pool"] == ("workspace", 256 << 20)
    assert calls["profile"] == ("input", (4, 3, IMG, IMG), (4, 3, IMG, IMG), (4, 3, IMG, IMG))


def test_build_engine_refuses_old_tensorrt(monkeypatch, tmp_path):
    fake, calls = _fake_trt("10.8.0", 1)
    monkeypatch.setattr(trtb, "_trt", lambda: fake)
    with pytest.raises(BenchmarkError, match=">= 10.12"):
        trtb.build_engine(tmp_path / "m.onnx", input_name="input", input_shape=(1, 3, IMG, IMG))
    assert calls["create_network"] == []


# --------------------------------------------------------------------------- trtexec version


@pytest.mark.parametrize(("text", "version"), [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", "11.1.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110000] [b91] # trtexec --help", "11.0.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101303] [b9] # trtexec", "10.13.3"),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v100800] [b43] # trtexec", "10.8.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", "8.6.1"),  # 8.x encoding
    ("[06/24/2026-10:00:00] [I] TensorRT version: 11.1.0\n[TensorRT v100300]", "11.1.0"),
    ("=== Model Options ===\n  --onnx=<file> ONNX model", None),
    ("", None),
])
def test_parse_trtexec_version(text, version):
    assert parse_trtexec_version(text) == version


def test_parse_trtexec_version_on_a_real_log():
    assert parse_trtexec_version(TRTEXEC_LOG.read_text()) == "10.3.0"


# --------------------------------------------------------------------------- precision


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A plain fp32 export and copies whose gpunet metadata says int8 (cpu) / fp8 (bogus)."""
    root = tmp_path_factory.mktemp("trt11")
    plain = root / "gpunet_0.onnx"
    export_onnx(create_model("gpunet_0"), plain, model_name="gpunet_0", img_size=IMG,
                dynamic_batch=True)

    def copy(name: str, **meta) -> Path:
        proto = onnx.load(str(plain))
        for prop in proto.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = json.dumps({**json.loads(prop.value), **meta})
        out = root / name
        onnx.save(proto, str(out))
        return out

    return {"fp32": plain, "int8": copy("gpunet_0.int8.onnx", precision="int8", target="cpu"),
            "fp8": copy("gpunet_0.fp8.onnx", precision="fp8", target="tensorrt")}


def test_graph_metadata_is_read(exports):
    assert inspect_onnx(exports["fp32"]).precision == "fp32"
    assert inspect_onnx(exports["fp32"]).target is None
    info = inspect_onnx(exports["int8"])
    assert (info.precision, info.target) == ("int8", "cpu")


def test_onnxruntime_reports_the_graphs_precision(exports):
    result = run_benchmark(exports["int8"], backend="onnxruntime", iterations=3, warmup_ms=0)
    assert result["precision"] == "int8" and result["backend"] == "onnxruntime"
    assert result["latency_ms"]["count"] == 3
    # asking for the graph's own precision is fine
    again = run_benchmark(exports["int8"], backend="onnxruntime", precision="int8",
                          iterations=1, warmup_ms=0)
    assert again["precision"] == "int8"
    # an INT8 graph's latency and an FP32 one's, measured alike, are comparable: the
    # precision belongs to the candidate, the fingerprint to the measurement
    plain = run_benchmark(exports["fp32"], backend="onnxruntime", iterations=1, warmup_ms=0)
    assert plain["precision"] == "fp32"
    assert plain["latency_fingerprint"] == result["latency_fingerprint"]
    other_batch = run_benchmark(exports["fp32"], backend="onnxruntime", iterations=1,
                                warmup_ms=0, batch=2)
    assert other_batch["latency_fingerprint"] != plain["latency_fingerprint"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "tensorrt", "trtexec", "auto"])
def test_a_precision_other_than_the_graphs_is_refused(exports, backend):
    with pytest.raises(BenchmarkError, match=r"--precision fp16 does not match .*int8 graph"
                                             r"(.|\n)*TensorRT 11(.|\n)*"
                                             r"gpunet quantize --precision fp16 --target"):
        run_benchmark(exports["int8"], backend=backend, precision="fp16")


def test_a_bogus_graph_precision_is_refused(exports):
    with pytest.raises(BenchmarkError, match="'fp8'"):
        run_benchmark(exports["fp8"], backend="onnxruntime")


def test_torch_cannot_run_an_int8_graph(exports):
    with pytest.raises(BenchmarkError, match="backend torch(.|\n)*int8 \\(Q/DQ\\) graph"):
        run_benchmark(exports["int8"], backend="torch", iterations=1, warmup_ms=0)


@needs_no_gpu
def test_tensorrt_without_gpu_is_still_a_clear_error(exports):
    with pytest.raises(BenchmarkError, match="backend tensorrt cannot run: no CUDA GPU is visible"):
        run_benchmark(exports["int8"], backend="tensorrt", iterations=1, warmup_ms=0)
    assert not list(exports["int8"].parent.glob("*.plan"))


# --------------------------------------------------------------------------- trtexec end to end


def _fake_trtexec(bin_dir: Path, banner_version: int) -> Path:
    """A stand-in trtexec: ``--help`` prints the version banner, a run logs its arguments and
    prints a real performance summary."""
    log = bin_dir / "trtexec.args"
    tool = bin_dir / "trtexec"
    tool.write_text(
        "#!/bin/bash\n"
        f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{banner_version}] [b1] # trtexec $*"\n'
        '[ "$1" = --help ] && { echo "=== Model Options ==="; exit 0; }\n'
        f'printf "%s\\n" "$@" > {log}\n'
        f"sed -n '/=== Performance summary ===/,$p' {TRTEXEC_LOG}\n"
        f'echo "&&&& PASSED TensorRT.trtexec [TensorRT v{banner_version}] [b1] # trtexec"\n')
    tool.chmod(0o755)
    return log


@pytest.mark.parametrize(("banner", "strongly_typed"), [(110100, False), (101303, True)])
def test_trtexec_backend_builds_strongly_typed_at_the_graphs_precision(
        exports, tmp_path, monkeypatch, banner, strongly_typed):
    log = _fake_trtexec(tmp_path, banner)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(latency, "nvidia_driver_present", lambda: True)
    result = run_benchmark(exports["int8"], backend="trtexec", iterations=10, warmup_ms=0,
                           engine=tmp_path / "e.plan")
    args = log.read_text().split()
    assert result["precision"] == "int8" and result["latency_kind"] == "gpu_compute"
    assert result["latency_ms"]["median"] == 0.467957
    assert ("--stronglyTyped" in args) is strongly_typed
    assert not {"--fp16", "--int8", "--best"} & set(args)
    assert result["details"]["command"][1:] == args
    assert result["details"]["trtexec_tensorrt"] == parse_trtexec_version(f"[TensorRT v{banner}]")


def test_trtexec_backend_refuses_an_old_trtexec(exports, tmp_path, monkeypatch):
    log = _fake_trtexec(tmp_path, 100800)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(latency, "nvidia_driver_present", lambda: True)
    with pytest.raises(BenchmarkError, match=r"backend trtexec(.|\n)*10\.8\.0 is too old"):
        run_benchmark(exports["fp32"], backend="trtexec", iterations=1, warmup_ms=0,
                      engine=tmp_path / "e.plan")
    assert not log.exists()  # never got as far as building


def test_trtexec_default_engine_is_named_after_the_graphs_precision(exports, tmp_path,
                                                                   monkeypatch):
    _fake_trtexec(tmp_path, 110100)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(latency, "nvidia_driver_present", lambda: True)
    result = run_benchmark(exports["int8"], backend="trtexec", iterations=1, warmup_ms=0)
    assert Path(result["engine_file"]).name == "gpunet_0.int8.int8.b1.plan"  # stem.precision.bN
