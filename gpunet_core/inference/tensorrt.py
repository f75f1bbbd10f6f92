"""TensorRT engine build and timing, the way NVIDIA measures GPUNet latency: TensorRT 10.12+ and 11.

Every network is built strongly typed: TensorRT 11 removed weak typing (no ``BuilderFlag.FP16``/
``INT8``/``OBEY_PRECISION_CONSTRAINTS``, no ``ITensor.set_dynamic_range``, no INT8 calibrators), so
the precision is the ONNX graph's own: an export is fp32, ``gpunet quantize`` rewrites it to fp16
(ModelOpt AutoCast) or int8 (explicit Q/DQ nodes). Network creation (:func:`network_flags`):
``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))`` on 10.12-10.x, where
strong typing is opt-in; ``create_network(0)`` on 11.x, where it is always on (the 11.x enum keeps
``STRONGLY_TYPED`` only as a deprecated, ignored value; ``EXPLICIT_BATCH`` is gone). Releases
before 10.12 are refused: strongly typed builds of Q/DQ graphs need 10.12.

The rest is the API both majors share: ``OnnxParser``, ``set_memory_pool_limit(WORKSPACE, ...)``,
one optimization profile for a dynamic batch, ``build_serialized_network``; timing binds device
buffers with ``set_tensor_address`` and runs ``execute_async_v3`` between two CUDA events recorded
on the same stream, i.e. pure GPU compute time as in trtexec's "GPU Compute Time" line. Device
memory, stream and events come from torch, so no extra CUDA binding is needed.

``tensorrt`` is imported lazily; without a GPU or without the package every entry point raises
:class:`~gpunet_core.utils.errors.BenchmarkError` with the fix. Unverified here: written against
NVIDIA's 10.x/11.x Python API reference, migration guide and the TensorRT 11.1 OSS bindings, but
never run on a GPU in this project's CI (no GPU, and TensorRT wheels are not installable there);
only the library-free helpers (:func:`tensorrt_major`, :func:`strong_typing_problem`,
:func:`network_flags`) are unit-tested.
"""

from __future__ import annotations

import importlib.util
import logging
import re
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
                "'gpunet-pipeline[gpu]' (TensorRT >= 10.12 comes from NVIDIA's index: "
                "--extra-index-url https://pypi.nvidia.com), or use --backend onnxruntime/torch")
MIN_TENSORRT = (10, 12)  # strongly typed builds of explicit-quantization (Q/DQ) graphs
_VERSION = re.compile(r"\s*(\d+)(?:\.(\d+))?")


def _major_minor(version: str) -> tuple[int, int] | None:
    m = _VERSION.match(str(version))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def tensorrt_major(version: str) -> int:
    """The major release of a TensorRT version string (``"11.1.0.106"`` -> 11)."""
    parsed = _major_minor(version)
    if parsed is None:
        raise BenchmarkError(f"cannot read a TensorRT version from {version!r}")
    return parsed[0]


def strong_typing_problem(version: str) -> str | None:
    """Why TensorRT ``version`` cannot build this project's strongly typed engines, or None."""
    parsed = _major_minor(version)
    if parsed is None:
        return f"cannot read a TensorRT version from {version!r}"
    if parsed < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return (f"TensorRT {version} is too old: this backend builds strongly typed networks "
                f"(precision from the ONNX graph, as TensorRT 11 requires), which for Q/DQ graphs "
                f"needs TensorRT >= {need}; upgrade it (pip install 'tensorrt>={need},<12' "
                "--extra-index-url https://pypi.nvidia.com, or a newer NGC container)")
    return None


def network_flags(version: str, strongly_typed_flag: int | None) -> int:
    """The ``Builder.create_network`` flags for TensorRT ``version``: always strongly typed.

    ``strongly_typed_flag`` is ``int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)``, or None
    where the enum has no such member. 10.12-10.x: strong typing is opt-in, so the flag's bit
    (the member is required). 11+: every network is strongly typed and the member, where still
    present, is deprecated and ignored, so no flags. Older releases: BenchmarkError.
    """
    problem = strong_typing_problem(version)
    if problem:
        raise BenchmarkError(f"backend tensorrt cannot run: {problem}")
    if tensorrt_major(version) >= 11:
        return 0
    if strongly_typed_flag is None:
        raise BenchmarkError(f"TensorRT {version} has no NetworkDefinitionCreationFlag."
                             "STRONGLY_TYPED; the installation looks broken, reinstall it")
    return 1 << int(strongly_typed_flag)


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
    return strong_typing_problem(str(trt.__version__))


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
                 workspace_mib: int = 1024) -> bytes:
    """Parse the ONNX file into a strongly typed network and build a serialized engine for exactly
    ``input_shape``. No precision flags: the engine runs in the graph's own types (fp32 export,
    fp16 AutoCast graph or int8 Q/DQ graph from ``gpunet quantize``)."""
    trt = _trt()
    version = str(trt.__version__)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = network_flags(version, None if strongly_typed is None else int(strongly_typed))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BenchmarkError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if any(d < 0 for d in network.get_input(0).shape):  # dynamic batch: one fixed profile
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, input_shape, input_shape, input_shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BenchmarkError(f"TensorRT {version} failed to build a strongly typed engine from "
                             f"{onnx_path} (input {input_shape}); rerun with -v for its log")
    return bytes(serialized)


def _torch_dtype(trt, dtype) -> torch.dtype:
    import torch

    mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
               trt.int8: torch.int8, trt.bool: torch.bool, trt.int64: torch.int64}
    if hasattr(trt, "bfloat16"):  # a strongly typed graph may keep bf16 I/O
        mapping[trt.bfloat16] = torch.bfloat16
    if dtype not in mapping:
        raise BenchmarkError(f"engine I/O tensor of TensorRT type {dtype} has no torch buffer type")
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
