"""Latency benchmarks of a GPUNet ONNX export on several backends, one result schema.

Backends: ``tensorrt`` (TensorRT 10.12+/11 Python API, strongly typed, GPU compute time, see
:mod:`gpunet_core.inference.tensorrt`), ``trtexec`` (runs NVIDIA's binary and parses its
performance summary), ``onnxruntime`` (CUDA EP when present, else CPU) and ``torch`` (eager or
``torch.compile``; the architecture is rebuilt from the export's metadata with random weights,
since latency does not depend on weight values). ``auto`` picks TensorRT when a GPU and the
package are present, else ONNX Runtime, and records why.

The precision is the ONNX graph's (:attr:`OnnxInfo.precision
<gpunet_core.inference.export.OnnxInfo.precision>`): TensorRT 11 builds every network strongly
typed, so there are no fp16/int8 builder flags any more; an export is fp32 and ``gpunet quantize``
writes fp16 (ModelOpt AutoCast) or int8 (Q/DQ) graphs. ``precision=`` only confirms it.

Every result is a JSON-able dict with ``schema`` :data:`BENCH_SCHEMA`: latency statistics in ms
(median, mean, min, max, p90, p95, p99, std), throughput in images/s, what was measured
(``latency_kind``: ``gpu_compute`` or ``host_wall``) and a hardware/software fingerprint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpunet_core.inference import tensorrt as trtb
from gpunet_core.inference.export import (
    MAX_BATCH,
    PARITY_SEED,
    OnnxInfo,
    fixed_input,
    inspect_onnx,
    onnx_providers,
    onnxruntime_session,
)
from gpunet_core.inference.tensorrt import (
    nvidia_driver_present,
    strong_typing_problem,
    tensorrt_major,
    tensorrt_unavailable_reason,
    tensorrt_version,
)
from gpunet_core.utils.errors import BenchmarkError
from gpunet_core.utils.files import BENCH_SCHEMA, atomic_write, sha256_file

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "trtexec", "onnxruntime", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
GPU_ONLY = {"tensorrt", "trtexec"}


# --------------------------------------------------------------------------- statistics


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """Summary of per-iteration latencies (ms), with trtexec's percentiles."""
    if not times_ms:
        raise BenchmarkError("no timed iterations: --iterations must be >= 1")
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"median": float(np.median(arr)), "mean": float(arr.mean()), "min": float(arr.min()),
            "max": float(arr.max()), "p90": float(np.percentile(arr, 90)),
            "p95": float(np.percentile(arr, 95)), "p99": float(np.percentile(arr, 99)),
            "std": float(arr.std()), "count": int(arr.size)}


def time_host_loop(step: Callable[[], Any], iterations: int, warmup_ms: float,
                   sync: Callable[[], Any] = lambda: None) -> list[float]:
    """Wall-clock ms of ``iterations`` calls of ``step`` after ``warmup_ms`` of warm-up."""
    deadline = time.perf_counter() + warmup_ms / 1000.0
    while True:
        step()
        sync()
        if time.perf_counter() >= deadline:
            break
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        step()
        sync()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


# --------------------------------------------------------------------------- fingerprint


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def fingerprint() -> dict[str, Any]:
    """Hardware and software the numbers were measured on."""

    import onnxruntime as ort

    torch = None  # imported only where it can tell something: a GPU, or already loaded
    if "torch" in sys.modules or nvidia_driver_present():
        import torch
    gpu = None
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}",
               "driver": _nvidia_driver(), "cuda_runtime": torch.version.cuda}
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu,
        "torch": torch.__version__ if torch else importlib.metadata.version("torch"),
        "torch_threads": torch.get_num_threads() if torch else None,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": tensorrt_version(),
        "trtexec": shutil.which("trtexec"),
    }


