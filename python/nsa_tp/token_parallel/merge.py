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

from nsa_tp import ops
from nsa_tp.ops.check import check_same_device, check_tensor
from nsa_tp.ops.topk import key_positions, order_keys

__all__ = ["local_topk", "merge_topk"]


def local_topk(
    logits: torch.Tensor, topk: int, lengths: torch.Tensor, key_start: torch.Tensor, *, check_values: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's candidates: the best ``topk`` of each row's ``lengths[r]`` first columns.

    Args:
        logits: ``[R, n]`` float32, column ``j`` = key ``key_start[r] + j`` of row ``r``.
        topk: K >= 1.
        lengths: ``[R]`` int32, valid columns of each row (``0 <= lengths[r] <= n``).
        key_start: ``[R]`` int32, global position of column 0.
        check_values: range-check ``lengths`` (a host sync); ``False`` for metadata validated once per batch.
        backend: tier of the top-k transform.

    Returns:
        ``(scores [R, topk] float32 (-inf fill), positions [R, topk] int32 global (-1 fill))`` in the top-k
        transform's order (any order, any tie choice: :mod:`nsa_tp.ops.topk`; :func:`merge_topk` reorders).
    """
    check_tensor(logits, "logits", ndim=2, dtype=torch.float32)
    R = logits.shape[0]
    check_tensor(key_start, "key_start", shape=(R,), dtype=torch.int32)
    check_same_device(logits=logits, lengths=lengths, key_start=key_start)
    # the ragged transform with every row starting at column 0 and its global offset added: global positions
    positions = ops.topk_transform_ragged(
        logits, topk, row_starts=torch.zeros_like(lengths), lengths=lengths, offset_override=key_start,
        check_values=check_values, backend=backend,
    )
    valid = positions >= 0
    if logits.shape[1]:
        cols = (positions.long() - key_start.long()[:, None]).clamp_min(0)
        scores = torch.where(valid, torch.gather(logits, 1, cols), float("-inf"))
    else:
        scores = logits.new_full((R, topk), float("-inf"))
    return scores, positions


def merge_topk(scores: torch.Tensor, positions: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``topk`` of every row over all shards' candidates.

    Args:
        scores: ``[W, R, k]`` float32, shard ``w``'s candidate scores for row ``r``.
        positions: ``[W, R, k]`` int32/int64 global key positions (``< 2^31``), ``-1`` = no candidate.
            Positions of one row must be distinct across shards (disjoint key slices).
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
    s = scores.permute(1, 0, 2).reshape(R, W * k) + 0.0  # [R, W*k]
    p = positions.permute(1, 0, 2).reshape(R, W * k).long()
    ok = (p >= 0) & (s > float("-inf"))  # False for NaN as well
    key = order_keys(s, p, ok)  # (score desc, position asc): one top-k replaces two stable sorts
    keep = min(topk, W * k)
    out_p = torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    out_s = torch.full((R, topk), float("-inf"), dtype=torch.float32, device=scores.device)
    if keep == 0 or R == 0:
        return out_p, out_s
    best, idx = torch.topk(key, keep, dim=1)  # sorted, largest first
    hit = best >= 0
    out_p[:, :keep] = key_positions(best).to(torch.int32)
    out_s[:, :keep] = torch.where(hit, torch.gather(s, 1, idx), float("-inf"))
    return out_p, out_s
