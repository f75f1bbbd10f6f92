"""Dataset preparation: digits determinism, a miniature ILSVRC2012 archive set, folder source."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpunet_core import cli
from gpunet_core.data import prepare as datasets
from gpunet_core.utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def jpeg_bytes(seed: int, size=(40, 30), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_ilsvrc(tmp: Path, *, train: dict[str, dict[str, bytes]],
                val: dict[str, tuple[str, bytes]], csv_labels: bool = True,
                extra_labels: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ILSVRC2012-style archives: train tar of <wnid>.tar, flat val tar, label file."""
    train_tar = tmp / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar, "w") as outer:
        for wnid, files in train.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in files.items():
                    add_bytes(inner, name, data)
            add_bytes(outer, f"{wnid}.tar", buf.getvalue())
    val_tar = tmp / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w") as tar:
        for name, (_, data) in val.items():
            add_bytes(tar, name, data)
    labels = {Path(n).stem: w for n, (w, _) in val.items()} | (extra_labels or {})
    if csv_labels:
        label_file = tmp / "LOC_val_solution.csv"
        rows = ["ImageId,PredictionString"] + [f"{stem},{w} 1 2 30 20 {w} 3 4 10 10"
                                                for stem, w in labels.items()]
    else:
        label_file = tmp / "val_labels.txt"
        rows = [f"{stem}.JPEG {w}" for stem, w in labels.items()]
    label_file.write_text("\n".join(rows) + "\n")
    return {"train_tar": train_tar, "val_tar": val_tar, "val_labels": label_file}


WNIDS = ("n01440764", "n01443537", "n01484850")


