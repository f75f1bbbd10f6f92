"""Input pipelines: shapes, dtypes, normalisation, determinism, DDP sharding, DALI parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gpunet_core import cli
from gpunet_core.data import folder, loaders, transforms
from gpunet_core.data import prepare as datasets
from gpunet_core.data.transforms import AugmentConfig, EvalConfig
from gpunet_core.utils.errors import GpunetError

MEAN = torch.tensor(transforms.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(transforms.IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    datasets.prepare_digits(root, img_size=24)
    return root


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory) -> Path:
    """A 3-class, 10-images-per-class slice of digits (with its own manifest)."""
    root = tmp_path_factory.mktemp("small")
    for split in ("train", "val"):
        for cls in ("0", "1", "2"):
            (root / split / cls).mkdir(parents=True)
            for img in sorted((digits / split / cls).iterdir())[:10]:
                shutil.copy(img, root / split / cls / img.name)
    (root / "manifest.json").write_text('{"classes": ["0", "1", "2", "3"]}')
    return root


def test_eval_loader_shapes_normalisation_and_determinism(small):
    cfg = EvalConfig(img_size=32, crop_pct=0.875)
    loader = loaders.build_eval_loader(small / "val", cfg, batch_size=8, workers=0)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (30,)
    assert labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    # normalised with ImageNet mean/std: undoing it gives pixels in [0, 1]
    pixels = images * STD + MEAN
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert pixels.max() > 0.9 and pixels.min() < 0.1  # white strokes on black background
    again = torch.cat([b[0] for b in loaders.build_eval_loader(small / "val", cfg, batch_size=30,
                                                                workers=0)])
    assert torch.equal(images, again)


@pytest.mark.parametrize(("size", "crop_pct", "interpolation"), [
    (32, 0.875, "bicubic"), (32, 1.0, "bicubic"), (41, 0.95, "bilinear"), (24, 0.5, "bicubic")])
def test_eval_transform_equals_timms(size, crop_pct, interpolation):
    """Validation builds its transform without timm/torchvision; the tensors must not differ."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    cfg = EvalConfig(img_size=size, crop_pct=crop_pct, interpolation=interpolation,
                     mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    ours = transforms.eval_transform(cfg)
    timms = create_transform(input_size=size, is_training=False, interpolation=interpolation,
                             mean=cfg.mean, std=cfg.std, crop_pct=crop_pct)
    rng = np.random.default_rng(size)
    # portrait, landscape, square, odd sizes, already at the target size, smaller than it
    for w, h in [(50, 37), (37, 50), (64, 64), (33, 97), (size, size), (13, 21)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = ours(img), timms(img)
        assert a.shape == b.shape == (3, size, size) and a.dtype == b.dtype
        assert torch.equal(a, b), (w, h)
    grey = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).convert("RGB")
    assert torch.equal(ours(grey), timms(grey))
    with pytest.raises(GpunetError, match="interpolation 'cubic' is not one of"):
        transforms.eval_transform(EvalConfig(img_size=32, crop_pct=1.0, interpolation="cubic"))


