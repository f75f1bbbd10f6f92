"""Run every case of :mod:`tests.bad_inputs.cases` and check its promises (a clear message,
exit code 2, no traceback, no new files or empty folders).

Most cases run in-process (``gpunet_core.cli.main`` / ``pipelines.cli.main`` / a step function)
so the corpus stays fast; the few marked ``subprocess`` run as ``python -m gpunet_core`` /
``python -m pipelines`` to prove the real entry points print no traceback either. Those are
started together when the first case runs and collected at the end, so they overlap with the
in-process cases instead of adding their start-up time.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpunet_core.utils.errors import GpunetError
from tests.bad_inputs import inputs
from tests.bad_inputs.cases import CASES, FILE_OUTPUTS, FOLDER_OUTPUTS, Case

REPO = Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
TEMP_PATTERNS = ("*.tmp", ".tmp*", "*.tmp.*")
# the CLI's one-line error format: "gpunet CMD: error: ...", "pipelines ACTION: error: ...",
# or argparse's "gpunet train: error: argument ..." / "python -m pipelines: error: ..."
ERROR_LINE = re.compile(r"^(gpunet|pipelines|python -m pipelines)( [\w-]+)*: error: \S",
                        re.MULTILINE)
SUBPROCESS_TIMEOUT = 240
# run subprocess cases after the in-process ones, by which time they have finished
ORDERED = [c for c in CASES if not c.subprocess] + [c for c in CASES if c.subprocess]


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    message: str  # where the user reads the error: stderr, or the step's exception text


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bad_inputs_dir(tmp_path_factory) -> Path:
    return inputs.build(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NotFound(BaseHTTPRequestHandler):
    """Answers, but has nothing: KFP's health check passes, KFP's experiment list is empty,
    every other request gets 404 with MLflow's RESOURCE_DOES_NOT_EXIST (and KFP's) error."""

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        if path == "/apis/v2beta1/healthz":
            status, body = 200, {"multi_user": False}
        elif path == "/apis/v2beta1/experiments" and self.command == "GET":
            status, body = 200, {}
        else:
            message = f"{path} not found"
            status, body = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": message,
                                 "error": message, "code": 5}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._answer()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def answering_server():
    """``http://127.0.0.1:PORT`` of a server that answers "not found" (see :class:`_NotFound`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def substitute(value: Any, ctx: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, repl in ctx.items():
            value = value.replace("{" + key + "}", repl)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(substitute(v, ctx) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, ctx) for k, v in value.items()}
    return value


def context(out: Path, inputs_dir: Path, port: int, digits: Path | None,
            server: str = "") -> dict[str, str]:
    return {"in": str(inputs_dir), "out": str(out), "port": str(port), "repo": str(REPO),
            "server": server, "digits": str(digits) if digits else "{digits}"}


def uses_digits(case: Case) -> bool:
    return "{digits}" in repr((case.argv, case.args, case.kwargs))


def case_env(case: Case, ctx: dict[str, str]) -> dict[str, str | None]:
    """Caches inside the case's directory (so stray writes are seen), then the case's own."""
    out = ctx["out"]
    return {"XDG_CACHE_HOME": f"{out}/cache", "GPUNET_CACHE_DIR": f"{out}/cache/gpunet",
            **substitute(case.env, ctx)}


def write_existing(case: Case, ctx: dict[str, str]) -> dict[Path, tuple[bytes, int]]:
    """Create the case's pre-existing outputs; return their bytes and mtimes."""
    state = {}
    for raw in case.existing:
        path = Path(substitute(raw, ctx))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"previous output of {path.name}\n".encode())
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        state[path] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


# --------------------------------------------------------------------------- subprocess cases


