"""A local run's tasks timed from the runner's side, against the work their steps report.

``kfp.local`` runs each task as a child process. From the thread that runs it, it logs
``Executing task 'NAME'`` just before starting the process and ``Task 'NAME' finished with
status ...`` once the process has exited, and it passes the task's output through the same
stream, including the step's own :data:`gpunet_core.steps.WORK_LOG` line. :class:`TaskClock`
reads that stream as it is written (a tee on ``sys.stdout``): a task's wall time is measured by
the process that launches it, and nothing in the task is patched or told it is watched.
:func:`pipeline_overhead` splits a run into the steps' work and everything else (process start,
imports, artifact copies, logging, and the runner's own time between tasks).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from gpunet_core.steps import parse_work_log
from gpunet_core.utils.errors import GpunetError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own log lines (logging_utils.local_logger_context): "HH:MM:SS.mmm - LEVEL - ...";
# a task's output is indented, so a task cannot fake them
_KFP_LOG = r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - "
_START = re.compile(_KFP_LOG + r"Executing task '([^']+)'")
_END = re.compile(_KFP_LOG + r"Task '([^']+)' finished with status (\w+)")


class TimingError(GpunetError):
    """Task timings that cannot describe a run (missing or impossible figures)."""


@dataclass
class TaskRun:
    """One task as the runner saw it: its attempts' wall time and the work its steps logged."""

    task: str
    wall_s: float = 0.0
    work: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    status: str = ""


class TaskClock:
    """A text stream that passes everything on to ``stream`` and times the tasks it shows."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self._stream, self._clock = stream, clock
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}  # per thread: tasks may run in parallel (ParallelFor)
        self._open: dict[int, tuple[str, float]] = {}  # thread -> (task, start)
        self._tasks: dict[str, TaskRun] = {}

    @classmethod
    @contextlib.contextmanager
    def on_stdout(cls) -> Iterator[TaskClock]:
        """Watch ``sys.stdout`` (where kfp.local logs and streams its tasks) while inside."""
        clock = cls(sys.stdout)
        with contextlib.redirect_stdout(clock):  # type: ignore[type-var]
            yield clock

    def write(self, text: str) -> int:
        now = self._clock()  # before passing it on: a full pipe must not delay the event
        self._stream.write(text)
        with self._lock:
            tid = threading.get_ident()
            *lines, self._partial[tid] = (self._partial.get(tid, "") + text).split("\n")
            for line in lines:
                self._line(tid, _ANSI.sub("", line), now)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)

    def _line(self, tid: int, line: str, now: float) -> None:
        if match := _START.search(line):
            self._open[tid] = (match[1], now)
            self._tasks.setdefault(match[1], TaskRun(match[1])).attempts += 1
        elif tid not in self._open:
            return
        elif match := _END.search(line):
            task, started = self._open.pop(tid)
            run = self._tasks[task]
            run.wall_s += now - started
            run.status = match[2]
        elif work := parse_work_log(line):
            run = self._tasks[self._open[tid][0]]
            run.work[work[0]] = run.work.get(work[0], 0.0) + work[1]

    def timings(self) -> list[dict[str, Any]]:
        """The tasks that ran (not those served from the cache), in the order they started:
        ``name`` (the step's, else the task's), ``task``, ``wall_s``, ``compute_s``."""
        with self._lock:
            runs = [r for r in self._tasks.values() if r.status]
        return [{"name": " + ".join(r.work) or r.task, "task": r.task,
                 "wall_s": round(r.wall_s, 3),
                 # the step's clock runs inside the task's: only rounding could put it above
                 "compute_s": round(min(sum(r.work.values(), 0.0), r.wall_s), 3),
                 "attempts": r.attempts} for r in runs]


def pipeline_overhead(step_timings: Iterable[dict[str, Any]],
                      total_wall_s: float | None = None) -> dict[str, Any]:
    """Split a pipeline run into the steps' work and everything else.

    ``step_timings``: one dict per task with ``name``, ``wall_s`` (its process as the runner
    saw it: start, imports, artifact copies, logging, exit) and ``compute_s`` (the work its
    step logged). ``total_wall_s`` defaults to the sum of the tasks' wall times (a sequential
    DAG); what it has beyond that sum is ``runner_s``, the runner's own time outside the task
    processes (compiling and walking the DAG, cache look-ups, copying cached outputs).
    """
    steps = []
    for t in step_timings:
        try:
            wall, compute = float(t["wall_s"]), float(t["compute_s"])
        except (KeyError, TypeError, ValueError):
            raise TimingError(f"pipeline step timing {t!r} needs numeric wall_s and "
                              "compute_s") from None
        if compute > wall or compute < 0:
            raise TimingError(f"step {t.get('name')!r}: compute_s {compute} must be in "
                              f"[0, wall_s {wall}]")
        steps.append({"name": str(t.get("name", f"step{len(steps)}")), "wall_s": wall,
                      "compute_s": compute, "overhead_s": wall - compute,
                      **({"task": str(t["task"])} if t.get("task") else {})})
    if not steps:
        raise TimingError("no pipeline step timings given")
    in_steps = sum(s["wall_s"] for s in steps)
    total = float(total_wall_s) if total_wall_s is not None else in_steps
    if total <= 0:
        raise TimingError(f"the run's wall time must be > 0, got {total}")
    compute = sum(s["compute_s"] for s in steps)
    return {"status": "measured", "total_wall_s": total, "compute_s": compute,
            "overhead_s": total - compute, "overhead_frac": (total - compute) / total,
            "tasks_s": in_steps, "runner_s": max(0.0, total - in_steps), "steps": steps}
