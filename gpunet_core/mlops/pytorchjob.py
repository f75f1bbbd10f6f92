"""Multi-node training through the Kubeflow Training Operator (``PyTorchJob``).

:func:`pytorchjob_manifest` builds the custom resource (torchrun elastic: the operator sets
``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR`` and ``nprocPerNode``), and
:func:`run_pytorchjob` creates it with the Kubernetes Python client, streams its status and
fails clearly when it fails.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gpunet_core.utils.errors import GpunetError

_logger = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


class PyTorchJobError(GpunetError):
    """The PyTorchJob could not be created or did not succeed."""


def pytorchjob_manifest(name: str, train_args: list[str], *, nodes: int, nproc_per_node: int,
                        image: str, gpus_per_node: int | None = None,
                        service_account: str = "gpunet-pipeline",
                        env_from_secrets: tuple[str, ...] = ("gpunet-s3", "gpunet-mlflow-auth"),
                        config_map: str = "gpunet-config", data_pvc: str = "gpunet-dataset-cache",
                        backoff_limit: int = 3, shm_size: str = "16Gi") -> dict[str, Any]:
    """The PyTorchJob for ``nodes`` x ``nproc_per_node`` workers running ``gpunet train``."""
    if nodes < 1 or nproc_per_node < 1:
        raise PyTorchJobError(f"nodes and nproc_per_node must be >= 1, got {nodes} x "
                              f"{nproc_per_node}")
    gpus = nproc_per_node if gpus_per_node is None else gpus_per_node
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "16Gi"},
                                 "limits": {"cpu": "16", "memory": "64Gi"}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": "pytorch",
        "image": image,
        "command": ["torchrun", "-m", "gpunet_core", "train"],
        "args": list(train_args),
        "envFrom": [{"configMapRef": {"name": config_map}}]
        + [{"secretRef": {"name": s}} for s in env_from_secrets],
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "metadata": {"labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "serviceAccountName": service_account,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": data_pvc}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
        },
    }
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure",
                                           "template": pod}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure",
                              "template": pod}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name[:63].lower().replace("_", "-"),
                     "labels": {"app.kubernetes.io/part-of": "gpunet-pipeline"}},
        "spec": {
            "nprocPerNode": str(nproc_per_node),
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": nodes,
                              "maxReplicas": nodes, "maxRestarts": backoff_limit},
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }


def _condition(job: dict[str, Any]) -> tuple[str, str]:
    conditions = (job.get("status") or {}).get("conditions") or []
    for cond in reversed(conditions):
        if cond.get("status") == "True":
            return cond.get("type", ""), cond.get("message", "")
    return "Pending", ""


def run_pytorchjob(train_args: list[str], *, nodes: int, nproc_per_node: int, image: str,
                   namespace: str = "gpunet", name: str = "gpunet-train",
                   poll_s: float = 10.0, timeout_s: float = 7 * 24 * 3600) -> dict[str, Any]:
    """Create the PyTorchJob, wait for it (logging status changes), fail clearly on failure."""
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
    except ImportError as exc:  # pragma: no cover - kubernetes is a dependency
        raise PyTorchJobError(f"the kubernetes client is missing: {exc}") from None
    if not image:
        raise PyTorchJobError("multi-node training needs the training image (image=...)")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as exc:
            raise PyTorchJobError(f"nodes > 1 needs a Kubernetes cluster with the Training "
                                  f"Operator, but no cluster credentials were found ({exc})") from None
    api = client.CustomObjectsApi()
    body = pytorchjob_manifest(name, train_args, nodes=nodes, nproc_per_node=nproc_per_node,
                               image=image)
    job_name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as exc:
        raise PyTorchJobError(f"cannot create PyTorchJob {job_name} in {namespace}: "
                              f"{exc.status} {exc.reason} (is the Training Operator installed?)") from None
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job_name)
        state, message = _condition(job)
        if state != last:
            _logger.info("PyTorchJob %s: %s %s", job_name, state, message)
            last = state
        if state == "Succeeded":
            return {"pytorchjob": job_name, "state": state}
        if state == "Failed":
            raise PyTorchJobError(f"PyTorchJob {job_name} failed: {message or 'see its pods'}")
        time.sleep(poll_s)
    raise PyTorchJobError(f"PyTorchJob {job_name} did not finish within {timeout_s:.0f}s")
