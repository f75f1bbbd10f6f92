"""promote: register the candidate in MLflow and decide its alias (gpunet_core.steps.promote)."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components._images import CPU_IMAGE, component


@component(CPU_IMAGE)
def promote(dataset: Input[Dataset], checkpoint: Input[Model], deployed: Input[Model],
            validation: Input[Artifact], deployed_validation: Input[Artifact],
            bench: Input[Artifact], model_name: str, img_size: int, registered_model: str,
            min_top1: float, max_latency_ms: float, margin: float,
            max_latency_increase_pct: float, max_quant_drop: float, mlflow_experiment: str,
            kfp_run_id: str, scheduled_time: str, report: Output[Markdown]) -> str:
    """``deployed``: the graph to register (the export or its FP16/INT8 graph), measured by
    ``deployed_validation`` and ``bench``; ``validation``: the FP32 checkpoint's. ``dataset``:
    its validation split is where a champion validated on other data is evaluated before the
    comparison. ``scheduled_time``: a recurring run's scheduled time, tagged on the MLflow
    run. ``model_name``: the architecture, unless ``checkpoint`` carries its own (a custom
    spec the training step kept with it)."""
    import json
    import os

    from gpunet_core import steps
    from gpunet_core.utils.files import BEST_CHECKPOINT

    with open(validation.path) as fh:
        val = json.load(fh)
    with open(deployed_validation.path) as fh:
        deployed_val = json.load(fh)
    with open(bench.path) as fh:
        lat = json.load(fh)
    decision = steps.promote(os.path.join(checkpoint.path, BEST_CHECKPOINT), deployed.path,
                             val, lat, model=steps.trained_model(checkpoint.path, model_name),
                             img_size=img_size,
                             registered_model=registered_model,
                             deployed_validation=deployed_val, min_top1=min_top1,
                             max_latency_ms=max_latency_ms, margin=margin,
                             max_latency_increase_pct=max_latency_increase_pct,
                             max_quant_drop=max_quant_drop,
                             teacher={k: checkpoint.metadata[k] for k in ("teacher",
                                                                          "teacher_top1")
                                      if k in checkpoint.metadata},
                             data=os.path.join(dataset.path, "val"),
                             experiment=mlflow_experiment, kfp_run_id=kfp_run_id,
                             scheduled_time=scheduled_time)
    with open(report.path, "w") as fh:
        fh.write(decision["markdown"])
    return f"{decision['alias']}:{decision['version']}"
