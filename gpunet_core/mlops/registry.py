"""MLflow model registry: trained GPUNets as MLflow 3 LoggedModels, promoted with aliases.

**One LoggedModel per candidate, holding both flavors.** Training logs the best checkpoint's
model with ``mlflow.pytorch.log_model`` (:func:`log_pytorch_model`): a LoggedModel of its run,
``pytorch`` flavor, signature, input example, pinned requirements, and the best epoch's metrics.
Promotion completes it (:func:`register`): it adds the ONNX export as the ``onnx`` flavor (the
same signature; ``mlflow.onnx.save_model`` writes it, then it is merged into the model's
``MLmodel``), and registers it by its ``models:/<model_id>`` URI, so ``models:/gpunet@champion``
loads through ``mlflow.pyfunc``, ``mlflow.pytorch`` and ``mlflow.onnx`` alike. One model per
candidate keeps the UI's Models tab to one row per trained checkpoint, with its validation and
latency metrics linked to it (``model_id``). Adding the flavor needs no torch.

A LoggedModel a version points to is never rewritten: registering the same run's checkpoint
again (another export or resolution) copies it into a new LoggedModel; a checkpoint training
did not log (``--no-log-model``) is built here, with torch.

Promotion uses MLflow 3 aliases (no deprecated stages): the candidate becomes ``champion`` only
when its top-1 reaches the minimum, its latency fits the budget and it beats the current champion
by the margin; else it becomes ``challenger`` with the reason as a tag. The champion's top-1 is
its figure *on the candidate's validation set*: unless both were validated on the same dataset
(manifest checksum), the champion's registered model is evaluated on it first. The version's
figures are those of the graph it deploys (its ``onnx`` flavor: the export or its FP16/INT8
graph, ``precision`` tag); a quantized candidate more than ``max_quant_drop`` top-1 points below
its own FP32 figure (``fp32_top1``) is refused. Latencies are compared only when measured alike
(backend, batch, hardware: ``latency_fingerprint``), whatever the two graphs' precisions.
Moving an alias is one registry call, so there is never a moment with two champions or none;
the replaced champion keeps the ``previous-champion`` alias, which :func:`rollback` restores.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpunet_core.mlops.mlflow_client import (
    client,
    fluent_tracking_uri,
    not_found,
    raise_if_unreachable,
    server_uri,
)
from gpunet_core.models.spec import is_custom_name, spec_store
from gpunet_core.models.spec import model_name as spec_model_name
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import BEST_CHECKPOINT, sha256_file

_logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
PIP_REQUIREMENTS = ["torch", "onnxruntime", "numpy", "gpunet-pipeline"]
MODEL_TYPE = "image-classifier"


class RegistryError(GpunetError):
    """The MLflow registry is unreachable or does not hold what was asked for."""


class ModelBuildError(RegistryError):
    """A checkpoint could not be built into an MLflow model: its weights or model, not the
    server (so retrying the upload cannot help)."""


CHECKPOINT_TAG = "gpunet.model_checkpoint_sha256"  # which checkpoint a LoggedModel is
IMG_SIZE_TAG = "gpunet.model_img_size"  # the resolution of its signature
# version tags promotion compares (besides top1/top5/latency_ms)
DATASET_TAG = "dataset_checksum"  # the manifest checksum of the validation set
CLASSES_TAG = "classes_sha256"  # the class names the classifier predicts, in order
LATENCY_FP_TAG = "latency_fingerprint"  # how latency_ms was measured
PRECISION_TAG = "precision"  # of the deployed graph (the onnx flavor): fp32, fp16, int8
TARGET_TAG = "quant_target"  # what a quantized graph was made for: tensorrt or cpu
FP32_TOP1_TAG = "fp32_top1"  # the same checkpoint's FP32 top-1, for the quantization gate
# top-1 points a quantized candidate may lose against its own FP32 export
DEFAULT_MAX_QUANT_DROP = 0.5
NOT_REGISTERED = "registered_model_meta"  # written into a model's files by registration


def _example(img_size: int) -> np.ndarray:
    return np.random.default_rng(0).random((1, 3, img_size, img_size), dtype=np.float32)


def _pytorch_kwargs(model, img_size: int) -> dict[str, Any]:
    """Signature, input example, requirements and format of a GPUNet's ``pytorch`` flavor."""
    import torch
    from mlflow.models import infer_signature

    example = _example(img_size)
    with torch.no_grad():
        output = model.eval()(torch.from_numpy(example)).numpy()
    # pickle keeps the GPUNet module itself (any batch size, its attributes); torch.export's
    # "pt2" would specialise the batch dimension to the example's
    return {"signature": infer_signature(example, output), "input_example": example,
            "pip_requirements": PIP_REQUIREMENTS, "serialization_format": "pickle"}


