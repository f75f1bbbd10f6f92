"""Our container images: names and tags, read from ``images/images.yaml``.

That file is the single list of images; the Makefile (``build-images``, ``push-images``,
``deploy``) asks this module for the references it builds, and the KFP components use
:func:`image_ref` as their ``base_image``, so both always agree. A reference is
``<registry>/<prefix><kind>:<tag>``; the tag defaults the way the Makefile's ``TAG`` does:
``$GPUNET_IMAGE_TAG``, else ``git describe --tags --always --dirty``, else ``"dev"``.

``python -m gpunet_core.mlops.images --help`` lists the images and writes the kustomization that
points a manifests overlay at them.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from gpunet_core.utils.errors import GpunetError

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_FILE = REPO_ROOT / "images" / "images.yaml"
TAG_ENV = "GPUNET_IMAGE_TAG"
REGISTRY_ENV = "GPUNET_REGISTRY"
FALLBACK_TAG = "dev"


class ImageConfigError(GpunetError):
    """``images/images.yaml`` is missing or malformed, or an unknown image kind was asked for."""


@functools.lru_cache(maxsize=4)
def load_images(path: Path = IMAGES_FILE) -> dict:
    """The parsed images file: ``{"registry": str, "prefix": str, "images": {kind: {...}}}``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ImageConfigError(f"{path} not found: images.yaml ships with the source checkout "
                               f"(set the image explicitly where no checkout exists)") from exc
    except yaml.YAMLError as exc:
        raise ImageConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict) or not data["images"]:
        raise ImageConfigError(f"{path} needs a non-empty 'images:' mapping of kind -> settings")
    for key in ("registry", "prefix"):
        if not isinstance(data.get(key), str):
            raise ImageConfigError(f"{path} needs a string '{key}:'")
    for kind, spec in data["images"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("dockerfile"), str):
            raise ImageConfigError(f"{path}: image '{kind}' needs a 'dockerfile:' path")
    return data


def image_kinds() -> list[str]:
    """The image kinds in file order, e.g. ``["train", "bench", "cpu"]``."""
    return list(load_images()["images"])


def default_tag() -> str:
    """``$GPUNET_IMAGE_TAG``, else ``git describe --tags --always --dirty``, else ``"dev"``."""
    return os.environ.get(TAG_ENV) or _git_describe()


@functools.cache
def _git_describe() -> str:
    """The checkout's ``git describe``, asked once per process (every component's image needs it)."""
    try:
        out = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return FALLBACK_TAG
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else FALLBACK_TAG


def default_registry() -> str:
    """``$GPUNET_REGISTRY``, else the ``registry:`` of images.yaml."""
    return os.environ.get(REGISTRY_ENV) or load_images()["registry"]


def image_name(kind: str, registry: str | None = None) -> str:
    """``<registry>/<prefix><kind>`` without a tag."""
    data = load_images()
    if kind not in data["images"]:
        raise ImageConfigError(f"unknown image kind '{kind}'; images.yaml defines: "
                               f"{', '.join(data['images'])}")
    registry = (registry or default_registry()).rstrip("/")
    return f"{registry}/{data['prefix']}{kind}"


def image_ref(kind: str, registry: str | None = None, tag: str | None = None) -> str:
    """The full reference ``<registry>/<prefix><kind>:<tag>`` that ``make build-images`` builds."""
    return f"{image_name(kind, registry)}:{tag or default_tag()}"


def dockerfile(kind: str) -> Path:
    """The Dockerfile of an image kind, relative to the repository root."""
    image_name(kind)  # validates the kind
    return Path(load_images()["images"][kind]["dockerfile"])


def kustomization(resource: str, registry: str | None = None, tag: str | None = None) -> dict:
    """A kustomization that includes ``resource`` and points every image of ours at
    :func:`image_ref`. Manifests name an image by its bare ``<prefix><kind>``, which their own
    kustomization may already have expanded to images.yaml's registry: both are matched."""
    data = load_images()
    tag = tag or default_tag()
    entries = []
    for kind in image_kinds():
        new = {"newName": image_name(kind, registry), "newTag": tag}
        for name in (f"{data['prefix']}{kind}", f"{data['registry'].rstrip('/')}/{data['prefix']}{kind}"):
            entries.append({"name": name, **new})
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [resource],
        "images": entries,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpunet_core.mlops.images",
                                     description="Our container images, from images/images.yaml.")
    parser.add_argument("--registry", default=None, help="registry (default: images.yaml)")
    parser.add_argument("--tag", default=None, help="tag (default: $GPUNET_IMAGE_TAG or git describe)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="print 'kind dockerfile reference' per image")
    sub.add_parser("refs", help="print one image reference per line")
    kust = sub.add_parser("kustomization", help="print a kustomization setting our images")
    kust.add_argument("resource", help="the overlay (path relative to the output's directory)")
    args = parser.parse_args(argv)
    try:
        if args.action == "kustomization":
            print(yaml.safe_dump(kustomization(args.resource, args.registry, args.tag),
                                 sort_keys=False), end="")
            return 0
        for kind in image_kinds():
            ref = image_ref(kind, args.registry, args.tag)
            print(f"{kind} {dockerfile(kind)} {ref}" if args.action == "list" else ref)
    except GpunetError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
