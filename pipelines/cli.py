"""``python -m pipelines`` / ``gpunet pipeline``: compile, run locally, submit, schedule, list.

* ``compile``   the DAG to KFP IR YAML (``--gpus-per-node`` etc. add the cluster settings);
* ``run-local`` the whole DAG on this machine with ``kfp.local.SubprocessRunner`` (MLflow in a
  local sqlite file unless ``MLFLOW_TRACKING_URI`` is set), then prints a summary;
  ``compile`` and ``run-local`` take ``--pipeline search`` for ``gpunet_search`` (the
  architecture search, then the same training chain on the spec it chose; docs/search.md);
* ``submit``    a run to a KFP server (``kfp.Client.create_run_from_pipeline_package``);
* ``schedule``  a recurring run (cron, 5 or 6 fields) for scheduled retraining, pinned to the
  pipeline version it uploads (named after the image tag and the package's hash);
* ``list-runs`` the runs of an experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpunet_core.mlops import images
from gpunet_core.mlops.mlflow_client import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ui_url,
    unreachable,
    unreachable_error,
)
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import (
    atomic_path,
    check_output_dir,
    check_output_file,
    remove_new_dirs_on_error,
    sha256_file,
)

_logger = logging.getLogger("pipelines")

PIPELINE_NAME = "gpunet-training"  # the KFP pipeline `schedule` uploads its versions to
# ... and per --pipeline: the KFP pipeline name and description `schedule` uploads under
PIPELINE_NAMES = {"training": (PIPELINE_NAME, "GPUNet training and promotion (gpunet-pipeline)"),
                  "search": ("gpunet-search", "GPUNet architecture search, then training and "
                                              "promotion of the chosen spec (gpunet-pipeline)")}


class PipelineError(GpunetError):
    """Bad pipeline parameters, an unreachable KFP host, or a failed local run."""


# --------------------------------------------------------------------------- parameters


# the DAGs by the name `--pipeline` takes: gpunet_training, and gpunet_search (its search, then
# the same training chain on the spec it chose)
PIPELINES = ("training", "search")


def pipeline_builder(pipeline: str = "training"):
    """The ``build_pipeline(platform)`` of the DAG ``pipeline`` (:data:`PIPELINES`)."""
    if pipeline == "search":
        from pipelines.gpunet_search import build_pipeline
    elif pipeline == "training":
        from pipelines.gpunet_training import build_pipeline
    else:
        raise PipelineError(f"unknown --pipeline {pipeline!r}: use {' or '.join(PIPELINES)}")
    return build_pipeline


def pipeline_parameters(pipeline: str = "training") -> dict[str, Any]:
    """The DAG's parameters and their defaults."""
    import inspect

    fn = pipeline_builder(pipeline)().pipeline_func
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}


def parse_params(pairs: Sequence[str], pipeline: str = "training") -> dict[str, Any]:
    """``k=v`` pairs typed like the DAG's defaults; unknown names are an error."""
    known = pipeline_parameters(pipeline)
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise PipelineError(f"--param {pair!r}: expected NAME=VALUE")
        name, raw = pair.split("=", 1)
        if name not in known:
            raise PipelineError(f"unknown pipeline parameter {name!r}; valid: "
                                f"{', '.join(sorted(known))}")
        default = known[name]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise PipelineError(f"--param {name}={raw!r}: expected a {type(default).__name__}") from None
        out[name] = value
    check_params(out, known)
    if pipeline == "search":
        check_search_params(out)
    return out


# minimum values of the DAG's numeric parameters (each is passed on to a step's flag)
_AT_LEAST = {"epochs": 1, "teacher_epochs": 1, "batch_size": 1, "nodes": 1, "nproc_per_node": 1,
             "bench_iterations": 1, "lr": 0.0, "kd_weight": 0.0, "min_top1": 0.0,
             "max_latency_ms": 0.0, "calib_samples": 1, "max_quant_drop": 0.0,
             "warmup_epochs": -1}  # -1: the recipe's warmup


