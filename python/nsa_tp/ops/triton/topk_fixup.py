"""The check after sgl-kernel's ``fast_topk_v2``, as one Triton kernel (used by :mod:`nsa_tp.ops.sglkernel`).

``fast_topk_v2`` keeps ``-inf`` / NaN candidates (see :mod:`nsa_tp.ops.sglkernel`), so each row of its
``[R, K]`` output is checked: gather each position's logit, keep positions inside the row whose logit is above
``-inf`` (NaN compares False), move the kept ones to the front in the kernel's order, ``-1`` after. In torch that
is about a dozen kernels over ``[R, K]``; here one program per row reads its ``K`` positions once, gathers, takes
the exclusive prefix count of ``keep`` with ``tl.cumsum`` and writes the row once.

Semantics (bit-identical): :func:`nsa_tp.ops.sglkernel.fixup_positions_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fixup_positions"]


@triton.jit
def _fixup_kernel(
    pos_ptr, logits_ptr, lengths_ptr, starts_ptr, out_ptr, nan_ptr,
    W, stride_pos, stride_lr, stride_lc, stride_out,
    K: tl.constexpr, BLOCK: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    in_k = j < K
    p = tl.load(pos_ptr + r * stride_pos + j, mask=in_k, other=-1)
    n = tl.load(lengths_ptr + r)
    inside = in_k & (p >= 0) & (p < n)
    col = tl.maximum(p, 0).to(tl.int64)
    if HAS_STARTS:
        col += tl.load(starts_ptr + r).to(tl.int64)
    col = tl.minimum(col, W - 1)  # defensive, as the torch version: never read past the row
    val = tl.load(logits_ptr + r * stride_lr + col * stride_lc, mask=inside, other=float("-inf"))
    keep = inside & (val > float("-inf"))  # NaN compares False: dropped
    k32 = keep.to(tl.int32)
    dest = tl.cumsum(k32, axis=0) - k32  # kept before this column: its compacted column
    n_kept = tl.sum(k32, axis=0)
    tl.store(out_ptr + r * stride_out + dest, p, mask=keep)
    tl.store(out_ptr + r * stride_out + j, tl.full([BLOCK], -1, tl.int32), mask=in_k & (j >= n_kept))
    # A kept NaN in a row longer than K may have displaced finite candidates (the caller repairs those rows).
    kept_nan = tl.max((inside & (val != val)).to(tl.int32), axis=0)
    tl.store(nan_ptr + r, kept_nan * (n > K).to(tl.int32))


def fixup_positions(
    pos: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor, row_starts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos [R, K]`` int32 (``fast_topk_v2``'s output), ``logits [R, W]`` float32 (W >= 1), ``lengths`` /
    ``row_starts`` ``[R]`` int32 contiguous -> ``(out [R, K] int32, nan_rows [R] int32)``: ``out`` keeps the
    positions inside the row with a logit above ``-inf`` first (in ``pos``' order), ``-1`` after; ``nan_rows[r]``
    is 1 where a position inside a row with ``lengths[r] > K`` had a NaN logit.
    Semantics: :func:`nsa_tp.ops.sglkernel.fixup_positions_torch`.
    """
    R, K = pos.shape
    assert pos.dtype == torch.int32 and pos.stride(1) == 1 and lengths.is_contiguous()
    out = torch.empty_like(pos, memory_format=torch.contiguous_format)
    nan_rows = torch.empty(R, dtype=torch.int32, device=pos.device)
    if R == 0:
        return out, nan_rows
    # 2048 positions a row: 8 a thread at 8 warps; a row's work is one load, one gather, one scan.
    _fixup_kernel[(R,)](
        pos, logits, lengths, row_starts if row_starts is not None else lengths, out, nan_rows,
        logits.shape[1], pos.stride(0), logits.stride(0), logits.stride(1), out.stride(0),
        K=K, BLOCK=triton.next_power_of_2(K), HAS_STARTS=row_starts is not None, num_warps=8,
    )
    return out, nan_rows
