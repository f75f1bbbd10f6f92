"""The image folder: torchvision's ``ImageFolder`` rules without importing torchvision.

Class indices come from the dataset's ``manifest.json`` when there is one, so a split that
lacks a class keeps the same indices. :data:`IMAGE_EXTENSIONS` is the one list of image file
types in the project (dataset preparation reads these plus GIF).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from gpunet_core.utils.errors import GpunetError
from gpunet_core.utils.files import MANIFEST_FILE

# torchvision's ImageFolder extensions (matched case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path: str | Path):
    """The image at ``path`` as an RGB PIL image (torchvision's ``pil_loader``)."""
    with open(path, "rb") as fh:
        return Image.open(fh).convert("RGB")


class ImageFolderDataset:
    """``(image, class index)`` samples of a ``<root>/<class>/.../<image>`` tree.

    A map-style dataset for ``torch.utils.data.DataLoader`` that does not import torch itself,
    so dataset preparation (which shares :data:`IMAGE_EXTENSIONS`) runs without it.

    torchvision's ``ImageFolder`` rules: classes are the sorted sub-directory names (or the
    given list), files are walked in sorted order (symlinks followed) and kept when their
    extension is in :data:`IMAGE_EXTENSIONS`. Raises ``FileNotFoundError`` for a tree without
    class folders, or for a class without images unless ``allow_empty`` (a split that lacks
    a class of the manifest).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 classes: list[str] | None = None, allow_empty: bool = False):
        self.root, self.transform, self.loader = str(root), transform, load_rgb
        if classes is None:
            classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {self.root}.")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in sorted(self.class_to_idx):
            found = 0
            class_dir = os.path.join(self.root, name)
            if os.path.isdir(class_dir):
                for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
                    for fname in sorted(files):
                        if fname.lower().endswith(IMAGE_EXTENSIONS):
                            self.samples.append((os.path.join(dirpath, fname),
                                                 self.class_to_idx[name]))
                            found += 1
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(IMAGE_EXTENSIONS)}")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        return (self.transform(img) if self.transform is not None else img), target


def manifest_classes(root: str | Path) -> list[str] | None:
    """Class list (index order) from ``manifest.json`` next to a split directory, if any."""
    root = Path(root)
    for candidate in (root / MANIFEST_FILE, root.parent / MANIFEST_FILE):
        if candidate.is_file():
            try:
                return list(json.loads(candidate.read_text())["classes"])
            except (ValueError, KeyError, TypeError):
                raise GpunetError(f"{candidate} is not a valid dataset manifest; re-run "
                                  "gpunet prepare") from None
    return None


def open_image_folder(root: str | Path, transform=None,
                      classes: list[str] | None = None) -> ImageFolderDataset:
    """An ImageFolder with a clear error when the directory is missing or holds no images.

    Class indices follow ``classes`` or the dataset's manifest.json when present, else the
    sorted sub-directory names (torchvision's rule).
    """
    root = Path(root)
    if not root.is_dir():
        raise GpunetError(f"dataset directory not found: {root} (expected <root>/<class>/<images>)")
    classes = classes or manifest_classes(root)
    try:
        dataset = ImageFolderDataset(root, transform, classes or None,
                                     allow_empty=bool(classes))
    except (FileNotFoundError, RuntimeError) as exc:
        raise GpunetError(f"no images found under {root}: {exc}") from None
    if len(dataset) == 0:
        raise GpunetError(f"no images found under {root} (expected <root>/<class>/<images>)")
    return dataset
