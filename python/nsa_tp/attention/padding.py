"""DP-padding helpers: make per-token and per-request tensors follow q's padded row count.

Under DP attention the token count is padded to a common size for the MLP sync (7 -> 8), so q has more
rows than the indexer produced and than the batch has requests. The padded rows must be harmless:
they attend to nothing (top-k row of ``-1``) and cost the decode kernel nothing (cache length 0).
This module is the one place that padding is done.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_tensor

__all__ = ["pad_topk_indices", "pad_cache_seqlens", "CACHE_SEQLEN_PAD"]

# The cache length of a padded decode row. FlashMLA checks ``cache_seqlens`` has one entry per q row
# (``seqlens_k must have shape (batch_size)``: the upstream PD-disaggregation failure), and its scheduler
# splits each row's KV work by that length. 0 gives the padded row no KV blocks at all; its indices are
# all -1 anyway, so it attends nothing and its output is discarded. Upstream pads with zeros too
# (SGLang's ``pad_nsa_cache_seqlens``). A 1 would schedule a block of work that only reads the -1 row.
CACHE_SEQLEN_PAD = 0


def pad_topk_indices(indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``indices [T_real, K]`` or ``[T_real, 1, K]`` int32 -> ``[num_rows, ...]``, extra rows all ``-1``.

    Returns ``indices`` itself when it already has ``num_rows`` rows.

    Raises:
        ValueError: ``num_rows < T_real`` — the indexer returned more rows than q has (a mismatch
            between the indexer's rows and q's layout, never something to trim silently).
    """
    check_tensor(indices, "indices", dtype=torch.int32)
    if indices.dim() not in (2, 3) or (indices.dim() == 3 and indices.shape[1] != 1):
        raise ValueError(f"indices: expected [T, K] or [T, 1, K], got shape {tuple(indices.shape)}")
    _check_rows(num_rows)
    t_real = indices.shape[0]
    if num_rows < t_real:
        raise ValueError(
            f"indices: the indexer returned {t_real} rows but q has {num_rows}; the indexer must not "
            "return more rows than q"
        )
    if num_rows == t_real:
        return indices
    out = torch.full((num_rows, *indices.shape[1:]), -1, dtype=torch.int32, device=indices.device)
    out[:t_real] = indices
    return out


def pad_cache_seqlens(seqlens: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``seqlens [B_real]`` int32 -> ``[num_rows]`` int32, padded with :data:`CACHE_SEQLEN_PAD` (0).

    Returns ``seqlens`` itself when it already has ``num_rows`` entries; fewer rows than requests is an error.
    """
    check_tensor(seqlens, "seqlens", ndim=1, dtype=torch.int32)
    _check_rows(num_rows)
    b = seqlens.shape[0]
    if num_rows < b:
        raise ValueError(f"seqlens: {b} requests but q has only {num_rows} rows")
    if num_rows == b:
        return seqlens
    out = torch.full((num_rows,), CACHE_SEQLEN_PAD, dtype=torch.int32, device=seqlens.device)
    out[:b] = seqlens
    return out


def _check_rows(num_rows: int) -> None:
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows: expected an int >= 0, got {num_rows!r}")
