"""The MLflow client, with this project's environment defaults set before MLflow reads them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from gpunet_core.utils.errors import GpunetError

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


# --------------------------------------------------------------------------- errors
#
# "The server did not answer" and "the server answered: no such thing" need different fixes,
# so every caller that turns an MLflow failure into a message asks :func:`unreachable` first.

class MlflowUnreachableError(GpunetError):
    """The MLflow tracking server cannot be reached (refused, unknown host, timed out)."""


# how requests/urllib3 word a failure to reach a server, and what the user is told
_UNREACHABLE = (("connection refused", "connection refused"),
                ("failed to establish a new connection", "no connection"),
                ("name or service not known", "unknown host"),
                ("nodename nor servname", "unknown host"),
                ("temporary failure in name resolution", "unknown host"),
                ("no route to host", "no route to host"),
                ("network is unreachable", "network unreachable"),
                ("read timed out", "timed out"), ("connect timeout", "timed out"),
                ("connection aborted", "connection aborted"),
                ("remotedisconnected", "connection closed"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` means that the server was not reached (``connection refused``, ``unknown
    host``, ``timed out``...); None when it answered (not found, denied, a server error)."""
    for link in _chain(exc):
        text = f"{type(link).__name__}: {link}".lower()
        for needle, reason in _UNREACHABLE:
            if needle in text:
                return reason
        if isinstance(link, (ConnectionError, TimeoutError)):
            return "no connection"
    return None


def not_found(exc: BaseException) -> bool:
    """Whether the server answered that the thing asked for does not exist."""
    code = getattr(exc, "error_code", None)
    return code == "RESOURCE_DOES_NOT_EXIST" or getattr(exc, "get_http_status_code",
                                                         lambda: None)() == 404


def server_uri(mlc=None) -> str:
    """The tracking URI ``mlc`` (a client, or a URI) talks to, else the environment's."""
    if isinstance(mlc, str):
        return mlc
    return str(getattr(mlc, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
               or "the default ./mlruns")


def unreachable_error(uri: str, reason: str) -> MlflowUnreachableError:
    return MlflowUnreachableError(
        f"cannot reach MLflow at {uri} ({reason}): start the tracking server, or point "
        "MLFLOW_TRACKING_URI at a running one")


def raise_if_unreachable(exc: BaseException, mlc=None) -> None:
    """Raise :class:`MlflowUnreachableError` when ``exc`` is a failure to reach the server of
    ``mlc``; return otherwise (the caller then reports what the server answered)."""
    reason = unreachable(exc)
    if reason:
        raise unreachable_error(server_uri(mlc), reason) from None


@contextlib.contextmanager
def reaching(mlc=None) -> Iterator[None]:
    """Turn a failure to reach the server of ``mlc`` inside the block into
    :class:`MlflowUnreachableError`; everything else passes through unchanged."""
    try:
        yield
    except GpunetError:
        raise
    except Exception as exc:
        raise_if_unreachable(exc, mlc)
        raise


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