def test_image_folder_follows_torchvision_rules(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for rel in ["b/x.JPG", "b/sub/a.png", "b/sub/deeper/z.jpeg", "a/1.jpg", "a/0.webp",
                "c/9.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (5, 4), 200).save(tmp_path / rel, format=Image.registered_extensions()[
            Path(rel).suffix.lower()])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.jpg").write_bytes(b"")  # files beside the class folders are ignored
    ours, theirs = folder.ImageFolderDataset(tmp_path), ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes == ["a", "b", "c"]
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets
    img, target = ours[1]
    assert img.mode == "RGB" and img.size == (5, 4) and target == 0
    # a fixed class list (from a manifest) keeps indices and tolerates absent classes
    fixed = folder.ImageFolderDataset(tmp_path, classes=["c", "zz", "a"], allow_empty=True)
    assert fixed.classes == ["c", "zz", "a"]
    assert sorted(fixed.targets) == [0, 2, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid file for the classes empty"):
        folder.ImageFolderDataset(tmp_path)
    with pytest.raises(GpunetError, match="no images found under"):
        folder.open_image_folder(tmp_path)


def test_manifest_fixes_class_indices(small):
    ds = folder.open_image_folder(small / "val")
    assert ds.classes == ["0", "1", "2", "3"]  # class "3" absent from the folder, still indexed


def test_train_loader_augments_and_shards_like_distributed_sampler(small):
    cfg = AugmentConfig(img_size=32)
    rank_indices = []
    for rank in range(2):
        loader = loaders.build_train_loader(small / "train", cfg, batch_size=4, workers=0,
                                            rank=rank, world_size=2, seed=3, drop_last=False)
        loaders.set_epoch(loader, 1)
        rank_indices.append([i for _, i in loader.sampler])  # (epoch, index) pairs
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
    a, b = map(set, rank_indices)
    assert len(rank_indices[0]) == len(rank_indices[1]) == 15
    assert not a & b and a | b == set(range(30))
    # a new epoch is a new permutation, same on every rank's view
    loader = loaders.build_train_loader(small / "train", cfg, batch_size=4, workers=0, rank=0,
                                        world_size=2, seed=3)
    loaders.set_epoch(loader, 2)
    assert [i for _, i in loader.sampler] != rank_indices[0]
    # training augmentation is random: the same image comes out differently
    t = transforms.train_transform(cfg)
    img = folder.open_image_folder(small / "train").loader(
        folder.open_image_folder(small / "train").samples[0][0])
    assert not torch.equal(t(img), t(img))


def test_augmentation_depends_only_on_seed_epoch_and_index(small):
    """What resume-equals-uninterrupted rests on: no dependence on workers or RNG history."""
    cfg = AugmentConfig(img_size=32, hflip=0.5)

    def first_batch(workers: int, epoch: int, seed: int = 3):
        loader = loaders.build_train_loader(small / "train", cfg, batch_size=6, workers=workers,
                                            seed=seed)
        loaders.set_epoch(loader, epoch)
        torch.manual_seed(epoch * 1000 + workers)  # the global RNG must not matter
        return next(iter(loader))

    x0, y0 = first_batch(workers=0, epoch=1)
    x2, y2 = first_batch(workers=2, epoch=1)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    loader = loaders.build_train_loader(small / "train", cfg, batch_size=6, workers=0, seed=3)
    state = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(state, torch.get_rng_state())  # model-side randomness untouched
    x_next, _ = first_batch(workers=0, epoch=2)
    x_seed, _ = first_batch(workers=0, epoch=1, seed=4)
    assert not torch.equal(x0, x_next) and not torch.equal(x0, x_seed)


def test_loader_bad_input(tmp_path, small):
    with pytest.raises(GpunetError, match="not found"):
        loaders.build_train_loader(tmp_path / "nope", AugmentConfig(img_size=32), workers=0)
    with pytest.raises(GpunetError, match="rank 2 is outside"):
        loaders.build_train_loader(small / "train", AugmentConfig(img_size=32), rank=2,
                                   world_size=2, workers=0)
    with pytest.raises(GpunetError, match="data-backend must be"):
        loaders.build_eval_loader(small / "val", EvalConfig(32, 1.0), backend="cuda")
    with pytest.raises(GpunetError, match="reprob"):
        AugmentConfig(reprob=2.0)


dali = pytest.importorskip("nvidia.dali", reason="DALI is Linux x86_64 only")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dali_cpu_eval_matches_pil(small):
    cfg = EvalConfig(img_size=32, crop_pct=0.875)
    pil = list(loaders.build_eval_loader(small / "val", cfg, batch_size=30, workers=0))
    assert loaders.resolve_backend("auto") == ("dali" if torch.cuda.is_available() else "pil")
    dali_loader = loaders.build_eval_loader(small / "val", cfg, batch_size=8, workers=1,
                                     backend="dali")
    assert dali_loader.device == "cpu"
    batches = list(dali_loader)
    assert len(dali_loader) == 4 and [len(b[1]) for b in batches] == [8, 8, 8, 6]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and images.shape == (30, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (30,)
    assert torch.equal(labels, pil[0][1])
    # same normalisation and geometry; only the resize kernels differ slightly
    assert (images - pil[0][0]).abs().mean() < 0.1
    again = torch.cat([b[0] for b in loaders.build_eval_loader(
        small / "val", cfg, batch_size=8, workers=1, backend="dali")])
    assert torch.equal(images, again)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dali_cpu_train_recipe_and_shards(small, capsys):
    cfg = AugmentConfig(img_size=32, reprob=1.0)
    seen = []
    for rank in range(2):
        loader = loaders.build_train_loader(small / "train", cfg, batch_size=5, workers=1,
                                            rank=rank, world_size=2, backend="dali")
        batches = list(loader)
        assert len(batches) == 3  # 15 samples per shard, batch 5
        images, labels = batches[0]
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (5,) and labels.dtype == torch.int64
        seen.append(sorted(torch.cat([b[1] for b in batches]).tolist()))
    # shards are disjoint and cover the dataset: 10 images of each class overall
    assert sorted(seen[0] + seen[1]) == [0] * 10 + [1] * 10 + [2] * 10
    # pixel-mode erasing with probability 1 puts N(0,1) noise far outside the image range
    assert (images < (0 - MEAN) / STD - 0.5).any()
    with pytest.raises(GpunetError, match="no CUDA GPU"):
        loaders.build_train_loader(small / "train", cfg, batch_size=5, workers=1,
                                   backend="dali", dali_device="gpu")
    assert cli.main(["bench-data", str(small), "--img-size", "32", "-b", "4", "--batches", "3",
                     "-j", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == ["pil", "dali"]
    assert all(r["images"] == 12 and r["images_per_s"] > 0 for r in rows)
