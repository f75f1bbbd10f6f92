"""Top-k accuracy counting, shared by training's evaluation and :func:`~gpunet_core.inference.
validate.validate` so both report the same top-1/top-5 for the same logits."""

from __future__ import annotations

import torch


def top_classes(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``[N, min(k, C)]`` class indices, best first (``k`` capped at the class count)."""
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


def topk_hits(ranked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-k hits]`` of one batch from its :func:`top_classes`, on their device
    (no host sync)."""
    hits = ranked.eq(target[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
