"""ONNX export of a GPUNet with a parity check in ONNX Runtime and a sidecar JSON.

Exporter: both of torch's exporters handle all seven GPUNets with identical parity (about 1e-8
on random weights) and both fold BatchNorm into the convolutions (no BatchNormalization node
is left). The default is the TorchScript one (``dynamo=False``, ``do_constant_folding``): on
this project's CPUs it is 3-5x faster (2-4 s vs 6-14 s per model at 64 px, which keeps CI
short) and writes opset 13..20, so the same file also feeds TensorRT 8.x (NVIDIA's published
figures) besides TensorRT 10. It is deprecated since torch 2.9 but present in the pinned torch
2.14.1. ``exporter="dynamo"`` (CLI ``--exporter dynamo``, opset >= 18) selects the
torch.export-based exporter, the maintained path once the TorchScript one is removed; it is
tested too.

The export is of the eval-mode model, so dropout and drop path are gone (the graph is checked to
hold no ``Dropout`` node). A ``gpunet`` entry in the ONNX ``metadata_props`` records what was
exported; :func:`inspect_onnx` uses it to reject files that are not GPUNet exports.

Parity tolerance: both sides run in FP32 on the same fixed input. They differ only by rounding:
the export has BatchNorm folded into the convolution weights (PyTorch applies it separately)
and ONNX Runtime sums in another order (MLAS vs oneDNN kernels). One FP32 op contributes a relative error of a few ulp (eps = 1.2e-7) times
roughly sqrt(fan-in); over GPUNet's 20-50 layers this accumulates to about 1e-6..1e-5 of the
logit scale (measured on random weights: <= 1e-6 relative for all seven models). The check allows
``PARITY_ATOL + PARITY_RTOL * max|logit|`` with both 1e-4: at least 10x above the rounding noise,
while real export faults (dropout left active, a wrong padding, BatchNorm in training mode, other
weights) move logits by 1e-2 of their scale or more.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpunet_core.inference.tensorrt import nvidia_driver_present
from gpunet_core.models.spec import check_img_size
from gpunet_core.utils.errors import ExportError, GpunetError
from gpunet_core.utils.files import check_output_file, sha256_file, write_json
from gpunet_core.utils.storage import fetch_file

if TYPE_CHECKING:  # torch loads on use: inspecting or timing an export does not need it
    import torch
    from torch import nn

_logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
METADATA_KEY = "gpunet"
DEFAULT_EXPORTER = "torchscript"
DEFAULT_OPSET = 17
OPSETS = {"torchscript": (13, 20), "dynamo": (18, 23)}  # exporter -> (min, max) opset
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
PARITY_SEED = 0
SIDECAR_SCHEMA = "gpunet.onnx-export/1"
MAX_BATCH = 4096  # also the upper bound of the dynamic batch axis


@dataclass(frozen=True)
class OnnxInfo:
    """What a GPUNet ONNX export holds (read back from the file by :func:`inspect_onnx`)."""

    path: Path
    model: str
    num_classes: int
    img_size: int
    input_name: str
    output_name: str
    batch: int | None  # None: dynamic batch axis
    opset: int
    metadata: dict[str, Any]

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.img_size, self.img_size)

    @property
    def precision(self) -> str:
        """``fp32`` for an export; ``fp16``/``int8`` once ``gpunet quantize`` rewrote the graph
        (TensorRT 11 builds every network strongly typed: the precision is the graph's)."""
        return str(self.metadata.get("precision") or "fp32")

    @property
    def target(self) -> str | None:
        """What ``gpunet quantize`` shaped the graph for (``tensorrt``/``cpu``); None: export."""
        return self.metadata.get("target")


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def fixed_input(batch: int, img_size: int, seed: int = PARITY_SEED) -> torch.Tensor:
    """The reproducible N(0, 1) input the parity check feeds both runtimes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=gen)


def parity_tolerance(reference: np.ndarray) -> float:
    return PARITY_ATOL + PARITY_RTOL * float(np.abs(reference).max(initial=0.0))


def onnxruntime_session(path: str | Path, providers: list[str] | None = None,
                        intra_op_threads: int | None = None):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise), errors made readable."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime cannot load {path}: {first}") from None


def onnx_providers() -> list[str]:
    """ONNX Runtime providers for a GPUNet graph: CUDA first when it is built in and an NVIDIA
    driver is present, then the CPU (benchmark and ONNX validation pick them alike)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_driver_present():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    """Make ``metadata`` the graph's one ``gpunet`` entry (what :func:`inspect_onnx` reads)."""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.producer_name = "gpunet-pipeline"


def check_parity(onnx_path: str | Path, model: nn.Module, inputs: torch.Tensor,
                 tolerance: float | None = None) -> float:
    """Max abs difference of ONNX Runtime (CPU) vs PyTorch logits; ExportError above tolerance."""
    import torch

    session = onnxruntime_session(onnx_path)
    input_name = session.get_inputs()[0].name
    got = session.run(None, {input_name: inputs.numpy()})[0]
    with torch.inference_mode():
        want = model.eval()(inputs).float().numpy()
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} != PyTorch output shape {want.shape} "
                          f"for input {tuple(inputs.shape)} ({onnx_path})")
    diff = float(np.abs(got - want).max())
    limit = parity_tolerance(want) if tolerance is None else tolerance
    if not diff <= limit:  # also catches NaN
        raise ExportError(
            f"ONNX parity check failed for {onnx_path}: max |onnxruntime - pytorch| = {diff:.3g} "
            f"> tolerance {limit:.3g} at batch {inputs.shape[0]}; the exported graph does not "
            "compute what the model does (custom op, training-mode layer, or exporter bug)")
    return diff


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                  dynamic_batch: bool, exporter: str) -> None:
    import torch

    kwargs: dict[str, Any] = {}
    if exporter == "dynamo":
        if dynamic_batch:
            kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1,
                                                                  max=MAX_BATCH)}}
        kwargs.update(dynamo=True, external_data=False, optimize=True)
    else:
        if dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        kwargs.update(dynamo=False, do_constant_folding=True)
    # the dynamo exporter's passes log every rewrite at INFO; keep them to warnings
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
                              **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export ({exporter}, opset {opset}) failed: {first}") from None
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def check_options(*, batch: int, opset: int, exporter: str, img_size: int | None,
                  tolerance: float | None) -> None:
    """Validate the export flags (before any model work); ExportError names the bad one."""
    if not 1 <= batch <= MAX_BATCH:
        raise ExportError(f"--batch must be in [1, {MAX_BATCH}], got {batch}")
    if exporter not in OPSETS:
        raise ExportError(f"unknown exporter {exporter!r}: use one of {', '.join(OPSETS)}")
    low, high = OPSETS[exporter]
    if not low <= opset <= high:
        raise ExportError(f"--opset {opset} is not supported by the {exporter} exporter: use "
                          f"{low}..{high} (default {DEFAULT_OPSET})")
    if img_size is not None and img_size < 32:
        raise ExportError(f"--img-size must be >= 32 (GPUNet downsamples 32x), got {img_size}")
    try:
        check_img_size(img_size, minimum=32)
    except GpunetError as exc:
        raise ExportError(str(exc)) from None
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"--tolerance must be a finite number > 0, got {tolerance}; leave it "
                          "out for the default 1e-4 + 1e-4 * max|logit|")


