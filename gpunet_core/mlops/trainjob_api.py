"""The Kubernetes API calls of :func:`~gpunet_core.mlops.trainjob.run_trainjob`, with errors
that say what the cluster lacks.

Exactly these calls, which ``manifests/base/rbac.yaml`` grants and nothing more: ``trainjobs``
list, create and get (``trainer.kubeflow.org``), ``pods`` list and ``pods/log`` get. Refusals
become :class:`TrainJobError`: a 404 on the TrainJob API means Trainer v2 is not installed (told
apart from a missing namespace), a 403 names the RBAC verb and resource the service account
lacks (or is the Trainer webhook's denial), 400/422 carry the API server's or webhook's message.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gpunet_core.utils.errors import GpunetError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
NODE = "node"  # the torch-distributed runtime's replicatedJob and its container
FIELD_MANAGER = "gpunet-pipeline"
INSTALL_HINT = (
    "install Trainer v2.3.0 and its default runtimes: kubectl apply --server-side -k "
    "'https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0' && "
    "kubectl apply --server-side -k "
    "'https://github.com/kubeflow/trainer.git/manifests/overlays/runtimes?ref=v2.3.0' "
    "(see docs/cluster.md)")


class TrainJobError(GpunetError):
    """A TrainJob cannot be built, created or followed, or it failed."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status  # the API server's HTTP status, when it refused a request


def _status(exc: Any) -> tuple[int, str, dict]:
    """(HTTP status, message, details) of an ApiException, from its Status body when it has one."""
    code = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None) or ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return code, str(status.get("message") or exc.reason), status.get("details") or {}
    return code, (body.strip() or str(getattr(exc, "reason", ""))), {}


def api_error(exc: Any, *, verb: str, resource: str, group: str, namespace: str,
              name: str = "") -> TrainJobError:
    """A TrainJobError that says what the API server refused and how to fix it."""
    code, message, details = _status(exc)
    error = _explain(code, message, details, verb=verb, resource=resource, group=group,
                     namespace=namespace, name=name)
    error.status = code
    return error


def _runtime_hint(message: str) -> str:
    return f" ({INSTALL_HINT})" if "runtime" in message.lower() and "not found" in message else ""


def _explain(code: int, message: str, details: dict, *, verb: str, resource: str, group: str,
             namespace: str, name: str) -> TrainJobError:
    what = f"{verb} {resource}" + (f" {name}" if name else "") + f" in namespace {namespace}"
    if "admission webhook" in message:  # controller-runtime webhooks deny with 403 or 422
        return TrainJobError(f"Kubeflow Trainer rejected the TrainJob ({code}): {message}"
                             f"{_runtime_hint(message)}")
    if code == 404 and details.get("kind") == "namespaces":
        return TrainJobError(f"namespace {namespace} does not exist: deploy the stack there "
                             f"(make deploy) or pass the namespace it runs in ({message})")
    if code == 404 and resource == PLURAL and not name:
        return TrainJobError(
            f"Kubeflow Trainer v2 is not installed: the {API_VERSION} TrainJob API is missing "
            f"on this cluster ({INSTALL_HINT}); the API server answered 404 {message}")
    if code == 403:
        api_group = group or 'core ("")'
        return TrainJobError(
            f"forbidden: the pipeline's service account may not {what} ({message}); grant "
            f"verb {verb} on resource {resource} of API group {api_group} "
            "(manifests/base/rbac.yaml, Role gpunet-pipeline) and run the step as "
            "ServiceAccount gpunet-pipeline")
    if code == 401:
        return TrainJobError(f"the API server rejected our credentials (401) to {what}: "
                             f"{message}")
    if code in (400, 422):
        return TrainJobError(f"the API server rejected the request to {what} ({code}): "
                             f"{message}{_runtime_hint(message)}")
    return TrainJobError(f"cannot {what}: {code} {message}")


def is_transient(exc: BaseException) -> bool:
    """A failure worth another poll: 429/5xx, or no connection (API server restarting)."""
    if type(exc).__name__ == "ApiException":
        code = int(getattr(exc, "status", 0) or 0)
        return code in (0, 429) or code >= 500
    return isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3")


class TrainJobApi:
    """The calls run_trainjob makes in ``namespace``, each refusal a TrainJobError."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.host = getattr(api_client.configuration, "host", "?")

    def _call(self, fn, *args: Any, verb: str, resource: str, group: str = GROUP,
              name: str = "", passthrough: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; API refusals become TrainJobErrors, except transient ones
        and ``passthrough`` codes, which the caller handles (ApiException)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if is_transient(exc) or exc.status in passthrough:
                raise
            raise api_error(exc, verb=verb, resource=resource, group=group,
                            namespace=self.namespace, name=name) from None

    def list_trainjobs(self, selector: str) -> list[dict[str, Any]]:
        out = self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                         self.namespace, PLURAL, label_selector=selector, verb="list",
                         resource=PLURAL)
        return list(out.get("items") or [])

    def create_trainjob(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create ``body`` (strict field validation); a 409 (it exists) stays an ApiException."""
        return self._call(self.custom.create_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURAL, body, field_manager=FIELD_MANAGER,
                          field_validation="Strict", verb="create", resource=PLURAL,
                          passthrough=(409,))

    def get_trainjob(self, name: str) -> dict[str, Any]:
        return self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURAL, name, verb="get", resource=PLURAL, name=name)

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        # raw JSON: the typed models would reject the partial pods some servers return
        resp = self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                          _preload_content=False, verb="list", resource="pods", group="")
        return list(json.loads(resp.data).get("items") or [])

    def stream_log(self, pod: str, read_timeout_s: float) -> Any:
        """The open ``follow`` stream of container ``node``'s log, each line time-stamped."""
        return self._call(self.core.read_namespaced_pod_log, pod, self.namespace,
                          container=NODE, follow=True, timestamps=True, _preload_content=False,
                          _request_timeout=(30, read_timeout_s), verb="get",
                          resource="pods/log", group="", name=pod)


def connect(api_client: Any = None) -> tuple[Any, bool]:
    """``(client, we_own_it)``: the given client, else one from the pod's service account,
    else from the kubeconfig; TrainJobError when there is neither."""
    if api_client is not None:
        return api_client, False
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as in_cluster:
        try:
            # $KUBECONFIG read now: the client's default is frozen when it is first imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise TrainJobError(
                "no Kubernetes credentials for multi-node training: not running in a pod with "
                f"a service account ({in_cluster}) and no usable kubeconfig ($KUBECONFIG or "
                f"~/.kube/config: {exc}). Run the step in the cluster (ServiceAccount "
                "gpunet-pipeline) or point KUBECONFIG at it") from None
    return client.ApiClient(), True
