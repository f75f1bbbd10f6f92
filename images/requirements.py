"""Print the project's runtime dependencies from pyproject.toml, one per line, minus some names.

Used inside image builds: NGC bases already ship tuned torch/torchvision (and DALI), which the
project's exact pins must not replace, so those are excluded and the rest installed from the
output. Standard library only (Python >= 3.11 for tomllib).

    python images/requirements.py --exclude torch torchvision > requirements.txt
    python images/requirements.py --extra gpu --exclude tensorrt onnxruntime > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def requirements(pyproject: Path, exclude: set[str], extras: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    skip = {_name(name) for name in exclude}
    return [d for d in deps if _name(d) not in skip]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--exclude", nargs="*", default=[], help="distribution names to leave out")
    parser.add_argument("--extra", action="append", default=[], help="add an optional extra")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, set(args.exclude), tuple(args.extra))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