def check_params(params: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Range and name checks of pipeline parameters, so a bad value fails here and not in a
    step an hour into the run."""
    import math

    from gpunet_core.models.spec import MAX_IMG_SIZE, MODEL_INFO, is_spec_location, load_spec
    from gpunet_core.utils import storage
    from gpunet_core.utils.errors import SpecError, StorageError

    def bad(name: str, why: str) -> PipelineError:
        return PipelineError(f"--param {name}={params[name]!r}: {why}")

    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(name, "expected a finite number")
        if name in _AT_LEAST and value < _AT_LEAST[name]:
            raise bad(name, f"must be >= {_AT_LEAST[name]}")
    for name, low in (("img_size", 32), ("teacher_img_size", 8)):
        if name in params and not low <= params[name] <= MAX_IMG_SIZE:
            raise bad(name, f"must be in [{low}, {MAX_IMG_SIZE}] pixels")
    if "dataset_img_size" in params and not 8 <= params["dataset_img_size"] <= 1024:
        raise bad("dataset_img_size", "must be in [8, 1024] pixels")
    if params.get("dataset_per_class", 0) != 0 and params["dataset_per_class"] < 2:
        raise bad("dataset_per_class", "must be 0 (all images) or >= 2")
    if "kd_temperature" in params and params["kd_temperature"] <= 0:
        raise bad("kd_temperature", "must be > 0")
    if params.get("min_top1", 0.0) > 100:
        raise bad("min_top1", "is a top-1 accuracy in percent: must be in [0, 100]")
    model = params.get("model_name")
    if model is not None and storage.is_s3_uri(model):  # the object: preflight, the train step
        try:
            storage.parse_s3_uri(model)
        except StorageError as exc:
            raise bad("model_name", str(exc)) from None
    elif model is not None and is_spec_location(model):
        try:
            load_spec(model)
        except SpecError as exc:
            raise bad("model_name", str(exc)) from None
    elif model is not None and model not in MODEL_INFO:
        raise bad("model_name", f"unknown model; valid names are {', '.join(MODEL_INFO)} "
                                "(or a GPUNet JSON spec: an s3:// URI or a .json path)")
    if params.get("teacher_name"):
        import timm  # gpunet_* join its registry on import (gpunet_core.models)

        if not timm.is_model(params["teacher_name"]):
            raise bad("teacher_name", "not a timm model name (see timm.list_models()), e.g. "
                                      "gpunet_1 or tf_efficientnet_b0")
    if params.get("preset"):
        from gpunet_core.training.presets import PRESETS

        if params["preset"] not in PRESETS:
            raise bad("preset", f"valid presets are {', '.join(sorted(PRESETS))} (or empty)")
    if "augment" in params:
        from gpunet_core.steps import AUGMENT

        if params["augment"] not in AUGMENT:
            raise bad("augment", f"valid values are {', '.join(sorted(AUGMENT))}")
    if "precision" in params:
        from gpunet_core.steps import DEPLOY_PRECISIONS

        if params["precision"] not in DEPLOY_PRECISIONS:
            raise bad("precision", f"valid values are {', '.join(DEPLOY_PRECISIONS)} (fp32: "
                                   "the export itself)")
    if "quant_target" in params and params["quant_target"] not in ("tensorrt", "cpu"):
        raise bad("quant_target", "valid values are tensorrt (Q/DQ for TensorRT 11) and cpu "
                                  "(ONNX Runtime's fastest x86 INT8)")
    if "bench_backend" in params:
        from gpunet_core.inference.latency import BACKENDS

        if params["bench_backend"] not in BACKENDS:
            raise bad("bench_backend", f"valid backends are {', '.join(BACKENDS)}")
    if params.get("optimizer"):
        import torch
        from timm.optim import create_optimizer_v2

        try:
            create_optimizer_v2(torch.nn.Linear(1, 1), opt=params["optimizer"])
        except (ValueError, KeyError, TypeError, AssertionError):
            raise bad("optimizer", "not a timm optimizer name; e.g. adamw, sgd or rmsproptf") \
                from None
    merged = {**(defaults or {}), **params}
    for warning in warmup_warnings(params, merged):
        print(f"pipelines: warning: {warning}", file=sys.stderr)
    if merged.get("enable_distill") and "img_size" in merged and "teacher_img_size" in merged \
            and merged["teacher_img_size"] < merged["img_size"]:
        raise PipelineError(f"--param teacher_img_size={merged['teacher_img_size']} is smaller "
                            f"than img_size={merged['img_size']}: the student sees a downsample "
                            "of the teacher's batch; raise teacher_img_size or pass "
                            "enable_distill=false")


def warmup_warnings(params: dict[str, Any], merged: dict[str, Any]) -> list[str]:
    """A training step no longer than its warm-up is legal but never trains at ``lr`` (the
    learning rate only climbs towards it): one warning per such step whose ``epochs`` /
    ``teacher_epochs`` or ``warmup_epochs`` the user set (``merged``: with the defaults).
    ``warmup_epochs=-1`` never warns: the training step then drops the recipe's (or preset's)
    warm-up from a run no longer than it (:func:`gpunet_core.steps.train_config`)."""
    warmup = merged.get("warmup_epochs", -1)
    if warmup <= 0:
        return []
    out = []
    for name, who in (("epochs", "the student"), ("teacher_epochs", "the teacher")):
        if name not in merged or not {name, "warmup_epochs"} & set(params) or \
                (who == "the teacher" and not merged.get("enable_distill")):
            continue
        if merged[name] <= warmup:
            out.append(f"{name}={merged[name]} is not longer than warmup_epochs={warmup}: "
                       f"{who} never leaves warm-up, so its learning rate never reaches "
                       f"lr={merged.get('lr')}; pass fewer warmup_epochs (-1: none for a run "
                       f"this short) or more {name}")
    return out


# --------------------------------------------------------------------------- gpunet_search

# minimum values of gpunet_search's own numeric parameters (each is passed on to the search)
_SEARCH_AT_LEAST = {"trials": 1, "workers": 1, "proxy_epochs": 1, "proxy_images": 0,
                    "proxy_batch_size": 1, "latency_iterations": 5, "seed": 0}


def check_search_params(params: dict[str, Any]) -> None:
    """gpunet_search's own parameters (the training chain's are :func:`check_params`'), as its
    setup task checks them, so that a bad value fails here in one line and not after the
    dataset is prepared."""
    # torch and optuna come with the search modules: only a search run loads them
    from gpunet_core.search.study import SAMPLERS, SEARCH_BACKENDS
    from gpunet_core.steps import SEARCH_PICKS

    def bad(name: str, why: str) -> PipelineError:
        return PipelineError(f"--param {name}={params[name]!r}: {why}")

    if "budget_ms" in params and not params["budget_ms"] > 0:
        raise bad("budget_ms", "must be > 0: the latency budget in milliseconds per image on "
                               "the search's backend")
    for name, low in _SEARCH_AT_LEAST.items():
        if name in params and params[name] < low:
            raise bad(name, f"must be >= {low}")
    for name, valid in (("backend", SEARCH_BACKENDS), ("sampler", SAMPLERS),
                        ("pick", SEARCH_PICKS)):
        if name in params and params[name] not in valid:
            raise bad(name, f"valid values are {', '.join(valid)}")
    if "study_name" in params and not params["study_name"].strip():
        raise bad("study_name", "must not be empty")
    if params.get("study_storage") and "://" not in params["study_storage"]:
        raise bad("study_storage", "expected an Optuna storage URL, sqlite:///PATH or "
                                   "postgresql+psycopg2://USER:PASS@HOST/DB (empty: the default)")
    if params.get("search_space"):
        from gpunet_core.search.space import load_space

        try:
            load_space(params["search_space"])
        except GpunetError as exc:
            raise bad("search_space", str(exc)) from None


def preflight_search(params: dict[str, Any]) -> None:
    """What the search-setup task would refuse on this machine (``params``: with the
    defaults), before any step starts: TensorRT or trtexec where the backend needs them."""
    # torch and optuna come with the search modules: only a search run loads them
    from gpunet_core.search.proxy import ProxyConfig
    from gpunet_core.search.space import load_space
    from gpunet_core.search.study import SearchConfig, check_config

    cfg = SearchConfig(data=params["dataset_source"], out="", budget_ms=params["budget_ms"],
                       backend=params["backend"], precision=params["precision"],
                       trials=params["trials"], workers=params["workers"],
                       resolutions=(params["img_size"],), space=params["search_space"] or None,
                       sampler=params["sampler"], iterations=params["latency_iterations"],
                       proxy=ProxyConfig(epochs=params["proxy_epochs"],
                                         train_images=params["proxy_images"],
                                         batch_size=params["proxy_batch_size"]))
    try:
        check_config(cfg, load_space(cfg.space))
    except GpunetError as exc:
        raise PipelineError(f"the search would refuse this run: {exc}") from None


# --------------------------------------------------------------------------- cron

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
           ("month", 1, 12), ("day of week", 0, 6))
_NAMES = {4: ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
          5: ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]}


def _check_cron_field(token: str, index: int) -> None:
    name, low, high = _FIELDS[index]

    def number(text: str) -> int:
        upper = text.upper()
        if index in _NAMES and upper in _NAMES[index]:
            return _NAMES[index].index(upper) + (1 if index == 4 else 0)
        if not text.isdigit():
            raise PipelineError(f"invalid cron {name} field {token!r}: {text!r} is not a number")
        value = int(text)
        if not low <= value <= high:
            raise PipelineError(f"invalid cron {name} field {token!r}: {value} is outside "
                                f"{low}-{high}")
        return value

    for part in token.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise PipelineError(f"invalid cron {name} field {token!r}: bad step {step!r}")
        if base in ("*", "?"):
            continue
        lo, _, hi = base.partition("-")
        if not lo:
            raise PipelineError(f"invalid cron {name} field {token!r}")
        if hi and number(lo) > number(hi):
            raise PipelineError(f"invalid cron {name} field {token!r}: range runs backwards")
        number(lo)


def to_kfp_cron(expression: str) -> str:
    """KFP wants 6 fields (seconds first); accept the usual 5-field form too and validate."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise PipelineError(f"invalid cron expression {expression!r}: expected 5 fields "
                            "(minute hour day-of-month month day-of-week) or 6 (seconds first)")
    for i, token in enumerate(fields):
        _check_cron_field(token, i)
    return " ".join(fields)


