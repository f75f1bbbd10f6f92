"""Pipeline steps: one function per step of the ``gpunet_training`` DAG.

Each KFP component in ``components/`` is a typed shell over exactly one function here, and the
CLI and tests call the same functions. Steps take plain values and local paths and return
JSON-able dicts. Every step but :func:`promote` is a pure function of its inputs, so KFP may
serve it from its cache when a pipeline is re-run.

MLflow: without KFP's MLflow plugin, training opens its own run (its id left in
``<output>/mlflow_run_id``) and logs the best checkpoint as a LoggedModel
(``<output>/mlflow_model_id``); :func:`promote` logs the validation and latency figures into
that run, linked to the model, and tags it with the pipeline run (``kfp_run_id``). With the
plugin (``$MLFLOW_RUN_ID``, one nested run per task), every step logs into its own task's run
instead and creates none; validation and benchmark figures then land in theirs too.

Models: a step's ``model`` is a shipped name or a GPUNet JSON spec given by location (a ``.json``
path or ``s3://`` URI), which :func:`train_config` reads, validates and stores once and trains
by its custom name (:func:`gpunet_core.models.spec.model_name`). :func:`train` keeps that
spec's verified copy beside the checkpoints, and the steps after training build the model from
it (:func:`trained_model`): the checkpoint folder carries its architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpunet_core.mlops.mlflow_client import client, ensure_experiment, plugin_run_id
from gpunet_core.models.spec import is_custom_name, model_name, stored_spec_path
from gpunet_core.training.config import TrainConfig, to_argv, with_model_name
from gpunet_core.utils import storage
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import (
    LAST_CHECKPOINT,
    MODEL_ID_FILE,
    RESULT_FILE,
    RUN_ID_FILE,
    copy_file,
    write_json,
)
from gpunet_core.utils.process import fast_exit

_logger = logging.getLogger(__name__)
RUN_TAG = "kfp_run_id"
RUNS_ENV = "GPUNET_RUNS_URI"
# train_config(augment=...): the flags each augmentation recipe sets. "light", for tiny
# images and a few epochs (the laptop demo), measured on digits at 32 px, 2 epochs, 2 workers:
# no RandAugment or erasing; no flips (a mirrored 2, 3 or 7 is no digit: 70 % -> 93 % top-1);
# 0.8-1 crops and no label smoothing (both slow a 90-step run down: 92.8 % -> 96.4 % at 64 px);
# a cosine LR decay (the figures: gpunet_training's docstring)
AUGMENT: dict[str, dict[str, Any]] = {
    "recipe": {},
    "light": {"aa": "", "reprob": 0.0, "scale": (0.8, 1.0), "hflip": 0.0, "smoothing": 0.0,
              "sched": "cosine"}}


class StepError(GpunetError):
    """A pipeline step failed; the message says which and why."""


WORK_LOG = "gpunet step %s: %.3f s of work"
_WORK_RE = re.compile(r"gpunet step (.+): (\d+(?:\.\d+)?) s of work\s*$")


def parse_work_log(line: str) -> tuple[str, float] | None:
    """The (step name, seconds) of a :data:`WORK_LOG` line in a task's log, else None."""
    match = _WORK_RE.search(line)
    return (match[1], float(match[2])) if match else None


