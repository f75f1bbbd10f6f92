"""Helpers for the training tests: a small digits set and CLI/torchrun launchers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Fast settings that still learn digits at 32 px (the recipe's 0.08 crop scale and RandAugment
# are tuned for ImageNet at 224+ px and for 1,536-image batches).
FAST = ["--img-size", "32", "-b", "16", "-j", "1", "--opt", "adamw", "--lr", "0.002",
        "--warmup-epochs", "0", "--aa", "", "--reprob", "0", "--scale", "0.5", "1.0"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def gpunet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpunet_core", *args]


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "gpunet_core", *args]


def run(cmd: list[str], timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra_env),
                          timeout=timeout, cwd=REPO)


def read_summary(path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def worker_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` running gpunet (torchrun's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"gpunet_core" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


# the make-run DAG at its smallest: still teacher + 2 torchrun workers, one epoch each
TINY_PIPELINE = ["dataset_per_class=20", "dataset_img_size=32", "epochs=1", "teacher_epochs=1",
                 "teacher_img_size=32", "bench_iterations=10"]


def run_pipeline(workdir, params: list[str], **extra_env: str
                 ) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m pipelines run-local --json`` in ``workdir``; (result, wall seconds)."""
    args = [sys.executable, "-m", "pipelines", "run-local", "--workdir", str(workdir), "--json"]
    for p in params:
        args += ["--param", p]
    started = time.monotonic()
    result = run(args, timeout=1200, **extra_env)
    return result, time.monotonic() - started


def train_briefly(root: Path, img_size: int, steps: int):
    """A gpunet_0 (10 classes) after ``steps`` plain AdamW steps of 16 on ``root/train``, seeded:
    well above chance on digits, far from perfect."""
    # torch: the CLI/torchrun helpers above run without it
    import torch

    from gpunet_core.data.folder import open_image_folder
    from gpunet_core.data.transforms import EvalConfig, eval_transform
    from gpunet_core.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("gpunet_0", num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    dataset = open_image_folder(root / "train",
                                eval_transform(EvalConfig.for_model(model, img_size, 1.0)))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