def build_pytorch_model_dir(model, img_size: int, dest: str | Path) -> Path:
    """An MLflow model directory with the ``pytorch`` flavor, its signature and input example."""
    import mlflow.pytorch

    dest = Path(dest)
    mlflow.pytorch.save_model(model.eval(), dest, **_pytorch_kwargs(model, img_size))
    return dest


def add_onnx_flavor(model_dir: str | Path, onnx_path: str | Path,
                    model_id: str | None = None) -> Path:
    """Add the ``onnx`` flavor (the exported file, same signature) to an MLflow model directory;
    ``model_id``: the LoggedModel the directory becomes (its ``MLmodel`` names it)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import Model

    model_dir = Path(model_dir)
    merged = Model.load(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp) / "onnx"
        mlflow.onnx.save_model(onnx.load(str(onnx_path)), onnx_dir, signature=merged.signature,
                               pip_requirements=PIP_REQUIREMENTS, save_as_external_data=False)
        onnx_conf = Model.load(onnx_dir).flavors["onnx"]
        shutil.copy(onnx_dir / onnx_conf["data"], model_dir / onnx_conf["data"])
    merged.add_flavor("onnx", **onnx_conf)
    if model_id:
        merged.model_id = merged.model_uuid = model_id
    merged.save(model_dir / "MLmodel")
    return model_dir


def checkpoint_model(checkpoint: str | Path, model_name: str):
    """``checkpoint``'s eval-mode model (as validation loads it); :class:`ModelBuildError`
    when the weights or the model fail."""
    # torch: only when a model must be built (promotion usually needs no torch)
    from gpunet_core.inference.validate import load_inference_model

    try:
        return load_inference_model(model_name, checkpoint)
    except Exception as exc:
        raise ModelBuildError(str(exc)) from exc


def checkpoint_model_dir(checkpoint: str | Path, *, model_name: str, img_size: int,
                         dest: str | Path) -> Path:
    """:func:`build_pytorch_model_dir` for ``checkpoint``'s weights."""
    model = checkpoint_model(checkpoint, model_name)
    try:
        return build_pytorch_model_dir(model, img_size, dest)
    except Exception as exc:
        raise ModelBuildError(str(exc)) from exc


def trained_model(mlc, run, sha: str, img_size: int, model_id: str | None = None):
    """The READY LoggedModel of ``run`` that is the model of the checkpoint with SHA-256
    ``sha`` at ``img_size`` (``model_id`` first, else searched by the run and the tags), or
    None."""
    from mlflow.exceptions import MlflowException


    def matches(model) -> bool:
        return (str(model.status) == "READY" and model.source_run_id == run.info.run_id
                and model.tags.get(CHECKPOINT_TAG) == sha
                and model.tags.get(IMG_SIZE_TAG) == str(img_size))

    if model_id:
        try:
            model = mlc.get_logged_model(model_id)
        except MlflowException as exc:
            raise_if_unreachable(exc, mlc)
            model = None
        if model is not None and matches(model):
            return model
    found = mlc.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`{CHECKPOINT_TAG}` = "
                      f"'{sha}' AND tags.`{IMG_SIZE_TAG}` = '{img_size}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": True}])
    ready = [m for m in found if matches(m)]
    return ready[0] if ready else None


def _link_to_run(mlc, run, model_id: str, step: int) -> None:
    """Make ``model_id`` an output of ``run`` at ``step`` and link the run's training metrics
    at that step (the best epoch's figures, not the system metrics) to it."""
    from mlflow.entities import LoggedModelOutput, Metric

    mlc.log_outputs(run.info.run_id, [LoggedModelOutput(model_id, step=step)])
    linked = []
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        linked += [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id,
                          run_id=run.info.run_id)
                   for m in mlc.get_metric_history(run.info.run_id, key)
                   if m.step == step and m.model_id is None]
    for i in range(0, len(linked), 1000):
        mlc.log_batch(run.info.run_id, metrics=linked[i:i + 1000])