# --------------------------------------------------------------------------- commands


def compile_pipeline(output: str | Path, *, gpus_per_node: int = 0, cluster: bool = False,
                     dataset_pvc: str = "", parents: bool = True, pipeline: str = "training",
                     parallelism: int = 0) -> Path:
    """Compile the DAG to ``output``; ``parents``: a missing folder is created (the command
    line's ``compile`` wants it to exist, as every file output). ``pipeline``: which DAG
    (:data:`PIPELINES`); ``parallelism``: gpunet_search's most workers at once (0: all)."""
    check_gpus_per_node(gpus_per_node)
    build = pipeline_builder(pipeline)
    check_parallelism(pipeline, parallelism)
    output = Path(output)
    check_output_file(output, "--output", error=PipelineError, parents=parents)
    from kfp import compiler

    from pipelines.gpunet_training import Platform

    if pipeline == "search":
        build_pipeline = functools.partial(build, parallelism=parallelism)
    else:
        build_pipeline = build
    platform = Platform.for_cluster(gpus_per_node) if cluster or gpus_per_node else Platform()
    if dataset_pvc:
        platform.dataset_pvc = dataset_pvc
    try:
        with atomic_path(output) as tmp:
            as_yaml = tmp.with_name(f"{tmp.name}.yaml")  # the compiler insists on .yaml
            try:
                compiler.Compiler().compile(build_pipeline(platform), str(as_yaml))
                os.replace(as_yaml, tmp)
            finally:
                as_yaml.unlink(missing_ok=True)
    except OSError as exc:  # e.g. the disk filled up, or the folder went away meanwhile
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(output) else ""
        raise PipelineError(f"cannot write --output {output}: {exc.strerror or exc}{where}; "
                            "choose another --output") from None
    return output


