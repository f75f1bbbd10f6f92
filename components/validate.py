"""validate / validate_deployed: accuracy of the FP32 export and of the graph that is deployed,
in ONNX Runtime (gpunet_core.steps.validate_onnx)."""

from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components._images import BENCH_IMAGE, component


@component(BENCH_IMAGE)
def validate(dataset: Input[Dataset], onnx: Input[Model], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], results: Output[Artifact]) -> float:
    """The FP32 export in ONNX Runtime: the same counts as the PyTorch checkpoint through the
    same eval transform (tests/test_validate_onnx.py), in a fraction of the time (no per-shape
    kernel warm-up), and what a quantized graph is judged against."""
    import os

    from gpunet_core import steps

    out = steps.validate_onnx(os.path.join(dataset.path, "val"), onnx.path,
                              results_file=results.path, prefix="val_")
    for key in ("top1", "top5", "loss", "images_per_second"):
        metrics.log_metric(key, float(out[key]))
    confusion.log_confusion_matrix(out["classes"], out["confusion_matrix"])
    steps.write_artifact_json(metrics.path, metrics.metadata)  # files: cacheable by kfp.local
    steps.write_artifact_json(confusion.path, confusion.metadata)
    return float(out["top1"])


@component(BENCH_IMAGE)
def validate_deployed(dataset: Input[Dataset], onnx: Input[Model], metrics: Output[Metrics],
                      results: Output[Artifact]) -> float:
    """The deployed graph (any precision) in ONNX Runtime, through the same eval transform."""
    import os

    from gpunet_core import steps

    out = steps.validate_onnx(os.path.join(dataset.path, "val"), onnx.path,
                              results_file=results.path)
    for key in ("top1", "top5", "loss"):
        metrics.log_metric(key, float(out[key]))
    metrics.metadata["precision"] = out["precision"]
    steps.write_artifact_json(metrics.path, metrics.metadata)  # a file: cacheable by kfp.local
    return float(out["top1"])
