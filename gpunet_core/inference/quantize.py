"""Lower-precision graphs of a GPUNet ONNX export: FP16, and INT8 calibrated on real images.

TensorRT 11 builds every network strongly typed, so the deployed precision is the graph's own
and has to be written into the ONNX file; ONNX Runtime on a CPU runs what the file says too.
Two tools, each where it serves:

- **FP16** (both targets): NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast``). It keeps the
  FP32 inputs/outputs and leaves in FP32 the nodes whose values, seen on the calibration
  images, would overflow FP16 -- the graph TensorRT 11 wants instead of ``--fp16``.
- **INT8, target tensorrt**: ModelOpt's ONNX post-training quantization. It writes explicit
  Q/DQ pairs with symmetric INT8 scales (zero point 0), per-channel weight scales and per-tensor
  activation scales, only where TensorRT fuses them (convolutions, the classifier), the rest
  left in FP32: what TensorRT builds as explicit quantization. Max calibration, FP32 elsewhere:
  entropy calibration or ModelOpt's FP16 for the unquantized ops moved a briefly trained
  GPUNet-0's top-1 to chance in the tests (max/FP32 kept every prediction). On this CPU such a graph is
  slower than FP32 (measured: 1.4x; ONNX Runtime's x86 kernels want unsigned activations).
- **INT8, target cpu**: ONNX Runtime's static quantization in QOperator form (QLinearConv,
  ...): unsigned 8-bit activations, signed per-channel 8-bit weights, the format ONNX Runtime's
  x86 kernels (MLAS u8s8) run fastest. The measurements behind this choice are in
  ``docs/quantization.md``.

Calibration: a fixed, seeded sample of the dataset's *train* split (never the validation split
the accuracy gate measures on), through the same evaluation transform as validation.

ModelOpt's ``[onnx]`` extra pins onnx ~=1.21 and onnxruntime-gpu; the project pins its own onnx
and CPU onnxruntime and lists ModelOpt's ONNX modules' imports one by one (pyproject.toml).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpunet_core.data.cache import local_dataset
from gpunet_core.data.folder import open_image_folder
from gpunet_core.inference.export import (
    METADATA_KEY,
    OnnxInfo,
    inspect_onnx,
    onnxruntime_session,
    set_metadata,
    sidecar_path,
)
from gpunet_core.utils.errors import ExportError, GpunetError
from gpunet_core.utils.files import MANIFEST_FILE, atomic_path, sha256_file, write_json

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
TARGETS = ("tensorrt", "cpu")
DEFAULT_CALIB_SAMPLES = 256
CALIB_SEED = 0
QUANTIZE_SCHEMA = "gpunet.quantize/1"
# op types that say a graph is not a plain FP32 export any more
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                 "MatMulInteger", "QGemm", "QLinearConv", "QLinearMatMul", "QLinearAdd",
                 "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool"}
_BATCH = 16  # calibration images per ONNX Runtime call (dynamic-batch exports)


class QuantizeError(GpunetError):
    """Bad quantization input (flags, calibration data, a graph already quantized)."""


@dataclass(frozen=True)
class CpuInt8:
    """ONNX Runtime static INT8 settings; :data:`CPU_INT8` is the measured-fastest choice."""

    quant_format: str = "qoperator"  # or "qdq"
    activations: str = "u8"  # or "s8"
    per_channel: bool = True
    reduce_range: bool = False
    exclude_first_conv: bool = False
    exclude_classifier: bool = False


CPU_INT8 = CpuInt8()


def check_options(*, precision: str, target: str, calib_samples: int) -> None:
    """The flags, checked before any file is read."""
    if precision not in PRECISIONS:
        raise QuantizeError(f"--precision {precision!r} is not supported: use "
                            f"{' or '.join(PRECISIONS)} (fp32 is the export itself)")
    if target not in TARGETS:
        raise QuantizeError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if calib_samples < 1:
        raise QuantizeError(f"--calib-samples must be >= 1, got {calib_samples}")


def graph_precision(proto) -> str:
    """``fp32`` for a plain export, else what the graph already is (``int8``/``fp16``)."""
    meta = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    recorded = (json.loads(meta).get("precision") if meta else None) or "fp32"
    if recorded != "fp32":
        return recorded
    if any(n.op_type in QUANTIZED_OPS for n in proto.graph.node):
        return "int8"
    from onnx import TensorProto

    if any(t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
           for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def calibration_split(data: str | Path) -> Path:
    """The images to calibrate on: a prepared dataset's ``train/`` split, else ``data`` itself
    (an ImageFolder tree); ``s3://`` datasets through their verified local copy."""
    if not str(data).startswith("s3://") and not Path(data).exists():
        raise QuantizeError(f"--calib-data {data}: no such directory; pass the prepared dataset "
                            "(its train/ split is used) or an ImageFolder of training images")
    root = local_dataset(data, progress=False)
    if (root / MANIFEST_FILE).is_file():
        if not (root / "train").is_dir():
            raise QuantizeError(f"--calib-data {root} is a prepared dataset without a train/ "
                                "split; calibrate on training images, never on validation ones")
        return root / "train"
    return root


