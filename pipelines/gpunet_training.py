"""The ``gpunet_training`` DAG: prepare -> teacher -> train -> validate -> export -> benchmark
-> promote + report. One DAG for the cluster and the laptop (``kfp.local``).

:func:`build_pipeline` returns the pipeline function; :class:`Platform` adds the Kubernetes
settings (GPUs, ``/dev/shm``, dataset PVC, node selector/tolerations, credentials from Secrets
and the ConfigMap) through ``kfp-kubernetes`` when compiling for a cluster.
"""


from dataclasses import dataclass, field

from kfp import dsl, kubernetes

import components as c
from components._images import TRAIN_IMAGE

PIPELINE_NAME = "gpunet-training"
S3_SECRET = "gpunet-s3"
CONFIG_MAP = "gpunet-config"


@dataclass
class Platform:
    """Cluster settings baked into the compiled spec (the laptop run uses none of them)."""

    gpus_per_node: int = 0
    accelerator: str = "nvidia.com/gpu"
    shm_size: str = "16Gi"
    use_secrets: bool = False
    dataset_pvc: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def cluster(cls, gpus_per_node: int = 1, **kw) -> "Platform":
        return cls(gpus_per_node=gpus_per_node, use_secrets=True,
                   dataset_pvc=kw.pop("dataset_pvc", "gpunet-dataset-cache"),
                   node_selector=kw.pop("node_selector", {"nvidia.com/gpu.present": "true"}),
                   tolerations=kw.pop("tolerations", [{"key": "nvidia.com/gpu",
                                                       "operator": "Exists",
                                                       "effect": "NoSchedule"}]), **kw)

    def credentials(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """S3 keys and the MLflow login from Secrets, endpoints and MLflow URI from the
        ConfigMap (names only: no value is baked into the compiled spec)."""
        if self.use_secrets:
            kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
            # the MLflow server runs with basic auth (manifests/base/mlflow.yaml); MLflow's
            # client sends these as HTTP basic credentials
            kubernetes.use_secret_as_env(task, secret_name="gpunet-mlflow-auth",
                                         secret_key_to_env={
                                             "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                             "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
            kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP,
                                             config_map_key_to_env={
                                                 "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                                                 "S3_ENDPOINT_URL": "AWS_ENDPOINT_URL"})
            kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP,
                                             config_map_key_to_env={
                                                 "S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"})
        return task

    def gpu(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """GPUs, shared memory for loader workers, the dataset cache and GPU node placement."""
        if self.gpus_per_node:
            task.set_accelerator_type(self.accelerator).set_accelerator_limit(self.gpus_per_node)
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                       medium="Memory", size_limit=self.shm_size)
            for key, value in self.node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for tol in self.tolerations:
                kubernetes.add_toleration(task, **tol)
        if self.dataset_pvc:
            kubernetes.mount_pvc(task, pvc_name=self.dataset_pvc, mount_path="/data")
        return task


def build_pipeline(platform: Platform | None = None):
    """The ``gpunet_training`` pipeline function for ``platform`` (default: laptop)."""
    p = platform or Platform()

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="GPUNet: data -> (teacher) -> torchrun training -> validation -> "
                              "ONNX -> latency -> MLflow registry promotion + report")
    def gpunet_training(
        dataset_source: str = "digits",
        dataset_img_size: int = 32,
        dataset_per_class: int = 0,
        model_name: str = "gpunet_0",
        preset: str = "",
        epochs: int = 2,
        batch_size: int = 16,
        img_size: int = 32,
        lr: float = 0.002,
        optimizer: str = "adamw",
        augment: str = "light",
        nodes: int = 1,
        nproc_per_node: int = 2,
        enable_distill: bool = True,
        teacher_name: str = "gpunet_1",
        teacher_epochs: int = 1,
        teacher_img_size: int = 48,
        kd_weight: float = 1.0,
        kd_temperature: float = 1.0,
        bench_backend: str = "auto",
        bench_iterations: int = 50,
        mlflow_experiment: str = "gpunet",
        registered_model: str = "gpunet",
        min_top1: float = 0.0,
        max_latency_ms: float = 0.0,
        promotion_margin: float = 0.0,
        train_image: str = TRAIN_IMAGE,
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = c.prepare_dataset(source=dataset_source, img_size=dataset_img_size,
                                 per_class=dataset_per_class)
        p.credentials(data)
        if p.dataset_pvc:
            kubernetes.mount_pvc(data, pvc_name=p.dataset_pvc, mount_path="/data")

        teacher = c.train_teacher(dataset=data.outputs["dataset"], enabled=enable_distill,
                                  model_name=teacher_name, epochs=teacher_epochs,
                                  batch_size=batch_size, img_size=teacher_img_size, lr=lr,
                                  optimizer=optimizer, augment=augment,
                                  nproc_per_node=nproc_per_node)
        p.gpu(p.credentials(teacher))

        student = c.train_student(
            dataset=data.outputs["dataset"], teacher=teacher.outputs["checkpoint"],
            model_name=model_name, preset=preset, epochs=epochs, batch_size=batch_size,
            img_size=img_size, lr=lr, optimizer=optimizer, augment=augment, nodes=nodes,
            nproc_per_node=nproc_per_node, teacher_name=teacher_name,
            teacher_img_size=teacher_img_size, kd_weight=kd_weight,
            kd_temperature=kd_temperature, mlflow_experiment=mlflow_experiment,
            image=train_image)
        p.gpu(p.credentials(student))
        student.set_retry(num_retries=1)  # resumes from its last checkpoint

        val = c.validate(dataset=data.outputs["dataset"], checkpoint=student.outputs["checkpoint"],
                         model_name=model_name, img_size=img_size)
        onnx = c.export_onnx(checkpoint=student.outputs["checkpoint"], model_name=model_name,
                             img_size=img_size)
        bench = c.benchmark(onnx=onnx.outputs["onnx"], backend=bench_backend,
                            iterations=bench_iterations)
        if p.gpus_per_node:
            bench.set_accelerator_type(p.accelerator).set_accelerator_limit(1)

        decision = c.promote(checkpoint=student.outputs["checkpoint"],
                             onnx=onnx.outputs["onnx"], validation=val.outputs["results"],
                             bench=bench.outputs["results"], model_name=model_name,
                             img_size=img_size, registered_model=registered_model,
                             min_top1=min_top1, max_latency_ms=max_latency_ms,
                             margin=promotion_margin, mlflow_experiment=mlflow_experiment,
                             kfp_run_id=run_id)
        p.credentials(decision)
        decision.set_caching_options(False)  # a registry decision is never replayed from cache
        c.report(validation=val.outputs["results"], bench=bench.outputs["results"])

    return gpunet_training


gpunet_training = build_pipeline()
