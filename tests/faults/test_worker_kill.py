"""A torchrun worker killed with SIGKILL at a random moment, for several seeds.

torchrun restarts the group, training auto-resumes from the last checkpoint, every epoch appears
once in summary.csv, and the final weights are bit-identical to an uninterrupted run with the
same seed: data order and per-sample augmentation depend only on (seed, epoch, index), and each
epoch reseeds the RNGs from (seed, rank, epoch) (gpunet_core.loaders / gpunet_core.train).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from gpunet_core.checkpoint import read_checkpoint
from tests.train_helpers import (
    FAST,
    REPO,
    env,
    read_summary,
    run,
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


def run_with_a_kill(data, out, log_path, kill_seed: int, window: tuple[float, float]) -> dict:
    """Start torchrun, SIGKILL one worker at a random time inside ``window`` (seconds after
    the workers appear), wait for the restarted run to finish."""
    rng = random.Random(kill_seed)
    delay = rng.uniform(*window)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun_cmd(2, *train_args(data, out), max_restarts=2),
                                stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(victims := worker_pids(proc.pid)) < 2:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(delay)
            assert proc.poll() is None, "the run ended before the kill: widen the window"
            epochs_done = len(read_summary(out / "summary.csv")) if (
                out / "summary.csv").exists() else 0
            rank = rng.randrange(2)
            os.kill(victims[rank], signal.SIGKILL)
            code = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"exit": code, "delay_s": round(delay, 1), "rank": rank,
            "epochs_done_at_kill": epochs_done}


def test_sigkilled_worker_resumes_to_the_same_weights(digits_small, tmp_path, observe):
    reference = tmp_path / "reference"
    started = time.monotonic()
    result = run(torchrun_cmd(2, *train_args(digits_small, reference)), timeout=900)
    ref_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    ref = weights(reference / "last.pth.tar")
    ref_rows = read_summary(reference / "summary.csv")

    kills = []
    for seed in KILL_SEEDS:
        out = tmp_path / f"killed-{seed}"
        log = tmp_path / f"killed-{seed}.log"
        # workers appear ~1/4 into the reference run; kill somewhere in its training part
        kill = run_with_a_kill(digits_small, out, log, seed, (0.1 * ref_s, 0.6 * ref_s))
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
    assert any(k["resumed"] for k in kills)  # at least one kill landed after a checkpoint
    observe({"fault": "SIGKILL of one torchrun worker (2 workers, gloo) at a random time",
             "injected": len(kills), "outcome": "every run restarted and finished; epochs "
             f"0..{EPOCHS - 1} once each in summary.csv; final model and EMA weights "
             "bit-identical to the uninterrupted run", "kills": kills,
             "reference_run_s": round(ref_s, 1)})
