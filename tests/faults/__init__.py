"""Fault-injection tests (``pytest -m faults``): real servers on 127.0.0.1, real failures."""
