"""The MLflow client, with this project's environment defaults set before MLflow reads them."""

from __future__ import annotations

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
