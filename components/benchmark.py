"""benchmark: latency of the ONNX export (gpunet_core.steps.benchmark)."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components._images import BENCH_IMAGE, component


@component(BENCH_IMAGE)
def benchmark(onnx: Input[Model], backend: str, iterations: int, metrics: Output[Metrics],
              results: Output[Artifact]) -> float:
    from gpunet_core import steps

    out = steps.benchmark(onnx.path, backend=backend, iterations=iterations,
                          results_file=results.path)
    for key, value in out["latency_ms"].items():
        metrics.log_metric(f"latency_ms_{key}", float(value))
    metrics.log_metric("throughput", float(out.get("throughput", 0.0) or 0.0))
    steps.write_artifact_json(metrics.path, metrics.metadata)  # a file: cacheable by kfp.local
    return float(out["latency_ms"]["median"])