def check_gpus_per_node(gpus_per_node: int) -> None:
    if gpus_per_node < 0:
        raise PipelineError(f"--gpus-per-node must be >= 0 (0: no GPU settings), got "
                            f"{gpus_per_node}")


HEALTHZ = "/apis/v2beta1/healthz"  # what kfp.Client asks first


def _unreachable(host: str, reason: str) -> PipelineError:
    return PipelineError(f"cannot reach the KFP API at {host} ({reason}): check --host (the "
                         "KFP API URL, e.g. http://localhost:8080) and that the server runs")


def _kfp_reason(exc: BaseException) -> str:
    """One line of what the KFP server answered (or why it did not)."""
    status = getattr(exc, "status", None)
    if status:
        detail = ""
        try:
            body = json.loads(getattr(exc, "body", None) or "{}")
            detail = str(body.get("error") or body.get("message") or "") \
                if isinstance(body, dict) else ""
        except ValueError:
            pass
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip() + \
            (f": {detail.splitlines()[0]}" if detail else "")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_reachable(host: str, token: str | None) -> None:
    """One plain request to KFP's health endpoint, so that a wrong --host fails at once and
    says which way (kfp.Client retries a 404 for 25 s, then reports a timeout)."""
    url = host if host.startswith("http") else f"https://{host}"  # as kfp.Client does
    request = urllib.request.Request(url.rstrip("/") + HEALTHZ, headers={
        "Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # as kfp: no proxy
    try:
        opener.open(request, timeout=15).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise PipelineError(f"no KFP API at {host}: it answered HTTP 404 (not found) for "
                                f"{HEALTHZ}; check --host (the KFP API URL, e.g. "
                                "http://localhost:8080)") from None
        # anything else (a login redirect, 401/403): kfp.Client, with its auth, has a say
    except (urllib.error.URLError, OSError) as exc:
        reason = unreachable(exc)
        if reason:
            raise _unreachable(host, reason) from None
        # e.g. a certificate this probe does not trust: kfp.Client, with its settings, decides


def kfp_client(host: str, token: str | None = None):
    # kfp: 0.5 s, only for the commands that talk to a server
    import kfp

    token = token or os.environ.get("KFP_TOKEN")
    _check_reachable(host, token)
    try:
        return kfp.Client(host=host, existing_token=token)
    except Exception as exc:
        reason = unreachable(exc)
        if reason:
            raise _unreachable(host, reason) from None
        raise PipelineError(f"the KFP API at {host} refused the connection: "
                            f"{_kfp_reason(exc)}; check --host and --token") from None


def _call(what: str, host: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a KFP client call; a failure says whether the server was not
    reached, or what it answered (not found, refused...)."""
    try:
        return fn(*args, **kwargs)
    except GpunetError:
        raise
    except Exception as exc:
        reason = unreachable(exc)
        if reason:
            raise _unreachable(host, reason) from None
        if isinstance(exc, ValueError) and "no experiment is found" in str(exc).lower():
            name = kwargs.get("experiment_name", "")
            raise PipelineError(f"{what} failed at {host}: experiment {name!r} not found; "
                                "check --experiment (submit and schedule create it)") from None
        answer = _kfp_reason(exc)
        if getattr(exc, "status", None) == 404:
            answer += " (not found: check --host and the names given)"
        raise PipelineError(f"{what} failed at {host}: {answer}") from None


def check_cluster_params(params: dict[str, Any]) -> None:
    """What a run on a cluster cannot take: a spec file on this machine (its pods read S3), or
    an sqlite study (the search's pods share no disk)."""
    from gpunet_core.models.spec import is_spec_location
    from gpunet_core.utils import storage

    model = params.get("model_name", "")
    if not storage.is_s3_uri(model) and is_spec_location(model):
        raise PipelineError(f"--param model_name={model!r}: the cluster's pods cannot read a "
                            "spec file on this machine; upload it to S3 and pass its s3:// URI")
    study = params.get("study_storage", "")
    if study.startswith("sqlite:"):
        raise PipelineError(f"--param study_storage={study!r}: the search's pods share no disk, "
                            "so they cannot share an sqlite study; leave it empty (the "
                            "gpunet-optuna Secret's PostgreSQL, manifests/README.md) or pass "
                            "a postgresql:// URL the pods can reach")


def check_parallelism(pipeline: str, parallelism: int) -> None:
    if parallelism < 0 or (parallelism and pipeline != "search"):
        raise PipelineError(f"--parallelism {parallelism}: the search pipeline's most workers "
                            "at once, >= 0 (0: all of them), with --pipeline search only")


def submit(host: str, params: dict[str, Any], *, experiment: str = "gpunet",
           run_name: str | None = None, token: str | None = None,
           cluster: bool = True, gpus_per_node: int = 1, pipeline: str = "training",
           parallelism: int = 0) -> dict[str, str]:
    """One run of the DAG ``pipeline`` (:data:`PIPELINES`), compiled now for the cluster."""
    check_gpus_per_node(gpus_per_node)
    check_parallelism(pipeline, parallelism)
    check_cluster_params(params)
    client = kfp_client(host, token)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / f"gpunet_{pipeline}.yaml", cluster=cluster,
                                   gpus_per_node=gpus_per_node, pipeline=pipeline,
                                   parallelism=parallelism)
        result = _call("submitting the run", host, client.create_run_from_pipeline_package,
                       str(package), arguments=params, experiment_name=experiment,
                       run_name=run_name or f"gpunet-{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = result.run_id
    return {"run_id": run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run_id}"}


# Recurring-run parameter macros of KFP v1 ([[ScheduledTime]], [[CurrentTime]], [[Index]],
# [[RunUUID]]) and pipeline-job placeholders ({{$.pipeline_job_...}}) given as parameter values.
_MACRO = re.compile(r"\[\[[^\]]*\]\]|\{\{\$\.[^}]*\}\}")


def check_no_macros(params: dict[str, Any]) -> None:
    """KFP 2.17 leaves macros in a pinned recurring run's parameters unexpanded: the parameters
    are compiled into the root DAG driver's runtime config, where the ScheduledWorkflow
    controller's macro substitution (it rewrites Argo workflow arguments) never reaches them,
    so the run would see the literal text. Refuse them here instead."""
    for name, value in params.items():
        if isinstance(value, str) and _MACRO.search(value):
            raise PipelineError(
                f"--param {name}={value!r}: KFP 2.17 does not expand {_MACRO.search(value)[0]} in "
                "the parameters of a recurring run of a pinned pipeline version (the run would "
                "get the literal text); a step that needs the scheduled time takes "
                "kfp.dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER as a task input in the DAG")


def pipeline_version_name(package: Path) -> str:
    """``<image tag>-<sha256 of the package, 12 hex>``: the same compiled DAG gets the same
    name (and is uploaded once), any change to it a new one."""
    return f"{images.default_tag()}-{sha256_file(package)[:12]}"


def upload_pipeline_version(client, host: str, package: Path,
                            pipeline_name: str = PIPELINE_NAME,
                            description: str = PIPELINE_NAMES["training"][1]) -> dict[str, str]:
    """Upload ``package`` as a version of the KFP pipeline ``pipeline_name`` unless a version
    of the same name, i.e. the same content, is there already. A new pipeline is created by
    uploading ``package`` (KFP names that first version like the pipeline), then the named
    version is added as for an existing one.

    Returns ``{"pipeline_id", "version_id", "version_name"}``. kfp's upload calls print a
    link to stdout, which carries our JSON result, so they print to stderr instead.
    """
    version_name = pipeline_version_name(package)
    with contextlib.redirect_stdout(sys.stderr):
        pipeline_id = _call("looking up the pipeline", host, client.get_pipeline_id,
                            pipeline_name)
        if pipeline_id is None:
            pipeline_id = _call("uploading the pipeline", host, client.upload_pipeline,
                                str(package), pipeline_name=pipeline_name,
                                description=description).pipeline_id
        else:
            by_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name",
                                                  "stringValue": version_name}]})
            found = _call("looking up the pipeline version", host,
                          client.list_pipeline_versions, pipeline_id=pipeline_id,
                          page_size=1, filter=by_name).pipeline_versions
            if found:
                return {"pipeline_id": pipeline_id, "version_id": found[0].pipeline_version_id,
                        "version_name": version_name}
        version = _call("uploading the pipeline version", host, client.upload_pipeline_version,
                        str(package), version_name, pipeline_id=pipeline_id)
    return {"pipeline_id": pipeline_id, "version_id": version.pipeline_version_id,
            "version_name": version_name}


