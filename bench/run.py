#!/usr/bin/env python3
"""`make bench`: run bench.perf (see its docstring and `bench/run.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.perf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
