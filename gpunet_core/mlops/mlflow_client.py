"""The MLflow client, with this project's environment defaults set before MLflow reads them."""

from __future__ import annotations

import contextlib
import os

# Keep MLflow's own HTTP retries short: our spool is the long-term retry.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Presigned S3 URLs name the store as the *server* sees it (e.g. in-cluster MinIO), which a
# client outside the cluster often cannot reach: download through the tracking server instead.
os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")


def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for ``tracking_uri``, else ``MLFLOW_TRACKING_URI``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


# MLflow 3's UI opens an experiment by its kind: without one it guesses, and an experiment with
# no traces yet looks like a GenAI one ("Agent versions"). Ours train models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# KFP >= 2.17's MLflow plugin hands every task its own (nested) run through these
PLUGIN_RUN_ENV = "MLFLOW_RUN_ID"


def ui_url(server: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment in its model-training view. MLflow 3.17's UI
    chooses between its GenAI and model-training views with a per-browser toggle (default
    GenAI) that overrides the experiment's kind; the ``workflowType`` query sets it."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def plugin_run_id() -> str | None:
    """The run KFP's MLflow plugin created for this task (``$MLFLOW_RUN_ID``), else None."""
    return os.environ.get(PLUGIN_RUN_ENV) or None


def ensure_experiment(mlc, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing; an
    existing one without a kind (e.g. created by KFP's plugin) gets it, a set kind is kept."""
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        return mlc.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    set_kind(mlc, exp.experiment_id, exp)
    return exp.experiment_id


def set_kind(mlc, experiment_id: str, exp=None) -> None:
    """Give ``experiment_id`` the model-training kind unless it has one."""
    exp = exp or mlc.get_experiment(experiment_id)
    if not exp.tags.get(EXPERIMENT_KIND_TAG):
        mlc.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's fluent functions (``mlflow.pytorch.log_model`` finalizes the LoggedModel
    through them) on ``uri`` for the duration; afterwards the previous global URI and
    ``$MLFLOW_TRACKING_URI`` (which ``mlflow.set_tracking_uri`` also writes) as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = previous
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
