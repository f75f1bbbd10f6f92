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


# Libraries imported where they are used, never at module top: what each would cost every
# process that imports the module (seconds on the 2-core CI machine) or why it cannot load.
LOADED_ON_USE = {
    "torch": "1.7 s", "torchvision": "with timm", "timm": "2.2 s on top of torch",
    "mlflow": "1.4 s", "sklearn": "1.3 s", "onnx": "0.8 s", "onnxscript": "with torch.onnx",
    "matplotlib": "0.55 s, and its first import writes a font cache",
    "kfp": "0.5 s", "kubernetes": "0.4 s",
    "onnxruntime": "0.2 s, and its first import writes a device id",
    "boto3": "0.16 s, S3 users only", "botocore": "with boto3", "s3transfer": "with boto3",
    "tensorrt": "GPU machines only", "nvidia": "DALI: GPU machines only",
}


def _function_level_imports(path: Path):
    import ast

    lines = path.read_text().splitlines()
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.names[0].name if isinstance(node, ast.Import) else node.module
                    yield module or "", node.lineno, lines


def _has_reason(lineno: int, lines: list[str]) -> bool:
    """A comment on the import's line, or above the block of imports it belongs to."""
    i = lineno - 1
    while i >= 0:
        text = lines[i].strip()
        if "#" in text:
            return True
        if not (text.startswith(("import ", "from ")) or text.endswith((",", "(", ")"))
                or text.isidentifier()):
            return False
        i -= 1
    return False


def test_function_level_imports_say_why():
    """An import inside a function buys start-up time; everything else belongs at the top."""
    unexplained = []
    for path in sorted((REPO / "gpunet_core").rglob("*.py")):
        for module, lineno, lines in _function_level_imports(path):
            if module.split(".")[0] in LOADED_ON_USE:
                continue
            if not _has_reason(lineno, lines):
                unexplained.append(f"{path.relative_to(REPO)}:{lineno}: {lines[lineno - 1].strip()}")
    assert not unexplained, "function-level imports without a reason (move them to the top, " \
                            "or say on the line above what they save):\n" + "\n".join(unexplained)
