"""Render docs/reliability.md from a reliability run (``make reliability``).

Inputs: the JSON lines the fault-injection tests append to ``$GPUNET_RELIABILITY_LOG`` (what was
injected, how often, what was observed, with figures) and pytest's JUnit XML of the same run
(pass/fail and time of every fault, bad-input and security test). Nothing here is typed in by
hand: a table row exists only because a test recorded it in that run.

    python -m tests.faults.report OBSERVATIONS.jsonl JUNIT.xml [-o docs/reliability.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

SUITES = {
    "tests.faults": "Fault injection (`tests/faults/`, `pytest -m faults`)",
    "tests.bad_inputs": "Bad-input corpus (`tests/bad_inputs/`)",
    "tests.test_security": "Security checks (`tests/test_security.py`)",
    "tests.test_mlflow_auth": "MLflow basic auth (`tests/test_mlflow_auth.py`)",
}
FIGURE_KEYS_SKIP = {"test", "time", "fault", "injected", "outcome"}


def _suite(classname: str) -> str:
    for prefix in SUITES:
        if classname.startswith(prefix):
            return prefix
    return classname


def read_junit(path: Path) -> dict[str, dict]:
    """Per suite: passed/failed/skipped counts and seconds."""
    out: dict[str, dict] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        suite = _suite(case.get("classname", ""))
        row = out.setdefault(suite, Counter())
        state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                 else "skipped" if case.find("skipped") is not None else "passed")
        row[state] += 1
        row["seconds"] += float(case.get("time", 0))
    return out


def _figures(row: dict) -> str:
    parts = []
    for key, value in row.items():
        if key in FIGURE_KEYS_SKIP:
            continue
        if key == "kills":
            value = "; ".join(f"worker {k['rank']} at +{k['kill_after_s']} s (after "
                              f"{k['epochs_done_at_kill']} epoch(s)), exit {k['exit']}"
                              for k in value)
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "<br>".join(parts)


def render(observations: list[dict], junit: dict[str, dict]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability: what we inject, and what the tests observed",
        "",
        f"Generated on {when} ({platform.node()}, {platform.machine()}, Python "
        f"{platform.python_version()}) by `tests/faults/report.py` from the observations the "
        "tests recorded in one run (`make reliability`, or any pytest run with "
        "`GPUNET_RELIABILITY_LOG` set); every figure below comes from that run. "
        "All servers are real processes on 127.0.0.1: SeaweedFS for S3, `mlflow server`, "
        "torchrun with gloo, kfp.local.",
        "",
        "## Faults injected",
        "",
        "| Fault | Times injected | Observed | Figures |",
        "|---|---|---|---|",
    ]
    for row in observations:
        lines.append(f"| {row['fault']} | {row['injected']} | {row['outcome']} | "
                     f"{_figures(row)} |")
    if junit:
        lines += ["", "## Suites in the run", "",
                  "| Suite | Passed | Failed | Skipped | Seconds |", "|---|---|---|---|---|"]
    for key, title in SUITES.items():
        if key in junit:
            c = junit[key]
            lines.append(f"| {title} | {c['passed']} | {c['failed']} | {c['skipped']} | "
                         f"{c['seconds']:.0f} |")
    lines += ["", "## How the faults are made", "",
              "* **Worker kill**: `SIGKILL` to one of two torchrun workers at a random time "
              "(seeded) inside the training span of a reference run; torchrun `--max-restarts=2`,"
              " `gpunet train --auto-resume`. Each epoch reseeds the RNGs from (seed, rank, "
              "epoch) and each sample's augmentation from (seed, epoch, index), so the resumed "
              "run is compared with the reference for bit equality of model and EMA weights.",
              "* **S3 outage**: the SeaweedFS server process (`weed mini`) is SIGKILLed in "
              "the middle of an upload (in-process: from a botocore hook just before a "
              "multipart upload's second part; from a `gpunet` process: after a set number of "
              "bytes through a metering TCP proxy) and started again on the same data "
              "directory and port after a delay, or not. The end state is read directly from "
              "the store.",
              "* **MLflow outage**: the real `mlflow server` process is stopped after the first "
              "epoch is logged and started again on the same sqlite store while training goes on.",
              "* **Failed pipeline step**: the benchmark step is asked for TensorRT on a machine "
              "without a GPU; the run is then repeated with the default backend in the same "
              "`--workdir` (kfp.local `enable_caching=True`, `cache_root=<workdir>/kfp-cache`).",
              "",
              "Run it yourself: `make reliability` (about 15 minutes on 2 CPU cores); the same "
              "tests also run in `make test`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("observations", type=Path)
    parser.add_argument("junit", type=Path, nargs="?", default=None)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/reliability.md"))
    args = parser.parse_args(argv)
    observations = [json.loads(line) for line in args.observations.read_text().splitlines()
                    if line.strip()] if args.observations.exists() else []
    junit = read_junit(args.junit) if args.junit and args.junit.exists() else {}
    text = render(observations, junit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.output)
    print(f"wrote {args.output} ({len(observations)} fault observations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
