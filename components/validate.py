"""validate: accuracy of the trained checkpoint (gpunet_core.steps.validate), and of the graph
that is deployed (gpunet_core.steps.validate_onnx)."""

from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components._images import BENCH_IMAGE, CPU_IMAGE, component


@component(CPU_IMAGE)
def validate(dataset: Input[Dataset], checkpoint: Input[Model], model_name: str, img_size: int,
             metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], results: Output[Artifact]) -> float:
    import os

    from gpunet_core import steps
    from gpunet_core.utils.files import BEST_CHECKPOINT

    out = steps.validate(os.path.join(dataset.path, "val"),
                         os.path.join(checkpoint.path, BEST_CHECKPOINT), model=model_name,
                         img_size=img_size, results_file=results.path)
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
