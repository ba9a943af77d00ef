"""Top-k selection as one fused Triton kernel: radix select instead of a full sort of every row.

Same contract as :mod:`nsa_tp.ops.topk` (the reference): per row ``r`` the candidates are the columns
``[row_starts[r], row_starts[r] + lengths[r])`` of ``logits [R, W]`` float32, ``-inf`` and NaN are never
selected, the row keeps its ``min(topk, #candidates)`` best as positions relative to the row start, ordered by
logit descending with ties to the lower position, ``-1`` fills the rest. The ids are identical to the
reference's; the checks and the ragged / paged id mapping are the reference's own
(:func:`~nsa_tp.ops.topk.ragged_transform`, :func:`~nsa_tp.ops.topk.paged_transform`).

One program per row:

1. Every candidate gets the order-preserving uint32 image of its logit (the encoding of
   :func:`~nsa_tp.ops.topk.order_keys`: ``-0.0`` as ``+0.0``); non-candidates get 0, below every valid key.
2. Radix select, four passes of 8-bit digits from the top: a 256-bin histogram of the digit over the keys
   that match the digits chosen so far gives the digit of the K-th largest key (K = the keep count). After
   the last pass the threshold key ``T`` is exact and ``take_eq`` is how many keys equal to ``T`` are kept.
3. Compaction in ascending position order: every key ``> T`` and the first ``take_eq`` keys ``== T`` (ties go
   to the lower position), written to the row's output slots.
4. The kept (at most ``BLOCK_K``) entries are read back and sorted in registers by the 64-bit key
   ``(key << 32) | ~position``, which is exactly (logit descending, position ascending).

Each pass reads only the row's ``lengths[r]`` candidates (the causal rows of a prefill are short on average)
and the rows re-read from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_tp.ops import topk as topk_ref
from nsa_tp.ops.triton import _common

__all__ = ["topk_positions", "topk_transform_ragged", "topk_transform_paged", "MAX_KEEP", "block_k"]

# The in-register sort holds next_pow2(min(topk, W)) entries per program; above this the reference runs.
MAX_KEEP = 4096
_BLOCK = 4096  # candidates per histogram / compaction step
_WARPS = 8
_RADIX = 8


def block_k(topk: int, width: int) -> int:
    """Entries the in-register sort holds: ``min(topk, width)`` rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(1, min(topk, width))))


@triton.jit
def _order_key(x, valid):
    """uint32 key, larger for a larger float; 0 where ``valid`` is False or ``x`` is -inf / NaN."""
    ok = valid & (x > float("-inf"))  # False for NaN too
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the reference's sort
    b = x.to(tl.uint32, bitcast=True)
    k = tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)
    return tl.where(ok, k, tl.zeros_like(k))


