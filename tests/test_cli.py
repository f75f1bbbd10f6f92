"""The ``gpunet`` CLI as a user runs it: a real subprocess, --help everywhere, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpunet_core.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def gpunet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpunet_core", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO, timeout=300)


def test_top_level_help_lists_commands():
    out = gpunet("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    out = gpunet(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: gpunet" in out.stdout


def test_models_json_parses():
    out = gpunet("models", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 7


def test_spec_json_for_an_edited_file(tmp_path):
    raw = json.loads((REPO / "gpunet_core" / "models" / "configs" / "0.5ms-D.json").read_text())
    raw[-1]["num_classes"] = 10
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    out = gpunet("spec", str(path), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["layers"][-1]["out"] == 10 and result["img_resolution"] == 224


@pytest.mark.parametrize("args,message", [
    (["spec", "gpunet_42"], "unknown model 'gpunet_42': valid names are gpunet_0"),
    (["spec", "missing.json"], "file not found"),
    (["spec", "BAD"], "entry 2, field 'num_in_channels'): channel mismatch"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    bad = tmp_path / "bad.json"
    raw = json.loads((REPO / "gpunet_core" / "models" / "configs" / "0.65ms.json").read_text())
    raw[2]["num_in_channels"] = 3
    bad.write_text(json.dumps(raw))
    args = [str(bad) if a == "BAD" else a for a in args]
    out = gpunet(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "gpunet"
    assert script.exists(), "pip install -e . must install the gpunet console script"