def timed(*modules: str):
    """Decorate a step: import ``modules`` (the libraries it uses), run it, log its work time.

    The one log line (:data:`WORK_LOG`, INFO: KFP's executor shows it in the task's log) is
    how long the step worked, so whoever watches the task from outside (``pipelines run-local``,
    ``make bench``) can tell it from the task process's own cost: interpreter and executor
    start, imports, artifact copies, exit. The clock starts after ``modules`` are loaded, so
    moving an import into the function cannot make it look like work. Only modules whose
    import writes nothing belong here: the step checks its arguments after them, and a bad call
    must leave no files behind. Libraries whose first import writes files (onnxruntime a device
    id, matplotlib a font cache) load inside the step after its checks and count as its work
    (about 0.1 and 0.4 s), as does torch where a step needs it only sometimes.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            fast_exit()
            for module in modules:
                importlib.import_module(module)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:  # a failed attempt's work was work too (a retried step counts both)
                model = kwargs.get("model") or getattr(args[0] if args else None, "model", "")
                name = fn.__name__ + (f"({model})" if model else "")  # train(cfg): cfg.model
                _logger.info(WORK_LOG, name, time.perf_counter() - start)

        wrapper.modules = modules  # what the step imports before its clock starts
        return wrapper

    return decorate


# --------------------------------------------------------------------------- MLflow glue


def pipeline_run_id(kfp_run_id: str, experiment: str) -> str | None:
    """The MLflow run tagged with this pipeline run (``kfp_run_id``), or None."""
    if not kfp_run_id or not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    mlc = client()
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlc.search_runs([exp.experiment_id], f"tags.{RUN_TAG} = '{kfp_run_id}'",
                           max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def training_run_id(checkpoint: str | Path) -> str | None:
    """The MLflow run that trained ``checkpoint`` (``mlflow_run_id`` beside it), if it exists."""
    marker = Path(checkpoint).parent / RUN_ID_FILE
    if not marker.is_file():
        return None
    run_id = marker.read_text().strip()
    from mlflow.exceptions import MlflowException

    try:
        client().get_run(run_id)
    except MlflowException:
        _logger.warning("training run %s (from %s) is not in this MLflow; a new run is used",
                        run_id, marker)
        return None
    return run_id


def logged_model_id(checkpoint: str | Path) -> str | None:
    """The LoggedModel training logged for ``checkpoint`` (``mlflow_model_id`` beside it)."""
    marker = Path(checkpoint).parent / MODEL_ID_FILE
    return (marker.read_text().strip() or None) if marker.is_file() else None


def log_metrics(run_id: str, metrics: dict[str, float], prefix: str, *,
                model_id: str | None = None, dataset: dict[str, Any] | None = None) -> None:
    """Log numeric results into ``run_id`` once (a cached step's figures are not re-logged),
    linked to LoggedModel ``model_id`` and measured on ``dataset`` (a validation result's
    ``dataset``) when given."""
    from mlflow.entities import Metric

    mlc = client()
    existing = mlc.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    name = digest = None
    if dataset and dataset.get("checksum"):
        name, digest = f"{dataset.get('split') or 'val'}", dataset["checksum"][:36]
    batch = [Metric(f"{prefix}{k}", float(v), now, 0, model_id=model_id, dataset_name=name,
                    dataset_digest=digest, run_id=run_id) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and (model_id or existing.get(f"{prefix}{k}") != float(v))]
    if batch:
        mlc.log_batch(run_id, metrics=batch)


def log_to_task_run(step: str, metrics: dict[str, Any], prefix: str) -> None:
    """With KFP's MLflow plugin: the step's figures into its task's run, tagged; otherwise
    nothing (the step stays a pure function). Never fails the step."""
    run_id = plugin_run_id()
    if not run_id or not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        client().set_tag(run_id, "gpunet.step", step)
        log_metrics(run_id, metrics, prefix)
    except Exception as exc:  # MLflow down: the figures are in the step's outputs anyway
        _logger.warning("could not log %s's figures into MLflow run %s: %s", step, run_id,
                        str(exc).splitlines()[0][:200])


def write_artifact_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a metrics-type artifact's values to its file too (atomically).

    KFP keeps Metrics in the artifact's metadata only; with no file at the artifact's URI a
    cache (``kfp.local``'s treats a missing file as a miss) would re-run the step every time.
    """
    write_json(dict(data), path)


# --------------------------------------------------------------------------- the steps


@timed("gpunet_core.data.prepare", "gpunet_core.utils.storage", "PIL.Image")
def prepare_dataset(source: str, out: str | Path, *, img_size: int = 32,
                    per_class: int | None = None, jobs: int = 1) -> dict[str, Any]:
    """``digits`` (the embedded demo set) or an ImageFolder tree (local path or ``s3://``)."""
    # every KFP task imports steps: each step loads only its own libraries
    from gpunet_core.data import prepare as datasets
    from gpunet_core.utils import storage

    if source == "digits":
        summary = datasets.prepare_digits(out, img_size=img_size, per_class=per_class or None,
                                          jobs=jobs)
    else:
        if not storage.is_s3_uri(source) and not Path(source).is_dir():
            raise StepError(f"dataset source {source!r} is neither 'digits' nor an existing "
                            "directory or s3:// prefix")
        summary = datasets.prepare_folder(source, out, jobs=jobs)
    return summary.manifest


@timed()
def train(cfg: TrainConfig, *, nproc_per_node: int = 1, nodes: int = 1, image: str = "",
          namespace: str = "gpunet", settings: str = "", task: str = "train",
          job_key: str = "") -> dict[str, Any]:
    """Run ``gpunet train`` with ``cfg`` under torchrun here, or as a Kubeflow Trainer
    ``TrainJob`` of ``nodes`` x ``nproc_per_node`` workers when ``nodes > 1``.

    Both run the same argv, :func:`~gpunet_core.training.config.to_argv` of the config (build
    ``cfg`` from a pipeline's parameters with :func:`train_config`), and return the same result.
    A TrainJob's pods share nothing with this process but S3 (:func:`cluster_config`); its
    outputs are copied back into ``cfg.output``. ``settings``: the pods' settings as
    :class:`~gpunet_core.mlops.cluster.PodSettings` JSON (the pipeline's platform; default:
    the stack's Secrets and ConfigMap). ``job_key`` names the TrainJob's attempts and S3
    prefix (default: the config's ``kfp_run_id`` tag): unique per run and ``task``, the same
    when the step is retried, so a retry re-attaches or resumes and never collides.
    """
    if nodes > 1:
        result = _train_on_cluster(cfg, nodes=nodes, nproc_per_node=nproc_per_node, image=image,
                                   namespace=namespace, settings=settings, task=task,
                                   key=job_key or run_id_of(cfg))
    else:
        result = _train_here(cfg, nproc_per_node)
    keep_spec(cfg)
    return result


def _train_here(cfg: TrainConfig, nproc_per_node: int) -> dict[str, Any]:
    args = to_argv(cfg)
    if nproc_per_node > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc_per_node}", "--max-restarts=1", "-m", "gpunet_core",
               "train", *args]
    else:
        cmd = [sys.executable, "-m", "gpunet_core", "train", *args]
    _logger.info("running %s", " ".join(cmd))
    code, reason = _run_streaming(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))))})
    if code != 0:
        raise StepError(f"training failed (exit code {code}): "
                        f"{reason or 'no error message; see the log above'}")
    return train_result(cfg.output)


def keep_spec(cfg: TrainConfig) -> None:
    """A custom spec's verified copy beside the run's checkpoints, ``<name>.json``: what the
    steps after training build the model from (:func:`trained_model`)."""
    if not is_custom_name(cfg.model):
        return
    stored = stored_spec_path(cfg.model)
    if storage.is_s3_uri(cfg.output):
        storage.upload_file(stored, storage.parse_s3_uri(cfg.output).join(stored.name))
    else:
        copy_file(stored, Path(cfg.output) / stored.name)


