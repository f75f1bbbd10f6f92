"""The ``gpunet_search`` DAG: prepare -> search-setup -> search-worker x ``workers``
(``dsl.ParallelFor``, one shared Optuna study) -> search-front -> the regular training chain
(:func:`pipelines.gpunet_training.train_and_deploy`) on the spec the front chooses.

* **search-setup** checks the request before anything else runs (budget, backend, TensorRT
  where asked for, precision, counts, the storage), creates or resumes the study, refuses a
  budget below the space's fastest spec and measures NVIDIA's seven GPUNets once
  (``references``). It returns the worker indices ``0 .. workers-1``: KFP's ``ParallelFor``
  takes its items from a task output or a list, not from ``range`` of a parameter, and its
  ``parallelism`` is fixed at compile time (:func:`build_pipeline`'s ``parallelism``; 0: all
  workers at once; ``kfp.local`` runs at most 2 at a time whatever it says).
* **search-worker** (one task per index) runs trials of the study until it holds ``trials``
  (:func:`gpunet_core.search.study.run_worker`); the measured latencies live in the study, so
  no worker measures a spec another has.
* **search-front**, after all of them (``dsl.Collected``), writes ``pareto.json``,
  ``specs/*.json`` and ``pareto.png`` as its ``front`` artifact and the chosen spec (``pick``:
  ``most_accurate`` within the budget by default, or ``fastest``) as ``spec``, with its URI
  (``spec_uri``: ``s3://...`` where the pipeline root is on S3).
* The training chain trains that spec (``spec_artifact``) and exports, validates, quantizes
  to ``precision``, times it on ``backend`` (the search's latency backend), and promotes it.

The study's storage: the ``study_storage`` parameter, else ``$GPUNET_SEARCH_STORAGE``; on a
cluster that variable comes from the Secret ``gpunet-optuna`` (manifests/README.md), wired
into the search tasks only, and the sqlite default is refused (the pods share no disk);
locally (``kfp.local``) the default is an sqlite file in the setup task's artifact folder,
which every task of the run reaches (``python -m pipelines search-local`` passes one under
``--workdir``, so that a rerun resumes the study).
"""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact

import components as c
from components._images import TRAIN_IMAGE
from pipelines.gpunet_training import HOUR, TTL_AFTER_FINISHED_S, Platform, train_and_deploy

PIPELINE_NAME = "gpunet-search"
# the study's URL on a cluster: this Secret's key, as this environment variable (the same name
# as gpunet_core.search.study.STORAGE_ENV, which imports torch: not for compiling)
STUDY_SECRET = "gpunet-optuna"
STUDY_ENV = "GPUNET_SEARCH_STORAGE"
# a task running longer than this is stuck (kfp-kubernetes set_timeout): setup measures and
# proxy-trains the seven references; a worker runs until the study holds its trials
SEARCH_TIMEOUTS_S = {"search-setup": 12 * HOUR, "search-worker": 7 * 24 * HOUR,
                     "search-front": HOUR}
# the tasks in the compiled IR (search-worker inside the ParallelFor's sub-DAG)
SETUP_TASK, WORKER_TASK, FRONT_TASK = "search-setup", "search-worker", "search-front"
# what a run returns: the front's folder (pareto.json, specs/, pareto.png), the chosen spec's URI
class SearchOutputs(NamedTuple):
    front: Artifact
    spec_uri: str


def search_task(p: Platform, task: dsl.PipelineTask, name: str, *,
                gpu: bool = False) -> dsl.PipelineTask:
    """A search task on a cluster: the platform's credentials, non-root security context and
    dataset cache as every task of the training DAG has (:meth:`Platform.task`), plus the
    study's URL from the Secret; ``gpu``: one GPU on a GPU node, where latency is measured."""
    if not p.cluster:
        return task
    p.task(task, name, timeout_s=SEARCH_TIMEOUTS_S[name])
    kubernetes.use_secret_as_env(task, secret_name=STUDY_SECRET,
                                 secret_key_to_env={STUDY_ENV: STUDY_ENV})
    if gpu and p.pod.gpus_per_node:
        task.set_accelerator_type(p.pod.accelerator).set_accelerator_limit(1)
        for key, value in p.pod.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in p.pod.tolerations:
            kubernetes.add_toleration(task, **tol)
    if gpu and p.dataset_pvc:
        kubernetes.mount_pvc(task, pvc_name=p.dataset_pvc, mount_path="/data")
    return task