def log_pytorch_model(run_id: str, checkpoint: str | Path, *, model_name: str, img_size: int,
                      step: int = 0, params: dict[str, Any] | None = None,
                      tracking_uri: str | None = None, mlc=None) -> str:
    """Log ``checkpoint``'s model as a LoggedModel of ``run_id`` (``pytorch`` flavor); its id.

    Training does this at its end (:meth:`gpunet_core.mlops.tracking.RunTracker.log_model`),
    where torch and the weights are at hand, so that :func:`register` needs no torch. The run's
    metrics at ``step`` (the best epoch) are linked to the model. Idempotent: a READY model of
    the same checkpoint is returned as it is; one left PENDING or FAILED by an interrupted
    attempt is deleted first.
    """
    import mlflow.pytorch

    mlc = mlc or client(tracking_uri)
    run = mlc.get_run(run_id)
    sha = sha256_file(checkpoint)
    done = trained_model(mlc, run, sha, img_size)
    if done is not None:
        return done.model_id
    for stale in mlc.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND tags.`{CHECKPOINT_TAG}` = '{sha}'"):
        if str(stale.status) != "READY":
            mlc.delete_logged_model(stale.model_id)
    model = checkpoint_model(checkpoint, model_name)
    logged = mlc.create_logged_model(
        experiment_id=run.info.experiment_id, name=model_name, source_run_id=run_id,
        tags={CHECKPOINT_TAG: sha, IMG_SIZE_TAG: str(img_size)},
        params={k: str(v)[:500] for k, v in (params or {}).items()}, model_type=MODEL_TYPE)
    with fluent_tracking_uri(mlc.tracking_uri):  # log_model finalizes through the fluent API
        # no run_id: log_model would link *every* metric of the run at ``step``, the system
        # metrics' samples included; the run link and the epoch's figures are set below
        mlflow.pytorch.log_model(model, name=model_name, model_id=logged.model_id,
                                 **_pytorch_kwargs(model, img_size))
    _link_to_run(mlc, run, logged.model_id, step)
    _logger.info("logged %s's model as %s (pytorch flavor) in run %s", checkpoint,
                 logged.model_id, run_id)
    return logged.model_id


def _upload(mlc, model_id: str, model_dir: Path) -> None:
    """Upload ``model_dir`` into the LoggedModel, ``MLmodel`` last: a model whose ``MLmodel``
    lists a flavor holds that flavor's files."""
    with tempfile.TemporaryDirectory() as tmp:
        rest = Path(tmp) / "rest"
        shutil.copytree(model_dir, rest, ignore=shutil.ignore_patterns("MLmodel", NOT_REGISTERED))
        mlc.log_model_artifacts(model_id, str(rest))
    mlc.log_model_artifact(model_id, str(model_dir / "MLmodel"))


