"""A stand-in for a Kubernetes API server with Kubeflow Trainer v2.3.0, on 127.0.0.1.

No real API server (kind, envtest, a cluster) can run in these tests, so this one plays it, for
exactly the endpoints :func:`gpunet_core.mlops.trainjob.run_trainjob` calls:

- ``trainer.kubeflow.org/v1alpha1`` ``trainjobs``: create, get, list (``labelSelector``);
- core ``pods``: list (``labelSelector``), get; ``pods/log``: get, with ``follow`` (a chunked
  stream that delivers lines as the test writes them) and ``timestamps``.

Where our code depends on the real server's behaviour it answers the same way: ``Status``
bodies; a plain-text ``404 page not found`` for the whole ``trainer.kubeflow.org`` group when
the CRD is missing (:attr:`FakeK8s.trainer_installed`); 404 ``namespaces "x" not found`` on
create in a missing namespace but an empty list on list; 409 AlreadyExists; 403 with RBAC's
wording for a denied (verb, resource) (:attr:`FakeK8s.denied`); 422 Invalid for a body the
strict TrainJob schema refuses and 403 ``admission webhook ... denied the request`` for what
Trainer's webhook refuses (both from tests/trainjob_schema.py); 400 for the log of a container
that is waiting to start. Every request is recorded as RBAC sees it: (verb, API group,
resource[/subresource]).

It does not run Trainer, JobSet, the scheduler or the kubelet: a test plays them, with
:meth:`FakeK8s.set_condition`, :meth:`FakeK8s.add_node_pod`, :meth:`FakeK8s.log` and friends,
usually from an :attr:`FakeK8s.on_create` hook. It does not check authentication, resource
versions, field selectors, watches or any other endpoint (they answer 404 or 405).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests import trainjob_schema

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class Recorded:
    verb: str
    group: str
    resource: str  # "pods/log" for a subresource, as RBAC names it
    namespace: str
    name: str
    query: dict


@dataclass
class _Log:
    """One container instance's log: (time, line) pairs; ``closed`` once it terminated."""

    lines: list[tuple[datetime.datetime, str]] = field(default_factory=list)
    closed: bool = False
    broken: int = 0  # bumped to cut the open follow streams (a dropped connection)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 plain: bool = False):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.plain = details or {}, plain

    def body(self) -> bytes:
        if self.plain:
            return self.message.encode()
        return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "message": self.message, "reason": self.reason,
                           "details": self.details, "code": self.code}).encode()