def calibration_images(data: str | Path, info: OnnxInfo, *, samples: int = DEFAULT_CALIB_SAMPLES,
                       seed: int = CALIB_SEED) -> tuple[np.ndarray, dict[str, Any]]:
    """``samples`` images (all when fewer) drawn with ``seed`` from the calibration split,
    through the evaluation transform: ``float32 [N, 3, S, S]`` and where they came from."""
    # torch (transforms, validation's preprocessing): only the calibration step needs it
    from gpunet_core.data.prepare import dataset_identity
    from gpunet_core.data.transforms import eval_transform
    from gpunet_core.inference.validate import onnx_eval_config

    split = calibration_split(data)
    dataset = open_image_folder(split, eval_transform(onnx_eval_config(info)))
    picked = sorted(random.Random(seed).sample(range(len(dataset)), min(samples, len(dataset))))
    images = np.stack([dataset[i][0].numpy() for i in picked]).astype(np.float32)
    source = {"dir": str(split), "images": len(picked), "of": len(dataset), "seed": seed,
              "dataset": dataset_identity(split)}
    return images, source


def _batches(info: OnnxInfo, images: np.ndarray) -> Iterator[np.ndarray]:
    size = info.batch or _BATCH
    for start in range(0, len(images) - (len(images) % size if info.batch else 0), size):
        yield images[start:start + size]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over the calibration images."""

    def __init__(self, info: OnnxInfo, images: np.ndarray):
        self.info, self.images = info, images
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.info.input_name: batch}

    def rewind(self) -> None:
        self._it = _batches(self.info, self.images)


def _calibration_feed(info: OnnxInfo, images: np.ndarray) -> np.ndarray:
    """The calibration images, cut to a fixed-batch graph's multiple of its batch."""
    if info.batch and len(images) < info.batch:
        raise QuantizeError(f"{info.path} has a fixed batch of {info.batch} but only "
                            f"{len(images)} calibration images were found; add images or "
                            "export with --dynamic-batch")
    return images[:len(images) - len(images) % info.batch] if info.batch else images


def _in_child(convert):
    """``convert`` run in a spawned process: importing ModelOpt's ONNX quantization patches
    ONNX Runtime's quantization tools in place, which broke a later CPU INT8 quantization in
    the same process (seen in the tests); a child keeps every call independent."""

    def run(*args):
        # multiprocessing: only the ModelOpt conversions use a child process
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(convert, *args).result()

    return run


def _fp16(src: Path, dst: Path, info: OnnxInfo, images: np.ndarray) -> dict[str, Any]:
    import onnx

    # ModelOpt (seconds to import): only the fp16 conversion needs it
    from modelopt.onnx.autocast import convert_to_mixed_precision

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, **{info.input_name: images[:info.batch or len(images)]})
        proto = convert_to_mixed_precision(str(src), low_precision_type="fp16",
                                           keep_io_types=True, calibration_data=str(calib))
    onnx.save(proto, str(dst))
    return {"tool": "modelopt.onnx.autocast.convert_to_mixed_precision",
            "low_precision_type": "fp16", "keep_io_types": True}


def _int8_tensorrt(src: Path, dst: Path, info: OnnxInfo, images: np.ndarray) -> dict[str, Any]:
    # ModelOpt (seconds to import): only the TensorRT int8 conversion needs it
    from modelopt.onnx.quantization import quantize

    feed = _calibration_feed(info, images)
    quantize(str(src), quantize_mode="int8", calibration_data=feed, calibration_method="max",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(dst),
             log_level="WARNING")
    return {"tool": "modelopt.onnx.quantization.quantize", "quantize_mode": "int8",
            "calibration_method": "max", "high_precision_dtype": "fp32",
            "format": "QDQ, symmetric int8, per-channel weights"}