def _download(model, dest: Path, path: str = "") -> Path:
    import mlflow.artifacts

    uri = model.artifact_location.rstrip("/") + (f"/{path}" if path else "")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _link_version(mlc, model_id: str, name: str, version: str) -> None:
    """List ``name`` ``version`` once in the LoggedModel's ``mlflow.modelVersions`` tag, which
    the UI's model page shows. A tracking server adds it when the version is created, a
    database store does not, and ``mlflow.register_model`` appends it again either way."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(mlc.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if (name, version) not in {(v.get("name"), str(v.get("version"))) for v in linked}:
        linked.append({"name": name, "version": version})
        mlc.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})


def register(run_id: str, checkpoint: str | Path, onnx_path: str | Path, *, model_name: str,
             name: str, img_size: int, tags: dict[str, Any], model_id: str | None = None,
             tracking_uri: str | None = None) -> tuple[str, str]:
    """Register ``checkpoint``'s model with both flavors; returns (version, model id).

    The LoggedModel training logged (``model_id``, else found by run, checkpoint and
    resolution) gets the ``onnx`` flavor from ``onnx_path`` and is registered, with no torch.
    When a version already points at it, or training logged none, a new LoggedModel of the run
    is made: a copy of it, or built from ``checkpoint``.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    mlc = client(tracking_uri)
    run = mlc.get_run(run_id)
    sha = sha256_file(checkpoint)
    trained = trained_model(mlc, run, sha, img_size, model_id)
    taken = {v.source for v in mlc.search_model_versions(f"run_id = '{run_id}'")}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        if trained is not None and f"models:/{trained.model_id}" not in taken:
            _logger.info("%s is %s's model: adding the onnx flavor", trained.model_id,
                         checkpoint)
            target = trained
            model_dir.mkdir()
            mlmodel = _download(trained, model_dir, "MLmodel")
            if mlmodel != model_dir / "MLmodel":
                shutil.move(mlmodel, model_dir / "MLmodel")
            add_onnx_flavor(model_dir, onnx_path)
            # only what is new goes up (the pytorch files stay), MLmodel after the onnx file
            onnx_file = model_dir / Model.load(model_dir).flavors["onnx"]["data"]
            mlc.log_model_artifact(target.model_id, str(onnx_file))
            mlc.log_model_artifact(target.model_id, str(model_dir / "MLmodel"))
        else:
            if trained is not None:
                _logger.info("%s is registered already: copying it into a new LoggedModel",
                             trained.model_id)
                model_dir = _download(trained, Path(tmp) / "copy")
            else:
                _logger.info("run %s has no LoggedModel of %s: building it", run_id, checkpoint)
                model_dir = checkpoint_model_dir(checkpoint, model_name=model_name,
                                                 img_size=img_size, dest=model_dir)
            target = mlc.create_logged_model(
                experiment_id=run.info.experiment_id, name=model_name, source_run_id=run_id,
                tags={CHECKPOINT_TAG: sha, IMG_SIZE_TAG: str(img_size)},
                model_type=MODEL_TYPE)
            add_onnx_flavor(model_dir, onnx_path, model_id=target.model_id)
            _upload(mlc, target.model_id, model_dir)
            mlc.finalize_logged_model(target.model_id, LoggedModelStatus.READY)
            mlc.log_outputs(run_id, [LoggedModelOutput(target.model_id, step=0)])
    try:
        mlc.get_registered_model(name)
    except MlflowException as exc:
        raise_if_unreachable(exc, mlc)
        mlc.create_registered_model(name, description="GPUNet models trained by gpunet-pipeline")
    version = mlc.create_model_version(name, f"models:/{target.model_id}", run_id=run_id,
                                       tags={k: str(v) for k, v in tags.items()},
                                       model_id=target.model_id)
    _link_version(mlc, target.model_id, name, str(version.version))
    _logger.info("registered %s version %s (models:/%s)", name, version.version,
                 target.model_id)
    return str(version.version), target.model_id