def _flag(query: dict, name: str) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool)."""
    return query.get(name, ["false"])[0] in ("1", "t", "T", "true", "TRUE", "True")


def _matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r} (this "
                                              "stand-in supports =, == and != only)")
    return True


class FakeK8s:
    """The server's state; tests read :attr:`requests` and drive jobs and pods."""

    def __init__(self) -> None:
        self.server: ThreadingHTTPServer | None = None
        self.lock = threading.Condition()
        self.requests: list[Recorded] = []
        self.namespaces: set[str] = {"gpunet"}
        self.trainer_installed = True
        self.denied: set[tuple[str, str]] = set()  # (verb, resource) RBAC refuses
        self.user = "system:serviceaccount:gpunet:gpunet-pipeline"
        self.trainjobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], _Log] = {}
        self.on_create: list[Callable[[dict], None]] = []  # run in a thread after a create
        self.closing = False
        self._clock = itertools.count(1)
        self._uid = itertools.count(1)

    # ------------------------------------------------------------------ for tests

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self) -> Any:
        from kubernetes import client

        config = client.Configuration()
        config.host = self.host
        return client.ApiClient(config)

    def seen(self) -> set[tuple[str, str, str]]:
        """Every (verb, API group, resource) requested so far, as RBAC sees it."""
        return {(r.verb, r.group, r.resource) for r in self.requests}

    def created(self) -> list[dict]:
        return [copy.deepcopy(j) for j in self.trainjobs.values()]

    def _now(self) -> datetime.datetime:
        return EPOCH + datetime.timedelta(microseconds=next(self._clock) * 1500)

    def _stamp(self) -> str:
        return self._now().strftime("%Y-%m-%dT%H:%M:%SZ")

    def add_trainjob(self, job: dict, namespace: str = "gpunet") -> dict:
        """Store ``job`` as if created earlier (by another step process)."""
        with self.lock:
            return self._store(namespace, job)

    def _store(self, namespace: str, job: dict) -> dict:
        job = trainjob_schema.with_defaults(job)
        meta = job["metadata"]
        meta.update(namespace=namespace, uid=f"uid-{next(self._uid)}", resourceVersion="1",
                    generation=1, creationTimestamp=self._stamp())
        for patch in job["spec"].get("runtimePatches") or []:
            patch.setdefault("time", meta["creationTimestamp"])  # Trainer's defaulting webhook
        job.setdefault("status", {})
        self.trainjobs[namespace, meta["name"]] = job
        return copy.deepcopy(job)

    def set_condition(self, name: str, kind: str, status: str = "True", reason: str = "",
                      message: str = "", namespace: str = "gpunet") -> None:
        """Set TrainJob condition ``kind`` (Complete, Failed, Suspended), as Trainer does."""
        with self.lock:
            conds = self.trainjobs[namespace, name]["status"].setdefault("conditions", [])
            conds[:] = [c for c in conds if c["type"] != kind]
            conds.append({"type": kind, "status": status, "reason": reason, "message": message,
                          "lastTransitionTime": self._stamp()})

    def set_jobs_status(self, name: str, ready: int, namespace: str = "gpunet") -> None:
        with self.lock:
            self.trainjobs[namespace, name]["status"]["jobsStatus"] = [
                {"name": "node", "active": 1, "ready": ready, "succeeded": 0, "failed": 0,
                 "suspended": 0}]

    def add_node_pod(self, job: str, rank: int = 0, *, phase: str = "Pending",
                     namespace: str = "gpunet", attempt: int = 0) -> str:
        """A pod of the TrainJob's ``node`` job labelled as JobSet and the Job controller do."""
        name = f"{job}-node-0-{rank}-{attempt:05d}"
        index = str(rank)
        with self.lock:
            self.pods[namespace, name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": namespace, "uid": f"uid-{next(self._uid)}",
                    "creationTimestamp": self._stamp(),
                    "labels": {"jobset.sigs.k8s.io/jobset-name": job,
                               "jobset.sigs.k8s.io/replicatedjob-name": "node",
                               "jobset.sigs.k8s.io/job-index": "0",
                               "batch.kubernetes.io/job-completion-index": index,
                               "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": index}},
                "spec": {"containers": [{"name": "node", "image": "x"}]},
                "status": {"phase": phase, "containerStatuses": [{
                    "name": "node", "restartCount": 0, "ready": phase == "Running",
                    "state": {"waiting": {"reason": "ContainerCreating"}}}]}}
            self.logs[namespace, name] = _Log()
            if phase != "Pending":
                self._set_phase(namespace, name, phase)
        return name

    def _set_phase(self, namespace: str, pod: str, phase: str) -> None:
        obj = self.pods[namespace, pod]
        obj["status"]["phase"] = phase
        cs = obj["status"]["containerStatuses"][0]
        if phase == "Running":
            cs.update(ready=True, state={"running": {"startedAt": self._stamp()}})
        elif phase in ("Succeeded", "Failed"):
            code = 0 if phase == "Succeeded" else 1
            cs.update(ready=False, state={"terminated": {"exitCode": code,
                                                         "reason": "Completed" if not code
                                                         else "Error"}})
            self.logs[namespace, pod].closed = True
        self.lock.notify_all()

    def set_pod_phase(self, pod: str, phase: str, namespace: str = "gpunet") -> None:
        """Running starts the container; Succeeded/Failed end it (and its log streams)."""
        with self.lock:
            self._set_phase(namespace, pod, phase)

    def set_pod_waiting(self, pod: str, reason: str, message: str = "", *,
                        unschedulable: bool = False, namespace: str = "gpunet") -> None:
        """A Pending pod that the scheduler cannot place, or whose container cannot start."""
        with self.lock:
            status = self.pods[namespace, pod]["status"]
            if unschedulable:
                status["conditions"] = [{"type": "PodScheduled", "status": "False",
                                         "reason": reason, "message": message}]
            else:
                status["containerStatuses"][0]["state"] = {"waiting": {"reason": reason,
                                                                       "message": message}}

    def restart_container(self, pod: str, namespace: str = "gpunet") -> None:
        """The kubelet restarted the container: a new log, the old streams end."""
        with self.lock:
            self.logs[namespace, pod].closed = True
            self.logs[namespace, pod] = _Log()
            cs = self.pods[namespace, pod]["status"]["containerStatuses"][0]
            cs["restartCount"] += 1
            cs["state"] = {"running": {"startedAt": self._stamp()}}
            self.lock.notify_all()

    def break_streams(self, pod: str, namespace: str = "gpunet") -> None:
        """Drop the open follow connections of ``pod``'s log (the container keeps running)."""
        with self.lock:
            self.logs[namespace, pod].broken += 1
            self.lock.notify_all()

    def log(self, pod: str, *lines: str, namespace: str = "gpunet") -> None:
        with self.lock:
            log = self.logs[namespace, pod]
            for line in lines:
                log.lines.append((self._now(), line))
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # ------------------------------------------------------------------ API

    def _trainjobs(self, verb: str, namespace: str, name: str, query: dict, body: Any) -> Any:
        if verb == "list":
            selector = query.get("labelSelector", [""])[0]
            items = [copy.deepcopy(j) for (ns, _), j in sorted(self.trainjobs.items())
                     if ns == namespace and _matches(selector, j["metadata"].get("labels", {}))]
            return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJobList",
                    "metadata": {"resourceVersion": "1"}, "items": items}
        if verb == "get":
            if (namespace, name) not in self.trainjobs:
                raise ApiError(404, "NotFound", f'trainjobs.{GROUP} "{name}" not found',
                               {"name": name, "group": GROUP, "kind": "trainjobs"})
            return copy.deepcopy(self.trainjobs[namespace, name])
        if verb == "create":
            if namespace not in self.namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            if not isinstance(body, dict) or body.get("kind") != "TrainJob" \
                    or body.get("apiVersion") != f"{GROUP}/{VERSION}":
                raise ApiError(400, "BadRequest", "the body is not a trainer.kubeflow.org/"
                                                  "v1alpha1 TrainJob")
            new = body.get("metadata", {}).get("name", "")
            if body["metadata"].get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does "
                                                  "not match the namespace sent on the request")
            bad = trainjob_schema.schema_problems(body)
            if bad:
                raise ApiError(422, "Invalid", f'TrainJob.{GROUP} "{new}" is invalid: '
                                               + "; ".join(bad), {"name": new, "group": GROUP,
                                                                  "kind": "TrainJob"})
            if (namespace, new) in self.trainjobs:
                raise ApiError(409, "AlreadyExists", f'trainjobs.{GROUP} "{new}" already '
                                                     "exists",
                               {"name": new, "group": GROUP, "kind": "trainjobs"})
            denial = trainjob_schema.webhook_problems(body)
            if denial:
                raise ApiError(403, "Forbidden", 'admission webhook "validator.trainjob.'
                                                 'trainer.kubeflow.org" denied the request: '
                               + "; ".join(denial))
            stored = self._store(namespace, body)
            for hook in self.on_create:
                threading.Thread(target=hook, args=(copy.deepcopy(stored),), daemon=True).start()
            return stored
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not implemented by this stand-in")

    def _pods(self, verb: str, namespace: str, name: str, query: dict) -> Any:
        if verb == "list":
            selector = query.get("labelSelector", [""])[0]
            items = [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                     if ns == namespace and _matches(selector, p["metadata"].get("labels", {}))]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                    "items": items}
        if verb == "get":
            return copy.deepcopy(self._pod(namespace, name))
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not implemented by this stand-in")

    def _pod(self, namespace: str, name: str) -> dict:
        if (namespace, name) not in self.pods:
            raise ApiError(404, "NotFound", f'pods "{name}" not found',
                           {"name": name, "kind": "pods"})
        return self.pods[namespace, name]

    def _log_source(self, namespace: str, name: str, query: dict) -> _Log:
        pod = self._pod(namespace, name)
        container = query.get("container", ["node"])[0]
        if container not in {c["name"] for c in pod["spec"]["containers"]}:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod "
                                              f"{name}")
        state = pod["status"]["containerStatuses"][0]["state"]
        if "waiting" in state and pod["status"]["phase"] == "Pending":
            reason = state["waiting"].get("reason", "ContainerCreating")
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is '
                                              f"waiting to start: {reason}")
        return self.logs[namespace, name]


