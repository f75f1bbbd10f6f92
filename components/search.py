"""search_setup / search_worker / search_front: the hardware-aware architecture search as KFP
tasks sharing one Optuna study (gpunet_core.steps.search_setup, search_worker, search_front).

The latency is measured where the setup and worker tasks run (the bench image: TensorRT and
ONNX Runtime); the front only reads the study and writes its files (the CPU image).
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components._images import BENCH_IMAGE, CPU_IMAGE, component


@component(BENCH_IMAGE)
def search_setup(dataset: Input[Dataset], budget_ms: float, trials: int, workers: int,
                 backend: str, precision: str, img_size: int, proxy_epochs: int,
                 proxy_images: int, proxy_batch_size: int, study_name: str,
                 study_storage: str, shared_storage: bool, references: bool,
                 search_space: str, sampler: str, seed: int, latency_iterations: int,
                 setup: Output[Artifact]) -> list[int]:
    """Create (or resume) the study and check the request up front; returns the worker
    indices ``0 .. workers-1`` (the ParallelFor's items). ``setup``: a folder with
    ``setup.json`` (the checked config, no storage URL) and, where the tasks share a
    filesystem and no ``study_storage`` or ``$GPUNET_SEARCH_STORAGE`` is given, the sqlite
    study itself. ``shared_storage`` (compiled in for a cluster): refuse that sqlite default.
    ``search_space``: a search-space YAML every search task can read (empty: the packaged
    one)."""
    from gpunet_core import steps

    out = steps.search_setup(dataset.path, setup.path, budget_ms=budget_ms,
                             storage=study_storage, shared_storage=shared_storage,
                             study_name=study_name, backend=backend, precision=precision,
                             img_size=img_size, trials=trials, workers=workers,
                             proxy_epochs=proxy_epochs, proxy_images=proxy_images,
                             proxy_batch_size=proxy_batch_size, references=references,
                             space=search_space, sampler=sampler, seed=seed,
                             iterations=latency_iterations)
    setup.metadata.update({"study": study_name, "storage": out["storage"],
                           "hardware": out["hardware"], "created": out["created"],
                           "fastest_in_space_ms": min(out["fastest_in_space_ms"].values())})
    return out["workers"]


@component(BENCH_IMAGE)
def search_worker(dataset: Input[Dataset], setup: Input[Artifact], worker: int,
                  study_storage: str) -> int:
    """Trials of the shared study until it holds its ``trials``; returns how many this
    worker ran."""
    from gpunet_core import steps

    out = steps.search_worker(dataset.path, setup.path, worker=worker, storage=study_storage)
    return int(out["trials_run"])


@component(CPU_IMAGE)
def search_front(setup: Input[Artifact], study_storage: str, trials_run: list[int], pick: str,
                 front: Output[Artifact], spec: Output[Artifact], metrics: Output[Metrics]
                 ) -> NamedTuple("SearchFront", [("spec_uri", str), ("trial", int),
                                                 ("proxy_top1", float), ("latency_ms", float)]):
    """After every worker (``trials_run``: theirs, collected): ``front``, a folder with
    ``pareto.json``, ``specs/trial-NNNNN.json`` and ``pareto.png``; ``spec``, the JSON spec
    of the front member ``pick`` chooses (``most_accurate`` or ``fastest``), its training name
    in ``metadata["name"]``; ``spec_uri``, that artifact's URI (``s3://...`` where the
    pipeline root is on S3: a ``model_name`` for gpunet_training, or ``gpunet train
    --model``)."""
    from collections import namedtuple

    from gpunet_core import steps

    out = steps.search_front(setup.path, front.path, spec.path, storage=study_storage,
                             pick=pick)
    chosen = out["chosen"]
    spec.metadata.update({"name": out["name"], "trial": chosen["trial"],
                          "proxy_top1": chosen["proxy_top1"], "latency_ms": chosen["latency_ms"],
                          "params": chosen["params"], "gmacs": chosen["gmacs"],
                          "backend": out["backend"], "precision": out["precision"],
                          "budget_ms": out["budget_ms"], "pick": pick})
    front.metadata.update({"front": len(out["front"]), "trials": out["trials_counted"],
                           "trained_in_budget": out["trained_in_budget"],
                           "workers_trials_run": sum(trials_run), "chosen": chosen,
                           "pick": pick})
    for key in ("proxy_top1", "latency_ms", "params", "gmacs"):
        metrics.log_metric(f"chosen_{key}", float(chosen[key]))
    metrics.log_metric("front_size", float(len(out["front"])))
    metrics.log_metric("trials", float(out["trials_counted"]))
    steps.write_artifact_json(metrics.path, metrics.metadata)  # a file: cacheable by kfp.local
    result = namedtuple("SearchFront", ["spec_uri", "trial", "proxy_top1", "latency_ms"])
    return result(spec.uri, int(chosen["trial"]), float(chosen["proxy_top1"]),
                  float(chosen["latency_ms"]))
