"""Triton Inference Server model repository export of a GPUNet ONNX file (or TensorRT plan).

Layout (Triton's model repository convention)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx      (platform onnxruntime_onnx)
    <repo>/<name>/<version>/model.plan      (platform tensorrt_plan)

``config.pbtxt`` declares the input (``input``, FP32, ``[3, H, W]``) and output (``logits``,
FP32, ``[num_classes]``) without the batch axis, ``max_batch_size``, dynamic batching and the
instance groups, read from the export's metadata (:func:`gpunet_core.inference.export.inspect_onnx`).
NVIDIA's reference benchmarked GPUNet on Triton with max batch 64 and 2 GPU instances; those are
the defaults here.

A graph from ``gpunet quantize`` is served as it is, its precision its own (inputs and outputs
stay FP32): an FP16 graph with ONNX Runtime's TensorRT accelerator gets ``precision_mode FP16``
(an FP32 export ``FP32``: never a precision nobody validated); an INT8 graph for ``--target cpu``
(QLinearConv, which ONNX Runtime runs on CPUs only) needs ``--kind cpu``; an INT8 Q/DQ graph for
TensorRT is served as a TensorRT plan built from it (``--plan``), not through the accelerator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpunet_core.inference.export import inspect_onnx
from gpunet_core.utils.errors import ExportError
from gpunet_core.utils.files import (
    check_output_dir,
    check_output_file,
    copy_file,
    remove_new_dirs_on_error,
    write_text,
)


class Enum(str):
    """A protobuf enum value: written bare (``KIND_GPU``), not quoted."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a dict (nested dicts, lists of dicts, lists of scalars)."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines += [f"{pad}  {{", to_pbtxt(item, indent + 2),
                          f"{pad}  }}{',' if i < len(value) - 1 else ''}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def triton_config(name: str, *, platform: str, input_name: str, output_name: str, img_size: int,
                  num_classes: int, max_batch_size: int, static_batch: int | None,
                  instances: int, kind: str, preferred_batch_sizes: list[int],
                  max_queue_delay_us: int, tensorrt_accelerator: bool,
                  precision: str = "fp32") -> dict[str, Any]:
    batch_dims = [] if max_batch_size > 0 else [static_batch or 1]
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": [{"name": input_name, "data_type": Enum("TYPE_FP32"),
                   "dims": [*batch_dims, 3, img_size, img_size]}],
        "output": [{"name": output_name, "data_type": Enum("TYPE_FP32"),
                    "dims": [*batch_dims, num_classes]}],
    }
    if max_batch_size > 0:
        batching: dict[str, Any] = {}
        if preferred_batch_sizes:
            batching["preferred_batch_size"] = preferred_batch_sizes
        batching["max_queue_delay_microseconds"] = max_queue_delay_us
        config["dynamic_batching"] = batching
    config["instance_group"] = [{"count": instances, "kind": Enum(f"KIND_{kind.upper()}")}]
    if tensorrt_accelerator:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt",
             "parameters": {"key": "precision_mode", "value": precision.upper()}}]}}
    return config


def export_triton(onnx: str | Path, repository: str | Path, *, name: str | None = None,
                  version: int = 1, plan: str | Path | None = None, max_batch_size: int = 64,
                  instances: int = 2, kind: str = "gpu", preferred_batch_sizes: list[int] | None = None,
                  max_queue_delay_us: int = 100, tensorrt_accelerator: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
    """Lay out ``onnx`` (or ``plan``, a TensorRT engine built from it) as a Triton model.

    The ONNX file must be a GPUNet export; with ``max_batch_size > 0`` it needs a dynamic batch
    axis (``export-onnx --dynamic-batch``), with 0 the fixed-batch file is served as is. A plan
    must have been built with an optimization profile covering ``max_batch_size``.
    Returns the model directory, the model file and the config dict.
    """
    info = inspect_onnx(onnx)
    name = name or info.model
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ExportError(f"Triton model name {name!r} must be letters, digits, '_' or '-'")
    if version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    if kind not in ("gpu", "cpu"):
        raise ExportError(f"--kind must be gpu or cpu, got {kind}")
    if max_batch_size < 0 or instances < 1:
        raise ExportError("--max-batch-size must be >= 0 and --instances >= 1")
    if max_batch_size > 0 and info.batch is not None:
        raise ExportError(
            f"{info.path} has a fixed batch of {info.batch}, so Triton cannot batch it: re-export "
            "with `gpunet export-onnx --dynamic-batch`, or pass --max-batch-size 0")
    if info.precision == "int8" and info.target == "cpu" and kind == "gpu":
        raise ExportError(f"{info.path} is an INT8 graph quantized for --target cpu "
                          "(QLinearConv, CPU kernels only): serve it with --kind cpu, or "
                          "quantize the export with `gpunet quantize --target tensorrt` for GPUs")
    if tensorrt_accelerator and info.precision not in ("fp32", "fp16"):
        raise ExportError(f"--tensorrt-accelerator: {info.path} is an {info.precision} graph; "
                          "build a TensorRT plan from it (`gpunet benchmark --backend tensorrt "
                          "--engine model.plan`) and pass it as --plan")
    preferred = [b for b in (preferred_batch_sizes or []) if b > 0]
    if any(b > max_batch_size for b in preferred):
        raise ExportError(f"preferred batch sizes {preferred} exceed --max-batch-size "
                          f"{max_batch_size}")
    if plan is not None:
        plan = Path(plan)
        if not plan.is_file():
            raise ExportError(f"TensorRT plan not found: {plan}")
        if tensorrt_accelerator:
            raise ExportError("--tensorrt-accelerator applies to ONNX models, not to a plan")
        if kind != "gpu":
            raise ExportError("a TensorRT plan runs on the GPU only (--kind gpu)")
    platform, source, filename = (("tensorrt_plan", plan, "model.plan") if plan
                                  else ("onnxruntime_onnx", info.path, "model.onnx"))
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    check_output_dir(repository, "-r/--repository", error=ExportError)
    check_output_dir(version_dir, "-r/--repository", error=ExportError)
    check_output_file(model_dir / "config.pbtxt", "-r/--repository", error=ExportError,
                      parents=True)
    check_output_file(version_dir / filename, "-r/--repository", error=ExportError,
                      parents=True)
    if version_dir.exists() and any(version_dir.iterdir()) and not overwrite:
        raise ExportError(f"{version_dir} already exists; pass a new --version or --overwrite")
    config = triton_config(name, platform=platform, input_name=info.input_name,
                           output_name=info.output_name, img_size=info.img_size,
                           num_classes=info.num_classes, max_batch_size=max_batch_size,
                           static_batch=info.batch, instances=instances, kind=kind,
                           preferred_batch_sizes=preferred, max_queue_delay_us=max_queue_delay_us,
                           tensorrt_accelerator=tensorrt_accelerator,
                           precision=info.precision)
    with remove_new_dirs_on_error(version_dir):
        copy_file(source, version_dir / filename)
        write_text(model_dir / "config.pbtxt", to_pbtxt(config) + "\n")
    return {"model_dir": str(model_dir), "model_file": str(version_dir / filename),
            "config": config}
