"""TensorRT 10 engine build and timing, the way NVIDIA measures GPUNet latency.

Written against the TensorRT 10 Python API (``tensorrt`` from the ``[gpu]`` extra):
``Builder.create_network(0)`` (explicit batch is the only mode), ``OnnxParser``,
``set_memory_pool_limit(WORKSPACE, ...)`` (the removed ``max_workspace_size``/``--workspace``
replacement), ``build_serialized_network``; timing binds device buffers with
``set_tensor_address`` and runs ``execute_async_v3`` between two CUDA events recorded on the same
stream, i.e. pure GPU compute time as in trtexec's "GPU Compute Time" line. Device memory,
stream and events come from torch, so no extra CUDA binding is needed.

``tensorrt`` is imported lazily; without a GPU or without the package every entry point raises
:class:`~gpunet_core.utils.errors.BenchmarkError` with the fix. Not run on a real GPU in this project's
CI (no GPU, and TensorRT wheels are not installable there).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpunet_core.utils.errors import BenchmarkError

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

INSTALL_HINT = ("install the [gpu] extra on a machine with an NVIDIA GPU: pip install "
                "'gpunet-pipeline[gpu]' (TensorRT >= 10 comes from NVIDIA's index: "
                "--extra-index-url https://pypi.nvidia.com), or use --backend onnxruntime/torch")
INT8_DUMMY_RANGE = 4.0  # like trtexec --int8 without a calibration cache: latency only


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is loaded here (device nodes or ``nvidia-smi``); torch is not imported."""
    return (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()
            or shutil.which("nvidia-smi") is not None)


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can.

    Without an NVIDIA driver or the ``tensorrt`` package the answer comes without importing
    torch (seconds saved in a CPU pipeline step).
    """
    if "torch" not in sys.modules and not nvidia_driver_present():
        return "no CUDA GPU is visible (no NVIDIA driver: no /dev/nvidiactl, no nvidia-smi)"
    if "torch" not in sys.modules and importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt Python package is not installed"
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        return f"tensorrt {trt.__version__} is installed but this backend needs TensorRT >= 10"
    return None


def _trt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BenchmarkError(f"backend tensorrt cannot run: {reason}; {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def build_engine(onnx_path: str | Path, *, input_name: str, input_shape: tuple[int, ...],
                 precision: str = "fp16", workspace_mib: int = 1024) -> bytes:
    """Parse the ONNX file and build a serialized engine for exactly ``input_shape``."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BenchmarkError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_outputs):
                layer.get_output(j).set_dynamic_range(-INT8_DUMMY_RANGE, INT8_DUMMY_RANGE)
        network.get_input(0).set_dynamic_range(-INT8_DUMMY_RANGE, INT8_DUMMY_RANGE)
    if any(d < 0 for d in network.get_input(0).shape):  # dynamic batch: one fixed profile
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, input_shape, input_shape, input_shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BenchmarkError(f"TensorRT failed to build an engine from {onnx_path} "
                             f"({precision}, input {input_shape}); rerun with -v for its log")
    return bytes(serialized)


def _torch_dtype(trt, dtype) -> torch.dtype:
    import torch

    mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
               trt.int8: torch.int8, trt.bool: torch.bool, trt.int64: torch.int64}
    return mapping[dtype]


def time_engine(engine_bytes: bytes, *, input_name: str, input_shape: tuple[int, ...],
                iterations: int, warmup_ms: float) -> tuple[list[float], dict[str, Any]]:
    """GPU compute time (ms) of ``iterations`` runs after ``warmup_ms`` of warm-up."""
    import torch

    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BenchmarkError("TensorRT could not deserialize the engine it just built")
    context = engine.create_execution_context()
    context.set_input_shape(input_name, input_shape)
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(context.get_tensor_shape(name))
        buffers[name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)),
                                    device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    buffers[input_name].normal_()
    stream = torch.cuda.Stream()
    handle = stream.cuda_stream
    deadline = time.perf_counter() + warmup_ms / 1000.0
    while True:
        context.execute_async_v3(handle)
        stream.synchronize()
        if time.perf_counter() >= deadline:
            break
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iterations):
        start.record(stream)
        if not context.execute_async_v3(handle):
            raise BenchmarkError("TensorRT execute_async_v3 failed")
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    details = {"tensorrt": trt.__version__, "engine_bytes": len(engine_bytes),
               "io": {n: [list(b.shape), str(b.dtype)] for n, b in buffers.items()}}
    return times, details
