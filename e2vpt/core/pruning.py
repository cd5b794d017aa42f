"""Pruning math shared by training and serving: from importance scores to the masks a prompt set stores.

Scores follow one convention: lower = less important = pruned first. The paper's score is
E|dL/d rho| (higher = more important); the official code's signed mean gradient also prunes its
lowest (most negative) values first, so both modes use the same selection.

Token masks are [P] and segment masks [P, R] (1 = kept), shared by all blocks. Segment pruning runs
inside the kept tokens: every kept token loses the same number of its lowest-scoring segments, so a
kept token always keeps at least one segment. Ties break towards the lower index (deterministic).
"""

from __future__ import annotations

import torch
from torch import Tensor


def prune_count(n: int, ratio: float, *, keep_at_least: int = 1) -> int:
    """How many of `n` entries a ratio prunes (rounded), leaving at least `keep_at_least`."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a pruning ratio must be in [0, 1], got {ratio}")
    return max(0, min(round(n * ratio), n - keep_at_least))


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the k lowest scores (stable: ties go to the lower index)."""
    order = torch.sort(scores.detach().float().cpu(), stable=True).indices
    return order[:k]


def token_mask_from_scores(scores: Tensor, ratio: float) -> Tensor:
    """[P] float mask pruning the `ratio` lowest-scoring tokens (at least one kept)."""
    P = scores.shape[0]
    mask = torch.ones(P)
    mask[_lowest(scores, prune_count(P, ratio))] = 0
    return mask


def segment_mask_from_scores(scores: Tensor, token_mask: Tensor, ratio: float) -> Tensor:
    """[P, R] float mask: each kept token prunes its `ratio` lowest-scoring segments (at least one kept).
    Rows of pruned tokens are all zero."""
    P, R = scores.shape
    mask = torch.zeros(P, R)
    k = prune_count(R, ratio)
    for p in range(P):
        if token_mask[p] > 0:
            mask[p] = 1
            mask[p, _lowest(scores[p], k)] = 0
    return mask


def kept_indices(mask: Tensor) -> list[int]:
    return torch.nonzero(mask.detach().cpu() > 0).flatten().tolist()