def _format(stamp: datetime.datetime, line: str, timestamps: bool) -> bytes:
    if not timestamps:
        return (line + "\n").encode()
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"
    return f"{text} {line}\n".encode()


def _route(path: str) -> tuple[str, str, str, str, str] | None:
    """(group, namespace, resource, name, subresource) of a namespaced API path."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:3] == ["apis", GROUP, VERSION]:
        group, rest = GROUP, parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces" or len(rest) > 5:
        return None
    return (group, rest[1], rest[2], rest[3] if len(rest) > 3 else "",
            rest[4] if len(rest) > 4 else "")


def start() -> FakeK8s:
    fake = FakeK8s()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, payload: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            route = _route(url.path)
            if route is None:
                self._send(404, b"404 page not found", "text/plain; charset=utf-8")
                return
            group, namespace, resource, name, sub = route
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete"}.get(method)
            if verb is None:
                verb = "get" if name else ("watch" if _flag(query, "watch") else "list")
            rbac_resource = f"{resource}/{sub}" if sub else resource
            with fake.lock:
                fake.requests.append(Recorded(verb, group, rbac_resource, namespace, name,
                                              query))
            try:
                if group == GROUP and not fake.trainer_installed:
                    raise ApiError(404, "NotFound", "404 page not found", plain=True)
                if (verb, rbac_resource) in fake.denied:
                    where = f'API group "{group}"' if group else 'API group ""'
                    raise ApiError(403, "Forbidden",
                                   f'{resource}{"." + group if group else ""} "{name}" is '
                                   f'forbidden: User "{fake.user}" cannot {verb} resource '
                                   f'"{rbac_resource}" in {where} in the namespace '
                                   f'"{namespace}"',
                                   {"name": name, "group": group, "kind": resource})
                body = json.loads(raw) if raw else None
                if (group, resource, sub) == ("", "pods", "log") and verb == "get":
                    self._log(namespace, name, query)
                    return
                with fake.lock:
                    if (group, resource, sub) == (GROUP, "trainjobs", ""):
                        payload = fake._trainjobs(verb, namespace, name, query, body)
                    elif (group, resource, sub) == ("", "pods", ""):
                        payload = fake._pods(verb, namespace, name, query)
                    else:
                        raise ApiError(404, "NotFound", "the server could not find the "
                                                        "requested resource")
                self._send(201 if verb == "create" else 200, json.dumps(payload).encode(),
                           "application/json")
            except ApiError as exc:
                self._send(exc.code, exc.body(), "text/plain; charset=utf-8" if exc.plain
                           else "application/json")

        def _log(self, namespace: str, name: str, query: dict) -> None:
            timestamps = _flag(query, "timestamps")
            with fake.lock:
                source = fake._log_source(namespace, name, query)
                if not _flag(query, "follow"):
                    text = b"".join(_format(t, line, timestamps) for t, line in source.lines)
                    self._send(200, text, "text/plain")
                    return
                broken = source.broken
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            while True:
                with fake.lock:
                    while (sent >= len(source.lines) and not source.closed and not fake.closing
                           and source.broken == broken):
                        fake.lock.wait(1.0)
                    pending = source.lines[sent:]
                    cut = source.broken != broken or fake.closing
                    done = source.closed
                for stamp, line in pending:
                    data = _format(stamp, line, timestamps)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                sent += len(pending)
                if cut:  # a dropped connection: no terminating chunk
                    self.close_connection = True
                    return
                if done and sent >= len(source.lines):
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def do_PUT(self):  # noqa: N802
            self._handle("PUT")

        def do_PATCH(self):  # noqa: N802
            self._handle("PATCH")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake
