"""Exact top-k from per-shard candidates: the merge step of the key-sharded decode indexer.

Each of ``W`` ranks scores a disjoint slice of a row's keys and keeps its local top-k (scores and global
positions). The row's global top-k is contained in the union of the local top-ks (a key beaten by ``k``
keys of its own slice is beaten by them globally too), so selecting the top-k of the ``W * k``
candidates gives the exact global answer. Order: score descending, ties to the lower position — the same
total order as :func:`nsa_tp.ops.topk.topk_positions`, so with bitwise-equal logits the merge returns the
very ids the unsharded transform returns. ``-1`` positions and ``-inf`` / NaN scores are not candidates.
"""

from __future__ import annotations

import torch

from nsa_tp.ops._check import check_same_device, check_tensor
from nsa_tp.ops.topk import topk_positions

__all__ = ["local_topk", "merge_topk"]


def local_topk(
    logits: torch.Tensor, topk: int, lengths: torch.Tensor, key_start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's candidates: the best ``topk`` of each row's ``lengths[r]`` first columns.

    Args:
        logits: ``[R, n]`` float32, column ``j`` = key ``key_start[r] + j`` of row ``r``.
        topk: K >= 1.
        lengths: ``[R]`` int32, valid columns of each row (``0 <= lengths[r] <= n``).
        key_start: ``[R]`` int32/int64, global position of column 0.

    Returns:
        ``(scores [R, topk] float32 (-inf fill), positions [R, topk] int64 global (-1 fill))``, sorted by
        score descending, ties to the lower position.
    """
    check_tensor(logits, "logits", ndim=2, dtype=torch.float32)
    R = logits.shape[0]
    check_tensor(key_start, "key_start", shape=(R,), dtype=(torch.int32, torch.int64))
    check_same_device(logits=logits, lengths=lengths, key_start=key_start)
    rel = topk_positions(logits, topk, lengths).long()  # [R, K] relative columns, -1 fill
    valid = rel >= 0
    scores = torch.gather(logits, 1, rel.clamp_min(0)) if logits.shape[1] else logits.new_empty(R, topk)
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    positions = torch.where(valid, rel + key_start.long()[:, None], torch.full_like(rel, -1))
    return scores, positions


def merge_topk(scores: torch.Tensor, positions: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``topk`` of every row over all shards' candidates.

    Args:
        scores: ``[W, R, k]`` float32, shard ``w``'s candidate scores for row ``r``.
        positions: ``[W, R, k]`` int32/int64 global key positions, ``-1`` = no candidate. Positions of one
            row must be distinct across shards (disjoint key slices).
        topk: K >= 1 (may exceed ``W * k``: the rest is filled).

    Returns:
        ``(positions [R, topk] int32 (-1 fill), scores [R, topk] float32 (-inf fill))``: score
        descending, ties to the lower position; a row with fewer than ``topk`` candidates keeps them all.
    """
    check_tensor(scores, "scores", ndim=3, dtype=torch.float32)
    check_tensor(positions, "positions", shape=tuple(scores.shape), dtype=(torch.int32, torch.int64))
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive int, got {topk!r}")
    check_same_device(scores=scores, positions=positions)
    W, R, k = scores.shape
    s = scores.permute(1, 0, 2).reshape(R, W * k)  # [R, W*k]
    p = positions.permute(1, 0, 2).reshape(R, W * k).long()
    ok = (p >= 0) & (s > float("-inf"))  # False for NaN as well
    s = torch.where(ok, s, torch.full_like(s, float("-inf")))
    p = torch.where(ok, p, torch.full_like(p, torch.iinfo(torch.int64).max))  # non-candidates sort last
    # Two stable sorts give the order (score desc, position asc): by position first, then by score.
    by_pos = torch.sort(p, dim=1, stable=True).indices
    s, p = torch.gather(s, 1, by_pos), torch.gather(p, 1, by_pos)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    keep = min(topk, W * k)
    s, p = torch.gather(s, 1, by_score[:, :keep]), torch.gather(p, 1, by_score[:, :keep])
    out_p = torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    out_s = torch.full((R, topk), float("-inf"), dtype=torch.float32, device=scores.device)
    hit = s > float("-inf")
    out_p[:, :keep] = torch.where(hit, p, torch.full_like(p, -1)).to(torch.int32)
    out_s[:, :keep] = s
    return out_p, out_s
