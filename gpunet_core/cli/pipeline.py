"""``gpunet pipeline``: the same as ``python -m pipelines`` (compile, run-local, submit, ...)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "pipeline", help="compile / run-local / submit / schedule / list-runs the KFP DAG",
        description="The gpunet_training KFP pipeline: compile to IR YAML, run the whole DAG "
                    "locally (kfp.local), submit or schedule it on a KFP server, list runs. "
                    "`gpunet pipeline ACTION --help` for each action.")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="ACTION ...",
                        help="compile | run-local | submit | schedule | list-runs, then options")
    return parser


def run(args: argparse.Namespace) -> int:
    # kfp (0.5 s): only `gpunet pipeline` needs the DAG's CLI
    from pipelines.cli import build_parser
    from pipelines.cli import run as run_action

    return run_action(build_parser("gpunet pipeline").parse_args(args.rest))