def trained_model(checkpoint_dir: str | Path, model: str) -> str:
    """The model the training step's output folder ``checkpoint_dir`` holds, as the steps after
    training pass it on: the path of the custom spec :func:`train` kept there
    (``<name>.json``), else ``model`` (the pipeline's ``model_name``)."""
    kept = sorted(p for p in Path(checkpoint_dir).glob("*.json") if is_custom_name(p.stem))
    if len(kept) > 1:
        raise StepError(f"{checkpoint_dir} holds {len(kept)} model specs "
                        f"({', '.join(p.name for p in kept)}); a training step's output folder "
                        "holds the one spec it trained")
    return str(kept[0]) if kept else model


def run_id_of(cfg: TrainConfig) -> str:
    """The pipeline run ``cfg`` belongs to (its ``kfp_run_id`` tag), or ``""``."""
    return dict(tag.split("=", 1) for tag in cfg.run_tag if "=" in tag).get(RUN_TAG, "")


def runs_prefix() -> storage.S3Uri:
    """Where multi-node runs keep their data and outputs: ``$GPUNET_RUNS_URI`` (ConfigMap
    ``gpunet-config`` key ``RUNS_URI``), an ``s3://`` prefix."""
    value = os.environ.get(RUNS_ENV, "")
    if not storage.is_s3_uri(value):
        raise StepError(f"multi-node training shares data and checkpoints through S3 only: set "
                        f"{RUNS_ENV} to an s3:// prefix (the gpunet-config ConfigMap's RUNS_URI), "
                        f"got {value!r}")
    return storage.parse_s3_uri(value)


def cluster_config(cfg: TrainConfig, *, run_id: str, task: str) -> TrainConfig:
    """``cfg`` for pods that share no filesystem with this process: everything through S3.

    The dataset is read from ``s3://`` (a local one is published once under
    ``<runs>/datasets/<manifest checksum>/``, so every run of the same data reuses it), local
    checkpoints it starts from go to ``<runs>/<run>/<task>/inputs/``, and the outputs to
    ``<runs>/<run>/<task>/output`` (resumable there: the step always auto-resumes). The
    task's MLflow run from KFP's plugin (``$MLFLOW_RUN_ID``) is passed as ``--mlflow-run-id``.
    """
    # multi-node only: the dataset publishing code (PIL, numpy) stays out of the other steps
    from gpunet_core.data.prepare import publish_dataset, read_manifest

    if not run_id:
        raise StepError("multi-node training needs a run key to name its TrainJob and S3 "
                        "prefix: pass job_key (the pipeline passes its output artifact's URI) "
                        "or kfp_run_id to train_config")
    runs = runs_prefix()
    storage.check_bucket(runs)  # a wrong bucket or credentials fail before any upload
    run = runs.join(_key_prefix(run_id), task)
    changes: dict[str, Any] = {"output": str(run.join("output")), "auto_resume": True}
    if cfg.mlflow and not cfg.mlflow_run_id and os.environ.get("MLFLOW_RUN_ID"):
        # the pods do not inherit this task's environment: KFP's plugin run goes in the argv
        changes["mlflow_run_id"] = os.environ["MLFLOW_RUN_ID"]
    data = str(cfg.data)
    if not storage.is_s3_uri(data):
        manifest = read_manifest(data)
        if manifest is None:
            raise StepError(f"{data} is not a prepared dataset (no manifest.json); multi-node "
                            "training reads it from S3, so it must be prepared first")
        dest = str(runs.join("datasets", manifest["checksum"][:16]))
        published = read_manifest(dest)
        if (published or {}).get("checksum") != manifest["checksum"]:
            _logger.info("publishing dataset %s to %s for the TrainJob's pods", data, dest)
            publish_dataset(data, dest, progress=False)
        changes["data"] = dest
    if is_custom_name(cfg.model):  # the pods have no spec store: the spec goes in the argv
        spec_uri = run.join("inputs", "model", f"{cfg.model}.json")
        storage.upload_file(stored_spec_path(cfg.model), spec_uri)
        changes["model"] = str(spec_uri)  # `gpunet train` knows it by the same name again
    for name in ("teacher_checkpoint", "initial_checkpoint", "resume"):
        local = getattr(cfg, name)
        if local and not storage.is_s3_uri(local):
            if not Path(local).is_file():
                raise StepError(f"{name.replace('_', '-')} {local} does not exist")
            dest_uri = run.join("inputs", name, Path(local).name)
            storage.upload_file(local, dest_uri)
            changes[name] = str(dest_uri)
    return dataclasses.replace(cfg, **changes)