def latency_fingerprint(result: dict[str, Any]) -> str:
    """16 hex digits naming how a benchmark result was measured: backend, batch, what was
    timed, and the hardware (CPU model and cores, GPU model). Two latencies are comparable
    only when their fingerprints are equal; software versions and the host name are left out
    (another node of the same kind measures the same). The graph's precision is not part of
    it: an INT8 candidate's latency and an FP32 champion's, measured alike, are what a
    deployment decision compares (the precision is the candidate's own ``precision``)."""
    fp = result.get("fingerprint") or {}
    gpu = fp.get("gpu") or {}
    key = {"backend": result.get("backend"), "batch": result.get("batch"), "latency_kind": result.get("latency_kind"),
           "cpu": fp.get("cpu"), "cpus": fp.get("cpu_affinity") or fp.get("cpu_count"),
           "gpu": gpu.get("name"), "gpus": gpu.get("count")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- trtexec


_STAT_LINE = re.compile(
    r"\[I\] (?P<name>Latency|Enqueue Time|H2D Latency|GPU Compute Time|D2H Latency): (?P<body>.+)")
_STAT_ITEM = re.compile(r"(?P<key>min|max|mean|median|percentile\((?P<pct>[\d.]+)%\))\s*=?\s*"
                        r"(?P<value>[-+\d.eE]+) ms")
_STAT_KEYS = {"Latency": "host_latency", "Enqueue Time": "enqueue", "H2D Latency": "h2d",
              "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}


def parse_trtexec_output(text: str) -> dict[str, Any]:
    """The performance summary of a ``trtexec`` run (TensorRT 8.6-11 format) as a dict.

    Keys: ``throughput_qps``, one stats dict (ms) per summary line (``gpu_compute``,
    ``host_latency``, ``enqueue``, ``h2d``, ``d2h``; percentiles as ``p90`` etc.),
    ``total_host_walltime_s``, ``total_gpu_compute_s``, ``tensorrt_version``, ``device``,
    ``passed``. BenchmarkError when there is no summary.
    """
    if "=== Performance summary ===" not in text:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise BenchmarkError(f"trtexec printed no performance summary; its last lines:\n{tail}")
    summary = text.split("=== Performance summary ===", 1)[1]
    out: dict[str, Any] = {}
    for line in summary.splitlines():
        if m := _STAT_LINE.search(line):
            stats = {}
            for item in _STAT_ITEM.finditer(m.group("body")):
                pct = item.group("pct")
                key = f"p{float(pct):g}" if pct else item.group("key")
                stats[key] = float(item.group("value"))
            out[_STAT_KEYS[m.group("name")]] = stats
        elif m := re.search(r"\[I\] Throughput: ([\d.eE+-]+) qps", line):
            out["throughput_qps"] = float(m.group(1))
        elif m := re.search(r"\[I\] Total Host Walltime: ([\d.eE+-]+) s", line):
            out["total_host_walltime_s"] = float(m.group(1))
        elif m := re.search(r"\[I\] Total GPU Compute Time: ([\d.eE+-]+) s", line):
            out["total_gpu_compute_s"] = float(m.group(1))
    if "gpu_compute" not in out or "median" not in out["gpu_compute"]:
        raise BenchmarkError("trtexec's performance summary has no 'GPU Compute Time' line")
    if version := parse_trtexec_version(text):
        out["tensorrt_version"] = version
    if m := re.search(r"\[I\] Selected Device: (.+)", text):
        out["device"] = m.group(1).strip()
    out["passed"] = "&&&& PASSED" in text
    return out


_VERSION_LINE = re.compile(r"TensorRT version: (\d+\.\d+\.\d+)")
_VERSION_BANNER = re.compile(r"\[TensorRT v(\d+)\]")


def parse_trtexec_version(text: str) -> str | None:
    """The TensorRT version trtexec reports, as ``"11.1.0"``; None when the text has none.

    Reads the ``[I] TensorRT version: 11.1.0`` line of a build, else the ``&&&& RUNNING
    TensorRT.trtexec [TensorRT v110100]`` banner every run (``--help`` included) starts with:
    ``NV_TENSORRT_VERSION``, major*10000 + minor*100 + patch since TensorRT 10 (8.x: major*1000
    + minor*100 + patch).
    """
    if m := _VERSION_LINE.search(text):
        return m.group(1)
    if m := _VERSION_BANNER.search(text):
        n = int(m.group(1))
        if n >= 100000:
            major, minor, patch = n // 10000, n // 100 % 100, n % 100
        else:
            major, minor, patch = n // 1000, n // 100 % 10, n % 100
        return f"{major}.{minor}.{patch}"
    return None


def trtexec_command(onnx: Path, info: OnnxInfo, *, tensorrt_major: int, batch: int,
                    iterations: int, warmup_ms: float, engine: Path, workspace_mib: int,
                    trtexec: str = "trtexec") -> list[str]:
    """The trtexec command line for TensorRT ``tensorrt_major``: strongly typed, never a precision
    flag (TensorRT 11 removed ``--fp16``/``--int8``/``--best``; the precision is the graph's).
    ``--stronglyTyped`` opts in on 10.x; 11.x is always strongly typed (the flag is a no-op)."""
    if tensorrt_major < 10:
        raise BenchmarkError(f"trtexec of TensorRT {tensorrt_major}.x cannot build strongly typed "
                             "engines; use TensorRT >= 10.12")
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", f"--iterations={iterations}",
           f"--warmUp={int(warmup_ms)}", "--duration=0",
           f"--memPoolSize=workspace:{workspace_mib}M"]
    if info.batch is None:
        cmd.append(f"--shapes={info.input_name}:{batch}x3x{info.img_size}x{info.img_size}")
    if tensorrt_major < 11:
        cmd.append("--stronglyTyped")
    return cmd


def trtexec_version(binary: str) -> str:
    """The TensorRT version of the ``trtexec`` at ``binary``, from the banner of ``--help``
    (trtexec has no ``--version``; ``--help`` needs no GPU work); BenchmarkError if unreadable."""
    try:
        proc = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchmarkError(f"backend trtexec: cannot run `{binary} --help` to learn its "
                             f"TensorRT version: {exc}") from None
    version = parse_trtexec_version(proc.stdout + proc.stderr)
    if version is None:
        raise BenchmarkError(f"backend trtexec: `{binary} --help` printed no TensorRT version "
                             "banner ([TensorRT vNNNNNN]); is it NVIDIA's trtexec?")
    return version


# --------------------------------------------------------------------------- backends


def _bench_tensorrt(info: OnnxInfo, batch: int, iterations: int, warmup_ms: float,
                    engine: Path, workspace_mib: int) -> dict[str, Any]:
    shape = info.input_shape(batch)
    plan = trtb.build_engine(info.path, input_name=info.input_name, input_shape=shape,
                             workspace_mib=workspace_mib)
    with atomic_write(engine, "wb") as fh:
        fh.write(plan)
    times, details = trtb.time_engine(plan, input_name=info.input_name, input_shape=shape,
                                      iterations=iterations, warmup_ms=warmup_ms)
    return {"latency_ms": latency_stats(times), "latency_kind": "gpu_compute",
            "engine_file": str(engine), "details": details}


def _bench_trtexec(info: OnnxInfo, batch: int, iterations: int, warmup_ms: float,
                   engine: Path, workspace_mib: int) -> dict[str, Any]:
    if not nvidia_driver_present():
        raise BenchmarkError("backend trtexec needs an NVIDIA GPU; none is visible. Use "
                             "--backend onnxruntime or torch here")
    binary = shutil.which("trtexec")
    if not binary:
        raise BenchmarkError("backend trtexec: no `trtexec` on PATH (it ships with TensorRT, "
                             "e.g. /usr/src/tensorrt/bin in NVIDIA's containers); add it to PATH "
                             "or use --backend tensorrt")
    version = trtexec_version(binary)
    if problem := strong_typing_problem(version):
        raise BenchmarkError(f"backend trtexec ({binary}): {problem}")
    cmd = trtexec_command(info.path, info, tensorrt_major=tensorrt_major(version), batch=batch,
                          iterations=iterations, warmup_ms=warmup_ms, engine=engine,
                          workspace_mib=workspace_mib, trtexec=binary)
    _logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise BenchmarkError(f"trtexec failed (exit {proc.returncode}):\n{tail}")
    parsed = parse_trtexec_output(text)
    stats = dict(parsed["gpu_compute"])
    stats.setdefault("count", iterations)
    return {"latency_ms": stats, "latency_kind": "gpu_compute", "engine_file": str(engine),
            "throughput_ips": parsed.get("throughput_qps", 0.0) * batch,
            "details": {"trtexec": {k: v for k, v in parsed.items() if k != "gpu_compute"},
                        "trtexec_tensorrt": version, "command": cmd}}


def _bench_onnxruntime(info: OnnxInfo, batch: int, iterations: int, warmup_ms: float,
                       threads: int | None) -> dict[str, Any]:
    """Runs the graph as it is, whatever its precision (fp32 export, fp16 or Q/DQ int8 graph)."""
    session = onnxruntime_session(info.path, onnx_providers(), threads)
    # latency does not depend on the values: numpy's N(0, 1), so this path needs no torch; in the
    # input's own type (an fp16 graph may take fp16)
    dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
        next((i.type for i in session.get_inputs() if i.name == info.input_name), ""), np.float32)
    feed = {info.input_name: np.random.default_rng(PARITY_SEED).standard_normal(
        info.input_shape(batch), dtype=np.float32).astype(dtype)}
    times = time_host_loop(lambda: session.run(None, feed), iterations, warmup_ms)
    opts = session.get_session_options()
    return {"latency_ms": latency_stats(times), "latency_kind": "host_wall", "engine_file": None,
            "details": {"providers": session.get_providers(),
                        "intra_op_num_threads": opts.intra_op_num_threads or None}}