def schedule(host: str, cron: str, params: dict[str, Any], *, experiment: str = "gpunet",
             name: str = "gpunet-retraining", max_concurrency: int = 1, catchup: bool = False,
             token: str | None = None, gpus_per_node: int = 1,
             pipeline_name: str | None = None, pipeline: str = "training",
             parallelism: int = 0) -> dict[str, str]:
    """A recurring run pinned to the pipeline version compiled now: it references that version
    by id (``pipeline_id`` + ``version_id``), so uploading another version later does not
    change what the schedule runs; to move it, schedule again (a new recurring run).
    ``pipeline``: which DAG; its versions go to the KFP pipeline ``pipeline_name`` (default
    :data:`PIPELINE_NAMES`' for it)."""
    cron6 = to_kfp_cron(cron)
    if max_concurrency < 1:
        raise PipelineError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    check_gpus_per_node(gpus_per_node)
    check_parallelism(pipeline, parallelism)
    check_no_macros(params)
    check_cluster_params(params)
    client = kfp_client(host, token)
    exp = _call("creating the experiment", host, client.create_experiment, name=experiment)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / f"gpunet_{pipeline}.yaml", cluster=True,
                                   gpus_per_node=gpus_per_node, pipeline=pipeline,
                                   parallelism=parallelism)
        default_name, description = PIPELINE_NAMES[pipeline]
        version = upload_pipeline_version(client, host, package, pipeline_name or default_name,
                                          description)
    job = _call("creating the recurring run", host, client.create_recurring_run,
                experiment_id=exp.experiment_id, job_name=name, cron_expression=cron6,
                max_concurrency=max_concurrency, no_catchup=not catchup, params=params,
                pipeline_id=version["pipeline_id"], version_id=version["version_id"])
    return {"recurring_run_id": job.recurring_run_id, "cron": cron6, **version}


