"""The broken input files of the corpus, built once per session under one directory.

The case table refers to them as ``{in}/<name>``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537")


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buf.getvalue()


def _specs(root: Path) -> None:
    from gpunet_core.models.spec import spec_json

    (root / "spec_not_json.json").write_text('{"layer_type": "data", img_resolution: 224')
    (root / "spec_empty.json").write_text("")
    raw = spec_json("gpunet_0")
    raw[2]["num_in_channels"] = 3
    (root / "spec_channel_mismatch.json").write_text(json.dumps(raw))
    raw = spec_json("gpunet_0")
    raw[5]["layer_type"] = "transformer"
    (root / "spec_unknown_layer.json").write_text(json.dumps(raw))
    (root / "spec_no_layers.json").write_text(json.dumps({"name": "gpunet_0", "blocks": []}))


def _checkpoints(root: Path) -> None:
    import torch

    from gpunet_core.models.factory import create_model

    torch.manual_seed(0)
    g0 = create_model("gpunet_0", num_classes=10).state_dict()
    torch.save(g0, root / "g0_10.pth")  # fits gpunet_0 (10 classes), not gpunet_1
    data = (root / "g0_10.pth").read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    step_dir = root / "ckpt_dir"  # the layout a KFP Model artifact has
    step_dir.mkdir()
    (step_dir / "model_best.pth.tar").write_bytes(data[: len(data) // 3])
    linear = torch.nn.Linear(4, 2).state_dict()
    torch.save(linear, root / "linear.pth")
    # NVIDIA's published files look like this: timm's training dict with argparse args
    torch.save({"epoch": 449, "arch": "gpunet_0", "state_dict": linear, "version": 2,
                "args": argparse.Namespace(model="gpunet_0", lr=0.06)}, root / "pickled.pth.tar")


def _images(root: Path) -> None:
    # an ImageFolder with one truncated JPEG among 7 images (14% > the default 1% bad)
    folder = root / "folder"
    seed = 0
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("a", "b"):
            d = folder / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (d / f"{cls}{i}.jpg").write_bytes(jpeg_bytes(seed))
    good = jpeg_bytes(99)
    (folder / "train/a/truncated.jpg").write_bytes(good[: len(good) // 2])
    flat = root / "folder_flat"  # images but no train/ or val/ split directories
    flat.mkdir()
    (flat / "x.jpg").write_bytes(good)


def _image_folder(root: Path, splits: dict[str, dict[str, int]], seed: int,
                  classes: list[str] | None = None) -> None:
    """``root/<split>/<class>/<n images>``; ``classes``: a manifest.json naming them (as
    ``gpunet prepare`` writes one, class indices from it)."""
    for split, counts in splits.items():
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (folder / f"{cls}{i}.jpg").write_bytes(jpeg_bytes(seed))
    if classes is not None:
        (root / "manifest.json").write_text(json.dumps({"classes": classes}))


def _degenerate_datasets(root: Path) -> None:
    """Datasets that are well-formed but cannot train a classifier as asked."""
    two = {"a": 3, "b": 3}
    _image_folder(root / "one_class", {"train": {"a": 4}, "val": {"a": 2}}, 200)
    # the manifest knows two classes, but the training split holds images of one
    _image_folder(root / "one_class_manifest", {"train": {"a": 4}, "val": {"a": 1, "b": 1}},
                  210, classes=["a", "b"])
    _image_folder(root / "val_extra_class", {"train": two, "val": {"a": 1, "b": 1, "c": 1}},
                  220)
    _image_folder(root / "val_extra_manifest", {"train": two, "val": {"a": 1, "c": 1}}, 230,
                  classes=["a", "b", "c"])
    _image_folder(root / "val_many_extra", {"train": two, "val": {
        **{"a": 1, "b": 1}, **{f"x{i}": 1 for i in range(7)}}}, 240)
    # 4 training images: smaller than the smallest batch of the corpus' train command (-b 8)
    _image_folder(root / "tiny", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, 260)


def _archives(root: Path) -> None:
    class_tars = {f"{w}.tar": _tar({f"{w}_{i}.JPEG": jpeg_bytes(10 * k + i) for i in range(3)})
                  for k, w in enumerate(WNIDS)}
    train = _tar(class_tars)
    (root / "train_truncated.tar").write_bytes(train[: len(train) // 2])
    inner = class_tars[f"{WNIDS[0]}.tar"]
    (root / "train_class_truncated.tar").write_bytes(
        _tar({f"{WNIDS[0]}.tar": inner[:700]}))  # the outer tar is fine, the class tar is not
    (root / "not_a_tar.tar").write_bytes(b"this is not a tar archive\n" * 40)
    (root / "val.tar").write_bytes(_tar({f"ILSVRC2012_val_0000000{i}.JPEG": jpeg_bytes(50 + i)
                                         for i in (1, 2)}))
    (root / "labels_bad.txt").write_text(f"ILSVRC2012_val_00000001.JPEG {WNIDS[0]}\n"
                                         f"ILSVRC2012_val_00000002.JPEG {WNIDS[1]} extra\n")


def build(root: Path) -> Path:
    """Write every broken input under ``root`` (cheap: about a second, one 40 MB checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    _specs(root)
    _checkpoints(root)
    _images(root)
    _degenerate_datasets(root)
    _archives(root)
    (root / "corrupt.onnx").write_bytes(b"\x08\x07\x12\x0bnot really onnx" + bytes(range(256)))
    (root / "bad_result.json").write_text('{"schema": "gpunet.validate/1", "top1": ')
    return root