def _key_prefix(key: str) -> str:
    """A run key as one S3 path segment: itself when short and plain, else 16 hex of its
    SHA-256 (an artifact URI is long and full of slashes)."""
    if len(key) <= 48 and re.fullmatch(r"[A-Za-z0-9._-]+", key):
        return key
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def collect_outputs(remote: str, out: str | Path) -> dict[str, Any]:
    """Copy a cluster run's outputs from ``remote`` (``s3://``) into ``out``; its result.

    Files are fetched into a scratch folder and then renamed over ``out``'s, so a failed copy
    leaves no half-written checkpoint and a stale same-size file is never kept.
    """
    out = Path(out)
    scratch = out / ".fetch"
    shutil.rmtree(scratch, ignore_errors=True)
    storage.download(remote.rstrip("/") + "/", scratch, progress=False)
    for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
        target = out / path.relative_to(scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(scratch, ignore_errors=True)
    return train_result(out)


def _train_on_cluster(cfg: TrainConfig, *, nodes: int, nproc_per_node: int, image: str,
                      namespace: str, settings: str, task: str, key: str) -> dict[str, Any]:
    # the Kubernetes client: multi-node only
    from gpunet_core.mlops.cluster import PodSettings
    from gpunet_core.mlops.trainjob import run_trainjob

    pod = PodSettings.from_json(settings) if settings else PodSettings()
    job_cfg = cluster_config(cfg, run_id=key, task=task)
    job = run_trainjob(to_argv(job_cfg), run_id=key, task=task, nodes=nodes,
                       nproc_per_node=nproc_per_node, image=image, settings=pod,
                       namespace=namespace)
    _logger.info("TrainJob %s: %s; copying its outputs from %s", job["trainjob"], job["state"],
                 job_cfg.output)
    return collect_outputs(job_cfg.output, cfg.output)


def train_config(data: str | Path, out: str | Path, *, augment: str = "recipe",
                 kfp_run_id: str = "", workers: int = 1, model_label: str | None = None,
                 **settings: Any) -> TrainConfig:
    """The :class:`~gpunet_core.training.config.TrainConfig` of a pipeline's training step.

    ``settings`` are TrainConfig fields (None: not given), layered as on the command line:
    defaults < ``preset`` < the ``augment`` recipe < ``settings``. The step always resumes
    (``--auto-resume``: a retried task continues its run). ``augment``: ``recipe`` keeps NVIDIA's
    augmentation (RandAugment, 0.08-1 crops, random erasing, flips, label smoothing; or the
    preset's); ``light`` (:data:`AUGMENT`) suits tiny images and few epochs, as in the laptop
    demo. ``warmup_epochs=None`` (the pipeline's -1) takes the recipe's or preset's warmup,
    unless the run is no longer than it: then there is none, since a run that ends inside its
    warmup never trains at ``lr`` (NVIDIA's 3 warmup epochs are for 450-epoch runs).
    ``model``: a shipped name or a GPUNet JSON spec (``.json`` path, ``s3://`` URI), read,
    validated and stored here: the config trains it by its custom name (``model_label``, default
    the file's stem, and 8 hex digits of its SHA-256; :func:`~gpunet_core.training.config.
    with_model_name`).
    Checked here, so a bad value fails before any training process starts.
    """
    if augment not in AUGMENT:
        raise StepError(f"augment must be one of {sorted(AUGMENT)}, got {augment!r}")
    tags = [f"{RUN_TAG}={kfp_run_id}"] if kfp_run_id else None
    cfg = TrainConfig.resolve(**{"data": str(data), "output": str(out), "auto_resume": True,
                                 "workers": workers, "run_tag": tags, **AUGMENT[augment],
                                 **settings})
    cfg = with_model_name(cfg, label=model_label)
    if settings.get("warmup_epochs") is None and cfg.warmup_epochs >= cfg.epochs:
        _logger.info("no LR warmup: the recipe's %d warmup epochs would last the whole "
                     "%d-epoch run", cfg.warmup_epochs, cfg.epochs)
        cfg = dataclasses.replace(cfg, warmup_epochs=0)
    return cfg


def train_result(out: str | Path) -> dict[str, Any]:
    """The finished run's epochs, steps, best top-1 and last epoch's figures, from the
    ``result.json`` that ``gpunet train`` writes beside its checkpoints (no torch import)."""
    path = Path(out) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StepError(f"training finished but {path} is missing or unreadable ({exc}); "
                        f"re-run the step (it resumes from {LAST_CHECKPOINT})") from None
    last = result.get("last") or {}
    return {"epochs": result["epochs"], "steps": result.get("steps", 0),
            "best_top1": result.get("best_top1"),
            **{k: v for k, v in last.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def _run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd`` with its output passed through; returns (exit code, its last error line)."""
    reason = ""
    with subprocess.Popen(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if ": error: " in line:  # `gpunet <cmd>: error: <what>; <how to fix>`
                reason = line.split(": error: ", 1)[1].strip()
    return proc.returncode, reason


@timed("gpunet_core.inference.validate", "gpunet_core.data.loaders")
def validate(data: str | Path, checkpoint: str | Path, *, model: str, img_size: int,
             crop_pct: float | None = None, batch_size: int = 64,
             results_file: str | Path | None = None) -> dict[str, Any]:
    """Accuracy of ``checkpoint`` on ``data``; ``crop_pct`` defaults to the model's own (as
    ``gpunet validate``: 0.875 for GPUNet-P0/P1, 1.0 for the others)."""
    # torch, and numpy/PIL for the dataset cache: every KFP task imports steps, only the model
    # steps need them
    from gpunet_core.data.cache import local_dataset
    from gpunet_core.inference.validate import load_inference_model
    from gpunet_core.inference.validate import validate as run_validate
    from gpunet_core.models.spec import check_img_size

    check_img_size(img_size)  # before the checkpoint is read
    model = model_name(model)  # a spec (path, s3://): stored, and known by its name
    data = local_dataset(data, progress=False)  # s3://: its verified per-node copy, checked first
    net = load_inference_model(model, checkpoint)
    results = run_validate(net, data, batch_size=batch_size, workers=0, img_size=img_size,
                           crop_pct=crop_pct, progress=False)
    results.update({"model": model, "checkpoint": str(checkpoint)})
    if results_file:
        write_json(results, results_file)
    log_to_task_run("validate", {k: results[k] for k in ("top1", "top5", "loss")}, "val_")
    return results


@timed("gpunet_core.inference.export", "gpunet_core.inference.validate", "onnx")
def export_onnx(checkpoint: str | Path, output: str | Path, *, model: str,
                img_size: int) -> dict[str, Any]:
    # torch: every KFP task imports steps, only the model steps need it
    from gpunet_core.inference import export
    from gpunet_core.inference.validate import load_inference_model

    export.check_options(batch=1, opset=export.DEFAULT_OPSET, exporter=export.DEFAULT_EXPORTER,
                         img_size=img_size, tolerance=None)  # before the checkpoint is read
    model = model_name(model)  # a spec (path, s3://): stored, and the export's name is its name
    net = load_inference_model(model, checkpoint)
    return export.export_onnx(net, output, model_name=model, img_size=img_size,
                              dynamic_batch=True, checkpoint=checkpoint)


DEPLOY_PRECISIONS = ("fp32", "fp16", "int8")


@timed("gpunet_core.inference.quantize", "onnx")
def quantize(onnx: str | Path, output: str | Path, *, calib_data: str | Path,
             precision: str = "fp32", target: str = "cpu", calib_samples: int | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """The graph to deploy: the export itself for ``fp32`` (copied with its sidecar), else
    ``gpunet quantize``'s ``precision`` graph for ``target``, calibrated on ``calib_data``
    (a prepared dataset: its train split)."""
    # every KFP task imports steps: each step loads only its own libraries
    from gpunet_core.inference import quantize as q
    from gpunet_core.inference.export import inspect_onnx, sidecar_path
    from gpunet_core.utils.files import copy_file

    if precision not in DEPLOY_PRECISIONS:
        raise StepError(f"precision must be one of {', '.join(DEPLOY_PRECISIONS)}, got "
                        f"{precision!r}")
    if target not in q.TARGETS:
        raise StepError(f"quant_target must be one of {', '.join(q.TARGETS)}, got {target!r}")
    if precision != "fp32":
        return q.quantize_onnx(onnx, output, calib_data=calib_data, precision=precision,
                               target=target, calib_samples=calib_samples or
                               q.DEFAULT_CALIB_SAMPLES,
                               seed=q.CALIB_SEED if seed is None else seed)
    info = inspect_onnx(onnx)  # a GPUNet export, not any file
    if info.precision != "fp32":
        raise StepError(f"{onnx} is a {info.precision} graph, not an FP32 export")
    copy_file(info.path, output)
    if sidecar_path(info.path).is_file():
        copy_file(sidecar_path(info.path), sidecar_path(output))
    return {"precision": "fp32", "target": None, "source_onnx": str(info.path),
            "onnx_file": Path(output).name}


@timed("gpunet_core.inference.validate", "gpunet_core.data.loaders")
def validate_onnx(data: str | Path, onnx: str | Path, *, results_file: str | Path | None = None,
                  prefix: str = "deployed_val_") -> dict[str, Any]:
    """Accuracy of an ONNX graph (the FP32 export, or the deployed graph at any precision)
    with ONNX Runtime on ``data``, through the validation step's eval transform: what is
    deployed is measured, not assumed. ``prefix``: of its figures in the task's MLflow run."""
    # torch (the loader) and onnxruntime: only the model steps need them
    from gpunet_core.data.cache import local_dataset
    from gpunet_core.inference.validate import validate_onnx as run_validate_onnx

    data = local_dataset(data, progress=False)
    results = run_validate_onnx(onnx, data, batch_size=64, workers=0, progress=False)
    if results_file:
        write_json(results, results_file)
    log_to_task_run("validate" if prefix == "val_" else "validate-deployed",
                    {k: results[k] for k in ("top1", "top5", "loss")}, prefix)
    return results


@timed("gpunet_core.inference.latency")
def benchmark(onnx: str | Path, *, backend: str = "auto", iterations: int = 50,
              results_file: str | Path | None = None) -> dict[str, Any]:
    # every KFP task imports steps: each step loads only its own libraries
    from gpunet_core.inference.latency import run_benchmark

    result = run_benchmark(onnx, backend=backend, iterations=iterations)
    if results_file:
        write_json(result, results_file)
    log_to_task_run("benchmark", {f"latency_ms_{k}": v for k, v in result["latency_ms"].items()},
                    "bench_")
    return result


@timed("gpunet_core.mlops.registry", "mlflow", "mlflow.onnx", "onnx")
def promote(checkpoint: str | Path, onnx: str | Path, validation: dict[str, Any],
            bench: dict[str, Any], *, model: str, img_size: int, registered_model: str,
            deployed_validation: dict[str, Any] | None = None, min_top1: float = 0.0,
            max_latency_ms: float = 0.0, margin: float = 0.0,
            max_latency_increase_pct: float = 0.0, max_quant_drop: float | None = None,
            data: str | Path | None = None, experiment: str = "gpunet", kfp_run_id: str = "",
            scheduled_time: str = "", teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the candidate (its LoggedModel, pytorch + onnx flavors) and give it an alias.

    ``onnx`` is the deployed graph (the export, or its FP16/INT8 graph) and ``bench`` its
    latency; ``deployed_validation`` its measured accuracy (:func:`validate_onnx`), which is
    then the candidate's top-1, while ``validation`` (the FP32 checkpoint's) is its
    ``fp32_top1``: a quantized candidate more than ``max_quant_drop`` points below it is
    refused (default :data:`~gpunet_core.mlops.registry.DEFAULT_MAX_QUANT_DROP`).
    The figures are logged into the task's run (KFP's plugin), else the run that trained
    ``checkpoint`` (else the pipeline run's, else a new one), linked to the model. ``data``:
    the candidate's validation set, on which the champion is evaluated when it was validated
    on another dataset. ``max_latency_ms`` / ``max_latency_increase_pct``: 0 means no limit.
    Torch is imported only to build a model training did not log, or to evaluate a champion.
    ``teacher``: the distillation teacher's ``teacher`` name and ``teacher_top1``, tagged.
    """
    # every KFP task imports steps: each step loads only its own libraries
    from gpunet_core.mlops import registry

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StepError("promotion needs MLflow: set MLFLOW_TRACKING_URI")
    model = model_name(model)  # a spec (path, s3://): registered by its name (MLflow's rules)
    mlc = client()
    trained_by = training_run_id(checkpoint)
    run_id = plugin_run_id() or trained_by or pipeline_run_id(kfp_run_id, experiment)
    if run_id is None:
        run_id = mlc.create_run(ensure_experiment(mlc, experiment)).info.run_id
    mlc.set_tag(run_id, RUN_TAG, kfp_run_id or "manual")
    if scheduled_time and not scheduled_time.startswith("{{$."):  # kfp.local leaves it as is
        # a recurring run: which scheduled retraining produced this candidate
        mlc.set_tag(run_id, "kfp_scheduled_time", scheduled_time)
    deployed = deployed_validation or validation
    dataset = deployed.get("dataset") or {}
    classes = deployed.get("classes")
    latency = float(bench["latency_ms"]["median"])
    precision = deployed.get("precision") or bench.get("precision") or "fp32"
    tags = {"top1": deployed["top1"], "top5": deployed["top5"], "latency_ms": latency,
            "latency_backend": bench.get("backend"), "model": model, "img_size": img_size,
            registry.PRECISION_TAG: precision, registry.FP32_TOP1_TAG: validation["top1"],
            "quant_drop": round(validation["top1"] - deployed["top1"], 4), RUN_TAG: kfp_run_id}
    if deployed.get("target"):
        tags[registry.TARGET_TAG] = deployed["target"]
    tags.update({k: v for k, v in (teacher or {}).items() if k in ("teacher", "teacher_top1")})
    for key, value in ((registry.DATASET_TAG, dataset.get("checksum")),
                       (registry.LATENCY_FP_TAG, bench.get("latency_fingerprint")),
                       (registry.CLASSES_TAG, classes and hashlib.sha256(
                           json.dumps(classes).encode()).hexdigest())):
        if value:
            tags[key] = value
    version, model_id = registry.register(
        trained_by or run_id, checkpoint, onnx, model_name=model, name=registered_model,
        img_size=img_size, tags=tags, model_id=logged_model_id(checkpoint))
    log_metrics(run_id, {k: validation[k] for k in ("top1", "top5", "loss") if k in validation},
                prefix="val_", model_id=model_id, dataset=dataset)
    if deployed_validation is not None:
        log_metrics(run_id, {k: deployed[k] for k in ("top1", "top5", "loss") if k in deployed},
                    prefix=f"deployed_{precision}_val_", model_id=model_id, dataset=dataset)
    log_metrics(run_id, {f"latency_ms_{k}": v for k, v in bench["latency_ms"].items()},
                prefix="bench_", model_id=model_id)
    decision = registry.promote(registered_model, version, min_top1=min_top1,
                                max_latency_ms=max_latency_ms or None, margin=margin,
                                max_latency_increase_pct=max_latency_increase_pct or None,
                                max_quant_drop=registry.DEFAULT_MAX_QUANT_DROP
                                if max_quant_drop is None else max_quant_drop, data=data)
    champion = decision.previous_champion or {}
    if champion.get("evaluated"):  # the champion's figure on this candidate's validation set
        log_metrics(run_id, {"champion_top1": champion["top1"]}, prefix="promotion_",
                    dataset=dataset)
    mlc.set_tag(run_id, "promotion", f"{decision.alias} (v{version})")
    mlc.log_text(run_id, decision.markdown(), f"promotion/v{version}.md")
    return json.loads(decision.to_json()) | {"markdown": decision.markdown(), "run_id": run_id,
                                             "model_id": model_id}


@timed("gpunet_core.inference.report", "mlflow")
def write_html_report(results: list[str | Path], out: str | Path, *, registered_model: str = "",
                      promotion: str = "") -> Path:
    """The run's report page from its validation and benchmark results: with
    ``registered_model`` and ``promotion`` (promote's output, ``alias:version``) and MLflow
    (``MLFLOW_TRACKING_URI``), the candidate against the champion history of that registered
    model on the same dataset and hardware fingerprint; else the given results only. NVIDIA's
    published points are a panel of their own (:mod:`gpunet_core.inference.report`)."""
    # every KFP task imports steps: each step loads only its own libraries
    from gpunet_core.inference import report

    version = promotion.rpartition(":")[2].strip()
    history = None
    if registered_model and version and os.environ.get("MLFLOW_TRACKING_URI"):
        history = report.RegistryHistory(registered_model, version)
        try:
            mlc = client()
            token = None
            while True:
                page = mlc.search_model_versions(f"name = '{registered_model}'",
                                                 page_token=token)
                history.versions += [{"version": str(v.version), "tags": dict(v.tags or {})}
                                     for v in page]
                token = page.token
                if not token:
                    break
            aliases = mlc.get_registered_model(registered_model).aliases or {}
            history.aliases = {alias: str(v) for alias, v in dict(aliases).items()}
        except Exception as exc:  # the page still shows this run's own figures, and says why
            history.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _logger.warning("report: the registry could not be read: %s", history.error)
    elif registered_model and version:
        _logger.info("report: MLFLOW_TRACKING_URI is unset, so the page shows this run's "
                     "results without the champion history of %s", registered_model)
    return report.write_html_report(results, out, history=history)


# ============================================================================================
# The gpunet_search DAG (pipelines/gpunet_search.py): search_setup -> search_worker, one task
# per worker on the one shared study (dsl.ParallelFor) -> search_front -> the training chain on
# the chosen spec. search_setup checks the request and builds the SearchConfig once; the other
# steps rebuild it from the setup folder (SEARCH_SETUP_FILE). The storage URL is never written
# there (it may hold a password): every task resolves it the same way (search_storage_url).
# ============================================================================================

SEARCH_SETUP_FILE = "setup.json"
SEARCH_LOCAL_DB = "study.db"  # the default study where the tasks share a filesystem (kfp.local)
SEARCH_PICKS = ("most_accurate", "fastest")  # search_front's rule for the spec to train


def search_storage_url(storage: str, local_db: str | Path | None = None) -> str:
    """The study's storage URL in a search task: ``storage`` (the pipeline's
    ``study_storage``) when given, else ``$GPUNET_SEARCH_STORAGE`` (on a cluster: the Secret
    ``gpunet-optuna``, manifests/README.md), else the sqlite file ``local_db`` where the tasks
    share a filesystem (kfp.local: the setup task's folder), else an error."""
    # the study module pulls in torch and optuna: only the search steps need them
    from gpunet_core.search.study import STORAGE_ENV

    url = storage or os.environ.get(STORAGE_ENV, "")
    if url:
        return url
    if local_db:
        return f"sqlite:///{Path(local_db).resolve()}"
    raise StepError(f"the search tasks share no filesystem here, so the study needs a database: "
                    f"set {STORAGE_ENV} (the Secret gpunet-optuna, manifests/README.md) or pass "
                    "study_storage=postgresql+psycopg2://USER:PASS@HOST/DB")


def read_search_setup(setup_dir: str | Path) -> dict[str, Any]:
    """What :func:`search_setup` wrote into its folder (``setup.json``)."""
    path = Path(setup_dir) / SEARCH_SETUP_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StepError(f"{path} is missing or unreadable ({exc}): pass the search-setup "
                        "task's setup artifact") from None


def search_config(setup: dict[str, Any], storage: str = "", *, data: str | Path | None = None):
    """The :class:`~gpunet_core.search.study.SearchConfig` that :func:`search_setup` checked,
    on the storage this task resolves (:func:`search_storage_url`); ``data``: this task's
    path of the dataset (default: the setup task's). A task that resolves another storage
    than the setup task did fails here, before it adds trials to a study of its own."""
    # torch and optuna come with the search modules: only the search steps need them
    from gpunet_core.search.proxy import ProxyConfig
    from gpunet_core.search.study import SearchConfig, redact

    fields = dict(setup["config"])
    proxy = ProxyConfig(**fields.pop("proxy"))
    for name in ("resolutions", "families"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    if data is not None:
        fields["data"] = str(data)
    url = search_storage_url(storage, setup.get("local_db"))
    if redact(url) != setup["storage"]:
        raise StepError(f"this task's study storage is {redact(url)}, but search-setup created "
                        f"the study in {setup['storage']}: give every search task the same "
                        "study_storage (or the same gpunet-optuna Secret)")
    return SearchConfig(**fields, out=setup["out"], storage=url, proxy=proxy)


@timed("gpunet_core.search.driver", "optuna")
def search_setup(data: str | Path, out: str | Path, *, budget_ms: float, storage: str = "",
                 shared_storage: bool = False, study_name: str = "gpunet-search",
                 backend: str = "onnxruntime", precision: str = "fp32", img_size: int = 32,
                 trials: int = 20, workers: int = 1, proxy_epochs: int = 3,
                 proxy_images: int = 640, proxy_batch_size: int = 64, references: bool = True,
                 space: str = "", sampler: str = "tpe", seed: int = 0,
                 iterations: int = 50) -> dict[str, Any]:
    """Create (or resume) the study and check the request before any worker starts, as
    ``gpunet search`` does: the settings (budget, backend, TensorRT where asked for,
    precision, counts, proxy), the storage (opened here), the budget's floor (each family's
    fastest spec measured: a budget below all of them is refused, and a study this step created
    is removed again), then NVIDIA's seven GPUNets measured and proxy-trained once
    (``references``; kept in the study, so a resumed search skips them).

    Writes ``out/setup.json`` (:func:`read_search_setup`): the config the worker and front
    steps rebuild, the redacted storage URL, the hardware the latencies are measured on, the
    fastest spec per family and the references. ``storage``: the study's URL, else
    ``$GPUNET_SEARCH_STORAGE``, else ``out/study.db``, unless ``shared_storage`` (the tasks
    share no filesystem: a cluster), which refuses that sqlite default. Returns what it wrote
    plus ``workers``, the worker indices ``0 .. workers-1``.
    """
    # torch and optuna come with the search modules: only the search steps need them
    from gpunet_core.search import driver
    from gpunet_core.search import study as studies
    from gpunet_core.search.measure import hardware_key
    from gpunet_core.search.proxy import ProxyConfig, ProxyData
    from gpunet_core.search.space import load_space

    cfg = studies.SearchConfig(
        data=str(data), out=str(out), budget_ms=budget_ms, backend=backend, precision=precision,
        trials=trials, workers=workers, study_name=study_name, resolutions=(img_size,),
        space=space or None, sampler=sampler, seed=seed, iterations=iterations,
        references=references,
        proxy=ProxyConfig(epochs=proxy_epochs, train_images=proxy_images,
                          batch_size=proxy_batch_size, seed=seed))
    if not study_name:
        raise StepError("study_name must not be empty")
    search_space = load_space(cfg.space)
    studies.check_config(cfg, search_space)
    size = studies.proxy_resolution(cfg, search_space)
    local_db = None if shared_storage else Path(out) / SEARCH_LOCAL_DB
    cfg = dataclasses.replace(cfg, storage=search_storage_url(storage, local_db))
    if local_db is not None and cfg.storage != f"sqlite:///{local_db.resolve()}":
        local_db = None  # the study is elsewhere: the other tasks must not fall back to it
    Path(out).mkdir(parents=True, exist_ok=True)
    study, fastest, created, classes = driver.open_checked_study(cfg, search_space)
    _logger.info("%s study %s in %s: %d of %d trials there", "created" if created else "resuming",
                 cfg.study_name, studies.redact(cfg.storage_url), studies.counted_trials(study),
                 cfg.trials)
    refs = driver.measure_references(cfg, study, ProxyData.load(cfg.data, size, cfg.proxy)) \
        if cfg.references else []
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("storage", "out")}
    setup = {"config": config, "out": str(out), "storage": studies.redact(cfg.storage_url),
             "local_db": str(local_db) if local_db else None, "img_size": size,
             "num_classes": classes, "hardware": hardware_key(cfg.backend, cfg.batch),
             "fastest_in_space_ms": fastest, "references": refs, "created": created}
    write_json(setup, Path(out) / SEARCH_SETUP_FILE)
    return {**setup, "workers": list(range(cfg.workers))}


@timed("gpunet_core.search.study", "optuna")
def search_worker(data: str | Path, setup_dir: str | Path, *, worker: int,
                  storage: str = "") -> dict[str, Any]:
    """One worker of the study :func:`search_setup` made: trials until the study holds its
    ``trials`` (:func:`~gpunet_core.search.study.run_worker`; any number run at once, each
    trial's architecture sampled from all finished so far). Returns ``worker`` and
    ``trials_run``, how many this worker ran."""
    # torch and optuna come with the search modules: only the search steps need them
    from gpunet_core.search.study import run_worker

    cfg = search_config(read_search_setup(setup_dir), storage, data=data)

    def progress(finished: int) -> None:
        _logger.info("search worker %d: %d of %d trials finished in the study", worker,
                     finished, cfg.trials)

    ran = run_worker(cfg, worker, progress=progress)
    return {"worker": worker, "trials_run": ran}


def pick_from_front(front: list[dict[str, Any]], pick: str, budget_ms: float) -> dict[str, Any]:
    """The front member to train: ``most_accurate`` (highest proxy top-1, then the faster)
    or ``fastest`` (lowest latency, then the more accurate), within ``budget_ms``."""
    if pick not in SEARCH_PICKS:
        raise StepError(f"pick must be one of {', '.join(SEARCH_PICKS)}, got {pick!r}")
    within = [r for r in front if r["latency_ms"] <= budget_ms]
    if not within:
        raise StepError(f"no trial within the {budget_ms:g} ms budget finished its proxy training, "
                        "so there is no spec to train: run more trials, raise budget_ms or "
                        "lower img_size (the study keeps its trials: rerun with the same "
                        "study_storage and study_name to add to them)")
    if pick == "fastest":
        return min(within, key=lambda r: (r["latency_ms"], -r["proxy_top1"], r["trial"]))
    return max(within, key=lambda r: (r["proxy_top1"], -r["latency_ms"], -r["trial"]))


@timed("gpunet_core.search.results", "gpunet_core.search.study", "optuna")
def search_front(setup_dir: str | Path, out: str | Path, spec_file: str | Path, *,
                 storage: str = "", pick: str = "most_accurate") -> dict[str, Any]:
    """The study's result after its workers: ``out/pareto.json``, ``out/specs/*.json`` and
    ``out/pareto.png`` (:func:`~gpunet_core.search.results.write_results`, the same files as
    ``gpunet search --out``), and the front member ``pick`` chooses (:func:`pick_from_front`)
    copied to ``spec_file``. Returns pareto.json's content plus ``chosen`` (its front entry),
    ``pick`` and ``name``, the label the chosen spec trains under."""
    # torch, optuna and matplotlib come with the search modules: only the search steps need them
    from gpunet_core.search import study as studies
    from gpunet_core.search.results import write_results
    from gpunet_core.search.space import load_space
    from gpunet_core.utils.files import copy_file

    if pick not in SEARCH_PICKS:  # before the study is read
        raise StepError(f"pick must be one of {', '.join(SEARCH_PICKS)}, got {pick!r}")
    setup = read_search_setup(setup_dir)
    cfg = search_config(setup, storage)
    study = studies.open_study(cfg, load_space(cfg.space))
    summary = {"study": cfg.study_name, "storage": studies.redact(cfg.storage_url),
               "data": str(cfg.data), "backend": cfg.backend, "precision": cfg.precision,
               "batch": cfg.batch, "img_size": setup["img_size"], "budget_ms": cfg.budget_ms,
               "hardware": setup["hardware"], "trials_counted": studies.counted_trials(study),
               "fastest_in_space_ms": setup["fastest_in_space_ms"],
               "proxy": dataclasses.asdict(cfg.proxy), "sampler": cfg.sampler}
    result = write_results(out, study, summary, setup["references"])
    chosen = pick_from_front(result["front"], pick, cfg.budget_ms)
    copy_file(Path(out) / chosen["spec_path"], spec_file)
    _logger.info("search front: %d of %d trials on it; %s: trial %d (%.3f ms, proxy top-1 "
                 "%.2f %%)", len(result["front"]), result["trials_counted"], pick,
                 chosen["trial"], chosen["latency_ms"], chosen["proxy_top1"])
    return {**result, "chosen": chosen, "pick": pick,
            "name": f"{cfg.study_name}-trial-{chosen['trial']:05d}"}
