"""Devices and ranks: ``torch.distributed`` from torchrun's environment (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                store=_rendezvous_store(rank, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(minutes=10))
    return DistEnv(rank, world_size, local_rank, device)


def _rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """The torchrun store, namespaced by restart round.

    torchrun's agent keeps one TCPStore across worker restarts; without a per-round prefix the
    restarted workers read the peer addresses the killed round left there and gloo's mesh
    connect hangs or is refused.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store,
                          timeout=timedelta(minutes=10))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"gpunet/restart{restart}", store)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers (whose state dict is saved)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def weights_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights, to check that DDP ranks agree."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in unwrap(model).parameters()))


def node_position(env: DistEnv) -> tuple[int, int]:
    """(this node's rank, the number of nodes), from torchrun's ``GROUP_RANK`` and
    ``LOCAL_WORLD_SIZE`` ((0, 1) outside torchrun)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size) or 1)
    return int(os.environ.get("GROUP_RANK", "0")), max(1, env.world_size // max(1, per_node))


def all_gather(env: DistEnv, value: object) -> list[object]:
    """``value`` from every rank (just ``[value]`` in a single process)."""
    if not env.distributed:
        return [value]
    gathered: list[object] = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shard_report(env: DistEnv, indices: list[int], num_samples: int) -> dict[str, int]:
    """How this epoch's data is split over the ranks: every sample counted across all ranks.

    ``missing`` samples belong to no rank, ``duplicated`` ones to more than one
    (``DistributedSampler`` repeats ``-num_samples % world_size`` to equalise shards). A
    misconfigured multi-node launch, e.g. nodes that each start their own world, shows as every
    sample duplicated or most of them missing.
    """
    counts = torch.zeros(num_samples, dtype=torch.int32)
    counts.index_add_(0, torch.tensor(indices, dtype=torch.long),
                      torch.ones(len(indices), dtype=torch.int32))
    if env.distributed:
        counts = counts.to(env.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return {"ranks": env.world_size, "samples": num_samples, "per_rank": len(indices),
            "missing": int((counts == 0).sum()),
            "duplicated": int((counts - 1).clamp(min=0).sum())}
