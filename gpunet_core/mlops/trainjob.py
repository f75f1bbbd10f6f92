"""Multi-node training as a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``).

:func:`trainjob_manifest` builds the TrainJob for the ``torch-distributed``
ClusterTrainingRuntime: ``spec.trainer`` sets the image, ``torchrun -m gpunet_core train`` with
``gpunet train``'s argv, the environment (Secret/ConfigMap references from
:class:`~gpunet_core.mlops.cluster.PodSettings`), the node count, processes and resources per
node; one ``spec.runtimePatches`` entry (manager :data:`MANAGER`) patches the runtime's ``node``
pods with what ``spec.trainer`` cannot say: service account, pod and container security
context, a memory-backed ``/dev/shm``, node selector, tolerations and pod labels. Trainer's
torch plugin gives every node ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which torchrun reads as its defaults, so the
command carries only what must not vary: ``--max-restarts=0`` (a lost node fails the attempt;
the next attempt resumes from its checkpoint instead of the static rendezvous hanging).

:func:`run_trainjob` creates it (or re-attaches to it) and follows it to the end: see
:func:`run_trainjob` for the naming and re-attach rules, docs/cluster.md for the whole path.

We talk to the API server with the Kubernetes Python client, not the Kubeflow SDK
(``kubeflow`` / ``TrainerClient``): the body we validate against the v2.3.0 CRD in the tests is
exactly the body we create and the body ``gpunet trainjob`` prints (the SDK builds its own,
without runtime patches for our security context, labels and ``/dev/shm``); re-attaching by
label, strict field validation and RBAC-precise errors need the raw API anyway; and the SDK
would add a dependency with its own pins (``kubernetes<36``) to every image.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

from gpunet_core.mlops import podlogs
from gpunet_core.mlops.cluster import (
    PodSettings,
    container_security_context,
    is_dns_label,
    label_key_problem,
    label_value_problem,
    parse_quantity,
    pod_labels,
)
from gpunet_core.mlops.trainjob_api import (
    API_VERSION,
    GROUP,
    INSTALL_HINT,
    KIND,
    NODE,
    PLURAL,
    VERSION,
    TrainJobApi,
    TrainJobError,
    connect,
    is_transient,
)

_logger = logging.getLogger(__name__)

__all__ = ["API_VERSION", "GROUP", "INSTALL_HINT", "KIND", "PLURAL", "VERSION", "TrainJobError",
           "job_state", "run_label", "run_trainjob", "trainjob_labels", "trainjob_manifest",
           "trainjob_name"]

RUNTIME_KIND = "ClusterTrainingRuntime"
DEFAULT_RUNTIME = "torch-distributed"
MANAGER = "gpunet-pipeline.io/trainjob"  # owner of our runtimePatches entry
LABEL_RUN = "gpunet-pipeline.io/run"
LABEL_TASK = "gpunet-pipeline.io/task"
LABEL_ATTEMPT = "gpunet-pipeline.io/attempt"
ANNOTATION_RUN_ID = "gpunet-pipeline.io/run-id"  # the exact run id (the label may be shortened)
TORCHRUN = ("torchrun", "--max-restarts=0")
SHM_VOLUME = "dshm"

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_IMAGE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
_MAX_ARGS = 128  # the CRD's maxItems for spec.trainer.args
_MAX_TRANSIENT = 10  # consecutive failed polls (API server restarts, timeouts) before giving up


# --------------------------------------------------------------------------- names and labels


def _digest(run_id: str) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:10]


def _task(task: str) -> str:
    norm = task.lower().replace("_", "-") if isinstance(task, str) else ""
    if not norm or len(norm) > 30 or not is_dns_label(norm) or not norm[0].isalpha():
        raise TrainJobError(f"task {task!r}: use <= 30 letters, digits and '-', starting with a "
                            "letter (e.g. train-student)")
    return norm


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id.strip():
        raise TrainJobError("run_id must be a non-empty string (the KFP run id, or a name of "
                            "your own for a manual run)")


def trainjob_name(run_id: str, task: str, attempt: int) -> str:
    """``gpunet-<task>-<10 hex of sha256(run_id)>-<attempt>``: an RFC 1035 label <= 63 chars,
    the same for the same (run, task, attempt), different across runs, tasks and attempts."""
    _check_run_id(run_id)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise TrainJobError(f"attempt must be an integer >= 1, got {attempt!r}")
    name = f"gpunet-{_task(task)}-{_digest(run_id)}-{attempt}"
    if len(name) > 63:
        raise TrainJobError(f"TrainJob name {name} is longer than 63 characters (attempt "
                            f"{attempt} of task {task}); use a shorter task name")
    return name


def run_label(run_id: str) -> str:
    """``run_id`` as a label value: itself when it is one, else a cleaned prefix + its digest."""
    _check_run_id(run_id)
    if label_value_problem(run_id) is None:
        return run_id
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id)[:52].strip("-._")
    return f"{safe}-{_digest(run_id)}" if safe else _digest(run_id)


def trainjob_labels(run_id: str, task: str, attempt: int) -> dict[str, str]:
    """The labels that find every attempt of (run, task) again (see :func:`run_trainjob`)."""
    trainjob_name(run_id, task, attempt)  # validates all three
    return {LABEL_RUN: run_label(run_id), LABEL_TASK: _task(task), LABEL_ATTEMPT: str(attempt)}


# --------------------------------------------------------------------------- the manifest


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest_args(name: str, train_args: list[str], nodes: int, nproc_per_node: int,
                         image: str, settings: PodSettings, namespace: str | None,
                         runtime: str) -> None:
    if not isinstance(name, str) or len(name) > 63 or not _NAME.match(name):
        raise TrainJobError(f"TrainJob name {name!r} must be an RFC 1035 label: <= 63 lower-case "
                            "letters, digits or '-', starting with a letter")
    if not _int(nodes) or not 1 <= nodes <= 2 ** 31 - 1:
        raise TrainJobError(f"nodes must be an integer >= 1, got {nodes!r}")
    if not _int(nproc_per_node) or not 1 <= nproc_per_node <= 2 ** 31 - 1:
        raise TrainJobError(f"nproc_per_node must be an integer >= 1, got {nproc_per_node!r}")
    if not isinstance(settings, PodSettings):
        raise TrainJobError(f"settings must be PodSettings, got {type(settings).__name__}")
    if settings.gpus_per_node and nproc_per_node > settings.gpus_per_node:
        raise TrainJobError(f"nproc_per_node {nproc_per_node} > gpus_per_node "
                            f"{settings.gpus_per_node}: each process drives one GPU")
    if not isinstance(image, str) or not image or len(image) > 500 or not _IMAGE.match(image):
        raise TrainJobError(f"image {image!r} is not a container image reference such as "
                            "ghcr.io/gpunet-pipeline/gpunet-train:v1 (multi-node training runs "
                            "the training image on every node)")
    if not isinstance(train_args, (list, tuple)) or not all(isinstance(a, str)
                                                            for a in train_args):
        raise TrainJobError("train_args must be a list of strings (gpunet train's argv)")
    if len(train_args) > _MAX_ARGS:
        raise TrainJobError(f"{len(train_args)} train args: a TrainJob takes at most "
                            f"{_MAX_ARGS}")
    if namespace is not None and not is_dns_label(namespace):
        raise TrainJobError(f"namespace {namespace!r} is not a valid namespace name")
    if not isinstance(runtime, str) or not runtime or len(runtime) > 253:
        raise TrainJobError(f"runtime {runtime!r} must name a ClusterTrainingRuntime")


def _check_meta(what: str, mapping: dict[str, str] | None, values: bool) -> dict[str, str]:
    out = dict(mapping or {})
    for key, value in out.items():
        problem = label_key_problem(key) or (label_value_problem(value) if values else None)
        if not values and not isinstance(value, str):
            problem = "must be a string"
        if problem:
            raise TrainJobError(f"{what} {key!r}: {value!r}: {problem}")
    return out


def _omp_threads(settings: PodSettings, nproc_per_node: int) -> str:
    """CPU cores requested per process (torchrun would otherwise force OMP_NUM_THREADS=1)."""
    return str(max(1, int(parse_quantity(settings.cpu)) // nproc_per_node))


def trainjob_manifest(name: str, train_args: list[str], *, nodes: int, nproc_per_node: int,
                      image: str, settings: PodSettings, namespace: str | None = None,
                      labels: dict[str, str] | None = None, runtime: str = DEFAULT_RUNTIME,
                      annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob running ``gpunet train <train_args>`` on ``nodes`` x ``nproc_per_node``
    processes; :class:`TrainJobError` on a bad name, count, image or label."""
    _check_manifest_args(name, train_args, nodes, nproc_per_node, image, settings, namespace,
                         runtime)
    training = pod_labels("training")
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {**training, **_check_meta("label", labels, values=True)}
    if annotations:
        metadata["annotations"] = _check_meta("annotation", annotations, values=False)
    env = settings.env_vars()
    names = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in (
        ("PYTHONUNBUFFERED", "1"),  # log lines reach the pod log (and our stream) at once
        ("OMP_NUM_THREADS", _omp_threads(settings, nproc_per_node))) if k not in names]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": settings.service_account,
        "securityContext": settings.pod_security_context(),
        "containers": [{"name": NODE, "securityContext": container_security_context(),
                        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]}],
        "volumes": [{"name": SHM_VOLUME,
                     "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    node_patch = {"name": NODE, "template": {"spec": {"template": {
        "metadata": {"labels": training}, "spec": pod_spec}}}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime},
            "trainer": {
                "image": image,
                "command": [*TORCHRUN, "-m", "gpunet_core", "train"],
                "args": list(train_args),
                "env": env,
                "numNodes": nodes,
                "numProcPerNode": nproc_per_node,
                "resourcesPerNode": settings.resources(),
            },
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {
                "spec": {"replicatedJobs": [node_patch]}}}}],
        },
    }