@dataclass
class Decision:
    """The outcome of a promotion or rollback, for reports and JSON.

    ``candidate`` and ``previous_champion`` hold the figures the decision used: the champion's
    ``top1`` is on the candidate's validation set (``top1_registered``: its own figure, on its
    own), and ``comparison`` says how they were obtained.
    """

    model: str
    version: str
    alias: str
    promoted: bool
    reason: str
    candidate: dict[str, Any]
    previous_champion: dict[str, Any] | None
    thresholds: dict[str, float | None] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def markdown(self) -> str:
        lines = [f"# Promotion of `{self.model}` version {self.version}", "",
                 f"**Decision:** `{self.alias}` — {self.reason}", "",
                 "| | top-1 % on the candidate's validation set | top-1 % as registered | "
                 "latency ms |", "|---|---:|---:|---:|",
                 f"| candidate v{self.version} | {_fmt(self.candidate.get('top1'))} | "
                 f"{_fmt(self.candidate.get('top1'))} | "
                 f"{_fmt(self.candidate.get('latency_ms'))} |"]
        if self.previous_champion:
            pc = self.previous_champion
            lines.append(f"| champion before v{pc['version']} | {_fmt(pc.get('top1'))} | "
                         f"{_fmt(pc.get('top1_registered'))} | {_fmt(pc.get('latency_ms'))} |")
        else:
            lines.append("| champion before | none | | |")
        cand = self.candidate
        if cand.get("precision") and cand["precision"] != "fp32":
            lines += ["", f"Deployed precision: {cand['precision']}"
                      + (f" (target {cand['target']})" if cand.get("target") else "")
                      + f"; its FP32 top-1 {_fmt(cand.get('fp32_top1'))} %, "
                        f"drop {_fmt(cand.get('quant_drop'))} points."]
        cmp = self.comparison
        if cmp.get("dataset"):
            lines += ["", f"Validation set: `{cmp['dataset']}` (manifest checksum)."]
        for key in ("top1", "latency"):
            if cmp.get(key):
                lines.append(f"{'Top-1' if key == 'top1' else 'Latency'}: {cmp[key]}.")
        lines += ["", "Thresholds: " + ", ".join(f"{k} = {_fmt(v)}"
                                                  for k, v in self.thresholds.items())]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _alias_version(mlc, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise_if_unreachable(exc, mlc)
        return None


def _tag_float(version, key: str) -> float | None:
    value = (version.tags or {}).get(key)
    return float(value) if value not in (None, "") else None


def _short(checksum: str | None) -> str:
    return checksum[:16] if checksum else "unknown"


def version_model(mlc, version):
    """The LoggedModel registered ``version`` points at (source ``models:/m-...``), or None."""
    source = version.source or ""
    return mlc.get_logged_model(source.removeprefix("models:/")) \
        if source.startswith("models:/m-") else None


def version_checkpoint(mlc, name: str, version, logged, dest: Path) -> Path:
    """The checkpoint registered ``version`` (LoggedModel ``logged``) was made from, downloaded
    into ``dest``: the ``model_best.pth.tar`` its LoggedModel's training run logged, verified
    against the LoggedModel's checksum tag. (The ``pytorch`` flavor is a pickle, which this
    project never loads; the checkpoint loads with ``weights_only``.)"""
    want = logged.tags.get(CHECKPOINT_TAG) if logged is not None else None
    if logged is None or not want or not logged.source_run_id:
        raise RegistryError(f"{name} version {version.version} does not name the checkpoint it "
                            f"was made from (source {version.source}): it cannot be evaluated")
    try:
        path = Path(mlc.download_artifacts(logged.source_run_id, BEST_CHECKPOINT, str(dest)))
    except Exception as exc:
        raise RegistryError(f"the checkpoint of {name} version {version.version} "
                            f"({BEST_CHECKPOINT} of run {logged.source_run_id}) cannot be "
                            f"downloaded: {str(exc).splitlines()[0]}") from None
    if sha256_file(path) != want:
        raise RegistryError(f"{BEST_CHECKPOINT} of run {logged.source_run_id} is not the "
                            f"checkpoint {name} version {version.version} holds (sha256 "
                            f"differs from its LoggedModel's {CHECKPOINT_TAG})")
    return path


def version_spec(mlc, name: str, version, logged, model_name: str, dest: Path) -> str:
    """``model_name``, buildable here: a custom spec that this machine's spec store lacks (a
    champion trained in another pod or on another machine) is fetched from the copy its
    training run logged (``<name>.json``), checked against the digest in its name and stored."""
    if not is_custom_name(model_name) or (spec_store() / f"{model_name}.json").is_file():
        return model_name
    where = f"{name} version {version.version} is the custom spec {model_name}"
    if logged is None or not logged.source_run_id:
        raise RegistryError(f"{where}, which this machine's spec store lacks, and it names no "
                            "training run to fetch it from: it cannot be evaluated")
    try:
        path = Path(mlc.download_artifacts(logged.source_run_id, f"{model_name}.json",
                                           str(dest)))
    except Exception as exc:
        raise RegistryError(f"{where}, which this machine's spec store lacks, and its training "
                            f"run {logged.source_run_id} holds no {model_name}.json: "
                            f"{str(exc).splitlines()[0]}") from None
    fetched = spec_model_name(path)
    if fetched != model_name:
        raise RegistryError(f"{where}, but {model_name}.json of run {logged.source_run_id} "
                            f"holds another spec ({fetched}): it cannot be evaluated")
    return model_name


def evaluate_version(name: str, version: str, data: str | Path, *, batch_size: int = 64,
                     tracking_uri: str | None = None) -> dict[str, Any]:
    """Validate registered ``version`` on ``data`` with the validation step's code: the
    checkpoint it holds, its own model and resolution, the model's crop, the same split."""
    # torch: only where a champion is evaluated on another validation set
    from gpunet_core.inference.validate import load_inference_model, validate

    mlc = client(tracking_uri)
    entry = mlc.get_model_version(name, str(version))
    logged = version_model(mlc, entry)
    model_name = (entry.tags or {}).get("model") or (logged.name if logged else None)
    img_size = (entry.tags or {}).get("img_size") or \
        (logged.tags.get(IMG_SIZE_TAG) if logged else None)
    if not model_name or not img_size:
        raise RegistryError(f"{name} version {version} records no model name or resolution "
                            "('model' / 'img_size' tags): it cannot be evaluated")
    precision = (entry.tags or {}).get(PRECISION_TAG, "fp32")
    if precision != "fp32":  # judged by what it deploys: its quantized graph
        return _evaluate_deployed_graph(name, entry, logged, data, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = version_checkpoint(mlc, name, entry, logged, Path(tmp))
        model_name = version_spec(mlc, name, entry, logged, model_name, Path(tmp))
        model = load_inference_model(model_name, checkpoint)
    return validate(model, data, batch_size=batch_size, workers=0, img_size=int(img_size),
                    progress=False)


def _evaluate_deployed_graph(name: str, entry, logged, data: str | Path,
                             batch_size: int) -> dict[str, Any]:
    """Validate the ``onnx`` flavor of registered version ``entry`` (LoggedModel ``logged``)
    with ONNX Runtime."""
    # the MLmodel reader, onnxruntime and the loader: only where a quantized champion is
    # evaluated
    from mlflow.models import Model

    # (torch, onnxruntime)
    from gpunet_core.inference.validate import validate_onnx

    if logged is None:
        raise RegistryError(f"{name} version {entry.version} has no LoggedModel: its deployed "
                            "graph cannot be evaluated")
    with tempfile.TemporaryDirectory() as tmp:
        flavors = Model.load(str(_download(logged, Path(tmp), "MLmodel"))).flavors
        if "onnx" not in flavors:
            raise RegistryError(f"{name} version {entry.version} is tagged "
                                f"{PRECISION_TAG}={entry.tags.get(PRECISION_TAG)} but its model "
                                "has no onnx flavor to evaluate")
        (Path(tmp) / "onnx").mkdir()
        graph = _download(logged, Path(tmp) / "onnx", flavors["onnx"]["data"])
        return validate_onnx(graph, data, batch_size=batch_size, workers=0, progress=False)


def _champion_on_candidate_data(mlc, name: str, champion, candidate, data,
                                batch_size: int) -> dict[str, Any]:
    """The champion's figures for the comparison; ``top1`` None when it cannot be compared
    (then ``blocked`` says why)."""
    tags, cand = champion.tags or {}, candidate.tags or {}
    figures: dict[str, Any] = {
        "version": str(champion.version), "top1_registered": _tag_float(champion, "top1"),
        "latency_ms": _tag_float(champion, "latency_ms"), "dataset": tags.get(DATASET_TAG),
        "latency_fingerprint": tags.get(LATENCY_FP_TAG), "evaluated": False}
    dataset = cand.get(DATASET_TAG)
    if dataset and tags.get(DATASET_TAG) == dataset:
        figures.update(top1=figures["top1_registered"],
                       basis="validated on the same dataset: registered figures compared")
        return figures
    if cand.get(CLASSES_TAG) and tags.get(CLASSES_TAG) and \
            cand[CLASSES_TAG] != tags[CLASSES_TAG]:
        figures.update(top1=None, blocked=f"champion v{champion.version} predicts other classes "
                       "than the candidate's dataset holds, so neither can be judged on the "
                       "other's data; set the alias by hand if the new task replaces the old")
        return figures
    if data is None and not dataset:  # registered by hand, without its validation set
        figures.update(top1=figures["top1_registered"],
                       basis="the candidate records no validation set: registered figures "
                             "compared (pass --data to evaluate the champion on it)")
        return figures
    if data is None:
        raise RegistryError(
            f"champion v{champion.version} was validated on dataset "
            f"{_short(tags.get(DATASET_TAG))}, candidate v{candidate.version} on "
            f"{_short(dataset)}: pass the candidate's validation set (--data) so that the "
            "champion is evaluated on it")
    _logger.info("evaluating champion v%s on the candidate's validation set %s",
                 champion.version, data)
    try:
        result = evaluate_version(name, str(champion.version), data, batch_size=batch_size,
                                  tracking_uri=mlc.tracking_uri)
    except GpunetError as exc:  # e.g. another number of classes
        figures.update(top1=None, blocked=f"champion v{champion.version} cannot be evaluated "
                       f"on the candidate's validation set: {str(exc).splitlines()[0]}")
        return figures
    got = (result.get("dataset") or {}).get("checksum")
    if dataset and got and got != dataset:
        raise RegistryError(f"{data} is dataset {_short(got)}, not candidate "
                            f"v{candidate.version}'s validation set ({_short(dataset)})")
    figures.update(top1=float(result["top1"]), top5=float(result["top5"]), evaluated=True,
                   basis=f"champion v{champion.version} (validated on "
                         f"{_short(tags.get(DATASET_TAG))}) evaluated on the candidate's "
                         "validation set")
    return figures


def promote(name: str, version: str, *, min_top1: float = 0.0,
            max_latency_ms: float | None = None, margin: float = 0.0,
            max_latency_increase_pct: float | None = None,
            max_quant_drop: float | None = DEFAULT_MAX_QUANT_DROP,
            data: str | Path | None = None, batch_size: int = 64,
            tracking_uri: str | None = None) -> Decision:
    """Give ``version`` the ``champion`` alias if it qualifies, else ``challenger``.

    ``data``: the candidate's validation set, on which the champion is evaluated when the two
    were validated on different datasets (required then). ``max_latency_increase_pct``: how
    much slower than the champion the candidate may be, checked only when both latencies were
    measured alike; None: not checked. ``max_quant_drop``: how many top-1 points an FP16/INT8
    candidate may lose against its own FP32 figure (``fp32_top1`` tag); None: not checked.
    """
    from mlflow.exceptions import MlflowException

    if max_quant_drop is not None and not max_quant_drop >= 0:
        raise RegistryError(f"--max-quant-drop must be >= 0 top-1 points, got {max_quant_drop}")
    if data is not None and not str(data).startswith("s3://") and not Path(data).is_dir():
        raise RegistryError(f"--data {data}: no such directory; pass the candidate's validation "
                            "set (a prepared dataset's val/ folder)")
    mlc = client(tracking_uri)
    try:
        candidate = mlc.get_model_version(name, str(version))
    except MlflowException as exc:
        raise_if_unreachable(exc, mlc)
        if not not_found(exc):  # it answered, with something else than "no such version"
            raise RegistryError(f"MLflow at {server_uri(mlc)} could not look up {name!r} "
                                f"version {version}: {str(exc).splitlines()[0]}") from None
        raise RegistryError(f"registered model {name!r} has no version {version}: "
                            f"{str(exc).splitlines()[0]}") from None
    top1, latency = _tag_float(candidate, "top1"), _tag_float(candidate, "latency_ms")
    if top1 is None:
        raise RegistryError(f"{name} version {version} has no 'top1' tag: register it with its "
                            "validation result first")
    cand_tags = candidate.tags or {}
    precision = cand_tags.get(PRECISION_TAG) or "fp32"
    fp32_top1 = _tag_float(candidate, FP32_TOP1_TAG)
    figures = {"top1": top1, "latency_ms": latency, "dataset": cand_tags.get(DATASET_TAG),
               "latency_fingerprint": cand_tags.get(LATENCY_FP_TAG), "precision": precision,
               "target": cand_tags.get(TARGET_TAG), "fp32_top1": fp32_top1,
               "quant_drop": None if fp32_top1 is None else round(fp32_top1 - top1, 4)}
    thresholds = {"min_top1": min_top1, "max_latency_ms": max_latency_ms, "margin": margin,
                  "max_latency_increase_pct": max_latency_increase_pct,
                  "max_quant_drop": max_quant_drop}
    comparison: dict[str, Any] = {"dataset": figures["dataset"]}
    champion = _alias_version(mlc, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        before = {"version": str(version), "top1": top1, "top1_registered": top1,
                  "latency_ms": latency}
        return Decision(name, str(version), CHAMPION, False, "it already is the champion",
                        figures, before, thresholds, comparison)
    before = None
    if champion is not None:
        before = _champion_on_candidate_data(mlc, name, champion, candidate, data, batch_size)
        comparison["top1"] = before.get("basis") or before.get("blocked")
        same_fp = bool(figures["latency_fingerprint"]) and \
            figures["latency_fingerprint"] == before["latency_fingerprint"]
        before["latency_comparable"] = same_fp
        comparison["latency"] = (
            "measured alike (backend, batch, hardware): compared" if same_fp else
            "not measured alike (another backend, batch or hardware): not compared, "
            "the budget alone applies")
    reasons = []
    if (max_quant_drop is not None and precision != "fp32" and fp32_top1 is not None
            and fp32_top1 - top1 > max_quant_drop):
        reasons.append(
            f"its {precision} graph's top-1 {top1:.2f} is {fp32_top1 - top1:.2f} points below "
            f"its own FP32 top-1 {fp32_top1:.2f}, more than max_quant_drop {max_quant_drop:g}: "
            "calibrate on representative training images (more of them), use another "
            "precision, or raise max_quant_drop")
    if top1 < min_top1:
        reasons.append(f"top-1 {top1:.2f} is below the minimum {min_top1:.2f}")
    if max_latency_ms is not None and (latency is None or latency > max_latency_ms):
        reasons.append(f"latency {_fmt(latency)} ms exceeds the budget {max_latency_ms:.4g} ms")
    if before is not None:
        if before.get("blocked"):
            reasons.append(before["blocked"])
        elif before["top1"] is not None and top1 < before["top1"] + margin:
            reasons.append(f"top-1 {top1:.2f} does not beat champion v{before['version']} "
                           f"({before['top1']:.2f} on the same validation set) by the margin "
                           f"{margin:.2f}")
        if (max_latency_increase_pct is not None and before["latency_comparable"]
                and latency is not None and before["latency_ms"] is not None
                and latency > before["latency_ms"] * (1 + max_latency_increase_pct / 100)):
            reasons.append(f"latency {latency:.4g} ms is more than {max_latency_increase_pct:g} "
                           f"% above champion v{before['version']}'s "
                           f"{before['latency_ms']:.4g} ms")
    if reasons:
        mlc.set_registered_model_alias(name, CHALLENGER, str(version))
        mlc.set_model_version_tag(name, str(version), "promotion",
                                  ("challenger: " + "; ".join(reasons))[:5000])
        return Decision(name, str(version), CHALLENGER, False, "; ".join(reasons), figures,
                        before, thresholds, comparison)
    if champion is not None:
        mlc.set_registered_model_alias(name, PREVIOUS, str(champion.version))
    mlc.set_registered_model_alias(name, CHAMPION, str(version))  # one atomic move
    reason = ("first champion" if champion is None else
              f"beats champion v{champion.version} by {top1 - (before['top1'] or 0):.2f} points")
    mlc.set_model_version_tag(name, str(version), "promotion", "champion: " + reason)
    return Decision(name, str(version), CHAMPION, True, reason, figures, before, thresholds,
                    comparison)


def rollback(name: str, tracking_uri: str | None = None) -> Decision:
    """Make the previous champion the champion again (the replaced one becomes previous)."""
    mlc = client(tracking_uri)
    previous = _alias_version(mlc, name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"registered model {name!r} has no '{PREVIOUS}' alias: nothing to "
                            "roll back to")
    current = _alias_version(mlc, name, CHAMPION)
    mlc.set_registered_model_alias(name, CHAMPION, str(previous.version))
    if current is not None:
        mlc.set_registered_model_alias(name, PREVIOUS, str(current.version))
    before = None if current is None else {"version": str(current.version),
                                           "top1": _tag_float(current, "top1"),
                                           "latency_ms": _tag_float(current, "latency_ms")}
    return Decision(name, str(previous.version), CHAMPION, True, "rollback to the previous champion",
                    {"top1": _tag_float(previous, "top1"),
                     "latency_ms": _tag_float(previous, "latency_ms")}, before)