@pytest.fixture(scope="session")
def launched(bad_inputs_dir, closed_port, answering_server, tmp_path_factory):
    """Start every subprocess case at once; each test collects its own process."""
    started: dict[str, tuple[subprocess.Popen, dict[str, str], dict]] = {}
    for case in (c for c in CASES if c.subprocess):
        assert not uses_digits(case), "subprocess cases start before digits_small exists"
        out = tmp_path_factory.mktemp(case.id)
        ctx = context(out, bad_inputs_dir, closed_port, None, answering_server)
        state = write_existing(case, ctx)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for key, value in case_env(case, ctx).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        module = "gpunet_core" if case.entry == "gpunet" else "pipelines"
        proc = subprocess.Popen([sys.executable, "-m", module, *substitute(case.argv, ctx)],
                                cwd=out, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started[case.id] = (proc, ctx, state)
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def collect(proc: subprocess.Popen) -> Outcome:
    try:
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running after {SUBPROCESS_TIMEOUT} s: {stderr[-2000:]}")
    return Outcome(proc.returncode, stdout, stderr, stderr)


# --------------------------------------------------------------------------- in-process cases


def set_env(monkeypatch, env: dict[str, str | None]) -> None:
    """Apply ``env`` (None: unset) so that monkeypatch restores every key afterwards, even
    keys the code under test sets itself (such as MLFLOW_TRACKING_URI)."""
    for key in {*env, "MLFLOW_TRACKING_URI"}:
        original = os.environ.get(key)
        monkeypatch.setenv(key, "")  # records the original value (or its absence) for undo
        value = env.get(key, original)
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)


def run_in_process(case: Case, ctx: dict[str, str], capfd) -> Outcome:
    if case.entry == "step":
        from gpunet_core import steps

        fn = getattr(steps, case.step)
        try:
            fn(*substitute(case.args, ctx), **substitute(case.kwargs, ctx))
        except GpunetError as exc:
            out, err = capfd.readouterr()
            return Outcome(exc.exit_code, out, err, f"{err}\n{exc}")
        except Exception:
            pytest.fail(f"steps.{case.step} raised a non-GpunetError, which a KFP log shows as "
                        f"a bare traceback:\n{traceback.format_exc()}")
        out, err = capfd.readouterr()
        return Outcome(0, out, err, f"steps.{case.step} returned without an error")
    if case.entry == "gpunet":
        from gpunet_core.cli import main
    else:
        from pipelines.cli import main
    try:
        code = main(list(substitute(case.argv, ctx)))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    except Exception:
        pytest.fail(f"{case.entry} {case.argv[0]} raised, the user would see a traceback:\n"
                    f"{traceback.format_exc()}")
    out, err = capfd.readouterr()
    return Outcome(code, out, err, err)


# --------------------------------------------------------------------------- the checks


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def check(case: Case, ctx: dict[str, str], outcome: Outcome,
          existing: dict[Path, tuple[bytes, int]], logged: str = "") -> None:
    shown = f"\n--- stdout\n{outcome.stdout[-3000:]}\n--- stderr\n{outcome.stderr[-3000:]}"
    # (1) a clear message: what is wrong and how to fix it
    for fragment in substitute(case.expect, ctx):
        assert fragment in outcome.message, f"message lacks {fragment!r}:{shown}"
    if case.entry != "step":
        assert ERROR_LINE.search(outcome.stderr), f"no 'PROG: error: ...' line:{shown}"
    # (2) a non-zero exit code (2: a usage or input error)
    assert outcome.code == case.exit_code, f"exit code {outcome.code!r}:{shown}"
    # (3) no traceback, wherever it could have gone
    assert TRACEBACK not in outcome.stdout + outcome.stderr + logged, f"a traceback:{shown}"
    # (4) no half-written output, pre-existing outputs untouched, no stray temp files
    out = Path(ctx["out"])
    for raw in case.outputs:
        path = Path(substitute(raw, ctx))
        assert not path.exists(), f"{path} was written although the command failed:{shown}"
    for path, (data, mtime) in existing.items():
        assert path.is_file(), f"pre-existing output {path} was removed"
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, \
            f"pre-existing output {path} was modified"
    leaves = [Path(substitute(raw, ctx)) for raw in case.leaves]
    new = sorted(str(p) for p in files_under(out) - set(existing)
                 if not any(p.is_relative_to(leaf) for leaf in leaves))
    assert not new, f"files appeared although the command failed: {new[:10]}{shown}"
    # (5) no empty folder left behind (the folders of pre-existing files were there before)
    before = {parent for path in existing for parent in path.parents}
    empty = sorted(str(p) for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())
                   and p not in before and not any(p.is_relative_to(leaf) for leaf in leaves))
    assert not empty, f"empty folders left behind: {empty[:10]}{shown}"
    for root in (out, Path(ctx["in"])):
        stray = sorted(str(p) for pattern in TEMP_PATTERNS for p in root.rglob(pattern))
        assert not stray, f"temp files left behind: {stray}"