@triton.jit
def _topk_rows_kernel(
    logits_ptr,
    stride_row,
    starts_ptr,
    lengths_ptr,
    out_ptr,
    stride_out,
    topk,
    HAS_STARTS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RADIX: tl.constexpr,
):
    r = tl.program_id(0)
    n = tl.load(lengths_ptr + r)
    if HAS_STARTS:
        row = logits_ptr + r.to(tl.int64) * stride_row + tl.load(starts_ptr + r)
    else:
        row = logits_ptr + r.to(tl.int64) * stride_row
    out_row = out_ptr + r.to(tl.int64) * stride_out
    offs = tl.arange(0, BLOCK)
    NB: tl.constexpr = 1 << RADIX
    bins = tl.arange(0, NB)
    zero = n * 0  # an int32 scalar for loop-carried counters

    # Radix select. `rem` is how many of the keys matching `prefix` (the digits chosen so far) are still to
    # keep; the first pass also counts the valid candidates, so the keep count is min(topk, #valid).
    prefix = zero.to(tl.uint32)
    rem = zero
    for p in tl.static_range(32 // RADIX):
        shift = 32 - RADIX * (p + 1)
        hist = tl.zeros([NB], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            pos = c0 + offs
            inside = pos < n
            key = _order_key(tl.load(row + pos, mask=inside, other=float("-inf")), inside)
            match = key != 0
            if p > 0:
                match = match & ((key >> (shift + RADIX)) == (prefix >> (shift + RADIX)))
            digit = ((key >> shift) & (NB - 1)).to(tl.int32)
            hist += tl.histogram(digit, NB, mask=match)
        total = tl.sum(hist, 0)
        if p == 0:
            rem = tl.minimum(total, topk)
        # ge[b] = matching keys with digit >= b (non-increasing); the K-th largest has the last b with ge >= rem.
        ge = total - tl.cumsum(hist, 0) + hist
        b = tl.sum((ge >= rem).to(tl.int32), 0) - 1
        rem = rem - tl.sum(tl.where(bins > b, hist, 0), 0)
        prefix = prefix | (b.to(tl.uint32) << shift)
    # No valid candidate: rem started at 0, every `ge >= 0`, so prefix is all ones and rem 0 -> keeps nothing.
    thresh = prefix
    take_eq = rem

    # Compaction in position order: keys above the threshold, then the first `take_eq` equal ones.
    kept = zero
    eq_seen = zero
    for c0 in range(0, n, BLOCK):
        pos = c0 + offs
        inside = pos < n
        key = _order_key(tl.load(row + pos, mask=inside, other=float("-inf")), inside)
        eq = (key == thresh) & (key != 0)
        eq_i = eq.to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq_i, 0) - 1
        sel = (key > thresh) | (eq & (eq_rank < take_eq))
        sel_i = sel.to(tl.int32)
        slot = kept + tl.cumsum(sel_i, 0) - 1
        tl.store(out_row + slot, pos, mask=sel)
        kept += tl.sum(sel_i, 0)
        eq_seen += tl.sum(eq_i, 0)

    # Order the kept entries: (key desc, position asc) == 64-bit (key << 32 | ~position) descending.
    tl.debug_barrier()  # the compacted slots were written by other threads of this program
    j = tl.arange(0, BLOCK_K)
    has = j < kept
    pos = tl.load(out_row + j, mask=has, other=0)
    key = _order_key(tl.load(row + pos, mask=has, other=float("-inf")), has)
    low = (0xFFFFFFFF - pos.to(tl.uint32)).to(tl.uint64)
    packed = tl.sort((key.to(tl.uint64) << 32) | low, descending=True)  # invalid slots (key 0) sort last
    ordered = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)
    tl.debug_barrier()  # every thread has read its slots before any is overwritten
    tl.store(out_row + j, tl.where(has, ordered, -1), mask=j < topk)


def topk_positions(
    logits: torch.Tensor,
    topk: int,
    lengths: torch.Tensor,
    row_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selection step (contract of :func:`nsa_tp.ops.topk.topk_positions`; inputs already checked).

    ``logits`` must have unit column stride and ``min(topk, W) <= MAX_KEEP`` (the tier's ``supports``).
    """
    R, W = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits: expected unit column stride")
    bk = block_k(topk, W)
    if bk > MAX_KEEP:
        raise ValueError(f"topk: min(topk, W) = {min(topk, W)} exceeds this kernel's {MAX_KEEP}")
    out = _common.alloc((R, topk), torch.int32, logits.device)
    if R == 0:
        return out
    if topk > bk:  # columns past W can never hold a candidate
        out[:, bk:] = -1
    starts = row_starts if row_starts is not None else lengths  # any int32 pointer; unused without starts
    _topk_rows_kernel[(R,)](
        logits, logits.stride(0), starts, lengths, out, out.stride(0), topk,
        HAS_STARTS=row_starts is not None, BLOCK=_BLOCK, BLOCK_K=bk, RADIX=_RADIX, num_warps=_WARPS,
    )
    return out


def topk_transform_ragged(
    logits: torch.Tensor,
    topk: int,
    *,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    offset_override: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """:func:`nsa_tp.ops.topk.topk_transform_ragged` with the fused selection (identical ids)."""
    return topk_ref.ragged_transform(
        topk_positions, logits, topk, row_starts=row_starts, lengths=lengths, offset_override=offset_override,
        check_values=check_values,
    )


def topk_transform_paged(
    logits: torch.Tensor,
    topk: int,
    *,
    lengths: torch.Tensor,
    page_table: torch.Tensor,
    row_to_req: torch.Tensor | None = None,
    row_starts: torch.Tensor | None = None,
    page_size: int = 64,
    check_values: bool = True,
) -> torch.Tensor:
    """:func:`nsa_tp.ops.topk.topk_transform_paged` with the fused selection (identical ids)."""
    return topk_ref.paged_transform(
        topk_positions, logits, topk, lengths=lengths, page_table=page_table, row_to_req=row_to_req,
        row_starts=row_starts, page_size=page_size, check_values=check_values,
    )