# --------------------------------------------------------------------------- state


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """``(state, detail)``: Complete, Failed or Suspended from Trainer v2.3's condition types,
    else Running (a node pod is ready) or Pending."""
    for kind in ("Failed", "Complete", "Suspended"):
        cond = _condition(job, kind)
        if cond is not None:
            detail = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
            return kind, detail
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    return ("Running" if any(j.get("ready") for j in jobs) else "Pending"), ""


def _attempt_of(job: dict[str, Any]) -> int:
    try:
        return int(((job.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, ""))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- run


def _find_attempts(api: TrainJobApi, run_id: str, task: str) -> dict[int, dict[str, Any]]:
    """``{attempt: TrainJob}`` of (run, task); the name check makes a shortened run label exact."""
    selector = f"{LABEL_RUN}={run_label(run_id)},{LABEL_TASK}={_task(task)}"
    found = {}
    for job in api.list_trainjobs(selector):
        attempt = _attempt_of(job)
        if attempt >= 1 and job["metadata"].get("name") == trainjob_name(run_id, task, attempt):
            found[attempt] = job
    return found


def _last_lines(follower: podlogs.PodLogFollower) -> str:
    if not follower.tail:
        return " (no log lines from node rank 0 were seen)"
    return "; last log lines of node rank 0:\n" + "\n".join(follower.tail)


def _follow(api: TrainJobApi, name: str, attempt: int, *, poll_s: float,
            timeout_s: float) -> tuple[str, str]:
    """Wait for TrainJob ``name`` to end, logging its progress; ``(state, detail)`` at the end."""
    deadline = time.monotonic() + timeout_s
    follower = podlogs.PodLogFollower(
        lambda pod: api.stream_log(pod, read_timeout_s=max(60.0, 30 * poll_s)), name, poll_s)
    follower.start()
    last: tuple[str, str] | None = None
    warned: set[tuple[str, str, str]] = set()
    failures = 0
    try:
        while True:
            try:
                job = api.get_trainjob(name)
                pods = api.list_pods(f"{podlogs.JOBSET_NAME}={name}")
                failures = 0
            except TrainJobError as exc:
                if exc.status == 404:
                    raise TrainJobError(f"TrainJob {name} disappeared while we waited for it "
                                        f"(deleted, or Trainer uninstalled?): {exc}") from None
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                if failures >= _MAX_TRANSIENT:
                    raise TrainJobError(f"lost the Kubernetes API at {api.host} while following "
                                        f"TrainJob {name} ({failures} failed polls: {exc}); it "
                                        "may still be running: the next run of this step "
                                        "re-attaches to it") from None
                _logger.warning("TrainJob %s: poll failed (%s), retrying", name, exc)
                time.sleep(poll_s)
                continue
            state, detail = job_state(job)
            if (state, detail) != last:
                _logger.info("TrainJob %s (attempt %d): %s%s", name, attempt, state,
                             f" ({detail})" if detail else "")
                if state == "Suspended":
                    _logger.warning("TrainJob %s is suspended (queued by Kueue, or suspended by "
                                    "hand): waiting for it to resume", name)
                last = (state, detail)
            follower.pod = podlogs.master_pod(pods)
            for pod in pods:
                for reason, message in podlogs.pod_problems(pod):
                    key = (pod["metadata"]["name"], reason, message)
                    if key not in warned:
                        warned.add(key)
                        _logger.warning("TrainJob %s: pod %s is not running: %s %s", name,
                                        key[0], reason, message)
            if state in ("Complete", "Failed"):
                follower.finish(wait_s=max(5.0, 5 * poll_s))
                if state == "Failed":
                    raise TrainJobError(
                        f"TrainJob {name} (attempt {attempt}) in namespace {api.namespace} "
                        f"failed: {detail or 'no reason given; kubectl describe trainjob'}"
                        f"{_last_lines(follower)}\nThe next run of this step starts attempt "
                        f"{attempt + 1}, resuming from the last checkpoint.")
                return state, detail
            if time.monotonic() >= deadline:
                raise TrainJobError(
                    f"TrainJob {name} did not finish within {timeout_s:.0f} s (state {state}); "
                    f"it keeps running: kubectl -n {api.namespace} get trainjob {name}. The "
                    "next run of this step re-attaches to it")
            time.sleep(poll_s)
    finally:
        follower.stop()


def run_trainjob(train_args: list[str], *, run_id: str, task: str, nodes: int,
                 nproc_per_node: int, image: str, settings: PodSettings,
                 namespace: str = "gpunet", poll_s: float = 10.0,
                 timeout_s: float = 7 * 24 * 3600, api_client: Any = None) -> dict[str, Any]:
    """Run ``gpunet train <train_args>`` as a TrainJob and wait for it.

    Attempts of (``run_id``, ``task``) are TrainJobs named :func:`trainjob_name` and labelled
    :func:`trainjob_labels`. When the newest attempt is still running, we follow it instead of
    starting another; when it completed, we return at once; when it failed (or there is none),
    we create the next attempt, which resumes from its checkpoint when ``train_args`` has
    ``--auto-resume``. A name conflict on create (a concurrent step made it) re-attaches.

    Returns ``{"trainjob", "attempt", "state": "Complete", "reattached"}``; raises
    :class:`TrainJobError` when the attempt fails (with its message and the last log lines of
    node rank 0), on timeout, and when the cluster lacks Trainer v2, the namespace or RBAC.
    """
    trainjob_name(run_id, task, 1)  # bad run id / task: fail before any connection
    trainjob_manifest(trainjob_name(run_id, task, 1), train_args, nodes=nodes,
                      nproc_per_node=nproc_per_node, image=image, settings=settings,
                      namespace=namespace)
    client, owned = connect(api_client)
    try:
        api = TrainJobApi(client, namespace)
        try:
            attempts = _find_attempts(api, run_id, task)
        except TrainJobError:
            raise
        except Exception as exc:  # no connection, or 5xx on the first call
            raise TrainJobError(f"cannot reach the Kubernetes API server at {api.host}: "
                                f"{exc}") from None
        newest = max(attempts, default=0)
        reattached = False
        if newest:
            state, detail = job_state(attempts[newest])
            name = trainjob_name(run_id, task, newest)
            if state == "Complete":
                _logger.info("TrainJob %s (attempt %d) already completed", name, newest)
                return {"trainjob": name, "attempt": newest, "state": "Complete",
                        "reattached": True}
            if state != "Failed":
                _logger.info("re-attaching to TrainJob %s (attempt %d, %s)", name, newest, state)
                reattached = True
            else:
                _logger.info("TrainJob %s (attempt %d) failed (%s): starting attempt %d", name,
                             newest, detail or "no reason given", newest + 1)
        attempt = newest if reattached else newest + 1
        name = trainjob_name(run_id, task, attempt)
        if not reattached:
            if attempt > 1 and "--auto-resume" not in train_args:
                _logger.warning("attempt %d runs without --auto-resume: it starts from "
                                "scratch", attempt)
            body = trainjob_manifest(
                name, train_args, nodes=nodes, nproc_per_node=nproc_per_node, image=image,
                settings=settings, namespace=namespace,
                labels=trainjob_labels(run_id, task, attempt),
                annotations={ANNOTATION_RUN_ID: run_id})
            try:
                api.create_trainjob(body)
                _logger.info("created TrainJob %s in %s: %d node(s) x %d process(es), image %s",
                             name, namespace, nodes, nproc_per_node, image)
            except TrainJobError:
                raise
            except Exception as exc:
                if getattr(exc, "status", None) != 409:
                    raise TrainJobError(f"cannot create TrainJob {name} at {api.host}: "
                                        f"{exc}") from None
                _logger.info("TrainJob %s already exists (a concurrent attempt): "
                             "re-attaching", name)
                reattached = True
        state, _ = _follow(api, name, attempt, poll_s=poll_s, timeout_s=timeout_s)
        return {"trainjob": name, "attempt": attempt, "state": state, "reattached": reattached}
    finally:
        if owned:
            client.close()
