"""The layering is enforced: import-linter's contracts (pyproject.toml) hold, and they catch a
deliberately added upward import or cycle in a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=300)


def test_the_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.fixture
def tree_copy(tmp_path):
    for name in ("gpunet_core", "components", "pipelines"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "configs", "train_params"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_an_upward_import_breaks_the_layers(tree_copy):
    _append(tree_copy / "gpunet_core" / "utils" / "files.py", "from gpunet_core import steps")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert "gpunet_core.utils is not allowed to import gpunet_core.steps" in result.stdout


def test_a_cycle_between_siblings_is_caught(tree_copy):
    # loaders imports folder; folder importing loaders back closes a cycle inside one layer
    _append(tree_copy / "gpunet_core" / "data" / "folder.py", "from gpunet_core.data import loaders")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert "No cycles are allowed in gpunet_core.data" in result.stdout


def test_a_component_importing_the_pipeline_is_caught(tree_copy):
    _append(tree_copy / "components" / "report.py", "import pipelines.gpunet_training")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert "components is not allowed to import pipelines" in result.stdout


def test_a_component_doing_the_work_itself_is_caught(tree_copy):
    _append(tree_copy / "components" / "validate.py", "import torch")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert "components.validate -> torch" in result.stdout
