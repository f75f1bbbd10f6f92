"""bench: result schema on onnxruntime/torch, auto fallback, GPU-only errors, trtexec parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpunet_core.cli import main as cli_main
from gpunet_core.inference.export import export_onnx, inspect_onnx
from gpunet_core.inference.latency import (
    BENCH_SCHEMA,
    latency_stats,
    parse_trtexec_output,
    run_benchmark,
    trtexec_command,
)
from gpunet_core.models.factory import create_model
from gpunet_core.utils.errors import BenchmarkError, ExportError

TRTEXEC_LOG = Path(__file__).parent / "data" / "trtexec10_gpunet0_fp16.txt"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the GPU-less path")
IMG = 64


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpunet_0.onnx"
    export_onnx(create_model("gpunet_0"), out, model_name="gpunet_0", img_size=IMG,
                dynamic_batch=True)
    return out


def check_schema(result, backend, batch):
    assert result["schema"] == BENCH_SCHEMA and result["backend"] == backend
    assert result["model"] == "gpunet_0" and result["batch"] == batch
    assert result["img_size"] == IMG and len(result["onnx_sha256"]) == 64
    lat = result["latency_ms"]
    assert set(lat) == {"median", "mean", "min", "max", "p90", "p95", "p99", "std", "count"}
    assert lat["count"] == result["iterations"]
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["throughput_ips"] == pytest.approx(batch * 1000.0 / lat["median"])
    fp = result["fingerprint"]
    for key in ("cpu", "cpu_count", "torch", "torch_threads", "onnxruntime", "gpu", "tensorrt",
                "python", "os"):
        assert key in fp
    assert fp["cpu"] and fp["cpu_count"] >= 1
    json.dumps(result)  # JSON-able


def test_onnxruntime_backend_schema_via_cli(onnx_file, tmp_path, capsys):
    out = tmp_path / "ort.json"
    code = cli_main(["bench", "--onnx", str(onnx_file), "--backend", "onnxruntime", "--batch",
                     "4", "--iterations", "5", "--warmup-ms", "10", "--threads", "1",
                     "--results-file", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    check_schema(result, "onnxruntime", 4)
    assert result["precision"] == "fp32" and result["latency_kind"] == "host_wall"
    assert result["details"]["intra_op_num_threads"] == 1
    assert json.loads(capsys.readouterr().out)["median_ms"] == result["latency_ms"]["median"]


def test_torch_backend_schema(onnx_file):
    result = run_benchmark(onnx_file, backend="torch", iterations=3, warmup_ms=0)
    check_schema(result, "torch", 1)
    assert result["details"]["compiled"] is False


@needs_no_gpu
def test_auto_falls_back_to_onnxruntime_and_says_why(onnx_file):
    result = run_benchmark(onnx_file, iterations=2, warmup_ms=0)
    check_schema(result, "onnxruntime", 1)
    assert result["backend_requested"] == "auto"
    assert "TensorRT not usable" in result["backend_reason"]
    assert "no CUDA GPU" in result["backend_reason"]


@needs_no_gpu
@pytest.mark.parametrize(("backend", "message"), [
    ("tensorrt", "backend tensorrt cannot run: no CUDA GPU is visible"),
    ("trtexec", "backend trtexec needs an NVIDIA GPU"),
])
def test_gpu_backends_without_gpu_are_clear_errors(onnx_file, capsys, backend, message):
    code = cli_main(["bench", "--onnx", str(onnx_file), "--backend", backend])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(onnx_file.parent.glob("*.plan"))


def test_bad_inputs_are_clear_errors(onnx_file, tmp_path):
    # an fp32 export: precision lives in the graph (TensorRT 11), no flag lowers it
    with pytest.raises(BenchmarkError, match="--precision fp16 does not match .*fp32 graph"
                                             "(.|\n)*gpunet quantize --precision fp16"):
        run_benchmark(onnx_file, backend="onnxruntime", precision="fp16")
    static = tmp_path / "static.onnx"
    export_onnx(create_model("gpunet_0"), static, model_name="gpunet_0", img_size=IMG, batch=2)
    with pytest.raises(BenchmarkError, match="fixed batch of 2"):
        run_benchmark(static, backend="onnxruntime", batch=1)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_file.read_bytes()[:5000])
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        run_benchmark(broken, backend="onnxruntime")


def test_trtexec_summary_parser_on_a_trtexec10_log():
    parsed = parse_trtexec_output(TRTEXEC_LOG.read_text())
    # the line NVIDIA's numbers come from: GPU Compute Time ... median
    assert parsed["gpu_compute"] == {"min": 0.462891, "max": 0.753662, "mean": 0.469635,
                                     "median": 0.467957, "p90": 0.472061, "p95": 0.474121,
                                     "p99": 0.494568}
    assert parsed["host_latency"]["median"] == 0.557617
    assert parsed["enqueue"]["p99"] == 0.0986328
    assert parsed["h2d"]["mean"] == 0.0833694 and parsed["d2h"]["max"] == 0.0112305
    assert parsed["throughput_qps"] == 1893.53
    assert parsed["total_host_walltime_s"] == 0.528113
    assert parsed["total_gpu_compute_s"] == 0.469635
    assert parsed["tensorrt_version"] == "10.3.0"
    assert parsed["device"] == "NVIDIA A100-SXM4-80GB"
    assert parsed["passed"] is True


def test_trtexec_parser_rejects_failed_runs():
    failed = "\n".join(TRTEXEC_LOG.read_text().splitlines()[:60]) + (
        "\n[11/20/2024-09:41:16] [E] Error[4]: ITensor::getDimensions: Error Code 4\n"
        "&&&& FAILED TensorRT.trtexec [TensorRT v100300] [b10] # trtexec --onnx=x.onnx\n")
    with pytest.raises(BenchmarkError, match="no performance summary(.|\n)*FAILED"):
        parse_trtexec_output(failed)
    no_gpu_line = TRTEXEC_LOG.read_text().replace("GPU Compute Time:", "GPU Compute:")
    with pytest.raises(BenchmarkError, match="no 'GPU Compute Time' line"):
        parse_trtexec_output(no_gpu_line)


@pytest.mark.parametrize(("major", "strongly_typed"), [(10, True), (11, False)])
def test_trtexec_command_line(onnx_file, tmp_path, major, strongly_typed):
    info = inspect_onnx(onnx_file)
    cmd = trtexec_command(onnx_file, info, tensorrt_major=major, batch=8, iterations=500,
                          warmup_ms=200, engine=tmp_path / "e.plan", workspace_mib=2048)
    assert cmd[0] == "trtexec" and f"--onnx={onnx_file}" in cmd
    # strongly typed only: 10.x opts in, 11.x always is; no precision flag on any major
    assert ("--stronglyTyped" in cmd) is strongly_typed
    assert not {"--fp16", "--int8", "--best", "--bf16", "--fp8"} & set(cmd)
    assert f"--shapes=input:8x3x{IMG}x{IMG}" in cmd
    assert "--memPoolSize=workspace:2048M" in cmd and "--iterations=500" in cmd
    assert "--warmUp=200" in cmd and f"--saveEngine={tmp_path / 'e.plan'}" in cmd
    assert not any(arg.startswith("--workspace") for arg in cmd)  # removed in TensorRT 10


def test_trtexec_command_refuses_pre_10_trtexec(onnx_file, tmp_path):
    with pytest.raises(BenchmarkError, match="strongly typed"):
        trtexec_command(onnx_file, inspect_onnx(onnx_file), tensorrt_major=8, batch=1,
                        iterations=1, warmup_ms=0, engine=tmp_path / "e.plan", workspace_mib=64)


def test_latency_stats():
    stats = latency_stats([float(i) for i in range(1, 101)])
    assert stats["median"] == 50.5 and stats["min"] == 1.0 and stats["max"] == 100.0
    assert stats["p90"] == pytest.approx(90.1) and stats["count"] == 100
    with pytest.raises(BenchmarkError):
        latency_stats([])
