"""TEMPORARY test helper: scikit-learn's bundled 8x8 digits as tiny RGB JPEG ImageFolders.

Stand-in until ``gpunet_core.datasets.prepare_digits`` (the datasets issue) lands; swap the
``make_digits_folders`` call in the tests for it then and delete this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def make_digits_folders(root: Path, *, size: int = 32, train_per_class: int = 40,
                        val_per_class: int = 12) -> tuple[Path, Path]:
    """Write ``root/train/<digit>/*.jpg`` and ``root/val/<digit>/*.jpg``; returns both dirs."""
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype(np.uint8)
    counts: dict[int, int] = {}
    for image, label in zip(images, digits.target, strict=True):
        index = counts.get(int(label), 0)
        if index >= train_per_class + val_per_class:
            continue
        counts[int(label)] = index + 1
        split = "train" if index < train_per_class else "val"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        rgb.save(folder / f"{index:04d}.jpg", quality=95)
    return root / "train", root / "val"