def list_runs(host: str, *, experiment: str | None = None, token: str | None = None,
              page_size: int = 20) -> list[dict[str, Any]]:
    client = kfp_client(host, token)
    exp_id = None
    if experiment:
        exp_id = _call("looking up the experiment", host, client.get_experiment,
                       experiment_name=experiment).experiment_id
    resp = _call("listing runs", host, client.list_runs, experiment_id=exp_id,
                 page_size=page_size, sort_by="created_at desc")
    return [{"run_id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": str(r.created_at)} for r in (resp.runs or [])]


def preflight(params: dict[str, Any]) -> None:
    """Check what can be checked here before any step starts (an s3:// model spec, the
    dataset source, S3 access)."""
    from gpunet_core.models.spec import fetch_spec
    from gpunet_core.utils import storage

    if storage.is_s3_uri(params.get("model_name", "")):
        fetch_spec(params["model_name"])  # there, a valid spec, readable with these credentials
    calib = params.get("calib_data") or ""
    if calib and not storage.is_s3_uri(calib) and not Path(calib).is_dir():
        raise PipelineError(f"calib_data {calib!r} does not exist: pass an ImageFolder of "
                            "training images (or an s3:// prefix), or leave it empty to "
                            "calibrate on the dataset's train split")
    source = params.get("dataset_source", "digits")
    if source == "digits":
        return
    if storage.is_s3_uri(source):
        storage.check_bucket(storage.parse_s3_uri(source))  # credentials, endpoint, bucket
        if not storage.list_objects(storage.parse_s3_uri(source)):
            raise PipelineError(f"dataset_source {source}: no objects under that prefix")
    elif not Path(source).is_dir():
        raise PipelineError(f"dataset_source {source!r} does not exist: pass 'digits', an "
                            "ImageFolder directory or an s3:// prefix")


