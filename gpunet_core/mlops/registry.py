"""MLflow model registry: register trained GPUNets and promote them with aliases.

One registered-model version holds both flavors of a trained model: ``pytorch`` (the module,
for ``mlflow.pytorch.load_model``) and ``onnx`` (the exported file, for ``mlflow.onnx`` and ONNX
Runtime), each with the same signature and input example. Versions carry their measured
``top1`` and ``latency_ms`` as tags, which promotion compares. Training logs the ``pytorch``
flavor to its own run (:func:`log_pytorch_model`); registration adds the ``onnx`` flavor and
builds the ``pytorch`` one only when the run does not already hold the checkpoint's model.
A registered version's folder is never rewritten: later registrations from the same run get
folders of their own.

Promotion uses MLflow 3 aliases (no deprecated stages): the candidate becomes ``champion`` only
when its top-1 reaches the minimum, its latency fits the budget and it beats the current champion
by the margin; else it becomes ``challenger`` with the reason as a tag. Moving an alias is one
registry call, so there is never a moment with two champions or none; the replaced champion
keeps the ``previous-champion`` alias, which :func:`rollback` restores.
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

from gpunet_core.mlops.mlflow_client import client
from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import sha256_file

_logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
PIP_REQUIREMENTS = ["torch", "onnxruntime", "numpy", "gpunet-pipeline"]


class RegistryError(GpunetError):
    """The MLflow registry is unreachable or does not hold what was asked for."""


class ModelBuildError(RegistryError):
    """A checkpoint could not be built into an MLflow model: its weights or model, not the
    server (so retrying the upload cannot help)."""


MODEL_PATH = "model"  # the run's artifact folder that holds the MLflow model
CHECKPOINT_TAG = "gpunet.model_checkpoint_sha256"  # which checkpoint the logged model is
IMG_SIZE_TAG = "gpunet.model_img_size"  # the resolution of its signature


def build_pytorch_model_dir(model, img_size: int, dest: str | Path) -> Path:
    """An MLflow model directory with the ``pytorch`` flavor, its signature and input example."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    dest = Path(dest)
    model = model.eval()
    example = np.random.default_rng(0).random((1, 3, img_size, img_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    # pickle keeps the GPUNet module itself (any batch size, its attributes); torch.export's
    # "pt2" would specialise the batch dimension to the example's
    mlflow.pytorch.save_model(model, dest, signature=infer_signature(example, output),
                              input_example=example, pip_requirements=PIP_REQUIREMENTS,
                              serialization_format="pickle")
    return dest


def add_onnx_flavor(model_dir: str | Path, onnx_path: str | Path) -> Path:
    """Add the ``onnx`` flavor (the exported file, same signature) to an MLflow model directory."""
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
    merged.save(model_dir / "MLmodel")
    return model_dir


def _upload_model_dir(mlc, run_id: str, model_dir: Path, folder: str = MODEL_PATH) -> None:
    """Upload ``model_dir`` to the run's ``folder``, ``MLmodel`` last: a folder whose
    ``MLmodel`` is there is complete."""
    for entry in sorted(model_dir.iterdir()):
        if entry.name == "MLmodel":
            continue
        if entry.is_dir():
            mlc.log_artifacts(run_id, str(entry), artifact_path=f"{folder}/{entry.name}")
        else:
            mlc.log_artifact(run_id, str(entry), artifact_path=folder)
    mlc.log_artifact(run_id, str(model_dir / "MLmodel"), artifact_path=folder)


def checkpoint_model_dir(checkpoint: str | Path, *, model_name: str, img_size: int,
                         dest: str | Path) -> Path:
    """:func:`build_pytorch_model_dir` for ``checkpoint``'s weights (as validation loads them);
    :class:`ModelBuildError` when the weights or the model fail."""
    # torch: only when the run lacks the checkpoint's model (promotion usually needs no torch)
    from gpunet_core.inference.validate import load_inference_model

    try:
        return build_pytorch_model_dir(load_inference_model(model_name, checkpoint), img_size,
                                       dest)
    except Exception as exc:
        raise ModelBuildError(str(exc)) from exc


def log_pytorch_model(run_id: str, checkpoint: str | Path, *, model_name: str, img_size: int,
                      tracking_uri: str | None = None, mlc=None) -> None:
    """Log ``checkpoint``'s model (``pytorch`` flavor) to the run's ``model`` folder.

    Training does this at its end (:meth:`gpunet_core.mlops.tracking.RunTracker.log_model`), where
    torch and the weights are at hand, so that :func:`register` needs no torch. The run's tags
    name the checkpoint (sha256) and resolution, which :func:`register` checks before it reuses
    the folder; they are cleared first and set after the upload, so they never describe a
    partial one.
    """
    mlc = mlc or client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = checkpoint_model_dir(checkpoint, model_name=model_name,
                                         img_size=img_size, dest=Path(tmp) / MODEL_PATH)
        stale = mlc.get_run(run_id).data.tags
        for key in (CHECKPOINT_TAG, IMG_SIZE_TAG):
            if key in stale:
                mlc.delete_tag(run_id, key)
        _upload_model_dir(mlc, run_id, model_dir)
    mlc.set_tag(run_id, CHECKPOINT_TAG, sha256_file(checkpoint))
    mlc.set_tag(run_id, IMG_SIZE_TAG, str(img_size))
    _logger.info("logged the model (pytorch flavor) to run %s", run_id)


def _logged_model_matches(run, checkpoint: str | Path, img_size: int) -> bool:
    tags = run.data.tags
    return (tags.get(IMG_SIZE_TAG) == str(img_size)
            and tags.get(CHECKPOINT_TAG) == sha256_file(checkpoint))


def _registered_folders(mlc, run) -> set[str]:
    """The run's artifact folders that registered versions (of any model) point at."""
    run_id = run.info.run_id
    prefixes = (f"{run.info.artifact_uri.rstrip('/')}/", f"runs:/{run_id}/")
    return {version.source[len(prefix):].strip("/")
            for version in mlc.search_model_versions(f"run_id = '{run_id}'")
            for prefix in prefixes if version.source.startswith(prefix)}


def _free_folder(mlc, run_id: str, taken: set[str]) -> str:
    """A new folder for a registration: ``model-2``, ``model-3``, ... (one not in the run yet,
    so a partial upload left by an interrupted registration is never mixed into it)."""
    present = {Path(f.path).name for f in mlc.list_artifacts(run_id)} | taken
    n = 2
    while f"{MODEL_PATH}-{n}" in present:
        n += 1
    return f"{MODEL_PATH}-{n}"


def register(run_id: str, checkpoint: str | Path, onnx_path: str | Path, *, model_name: str,
             name: str, img_size: int, tags: dict[str, Any],
             tracking_uri: str | None = None) -> str:
    """Register the run's model with both flavors; returns the new version.

    The ``pytorch`` flavor is the one training logged when it is ``checkpoint``'s model at
    ``img_size`` (no torch needed here); otherwise it is built from ``checkpoint`` now.
    The ``onnx`` flavor is added from ``onnx_path``.

    A registered version's files are never rewritten: the first registration from a run uses
    its ``model`` folder; once a version points there, later ones from the same run (another
    export, checkpoint or resolution) get a folder of their own (``model-2``, ...), copied
    from ``model`` when it holds the checkpoint's model, else built.
    """
    from mlflow.exceptions import MlflowException

    mlc = client(tracking_uri)
    run = mlc.get_run(run_id)
    reuse = _logged_model_matches(run, checkpoint, img_size)
    taken = _registered_folders(mlc, run)
    folder = MODEL_PATH if MODEL_PATH not in taken else _free_folder(mlc, run_id, taken)
    with tempfile.TemporaryDirectory() as tmp:
        if folder == MODEL_PATH:  # the run's own folder, not registered yet
            if reuse:
                _logger.info("run %s already holds %s's model: adding the onnx flavor",
                             run_id, checkpoint)
            else:
                log_pytorch_model(run_id, checkpoint, model_name=model_name,
                                  img_size=img_size, mlc=mlc)
            model_dir = Path(tmp) / MODEL_PATH  # only MLmodel: the rest stays in place
            model_dir.mkdir()
            mlmodel = mlc.download_artifacts(run_id, f"{MODEL_PATH}/MLmodel", str(model_dir))
            if Path(mlmodel) != model_dir / "MLmodel":
                shutil.move(mlmodel, model_dir / "MLmodel")
        elif reuse:
            _logger.info("run %s's model folder is registered already: copying %s's model "
                         "to %s", run_id, checkpoint, folder)
            model_dir = Path(mlc.download_artifacts(run_id, MODEL_PATH, tmp))
        else:
            model_dir = checkpoint_model_dir(checkpoint, model_name=model_name,
                                             img_size=img_size, dest=Path(tmp) / folder)
        add_onnx_flavor(model_dir, onnx_path)
        _upload_model_dir(mlc, run_id, model_dir, folder)
    try:
        mlc.get_registered_model(name)
    except MlflowException:
        mlc.create_registered_model(name, description="GPUNet models trained by gpunet-pipeline")
    source = f"{run.info.artifact_uri}/{folder}"
    version = mlc.create_model_version(name, source, run_id=run_id,
                                       tags={k: str(v) for k, v in tags.items()})
    _logger.info("registered %s version %s (%s)", name, version.version, source)
    return str(version.version)


@dataclass
class Decision:
    """The outcome of a promotion or rollback, for reports and JSON."""

    model: str
    version: str
    alias: str
    promoted: bool
    reason: str
    candidate: dict[str, float | None]
    previous_champion: dict[str, Any] | None
    thresholds: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def markdown(self) -> str:
        lines = [f"# Promotion of `{self.model}` version {self.version}", "",
                 f"**Decision:** `{self.alias}` — {self.reason}", "",
                 "| | top-1 % | latency ms |", "|---|---:|---:|",
                 f"| candidate v{self.version} | {_fmt(self.candidate.get('top1'))} | "
                 f"{_fmt(self.candidate.get('latency_ms'))} |"]
        if self.previous_champion:
            pc = self.previous_champion
            lines.append(f"| champion before v{pc['version']} | {_fmt(pc.get('top1'))} | "
                         f"{_fmt(pc.get('latency_ms'))} |")
        else:
            lines.append("| champion before | none | |")
        lines += ["", "Thresholds: " + ", ".join(f"{k} = {_fmt(v)}"
                                                  for k, v in self.thresholds.items())]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _alias_version(mlc, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _tag_float(version, key: str) -> float | None:
    value = (version.tags or {}).get(key)
    return float(value) if value not in (None, "") else None


def promote(name: str, version: str, *, min_top1: float = 0.0,
            max_latency_ms: float | None = None, margin: float = 0.0,
            tracking_uri: str | None = None) -> Decision:
    """Give ``version`` the ``champion`` alias if it qualifies, else ``challenger``."""
    from mlflow.exceptions import MlflowException

    mlc = client(tracking_uri)
    try:
        candidate = mlc.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} has no version {version}: "
                            f"{str(exc).splitlines()[0]}") from None
    top1, latency = _tag_float(candidate, "top1"), _tag_float(candidate, "latency_ms")
    if top1 is None:
        raise RegistryError(f"{name} version {version} has no 'top1' tag: register it with its "
                            "validation result first")
    champion = _alias_version(mlc, name, CHAMPION)
    before = None
    if champion is not None:
        before = {"version": str(champion.version), "top1": _tag_float(champion, "top1"),
                  "latency_ms": _tag_float(champion, "latency_ms")}
    thresholds = {"min_top1": min_top1, "max_latency_ms": max_latency_ms, "margin": margin}
    if before and before["version"] == str(version):  # nothing to move, nothing to re-tag
        return Decision(name, str(version), CHAMPION, False, "it already is the champion",
                        {"top1": top1, "latency_ms": latency}, before, thresholds)
    reasons = []
    if top1 < min_top1:
        reasons.append(f"top-1 {top1:.2f} is below the minimum {min_top1:.2f}")
    if max_latency_ms is not None and (latency is None or latency > max_latency_ms):
        reasons.append(f"latency {_fmt(latency)} ms exceeds the budget {max_latency_ms:.4g} ms")
    if before and before["top1"] is not None and top1 < before["top1"] + margin:
        reasons.append(f"top-1 {top1:.2f} does not beat champion v{before['version']} "
                       f"({before['top1']:.2f}) by the margin {margin:.2f}")
    if reasons:
        mlc.set_registered_model_alias(name, CHALLENGER, str(version))
        mlc.set_model_version_tag(name, str(version), "promotion", "challenger: " + "; ".join(reasons))
        return Decision(name, str(version), CHALLENGER, False, "; ".join(reasons),
                        {"top1": top1, "latency_ms": latency}, before, thresholds)
    if champion is not None:
        mlc.set_registered_model_alias(name, PREVIOUS, str(champion.version))
    mlc.set_registered_model_alias(name, CHAMPION, str(version))  # one atomic move
    reason = ("first champion" if champion is None else
              f"beats champion v{champion.version} by {top1 - (before['top1'] or 0):.2f} points")
    mlc.set_model_version_tag(name, str(version), "promotion", "champion: " + reason)
    return Decision(name, str(version), CHAMPION, True, reason,
                    {"top1": top1, "latency_ms": latency}, before, thresholds)


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
