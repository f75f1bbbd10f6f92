"""Node rank 0's pod of a TrainJob: which pod it is, why it is not running, and its log stream.

JobSet labels the pods of a TrainJob with ``jobset.sigs.k8s.io/jobset-name`` (the TrainJob's
name) and ``jobset.sigs.k8s.io/replicatedjob-name`` (``node``); the Indexed Job adds
``batch.kubernetes.io/job-completion-index``, which Trainer passes to torchrun as
``PET_NODE_RANK``. :class:`PodLogFollower` streams that pod's log to our logger while the job
runs, across container restarts and pod replacements.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
import time
from typing import Any

_logger = logging.getLogger("gpunet_core.mlops.trainjob")

JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # label (K8s >= 1.28), annotation
_WAITING_OK = {"ContainerCreating", "PodInitializing"}


def _uid(pod: dict[str, Any]) -> str:
    return pod["metadata"].get("uid") or pod["metadata"]["name"]


def is_master(pod: dict[str, Any], replicated_job: str = "node") -> bool:
    """Node rank 0 of ``replicated_job`` (completion index from the label, else annotation)."""
    meta = pod.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    index = labels.get(COMPLETION_INDEX, notes.get(COMPLETION_INDEX))
    return (labels.get(REPLICATED_JOB) == replicated_job and labels.get(JOB_INDEX, "0") == "0"
            and index == "0")


def master_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Node rank 0's pod: when the Job has replaced it, the live one, else the newest
    (creationTimestamp has whole seconds: a replacement may share its predecessor's)."""
    masters = [p for p in pods if is_master(p)]
    return max(masters, default=None, key=lambda p: (
        not finished(p), p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def pod_problems(pod: dict[str, Any]) -> list[tuple[str, str]]:
    """(reason, message) of why ``pod`` is not running: unschedulable, image or config errors
    (a missing Secret or ConfigMap key shows as CreateContainerConfigError), crash loops."""
    status = pod.get("status") or {}
    problems = []
    if status.get("phase") == "Pending":
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                problems.append((cond.get("reason") or "Unschedulable", cond.get("message", "")))
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses")
                                                              or [])
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in _WAITING_OK:
            problems.append((waiting["reason"], waiting.get("message", "")))
    return problems


def started(pod: dict[str, Any]) -> bool:
    """Whether the pod has a log to read (a container ran or runs)."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    return any({"running", "terminated"} & set(cs.get("state") or {})
               for cs in status.get("containerStatuses") or [])


def finished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _ts_key(stamp: str) -> tuple[str, str] | None:
    """An RFC 3339 (nano) timestamp as a sortable key; kubelet trims trailing zeros."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$", stamp)
    return (match.group(1), (match.group(2) or "").ljust(9, "0")) if match else None


class PodLogFollower(threading.Thread):
    """Streams the log of :attr:`pod` (set by the caller's poll loop) to our logger.

    ``open_stream(pod_name)`` returns an open urllib3 response of the log with
    ``follow=true&timestamps=true``; the timestamps let a reconnect (a broken stream, a
    restarted container) skip the lines already shown. A pod whose stream ended after it
    finished is done; a replacement pod (new uid) is streamed from its start.
    """

    def __init__(self, open_stream: Any, job: str, poll_s: float, tail: int = 30):
        super().__init__(name=f"logs-{job}", daemon=True)
        self.open_stream, self.job, self.poll_s = open_stream, job, poll_s
        self.pod: dict[str, Any] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.lines = 0
        self._stop_event = threading.Event()
        self._seen: dict[str, tuple[tuple[str, str], int]] = {}
        self._done: set[str] = set()
        self._resp: Any = None

    def drained(self) -> bool:
        pod = self.pod
        return pod is None or not started(pod) or _uid(pod) in self._done

    def finish(self, wait_s: float) -> None:
        """Let the stream reach the end of the finished pod's log (at most ``wait_s``), stop."""
        deadline = time.monotonic() + wait_s
        while self.is_alive() and not self.drained() and time.monotonic() < deadline:
            time.sleep(min(0.05, self.poll_s))
        self.stop()

    def stop(self) -> None:
        """Stop; an open stream is shut down (urllib3 >= 2.3) or closed under the reader."""
        self._stop_event.set()
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):  # the reader thread is going away anyway
                getattr(resp, "shutdown", resp.close)()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pod = self.pod
            if pod is None or not started(pod) or _uid(pod) in self._done:
                self._stop_event.wait(self.poll_s)
                continue
            try:
                self._stream(pod["metadata"]["name"], _uid(pod))
            except Exception as exc:  # noqa: BLE001 - not started yet, broken stream: retry
                if getattr(exc, "status", 0) in (401, 403):  # not allowed: say so once, stop
                    _logger.warning("cannot stream the log of %s: %s", pod["metadata"]["name"],
                                    exc)
                    self._done.add(_uid(pod))
                    continue
                _logger.debug("log stream of %s: %r", pod["metadata"]["name"], exc)
            else:
                latest = self.pod
                if latest is not None and _uid(latest) == _uid(pod) and finished(latest):
                    self._done.add(_uid(pod))
                    continue
            self._stop_event.wait(self.poll_s)

    def _stream(self, pod: str, uid: str) -> None:
        self._resp = resp = self.open_stream(pod)
        buffer, passed = b"", [0]  # passed: lines of this connection at the last timestamp
        whole = False
        try:
            for chunk in resp.stream(amt=None, decode_content=False):
                if self._stop_event.is_set():
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self._emit(uid, raw.decode("utf-8", "replace").rstrip("\r"), passed)
            if buffer:
                self._emit(uid, buffer.decode("utf-8", "replace"), passed)
            whole = True
        finally:
            self._resp = None
            if whole:
                resp.release_conn()  # read to its end: the connection can serve another request
            else:
                resp.close()

    def _emit(self, uid: str, line: str, passed: list[int]) -> None:
        stamp, _, text = line.partition(" ")
        key = _ts_key(stamp)
        if key is None:
            text = line
        else:
            last, shown = self._seen.get(uid, (("", ""), 0))
            if key < last:
                return
            if key == last:  # kubelet may stamp several lines alike: skip as many as shown
                passed[0] += 1
                if passed[0] <= shown:
                    return
                self._seen[uid] = (key, shown + 1)
            else:
                self._seen[uid], passed[0] = (key, 1), 1
        self.lines += 1
        self.tail.append(text)
        _logger.info("[%s rank 0] %s", self.job, text)
