"""A torchrun worker killed with SIGKILL at a random moment, for several seeds.

torchrun restarts the group, training auto-resumes from the last checkpoint, every epoch appears
once in summary.csv, and the final weights are bit-identical to an uninterrupted run with the
same seed: data order and per-sample augmentation depend only on (seed, epoch, index), and each
epoch reseeds the RNGs from (seed, rank, epoch) (gpunet_core.data.loaders / gpunet_core.training.loop).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from gpunet_core.models.checkpoint import read_checkpoint
from tests.train_helpers import (
    FAST,
    REPO,
    env,
    read_summary,
    torchrun_cmd,
    worker_pids,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EPOCHS = 3
KILL_SEEDS = (11, 22, 33)


def train_args(data, out) -> list[str]:
    return ["train", str(data), "--model", "gpunet_0", "--epochs", str(EPOCHS), "--seed", "7",
            "--auto-resume", "--output", str(out), *FAST]


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(path)
    return {**{f"model.{k}": v for k, v in ckpt["state_dict"].items()},
            **{f"ema.{k}": v for k, v in ckpt.get("state_dict_ema", {}).items()}}


def launch(data, out, log_path, kill_at: float | None = None, victim: int = 0,
           after_checkpoint: bool = False) -> dict:
    """Run torchrun (2 workers, up to 2 restarts); with ``kill_at``, SIGKILL worker ``victim``
    that many seconds after the workers appear (``after_checkpoint``: after the first
    checkpoint is written). Returns timings, when the first checkpoint appeared and where the
    kill landed."""
    checkpoint = out / "last.pth.tar"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun_cmd(2, *train_args(data, out), max_restarts=2),
                                stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(workers := worker_pids(proc.pid)) < 2:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            appeared = time.monotonic()
            info: dict = {}
            first_checkpoint = None
            if kill_at is not None:
                if after_checkpoint:
                    while not checkpoint.exists():
                        assert proc.poll() is None, "the run ended before its first checkpoint"
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    first_checkpoint = time.monotonic() - appeared
                time.sleep(kill_at)
                assert proc.poll() is None, "the run ended before the kill"
                summary = out / "summary.csv"
                info = {"kill_after_s": round(time.monotonic() - appeared, 1), "rank": victim,
                        "after_checkpoint": after_checkpoint,
                        "epochs_done_at_kill": len(read_summary(summary))
                        if summary.exists() else 0}
                os.kill(workers[victim], signal.SIGKILL)
            while proc.poll() is None:  # note when the first checkpoint appears
                if first_checkpoint is None and checkpoint.exists():
                    first_checkpoint = time.monotonic() - appeared
                assert time.monotonic() < deadline + 600
                time.sleep(0.05)
            info["exit"] = proc.returncode
            info["workers_s"] = round(time.monotonic() - appeared, 1)
            info["first_checkpoint_s"] = first_checkpoint
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return info


def test_sigkilled_worker_resumes_to_the_same_weights(digits_tiny, tmp_path, observe):
    reference = tmp_path / "reference"
    ref_run = launch(digits_tiny, reference, tmp_path / "reference.log")
    assert ref_run["exit"] == 0, (tmp_path / "reference.log").read_text()[-3000:]
    span = ref_run["workers_s"]  # from the workers' start to the end of training
    ref = weights(reference / "last.pth.tar")
    ref_rows = read_summary(reference / "summary.csv")

    assert ref_run["first_checkpoint_s"] is not None
    # one epoch after the first checkpoint, in the reference run
    epoch_s = (span - ref_run["first_checkpoint_s"]) / (EPOCHS - 1)

    kills = []
    for i, seed in enumerate(KILL_SEEDS):
        rng = random.Random(seed)
        out = tmp_path / f"killed-{seed}"
        log = tmp_path / f"killed-{seed}.log"
        # random moments of the run, and the last one surely after a checkpoint (how long the
        # workers take to start on a loaded 2-core machine decides whether a fraction of the
        # run lands before or after the first one)
        last = i == len(KILL_SEEDS) - 1
        kill_at = rng.uniform(0.1, 0.5) * epoch_s if last else rng.uniform(0.25, 0.7) * span
        kill = launch(digits_tiny, out, log, kill_at=kill_at, victim=rng.randrange(2),
                      after_checkpoint=last)
        text = log.read_text()
        assert kill["exit"] == 0, text[-3000:]
        rows = read_summary(out / "summary.csv")
        assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS)), rows  # each epoch once
        ckpt = read_checkpoint(out / "last.pth.tar")
        assert ckpt["epoch"] == EPOCHS
        got = weights(out / "last.pth.tar")
        assert got.keys() == ref.keys()
        differing = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not differing, f"seed {seed}: {len(differing)} tensors differ, e.g. {differing[:3]}"
        assert [r["top1"] for r in rows] == [r["top1"] for r in ref_rows]
        kill["resumed"] = "resumed from" in text
        kills.append(kill)
    assert kills[-1]["resumed"], kills  # killed after a checkpoint: it resumed from it
    observe({"fault": "SIGKILL of one torchrun worker (2 workers, gloo) at a random time",
             "injected": len(kills), "outcome": "every run restarted and finished; epochs "
             f"0..{EPOCHS - 1} once each in summary.csv; final model and EMA weights "
             "bit-identical to the uninterrupted run", "kills": kills,
             "reference_training_s": round(span, 1)})
