"""What a candidate costs: parameters, multiply-accumulates, and measured latency.

Latency is measured, never predicted: the candidate (random weights: latency does not depend
on them) is exported to ONNX, converted to the asked precision, and timed by the project's
benchmark (:func:`~gpunet_core.inference.latency.run_benchmark`) on the asked backend. A
:class:`LatencyCache` keyed by :func:`latency_key` (spec hash, backend, precision, batch and the
hardware fingerprint) makes a study measure a spec once per kind of machine.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gpunet_core.inference.latency import fingerprint, latency_fingerprint, run_benchmark
from gpunet_core.models.factory import count_parameters, create_model
from gpunet_core.search.space import spec_hash

_logger = logging.getLogger(__name__)


class LatencyCache(Protocol):
    """Measured latencies by :func:`latency_key` (the study's storage, shared by workers)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryCache:
    """A dict-backed :class:`LatencyCache` (one process)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value


def hardware_key(backend: str, batch: int) -> str:
    """The benchmark's own comparability key (backend, batch, CPU/GPU model and count)."""
    kind = "gpu_compute" if backend in ("tensorrt", "trtexec") else "host_wall"
    return latency_fingerprint({"backend": backend, "batch": batch, "latency_kind": kind,
                                "fingerprint": fingerprint()})


def latency_key(spec: list[dict[str, Any]], *, backend: str, precision: str, batch: int,
                hardware: str) -> str:
    return f"{spec_hash(spec)}.{backend}.{precision}.b{batch}.{hardware}"


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one forward pass at ``img_size`` (convolutions and linears)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups
            per_output *= module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        for handle in handles:
            handle.remove()
    return total


def model_cost(spec: list[dict[str, Any]]) -> dict[str, float]:
    """Trainable parameters and GMACs (batch 1) of a spec at its own resolution."""
    model = create_model(spec)
    return {"params": count_parameters(model),
            "gmacs": count_macs(model, int(spec[0]["img_resolution"])) / 1e9}


def measure_latency(spec: list[dict[str, Any]], *, backend: str, precision: str = "fp32",
                    batch: int = 1, iterations: int = 50, warmup_ms: float = 100.0,
                    threads: int | None = None, calib_data: str | Path | None = None,
                    cache: LatencyCache | None = None, hardware: str | None = None,
                    name: str = "candidate") -> dict[str, Any]:
    """Median latency in ms of ``spec`` on ``backend``; from ``cache`` when measured before.

    Returns ``{"latency_ms", "key", "cached", "backend"}``; a fresh measurement is stored in
    ``cache`` under its key before returning. ``precision`` int8 uses the CPU (QOperator)
    graph on ONNX Runtime and the Q/DQ graph on TensorRT, calibrated on ``calib_data``.
    """
    hardware = hardware or hardware_key(backend, batch)
    key = latency_key(spec, backend=backend, precision=precision, batch=batch,
                      hardware=hardware)
    if cache is not None and (hit := cache.get(key)) is not None:
        return {**hit, "key": key, "cached": True}
    # the export path and the quantizer pull in onnx; only a fresh measurement needs them
    from gpunet_core.inference.export import export_onnx
    from gpunet_core.inference.quantize import quantize_onnx

    model = create_model(spec)
    img_size = int(spec[0]["img_resolution"])
    with tempfile.TemporaryDirectory(prefix="gpunet-search-") as tmp:
        onnx_path = Path(tmp) / f"{spec_hash(spec)}.onnx"
        export_onnx(model, onnx_path, model_name=name, img_size=img_size, batch=batch)
        if precision != "fp32":
            target = "tensorrt" if backend in ("tensorrt", "trtexec") else "cpu"
            quantized = onnx_path.with_name(f"{onnx_path.stem}.{precision}.onnx")
            quantize_onnx(onnx_path, quantized, calib_data=calib_data, precision=precision,
                          target=target, calib_samples=32)
            onnx_path = quantized
        result = run_benchmark(onnx_path, backend=backend, batch=batch, iterations=iterations,
                               warmup_ms=warmup_ms, threads=threads)
    value = {"latency_ms": float(result["latency_ms"]["median"]), "backend": result["backend"],
             "p90_ms": float(result["latency_ms"]["p90"]),
             "latency_fingerprint": result["latency_fingerprint"]}
    if cache is not None:
        cache.put(key, value)
    _logger.debug("measured %s: %.3f ms (%s)", name, value["latency_ms"], key)
    return {**value, "key": key, "cached": False}
