"""A tiny search space and search settings for the search tests (seconds per trial)."""

from __future__ import annotations

from pathlib import Path

TINY_SPACE = """
resolution: {min: 32, max: 32, step: 32}
families:
  non_d:
    distill: false
    head: {types: [head], width: {min: 8, max: 16, step: 8}, act: [relu, swish]}
    expansion: {min: 1, max: 4, choices: [2, 4]}
    stages:
      - {stage: 1, types: [conv], depth: [1, 1], width: {min: 8, max: 16, step: 8},
         stride: [1], kernel: [3], act: [relu], se: [false]}
      - {stage: 2, types: [fused_irb], depth: [1, 2], width: {min: 16, max: 24, step: 8},
         stride: [2], kernel: [3], act: [relu, swish], se: [false]}
      - {stage: 4, types: [irb], depth: [1, 2], width: {min: 24, max: 48, step: 24},
         stride: [2], kernel: [3, 5], act: [relu], se: [false, true]}
    tail: {width: [64]}
"""


def tiny_space(folder: Path) -> Path:
    path = folder / "tiny_space.yaml"
    path.write_text(TINY_SPACE)
    return path


def search_argv(data: Path, out: Path, space: Path, *extra: str, trials: int = 4) -> list[str]:
    return ["search", str(data), "--out", str(out), "--space", str(space), "--img-size", "32",
            "--budget-ms", "200", "--trials", str(trials), "--no-references",
            "--iterations", "5", "--proxy-epochs", "2", "--proxy-images", "64",
            "--proxy-batch-size", "32", *extra]
