"""train_teacher / train_student: torchrun training (gpunet_core.steps.train_config + train)."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components._images import TRAIN_IMAGE, component


@component(TRAIN_IMAGE)
def train_teacher(dataset: Input[Dataset], enabled: bool, model_name: str, epochs: int,
                  batch_size: int, img_size: int, lr: float, optimizer: str, augment: str,
                  warmup_epochs: int, nproc_per_node: int, checkpoint: Output[Model]):
    """The distillation teacher, trained in the same run (a no-op when not ``enabled``).
    ``warmup_epochs`` < 0: the recipe's (or the preset's)."""
    import os

    from gpunet_core import steps

    os.makedirs(checkpoint.path, exist_ok=True)
    checkpoint.metadata["enabled"] = enabled
    if enabled:
        cfg = steps.train_config(dataset.path, checkpoint.path, augment=augment,
                                 model=model_name, epochs=epochs, batch_size=batch_size,
                                 img_size=img_size, lr=lr, opt=optimizer or None,
                                 warmup_epochs=warmup_epochs if warmup_epochs >= 0 else None)
        result = steps.train(cfg, nproc_per_node=nproc_per_node)
        checkpoint.metadata.update({"model": cfg.model, "img_size": img_size,
                                    "top1": result.get("top1", 0.0)})


@component(TRAIN_IMAGE)
def train_student(dataset: Input[Dataset], teacher: Input[Model], model_name: str, preset: str,
                  epochs: int, batch_size: int, img_size: int, lr: float, optimizer: str,
                  augment: str, warmup_epochs: int, nodes: int, nproc_per_node: int,
                  teacher_name: str, teacher_img_size: int,
                  kd_weight: float, kd_temperature: float, mlflow_experiment: str,
                  image: str, pod_settings: str, checkpoint: Output[Model],
                  metrics: Output[Metrics], spec: Input[Artifact] = None):
    """The candidate GPUNet; distils from ``teacher`` when the teacher step was enabled.

    ``model_name``: a shipped name or a GPUNet JSON spec (a ``.json`` path or ``s3://`` URI);
    ``spec``, when given (an architecture search's output: the JSON at its path, its name in
    ``metadata["name"]`` if set), overrides it. A spec trains by its custom name, and its
    verified copy is kept in ``checkpoint``, where the later steps read the architecture.

    ``nodes > 1`` runs it as a Kubeflow Trainer ``TrainJob`` with ``pod_settings``
    (PodSettings JSON, compiled in from the pipeline's platform), keyed by the checkpoint
    artifact's URI: unique per run and task, the same for a retried attempt, and no cache input
    (a run id parameter would make every run miss the cache).
    """
    import os

    from gpunet_core import steps
    from gpunet_core.utils.files import LAST_CHECKPOINT

    use_teacher = bool(teacher.metadata.get("enabled"))
    distill = {"enable_distill": True, "teacher": teacher_name,
               "teacher_checkpoint": os.path.join(teacher.path, LAST_CHECKPOINT),
               "teacher_img_size": teacher_img_size or None, "kd_weight": kd_weight,
               "kd_temperature": kd_temperature} if use_teacher and teacher_name else {}
    mlflow = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    cfg = steps.train_config(
        dataset.path, checkpoint.path, augment=augment, model=spec.path if spec else model_name,
        model_label=spec.metadata.get("name") if spec else None, preset=preset or None,
        epochs=epochs, batch_size=batch_size, img_size=img_size, lr=lr or None,
        opt=optimizer or None, warmup_epochs=warmup_epochs if warmup_epochs >= 0 else None,
        mlflow=mlflow, experiment=mlflow_experiment if mlflow else None,
        **distill)
    result = steps.train(cfg, nodes=nodes, nproc_per_node=nproc_per_node, image=image,
                         settings=pod_settings, task="student", job_key=checkpoint.uri)
    checkpoint.metadata.update({"model": cfg.model, "img_size": img_size,
                                "distilled": use_teacher})
    if use_teacher:  # what it learnt from, for the registry and the run's summary
        checkpoint.metadata.update({"teacher": teacher_name,
                                    "teacher_top1": teacher.metadata.get("top1", -1.0)})
    for key in ("train_loss", "top1", "top5", "eval_loss", "img_per_sec"):
        if key in result:
            metrics.log_metric(key, float(result[key]))
    steps.write_artifact_json(metrics.path, metrics.metadata)  # a file: cacheable by kfp.local
