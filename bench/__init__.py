"""``make bench``: a tool that measures the library from outside; not part of it.

Not packaged (pyproject ships gpunet_core, components and pipelines only) and imported by none
of them; run it as ``bench/run.py`` from a checkout, tests import it as ``from bench import perf``.
"""