@pytest.mark.parametrize("case", ORDERED, ids=[c.id for c in ORDERED])
def test_bad_input(case, request, launched, bad_inputs_dir, closed_port, answering_server,
                   tmp_path, monkeypatch, capfd, caplog):
    if case.subprocess:
        proc, ctx, existing = launched[case.id]
        check(case, ctx, collect(proc), existing)
        return
    digits = request.getfixturevalue("digits_small") if uses_digits(case) else None
    out = tmp_path / "out"
    out.mkdir()
    ctx = context(out, bad_inputs_dir, closed_port, digits, answering_server)
    existing = write_existing(case, ctx)
    set_env(monkeypatch, case_env(case, ctx))
    monkeypatch.chdir(out)
    outcome = run_in_process(case, ctx, capfd)
    check(case, ctx, outcome, existing, caplog.text)


def test_the_corpus_is_broad():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 36
    entries = {c.entry for c in CASES}
    assert entries == {"gpunet", "pipelines", "step"}
    commands = {c.argv[0] for c in CASES if c.entry != "step"}
    assert {"spec", "train", "validate", "export-onnx", "prepare", "schedule", "run-local",
            "compile", "bench", "report", "export-triton", "promote", "submit",
            "list-runs"} <= commands
    # every command that writes, with each way its output path can be wrong
    ids = set(ids)
    for name in FILE_OUTPUTS:
        for kind in ("folder-missing", "below-a-file", "is-a-folder", "not-writable"):
            assert f"{name}-output-{kind}" in ids
    for name in FOLDER_OUTPUTS:
        for kind in ("below-a-file", "is-a-file", "not-writable"):
            assert f"{name}-output-{kind}" in ids
    assert {c.argv[0] for c in CASES if "removed" in c.id} >= {
        "train", "prepare", "report", "export-triton", "run-local"}
    assert 3 <= sum(c.subprocess for c in CASES) <= 5
    assert {c.entry for c in CASES if c.subprocess} == {"gpunet", "pipelines"}
    for c in CASES:
        assert c.expect, f"{c.id}: no message fragments"
        assert c.exit_code != 0


def test_the_checks_catch_each_broken_promise(tmp_path):
    """The harness itself: each of the four promises, broken once, fails the check."""
    out = tmp_path / "out"
    out.mkdir()
    ctx = {"in": str(tmp_path / "in"), "out": str(out)}
    (tmp_path / "in").mkdir()
    case = Case("demo", "gpunet", ("spec", "x"), ("bad thing", "do this"),
                outputs=("{out}/result.json",), existing=("{out}/old.json",))
    good = "gpunet spec: error: a bad thing; do this\n"
    existing = write_existing(case, ctx)
    check(case, ctx, Outcome(2, "", good, good), existing)  # all promises kept
    broken = [
        Outcome(2, "", "gpunet spec: error: something\n", "gpunet spec: error: something\n"),
        Outcome(0, "", good, good),
        Outcome(2, "", f"{TRACEBACK}:\n{good}", f"{TRACEBACK}:\n{good}"),
        Outcome(2, "", "a bad thing; do this\n", "a bad thing; do this\n"),  # no error line
    ]
    for outcome in broken:
        with pytest.raises(AssertionError):
            check(case, ctx, outcome, existing)
    for make_mess, undo in [
        (lambda: (out / "result.json").write_text("{}"), lambda: (out / "result.json").unlink()),
        (lambda: (out / ".result.json.x1.tmp").write_text("{"),
         lambda: (out / ".result.json.x1.tmp").unlink()),
        (lambda: (out / "other.txt").write_text("?"), lambda: (out / "other.txt").unlink()),
        (lambda: (out / "empty" / "run").mkdir(parents=True),
         lambda: ((out / "empty" / "run").rmdir(), (out / "empty").rmdir())),
        (lambda: (out / "old.json").write_text("new"), lambda: None),
    ]:
        make_mess()
        with pytest.raises(AssertionError):
            check(case, ctx, Outcome(2, "", good, good), existing)
        undo()
