"""The ``gpunet`` command line.

Each subcommand lives in its own module under :mod:`gpunet_core.cli` with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``; this module wires them together and turns
:class:`~gpunet_core.utils.errors.GpunetError` into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.process import fast_exit

# subcommand name -> module under gpunet_core.cli
COMMANDS = {
    "models": "models",
    "spec": "spec",
    "train": "train",
    "trainjob": "trainjob",
    "pipeline": "pipeline",
    "promote": "promote",
    "prepare": "prepare",
    "bench-data": "bench_data",
    "validate": "validate",
    "export-onnx": "export_onnx",
    "quantize": "quantize",
    "bench": "bench",
    "report": "report",
    "export-triton": "export_triton",
    "search": "search",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpunet",
        description="GPUNet pipeline: models, data, training, validation, export and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"gpunet_core.cli.{module}")
        sub_parser = mod.add_parser(sub)
        sub_parser.set_defaults(_run=mod.run, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    fast_exit()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except GpunetError as exc:
        print(f"gpunet {args._name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gpunet {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