def build_pipeline(platform: Platform | None = None, *, parallelism: int = 0):
    """The ``gpunet_search`` pipeline function for ``platform`` (default: laptop);
    ``parallelism``: at most this many workers at once (0: all)."""
    p = platform or Platform()
    gpu = p.cluster and bool(p.pod.gpus_per_node)
    default_backend = "tensorrt" if gpu else "onnxruntime"
    default_target = "tensorrt" if gpu else "cpu"
    config = dsl.PipelineConfig(ttl_seconds_after_finished=TTL_AFTER_FINISHED_S) \
        if p.cluster else None

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="GPUNet's hardware-aware search: workers sharing one Optuna study "
                              "(measured latency within a budget, proxy accuracy) -> Pareto "
                              "front -> the chosen spec trained, deployed and promoted",
                  pipeline_config=config)
    def gpunet_search(
        dataset_source: str = "digits",
        dataset_img_size: int = 64,
        dataset_per_class: int = 0,
        budget_ms: float = 20.0,
        trials: int = 8,
        workers: int = 1,
        backend: str = default_backend,
        precision: str = "fp32",
        img_size: int = 32,
        proxy_epochs: int = 3,
        proxy_images: int = 640,
        proxy_batch_size: int = 32,
        study_name: str = "gpunet-search",
        study_storage: str = "",
        references: bool = p.cluster,
        search_space: str = "",
        sampler: str = "tpe",
        seed: int = 0,
        latency_iterations: int = 50,
        pick: str = "most_accurate",
        preset: str = "",
        epochs: int = 3,
        batch_size: int = 16,
        lr: float = 0.002,
        optimizer: str = "adamw",
        augment: str = "light",
        warmup_epochs: int = -1,
        nodes: int = 1,
        nproc_per_node: int = 2,
        enable_distill: bool = True,
        teacher_name: str = "gpunet_0",
        teacher_epochs: int = 3,
        teacher_img_size: int = 64,
        kd_weight: float = 1.0,
        kd_temperature: float = 1.0,
        bench_iterations: int = 50,
        quant_target: str = default_target,
        calib_data: str = "",
        calib_samples: int = 256,
        max_quant_drop: float = 0.5,
        mlflow_experiment: str = "gpunet",
        registered_model: str = "gpunet",
        min_top1: float = 0.0,
        max_latency_ms: float = 0.0,
        promotion_margin: float = 0.0,
        max_latency_increase_pct: float = 0.0,
        train_image: str = TRAIN_IMAGE,
    ) -> SearchOutputs:
        """The search's parameters first, then the training chain's (gpunet_training's, with
        the same names and defaults; ``img_size`` and ``precision`` are both the search's and
        the deployed model's, and the benchmark times it on ``backend``).

        ``budget_ms``: the hard latency limit per image (batch 1) on ``backend``; ``trials``:
        the study's total (a resumed study counts what it has); ``img_size``: the search
        resolution, which the chosen spec is trained at; ``proxy_*``: the short training that
        ranks candidates (the same for all); ``study_storage``: empty, the Secret on a cluster,
        an sqlite file of this run locally; ``search_space``: a search-space YAML every search
        task can read (empty: the packaged one); ``references``: also measure NVIDIA's seven
        GPUNets (the default on a cluster; several minutes of CPU on a laptop); ``pick``:
        ``most_accurate`` or ``fastest`` front member.

        The defaults are the laptop run (``make search``: digits at 32 px, ONNX Runtime),
        chosen by measurement on 2 cores:

        - ``budget_ms=20``: about GPUNet-0's latency there (18 ms); roughly half of the space's
          candidates at 32 px meet it.
        - ``proxy_batch_size=32``: with the search's 64, 3 epochs of 640 images are 30 steps,
          and an 11 M-parameter candidate stayed at chance (10 %); with 32 it reached 88.6 %
          (60 steps, 41 s).
        - ``workers=1``: two workers on 2 cores measure each other's load (one spec: 18 ms
          alone, 38 ms beside a worker training its proxy). On one machine run one worker;
          give each worker a machine of its own (a cluster's GPU pods) to run more.
        """
        data = c.prepare_dataset(source=dataset_source, img_size=dataset_img_size,
                                 per_class=dataset_per_class)
        p.task(data, "prepare-dataset")
        if p.dataset_pvc:
            kubernetes.mount_pvc(data, pvc_name=p.dataset_pvc, mount_path="/data")
        dataset = data.outputs["dataset"]

        setup = c.search_setup(dataset=dataset, budget_ms=budget_ms, trials=trials,
                               workers=workers, backend=backend, precision=precision,
                               img_size=img_size, proxy_epochs=proxy_epochs,
                               proxy_images=proxy_images, proxy_batch_size=proxy_batch_size,
                               study_name=study_name, study_storage=study_storage,
                               shared_storage=p.cluster, references=references,
                               search_space=search_space, sampler=sampler, seed=seed,
                               latency_iterations=latency_iterations)
        search_task(p, setup, SETUP_TASK, gpu=True)
        # the study is state outside the task's inputs: never replayed from a cache
        setup.set_caching_options(False)

        with dsl.ParallelFor(setup.outputs["Output"], parallelism=parallelism) as index:
            worker = c.search_worker(dataset=dataset, setup=setup.outputs["setup"],
                                     worker=index, study_storage=study_storage)
            search_task(p, worker, WORKER_TASK, gpu=True)
            worker.set_caching_options(False)
            # a preempted pod's trial goes stale and is retried once, by any worker; the task
            # itself starts again and joins the study (finished trials are never repeated)
            worker.set_retry(num_retries=1)

        front = c.search_front(setup=setup.outputs["setup"], study_storage=study_storage,
                               trials_run=dsl.Collected(worker.output), pick=pick)
        search_task(p, front, FRONT_TASK)
        front.set_caching_options(False)  # it reads the study as it is now

        train_and_deploy(
            p, dataset, spec_artifact=front.outputs["spec"], preset=preset, epochs=epochs,
            batch_size=batch_size, img_size=img_size, lr=lr, optimizer=optimizer,
            augment=augment, warmup_epochs=warmup_epochs, nodes=nodes,
            nproc_per_node=nproc_per_node, enable_distill=enable_distill,
            teacher_name=teacher_name, teacher_epochs=teacher_epochs,
            teacher_img_size=teacher_img_size, kd_weight=kd_weight,
            kd_temperature=kd_temperature, bench_backend=backend,
            bench_iterations=bench_iterations, precision=precision, quant_target=quant_target,
            calib_data=calib_data, calib_samples=calib_samples, max_quant_drop=max_quant_drop,
            mlflow_experiment=mlflow_experiment, registered_model=registered_model,
            min_top1=min_top1, max_latency_ms=max_latency_ms,
            promotion_margin=promotion_margin,
            max_latency_increase_pct=max_latency_increase_pct, train_image=train_image)
        return SearchOutputs(front.outputs["front"], front.outputs["spec_uri"])

    return gpunet_search


gpunet_search = build_pipeline()

__all__ = ["PIPELINE_NAME", "SEARCH_TIMEOUTS_S", "STUDY_ENV", "STUDY_SECRET", "SearchOutputs",
           "build_pipeline", "gpunet_search", "search_task"]