def check_export_output(output: str | Path, *, parents: bool = False) -> None:
    """The export and its sidecar JSON (:func:`sidecar_path`) can be written (``parents``:
    their folder may be missing, and is created; the command line wants it to exist)."""
    check_output_file(output, "--output", error=ExportError, parents=parents)
    check_output_file(sidecar_path(output), "--output", error=ExportError, parents=True)


def export_onnx(model: nn.Module, output: str | Path, *, model_name: str,
                img_size: int | None = None, batch: int = 1, dynamic_batch: bool = False,
                opset: int = DEFAULT_OPSET, checkpoint: str | Path | None = None,
                tolerance: float | None = None, exporter: str = DEFAULT_EXPORTER) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``output``, check it, and write the sidecar JSON.

    Steps: export to a temp file, embed ``gpunet`` metadata, ``onnx.checker`` (full check),
    reject Dropout nodes, compare ONNX Runtime with PyTorch on :func:`fixed_input` (batch
    ``batch``; with ``dynamic_batch`` also at 1 and 4), then rename into place. Returns the
    sidecar dict (also written to :func:`sidecar_path`).
    """
    import onnx
    import torch

    cfg = dict(getattr(model, "pretrained_cfg", {}))
    img_size = int(cfg.get("input_size", (3, 224, 224))[-1] if img_size is None else img_size)
    check_options(batch=batch, opset=opset, exporter=exporter, img_size=img_size,
                  tolerance=tolerance)
    output = Path(output)
    check_export_output(output, parents=True)
    model = model.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": model_name,
        "num_classes": int(model.num_classes),
        "img_size": img_size,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "dynamic_batch": dynamic_batch,
        "batch": None if dynamic_batch else batch,
        "crop_pct": cfg.get("crop_pct"),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _torch_export(model, fixed_input(batch, img_size), tmp, opset, dynamic_batch, exporter)
        proto = onnx.load(str(tmp))
        set_metadata(proto, metadata)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the export of {model_name}: {exc}") from None
        dropouts = [n.name for n in proto.graph.node if n.op_type == "Dropout"]
        if dropouts:
            raise ExportError(f"export of {model_name} still holds Dropout nodes {dropouts[:3]}")
        onnx.save(proto, str(tmp))
        batches = sorted({batch, 1, 4}) if dynamic_batch else [batch]
        parity = {str(b): check_parity(tmp, model, fixed_input(b, img_size), tolerance)
                  for b in batches}
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    import onnxruntime

    sidecar = {
        "schema": SIDECAR_SCHEMA,
        **metadata,
        "input_shape": ["batch" if dynamic_batch else batch, 3, img_size, img_size],
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'})",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "parity_max_abs_diff": max(parity.values()),
        "parity_by_batch": parity,
        "parity_tolerance": tolerance if tolerance is not None
        else f"{PARITY_ATOL:g} + {PARITY_RTOL:g} * max|logit|",
        "parity_input": f"torch.randn(batch, 3, {img_size}, {img_size}), seed {PARITY_SEED}",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(fetch_file(checkpoint)) if checkpoint else None,
        "onnx_file": output.name,
        "onnx_sha256": sha256_file(output),
    }
    write_json(sidecar, sidecar_path(output))
    _logger.info("exported %s to %s (parity max abs diff %.3g)", model_name, output,
                 sidecar["parity_max_abs_diff"])
    return sidecar


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Read a GPUNet ONNX export's facts; ExportError if missing, corrupt or not a GPUNet export."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path} (create one with `gpunet export-onnx`)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path} is not a readable ONNX model (corrupt or truncated?): "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path} is an ONNX model but not a GPUNet export (no '{METADATA_KEY}' "
                          "metadata); export it with `gpunet export-onnx`")
    try:
        meta = json.loads(props[METADATA_KEY])
        graph_inputs = [i for i in proto.graph.input
                        if i.name not in {t.name for t in proto.graph.initializer}]
        dims = graph_inputs[0].type.tensor_type.shape.dim
        batch_dim = dims[0].dim_value if dims[0].HasField("dim_value") else None
        opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                    default=0)
        return OnnxInfo(path=path, model=str(meta["model"]), num_classes=int(meta["num_classes"]),
                        img_size=int(meta["img_size"]), input_name=graph_inputs[0].name,
                        output_name=proto.graph.output[0].name, batch=batch_dim, opset=opset,
                        metadata=meta)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise ExportError(f"{path} has damaged GPUNet metadata or graph inputs ({exc!r}); "
                          "re-export it with `gpunet export-onnx`") from None