def _node_names(path: Path) -> tuple[str | None, str | None]:
    """The first convolution and the classifier (last Gemm/MatMul) of a graph."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return first, last


def quantize_int8_cpu(src: Path, dst: Path, info: OnnxInfo, images: np.ndarray,
                      options: CpuInt8 = CPU_INT8) -> dict[str, Any]:
    """ONNX Runtime static INT8 of ``src`` into ``dst`` with ``options``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feed = _calibration_feed(info, images)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference + graph optimisation first
        first, classifier = _node_names(pre)
        exclude = [n for n, on in ((first, options.exclude_first_conv),
                                   (classifier, options.exclude_classifier)) if n and on]
        symmetric = options.activations == "s8"
        quantize_static(
            str(pre), str(dst), _Reader(info, feed),
            quant_format=QuantFormat.QOperator if options.quant_format == "qoperator"
            else QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, per_channel=options.per_channel,
            reduce_range=options.reduce_range, nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return {"tool": "onnxruntime.quantization.quantize_static",
            "format": options.quant_format, "activations": options.activations,
            "weights": "s8", "per_channel": options.per_channel,
            "reduce_range": options.reduce_range, "calibration_method": "MinMax",
            "excluded_nodes": exclude}


def _finish(path: Path, info: OnnxInfo, precision: str, target: str) -> None:
    """Carry the export's ``gpunet`` metadata over, plus the precision; full checker pass."""
    import onnx

    proto = onnx.load(str(path))
    meta = {**info.metadata, "precision": precision, "target": target,
            "source_onnx_sha256": sha256_file(info.path)}
    set_metadata(proto, meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the {precision} graph of {info.path}: "
                          f"{str(exc).splitlines()[0]}") from None
    onnx.save(proto, str(path))


def compare_logits(reference: Path, candidate: Path, info: OnnxInfo,
                   images: np.ndarray) -> dict[str, float]:
    """Both graphs in ONNX Runtime (CPU) on the same images: how far the logits moved."""
    ref_s, cand_s = onnxruntime_session(reference), onnxruntime_session(candidate)
    diffs, scale, agree, seen = [], 0.0, 0, 0
    for batch in _batches(info, images):
        ref = ref_s.run(None, {info.input_name: batch})[0]
        got = cand_s.run(None, {info.input_name: batch})[0].astype(np.float32)
        diffs.append(float(np.abs(ref - got).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        seen += len(batch)
    return {"logits_max_abs_diff": max(diffs, default=0.0), "logits_max_abs": scale,
            "top1_agreement": agree / seen if seen else 0.0, "images": seen}


def quantize_onnx(onnx_path: str | Path, output: str | Path, *, calib_data: str | Path,
                  precision: str, target: str, calib_samples: int = DEFAULT_CALIB_SAMPLES,
                  seed: int = CALIB_SEED) -> dict[str, Any]:
    """Write the ``precision`` graph of a GPUNet export for ``target`` to ``output`` (temp
    name, checks, then rename) and its sidecar JSON; returns the sidecar dict."""
    check_options(precision=precision, target=target, calib_samples=calib_samples)
    import onnx

    info = inspect_onnx(onnx_path)
    output = Path(output)
    if output.resolve() == info.path.resolve():
        raise QuantizeError(f"-o {output} is the input file; write the {precision} graph to "
                            "another path")
    already = graph_precision(onnx.load(str(info.path), load_external_data=False))
    if already != "fp32":
        raise QuantizeError(f"{info.path} is already a {already} graph; quantize the FP32 "
                            "export from `gpunet export-onnx`")
    images, source = calibration_images(calib_data, info, samples=calib_samples, seed=seed)
    convert = {"fp16": _fp16, "int8": _int8_tensorrt if target == "tensorrt"
               else quantize_int8_cpu}[precision]
    if convert is not quantize_int8_cpu:
        convert = _in_child(convert)
    _logger.info("%s %s graph of %s from %d calibration images", target, precision,
                 info.path.name, len(images))
    with atomic_path(output) as tmp:
        method = convert(info.path, tmp, info, images)
        _finish(tmp, info, precision, target)
        try:
            parity = compare_logits(info.path, tmp, info, images[:64])
        except ExportError as exc:
            raise ExportError(f"the {precision} graph does not run in ONNX Runtime: {exc}") \
                from None
    import onnxruntime

    sidecar = {"schema": QUANTIZE_SCHEMA, **inspect_onnx(output).metadata,
               "precision": precision, "target": target, "method": method,
               "calibration": source, "parity_vs_fp32": parity,
               "source_onnx": str(info.path), "onnx_file": output.name,
               "onnx_sha256": sha256_file(output), "onnx": onnx.__version__,
               "onnxruntime": onnxruntime.__version__, "modelopt": importlib.metadata.version("nvidia-modelopt")}
    write_json(sidecar, sidecar_path(output))
    return sidecar