def _bench_torch(info: OnnxInfo, precision: str, batch: int, iterations: int,
                 warmup_ms: float, compile_model: bool, threads: int | None) -> dict[str, Any]:
    import torch

    # torch: only the torch backend needs it (a KFP benchmark task on ONNX Runtime does not)
    from gpunet_core.models.factory import create_model

    if precision == "int8":
        raise BenchmarkError(f"backend torch rebuilds the architecture from {info.path}'s "
                             "metadata and cannot run its int8 (Q/DQ) graph from `gpunet "
                             "quantize`; benchmark that graph with --backend onnxruntime (target "
                             "cpu) or tensorrt/trtexec (target tensorrt), or give torch the fp32 "
                             "export")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision)
    if dtype is None or (dtype == torch.float16 and device.type != "cuda"):
        raise BenchmarkError(f"backend torch on {device.type} runs "
                             f"{'fp32/fp16' if device.type == 'cuda' else 'fp32'} only, and "
                             f"{info.path} is a {precision} graph; use --backend onnxruntime")
    if threads:
        torch.set_num_threads(threads)
    # torch: only the torch backend needs it
    from gpunet_core.inference.validate import fold_batchnorm

    # BN folded into the convs, channels-last: 1.1-2x faster eager inference (BENCHMARKS.md)
    model = fold_batchnorm(create_model(info.model, num_classes=info.num_classes).eval())
    model = model.to(device, dtype).to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compile_model else model
    x = fixed_input(batch, info.img_size).to(device, dtype).contiguous(
        memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            runner(x)

    if device.type == "cuda":
        stream = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        time_host_loop(step, 1, warmup_ms, torch.cuda.synchronize)  # warm-up only
        times = []
        for _ in range(iterations):
            start.record(stream)
            step()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        kind = "gpu_compute"
    else:
        times, kind = time_host_loop(step, iterations, warmup_ms), "host_wall"
    return {"latency_ms": latency_stats(times), "latency_kind": kind, "engine_file": None,
            "details": {"device": str(device), "compiled": compile_model,
                        "bn_folded": True, "channels_last": True,
                        "weights": "random (latency does not depend on weight values)",
                        "threads": torch.get_num_threads()}}


def choose_backend(requested: str) -> tuple[str, str]:
    """``(backend, reason)``; ``auto`` prefers TensorRT, falls back to ONNX Runtime."""
    if requested != "auto":
        return requested, "requested"
    reason = tensorrt_unavailable_reason()
    if reason is None:
        return "tensorrt", "auto: a CUDA GPU and TensorRT are present"
    return "onnxruntime", f"auto: TensorRT not usable ({reason}), using ONNX Runtime"


def default_engine_path(onnx: Path, precision: str, batch: int) -> Path:
    return onnx.with_name(f"{onnx.stem}.{precision}.b{batch}.plan")


def run_benchmark(onnx: str | Path, *, backend: str = "auto", precision: str | None = None,
                  batch: int = 1, iterations: int = 100, warmup_ms: float = 200.0,
                  threads: int | None = None, compile_model: bool = False,
                  engine: str | Path | None = None, workspace_mib: int = 1024) -> dict[str, Any]:
    """Benchmark a GPUNet ONNX export; returns the result dict (schema :data:`BENCH_SCHEMA`).

    The precision is the graph's (``OnnxInfo.precision``: fp32 for an export, fp16/int8 after
    ``gpunet quantize``) on every backend; ``precision=None`` takes it, an explicit one must equal
    it (TensorRT 11 builds strongly typed networks only: there is no flag to lower the
    precision of an fp32 graph). The TensorRT engine is saved to ``engine`` (default beside the
    ONNX file, named after the precision).
    """
    if backend not in BACKENDS:
        raise BenchmarkError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise BenchmarkError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if not 1 <= batch <= MAX_BATCH:
        raise BenchmarkError(f"--batch must be in [1, {MAX_BATCH}], got {batch}")
    if iterations < 1:
        raise BenchmarkError(f"--iterations must be >= 1, got {iterations}")
    if not 0 <= warmup_ms < float("inf"):  # also NaN
        raise BenchmarkError(f"--warmup-ms must be a finite number >= 0, got {warmup_ms}")
    if threads is not None and threads < 1:
        raise BenchmarkError(f"--threads must be >= 1, got {threads}; leave it out for the "
                             "runtime's default")
    if workspace_mib < 1:
        raise BenchmarkError(f"--workspace-mib must be >= 1, got {workspace_mib}")
    info = inspect_onnx(onnx)
    if info.batch is not None and info.batch != batch:
        raise BenchmarkError(f"{info.path} was exported with a fixed batch of {info.batch}; "
                             f"benchmark with --batch {info.batch} or re-export with "
                             "--dynamic-batch")
    graph_precision = info.precision
    if graph_precision not in PRECISIONS:
        raise BenchmarkError(f"{info.path} says its graph precision is {graph_precision!r} "
                             f"(gpunet metadata), not one of {', '.join(PRECISIONS)}; re-export "
                             "it or rerun `gpunet quantize`")
    if precision is not None and precision != graph_precision:
        raise BenchmarkError(
            f"--precision {precision} does not match {info.path}, a {graph_precision} graph: "
            "under TensorRT 11 every network is strongly typed and the precision lives in the "
            f"ONNX graph, so run `gpunet quantize --precision {precision} --target tensorrt|cpu` "
            "on the export first and benchmark its output (or leave --precision out)")
    precision = graph_precision
    used, reason = choose_backend(backend)
    if info.target == "cpu" and used in GPU_ONLY:
        _logger.warning("%s was quantized for --target cpu; TensorRT may build it slowly or not "
                        "at all (use `gpunet quantize --target tensorrt` for TensorRT)", info.path)
    elif info.target == "tensorrt" and used not in GPU_ONLY:
        _logger.warning("%s was quantized for --target tensorrt; its latency on %s says little "
                        "about TensorRT", info.path, used)
    engine_path = Path(engine) if engine else default_engine_path(info.path, precision, batch)
    _logger.info("benchmarking %s with %s (%s), %s, batch %d", info.path, used, reason, precision,
                 batch)
    if used == "tensorrt":
        result = _bench_tensorrt(info, batch, iterations, warmup_ms, engine_path, workspace_mib)
    elif used == "trtexec":
        result = _bench_trtexec(info, batch, iterations, warmup_ms, engine_path, workspace_mib)
    elif used == "onnxruntime":
        result = _bench_onnxruntime(info, batch, iterations, warmup_ms, threads)
    else:
        result = _bench_torch(info, precision, batch, iterations, warmup_ms, compile_model,
                              threads)
    median = result["latency_ms"]["median"]
    result.setdefault("throughput_ips", batch * 1000.0 / median if median > 0 else 0.0)
    out = {
        "schema": BENCH_SCHEMA,
        "model": info.model,
        "num_classes": info.num_classes,
        "img_size": info.img_size,
        "onnx": str(info.path),
        "onnx_sha256": sha256_file(info.path),
        "backend": used,
        "backend_requested": backend,
        "backend_reason": reason,
        "precision": precision,
        "batch": batch,
        "iterations": iterations,
        "warmup_ms": warmup_ms,
        **result,
        "fingerprint": fingerprint(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out["latency_fingerprint"] = latency_fingerprint(out)  # what promotion compares
    return out