def run_local(params: dict[str, Any], workdir: str | Path = "runs/local", *,
              cache: bool = True, pipeline: str = "training") -> dict[str, Any]:
    """Run the whole DAG here with ``kfp.local`` and summarise the outcome from MLflow.

    With ``cache`` (the default, as on a cluster) a step whose inputs match an earlier run in
    the same ``workdir`` is served from ``<workdir>/kfp-cache`` instead of running again, so a
    re-run after a failure resumes after the last finished step; promotion always runs.

    ``pipeline="search"``: gpunet_search, whose study is ``study_storage``, by default the
    sqlite file ``<workdir>/search/study.db`` (a rerun resumes the study of the same
    ``study_name``; the search tasks are never served from the cache); the summary adds its
    ``search`` (the front, the chosen trial and its spec's URI).
    """
    from kfp import local

    from gpunet_core.mlops import registry
    from pipelines.timing import TaskClock, pipeline_overhead

    run_pipeline = pipeline_builder(pipeline)()
    check_output_dir(workdir, "--workdir", error=PipelineError)
    preflight(params)
    if pipeline == "search":
        preflight_search({**pipeline_parameters("search"), **params})

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if pipeline == "search" and not params.get("study_storage"):
        params = {**params, "study_storage": f"sqlite:///{workdir / 'search' / 'study.db'}"}
        (workdir / "search").mkdir(exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    experiment = params.get("mlflow_experiment", "gpunet")
    name = params.get("registered_model", "gpunet")
    mlc = registry.client()
    try:
        if mlc.get_experiment_by_name(experiment) is None:
            artifacts = workdir / "mlartifacts"
            mlc.create_experiment(experiment, artifact_location=artifacts.as_uri()
                                  if os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite")
                                  else None, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception as exc:
        reason = unreachable(exc)
        if reason:
            raise unreachable_error(os.environ["MLFLOW_TRACKING_URI"], reason) from None
        raise PipelineError(f"MLflow at {os.environ['MLFLOW_TRACKING_URI']} is not usable: "
                            f"{str(exc).splitlines()[0]}") from None
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "kfp"), raise_on_error=True,
               enable_caching=cache, cache_root=str(workdir / "kfp-cache"))
    started = time.monotonic()
    with TaskClock.on_stdout() as clock:  # each task's process, timed from this side
        try:
            outputs = run_pipeline(**params)
        except Exception as exc:
            raise PipelineError(f"the local pipeline run failed: "
                                f"{str(exc).splitlines()[0]}") from None
    elapsed = time.monotonic() - started
    tasks = clock.timings()  # none when every task came from the cache
    # gpunet_search's workers run at once: then their processes' time, not the run's, is the
    # whole the steps' work is part of
    overlapped = sum(t["wall_s"] for t in tasks) > elapsed
    overhead = pipeline_overhead(tasks, total_wall_s=None if overlapped else elapsed) \
        if tasks else None
    if overhead:  # a loop's tasks share a name (kfp.local logs each iteration by it)
        overhead["processes"] = sum(t["attempts"] for t in tasks)
    latest = max(mlc.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    tags = latest.tags or {}
    champion = registry._alias_version(mlc, name, registry.CHAMPION)
    experiment_id = mlc.get_experiment_by_name(experiment).experiment_id
    return {"registered_model": name, "version": str(latest.version), "model_uri": latest.source,
            "alias": tags.get("promotion", "").split(":")[0],
            "champion_version": str(champion.version) if champion else None,
            "top1": float(tags.get("top1", "nan")),
            "precision": tags.get(registry.PRECISION_TAG, "fp32"),
            "fp32_top1": float(tags.get(registry.FP32_TOP1_TAG, "nan")),
            "promotion": tags.get("promotion", ""),
            "teacher": tags.get("teacher"),
            "teacher_top1": float(tags.get("teacher_top1", "nan")),
            "latency_ms": float(tags.get("latency_ms", "nan")),
            "latency_backend": tags.get("latency_backend"),
            "seconds": round(elapsed, 1),
            "overhead": overhead,
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
            "experiment_id": experiment_id,
            "kfp_outputs": str(workdir / "kfp"),
            **({"search": search_summary(outputs.outputs)} if pipeline == "search" else {})}


def search_summary(outputs: dict[str, Any]) -> dict[str, Any]:
    """A local gpunet_search run's outputs (its front artifact and the chosen spec's URI) as
    the summary's ``search``: the study, its front, the chosen trial."""
    front = outputs["front"]
    pareto = json.loads((Path(front.path) / "pareto.json").read_text())
    return {"study": pareto["study"], "storage": pareto["storage"],
            "trials": pareto["trials_counted"], "trained_in_budget": pareto["trained_in_budget"],
            "budget_ms": pareto["budget_ms"], "backend": pareto["backend"],
            "front": [{k: r[k] for k in ("trial", "latency_ms", "proxy_top1", "params")}
                      for r in pareto["front"]],
            "chosen": front.metadata.get("chosen"), "pick": front.metadata.get("pick"),
            "spec_uri": outputs["spec_uri"], "front_dir": front.path}


def format_summary(s: dict[str, Any]) -> str:
    exp = s.get("experiment_id", "0")
    ui = (f"mlflow ui --backend-store-uri {s['tracking_uri']}, then "
          f"{ui_url('http://127.0.0.1:5000', exp)}"
          if s["tracking_uri"].startswith("sqlite") else ui_url(s["tracking_uri"], exp))
    return "\n".join([
        f"pipeline finished in {s['seconds']:.0f} s" + (
            f" ({s['overhead']['compute_s']:.0f} s in the steps' own work, "
            f"{100 * s['overhead']['overhead_frac']:.0f} % process start, imports, artifact "
            f"copies and logging, timed around its "
            f"{s['overhead'].get('processes', len(s['overhead']['steps']))} task "
            "processes)" if s.get("overhead") else ""),
        *(format_search(s["search"]) if s.get("search") else []),
        f"  candidate: {s['registered_model']} v{s['version']}: top-1 {s['top1']:.2f} %, "
        f"latency {s['latency_ms']:.3f} ms ({s['latency_backend']}, batch 1)"
        + (f", deployed {s['precision']} (FP32 top-1 {s['fp32_top1']:.2f} %)"
           if s.get("precision", "fp32") != "fp32" else ""),
        *([f"  distilled from {s['teacher']} (teacher top-1 {s['teacher_top1']:.2f} %)"]
          if s.get("teacher") else []),
        f"  registry: alias '{s['alias']}'; champion is v{s['champion_version']}; the candidate "
        f"is LoggedModel {s.get('model_uri')}",
        *([f"  why not champion: {s['promotion'].split(':', 1)[1].strip()}"]
          if s.get("alias") == "challenger" and ":" in s.get("promotion", "") else []),
        f"  MLflow UI: {ui}",
        f"  step outputs: {s['kfp_outputs']}",
    ])


def format_search(x: dict[str, Any]) -> list[str]:
    """The summary lines of a gpunet_search run's ``search`` (:func:`search_summary`)."""
    chosen = x.get("chosen") or {}
    trial = int(chosen["trial"]) if "trial" in chosen else None  # KFP metadata: numbers are floats
    lines = [f"  search: study {x['study']} ({x['storage']}): {x['trials']} trials, "
             f"{x['trained_in_budget']} trained within {x['budget_ms']:g} ms on "
             f"{x['backend']}; Pareto front (* trained):"]
    for r in x["front"]:
        mark = "*" if r["trial"] == trial else " "
        lines.append(f"   {mark} trial {r['trial']:>4}: {r['latency_ms']:8.3f} ms, proxy top-1 "
                     f"{r['proxy_top1']:6.2f} %, {r['params'] / 1e6:.2f} M params")
    lines.append(f"  trained: trial {trial} ({x.get('pick')}), spec "
                 f"{x['spec_uri']}; pareto.json, specs/, pareto.png in {x['front_dir']}")
    return lines


# --------------------------------------------------------------------------- argparse


def build_parser(prog: str = "python -m pipelines") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def params(p):
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="pipeline parameter (repeatable); see `compile` output for names")

    def server(p):
        p.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
        p.add_argument("--token", default=None, help="bearer token (default: $KFP_TOKEN)")
        p.add_argument("--experiment", default="gpunet", help="KFP experiment")

    def which(p):
        p.add_argument("--pipeline", default="training", choices=PIPELINES,
                       help="gpunet_training (default), or gpunet_search: the architecture "
                            "search, then the same training chain on the spec it chose")

    def parallelism(p):
        p.add_argument("--parallelism", type=int, default=0,
                       help="--pipeline search: at most this many workers at once (default 0: "
                            "all)")

    p = sub.add_parser("compile", help="compile the DAG to KFP IR YAML")
    which(p)
    p.add_argument("--output", "-o", default=None,
                   help="the YAML file to write (its folder must exist; default "
                        "gpunet_<pipeline>.yaml)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per training pod; > 0 also adds shm, node placement, secrets")
    p.add_argument("--cluster", action="store_true", help="add secrets/config even without GPUs")
    p.add_argument("--dataset-pvc", default="", help="mount this PVC at /data in data steps")
    parallelism(p)
    p = sub.add_parser("run-local", help="run the whole DAG here (kfp.local)")
    which(p)
    params(p)
    p.add_argument("--workdir", default="runs/local",
                   help="outputs, MLflow db and artifacts (created if missing)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-cache", action="store_true",
                   help="run every step even when an earlier run in --workdir has its result")
    p = sub.add_parser("submit", help="submit a run to a KFP server")
    server(p)
    which(p)
    params(p)
    parallelism(p)
    p.add_argument("--run-name", default=None,
                   help="the run's name (default gpunet-<pipeline>-<local time>)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p = sub.add_parser("schedule", help="create a recurring (scheduled retraining) run")
    server(p)
    which(p)
    params(p)
    parallelism(p)
    p.add_argument("--cron", required=True, help="cron expression, 5 or 6 fields")
    p.add_argument("--name", default="gpunet-retraining")
    p.add_argument("--max-concurrency", type=int, default=1)
    p.add_argument("--catchup", default="false", choices=("true", "false"),
                   help="run missed intervals after a pause (default false)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--pipeline-name", default=None,
                   help="KFP pipeline to add the compiled DAG to as a version (created if new; "
                        f"default {PIPELINE_NAME}, or {PIPELINE_NAMES['search'][0]} with "
                        "--pipeline search)")
    p = sub.add_parser("list-runs", help="list runs of an experiment")
    server(p)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.action == "compile":
        path = compile_pipeline(args.output or f"gpunet_{args.pipeline}.yaml",
                                gpus_per_node=args.gpus_per_node,
                                cluster=args.cluster, dataset_pvc=args.dataset_pvc,
                                parents=False, pipeline=args.pipeline,
                                parallelism=args.parallelism)
        print(f"wrote {path}")
    elif args.action == "run-local":
        params = parse_params(args.param, args.pipeline)
        with remove_new_dirs_on_error(args.workdir):  # a failed check leaves no empty folder
            summary = run_local(params, args.workdir, cache=not args.no_cache,
                                pipeline=args.pipeline)
        print(json.dumps(summary) if args.json else format_summary(summary))
    elif args.action == "submit":
        print(json.dumps(submit(args.host, parse_params(args.param, args.pipeline),
                                experiment=args.experiment, run_name=args.run_name,
                                token=args.token, gpus_per_node=args.gpus_per_node,
                                pipeline=args.pipeline, parallelism=args.parallelism)))
    elif args.action == "schedule":
        print(json.dumps(schedule(args.host, args.cron, parse_params(args.param, args.pipeline),
                                  experiment=args.experiment, name=args.name,
                                  max_concurrency=args.max_concurrency,
                                  catchup=args.catchup == "true", token=args.token,
                                  gpus_per_node=args.gpus_per_node,
                                  pipeline_name=args.pipeline_name, pipeline=args.pipeline,
                                  parallelism=args.parallelism)))
    else:
        for row in list_runs(args.host, experiment=args.experiment, token=args.token):
            print(json.dumps(row))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except GpunetError as exc:
        print(f"pipelines {args.action}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