def quirky_imagenet(tmp: Path, **kwargs) -> dict[str, Path]:
    good = jpeg_bytes(99)
    train = {
        WNIDS[0]: {f"{WNIDS[0]}_{i}.JPEG": jpeg_bytes(i) for i in range(4)},
        WNIDS[1]: {f"{WNIDS[1]}_{i}.JPEG": jpeg_bytes(10 + i) for i in range(3)}
        | {f"{WNIDS[1]}_png.JPEG": jpeg_bytes(20, fmt="PNG"),          # PNG under a JPEG name
           f"{WNIDS[1]}_cmyk.JPEG": jpeg_bytes(21, mode="CMYK")},       # CMYK JPEG
        WNIDS[2]: {f"{WNIDS[2]}_{i}.JPEG": jpeg_bytes(30 + i) for i in range(3)}
        | {f"{WNIDS[2]}_gray.JPEG": jpeg_bytes(31, mode="L"),           # grayscale JPEG
           f"{WNIDS[2]}_trunc.JPEG": good[: len(good) // 2]},           # truncated
    }
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": (WNIDS[i % 3], jpeg_bytes(50 + i))
           for i in range(1, 7)}
    return make_ilsvrc(tmp, train=train, val=val, **kwargs)


def tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- digits


def test_digits_builds_deterministically_as_an_imagefolder(tmp_path):
    a = datasets.prepare_digits(tmp_path / "a", img_size=16)
    b = datasets.prepare_digits(tmp_path / "b", img_size=16, jobs=2)
    ma, mb = a.manifest, b.manifest
    assert ma["classes"] == [str(i) for i in range(10)]
    assert ma["splits"]["train"]["count"] + ma["splits"]["val"]["count"] == 1797
    assert ma["splits"]["val"]["count"] == 360
    # stratified: each class's val share is close to 20%
    for c in ma["classes"]:
        n_val, n_train = ma["splits"]["val"]["per_class"][c], ma["splits"]["train"]["per_class"][c]
        assert abs(n_val / (n_val + n_train) - 0.2) < 0.02
    assert ma == mb
    assert (tmp_path / "a/SHA256SUMS").read_bytes() == (tmp_path / "b/SHA256SUMS").read_bytes()
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    img = Image.open(next((tmp_path / "a/train/3").iterdir()))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 16))
    # a different split seed is a different dataset
    c = datasets.prepare_digits(tmp_path / "c", img_size=16, seed=1)
    assert c.manifest["checksum"] != ma["checksum"]
    # the checksum file verifies with the standard tool
    res = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=tmp_path / "a",
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_digits_cli_and_rerun_is_noop(tmp_path, capsys):
    args = ["prepare", "digits", "--out", str(tmp_path / "d"), "--img-size", "12",
            "--no-progress", "-j", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-m", "gpunet_core", *args], capture_output=True,
                           text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "train=1437, val=360" in first.stdout
    before = tree(tmp_path / "d")
    assert cli.main(args) == 0
    assert "already prepared" in capsys.readouterr().out
    assert tree(tmp_path / "d") == before
    assert cli.main(args[:4] + ["--img-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "--img-size must be" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- imagenet


def test_imagenet_quirks_quarantine_and_rerun(tmp_path):
    src = quirky_imagenet(tmp_path)
    out = tmp_path / "out"
    summary = datasets.prepare_imagenet(out, **src, max_bad_fraction=0.2, jobs=2,
                                        progress=False)
    m = summary.manifest
    assert m["classes"] == sorted(WNIDS)
    assert m["splits"]["train"]["per_class"] == {WNIDS[0]: 4, WNIDS[1]: 5, WNIDS[2]: 4}
    assert m["splits"]["val"]["per_class"] == {WNIDS[0]: 2, WNIDS[1]: 2, WNIDS[2]: 2}
    assert summary.quarantined == 1 and summary.written == 19
    (skipped,) = m["skipped"]
    assert skipped["path"] == f"train/{WNIDS[2]}/{WNIDS[2]}_trunc.JPEG"
    assert "truncated" in skipped["reason"]
    assert (out / skipped["quarantine"]).is_file()
    assert not (out / skipped["path"]).exists()
    assert {c["from"] for c in m["converted"]} == {"PNG", "CMYK", "L"}
    for c in m["converted"]:
        img = Image.open(out / c["path"])
        assert (img.format, img.mode) == ("JPEG", "RGB")
    assert (out / f"val/{WNIDS[1]}/ILSVRC2012_val_00000001.JPEG").is_file()
    assert m["splits"]["train"]["image_size"]["max_width"] == 40

    # re-run on the same input: a no-op
    before = tree(out)
    again = datasets.prepare_imagenet(out, **src, max_bad_fraction=0.2, progress=False)
    assert again.up_to_date and again.manifest == m and tree(out) == before

    # interrupted run (no manifest, one image missing): resumes, same manifest
    (out / "manifest.json").unlink()
    (out / f"train/{WNIDS[1]}/{WNIDS[1]}_png.JPEG").unlink()
    resumed = datasets.prepare_imagenet(out, **src, max_bad_fraction=0.2, progress=False)
    assert resumed.written == 1 and resumed.reused == 18
    assert resumed.manifest == m
    assert json.loads((out / "manifest.json").read_text()) == m


def test_imagenet_plain_label_file(tmp_path):
    src = quirky_imagenet(tmp_path, csv_labels=False)
    summary = datasets.prepare_imagenet(tmp_path / "o", val_tar=src["val_tar"],
                                        val_labels=src["val_labels"], progress=False)
    assert summary.manifest["splits"]["val"]["count"] == 6
    assert "train" not in summary.manifest["splits"]


def test_imagenet_too_many_bad_files_leaves_no_manifest(tmp_path):
    src = quirky_imagenet(tmp_path)
    with pytest.raises(DataError, match="undecodable.*max-bad-fraction"):
        datasets.prepare_imagenet(tmp_path / "o", **src, max_bad_fraction=0.01, progress=False)
    assert not (tmp_path / "o/manifest.json").exists()
    assert datasets.read_manifest(tmp_path / "o") is None


@pytest.mark.parametrize("case, match", [
    ("missing_archive", "train archive not found"),
    ("not_a_tar", "not a readable tar"),
    ("label_without_image", "absent from"),
    ("image_without_label", "have no label"),
    ("val_class_not_in_train", "in val but not in train"),
    ("empty_class", "has no images"),
])
def test_imagenet_bad_input_is_a_clear_error(tmp_path, case, match):
    one = {"a.JPEG": jpeg_bytes(1)}
    train = {WNIDS[0]: one, WNIDS[1]: {"b.JPEG": jpeg_bytes(2)}}
    val = {"ILSVRC2012_val_00000001.JPEG": (WNIDS[0], jpeg_bytes(3))}
    kwargs: dict = {}
    if case == "label_without_image":
        kwargs["extra_labels"] = {"ILSVRC2012_val_00000002": WNIDS[0]}
    if case == "val_class_not_in_train":
        val["ILSVRC2012_val_00000002.JPEG"] = (WNIDS[2], jpeg_bytes(4))
    if case == "empty_class":
        train[WNIDS[2]] = {}
    src = make_ilsvrc(tmp_path, train=train, val=val, **kwargs)
    if case == "image_without_label":
        src["val_labels"].write_text("ImageId,PredictionString\n")
        src["val_labels"].write_text(src["val_labels"].read_text() + "other,n0 1 2 3 4\n")
    if case == "missing_archive":
        src["train_tar"] = tmp_path / "nope.tar"
    if case == "not_a_tar":
        src["train_tar"].write_bytes(b"this is not a tar file at all" * 30)
    with pytest.raises(DataError, match=match):
        datasets.prepare_imagenet(tmp_path / "o", **src, progress=False)
    assert not (tmp_path / "o/manifest.json").exists()


# ----------------------------------------------------------------------------- folder


def test_folder_source_normalises_and_checks(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{cls}{i}.jpg").write_bytes(jpeg_bytes(hash((split, cls, i)) % 1000))
    (src / "train/dog/extra.png").write_bytes(jpeg_bytes(7, fmt="PNG"))
    (src / "train/dog/notes.txt").write_text("not an image")
    summary = datasets.prepare_folder(src, tmp_path / "out", progress=False)
    m = summary.manifest
    assert m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["per_class"] == {"cat": 3, "dog": 4}
    assert (tmp_path / "out/train/dog/extra.jpg").is_file()
    assert m["converted"] == [{"path": "train/dog/extra.jpg", "from": "PNG"}]

    (src / "val/bird").mkdir()
    with pytest.raises(DataError, match="'bird'.*has no images"):
        datasets.prepare_folder(src, tmp_path / "out2", progress=False)
    (src / "val/bird/b.jpg").write_bytes(jpeg_bytes(5))
    with pytest.raises(DataError, match="bird are in val but not in train"):
        datasets.prepare_folder(src, tmp_path / "out2", progress=False)
    with pytest.raises(DataError, match="different prepared dataset"):
        datasets.prepare_digits(tmp_path / "out", img_size=8)
