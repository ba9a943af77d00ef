"""Top-k transform: from per-row indexer logits to the top-K token ids, ragged or paged.

Every row ``r`` scores the candidate columns ``[row_starts[r], row_starts[r] + lengths[r])`` of ``logits [R,
W]``; a candidate whose logit is ``-inf`` (or NaN) is not selectable. The row keeps ``n = min(topk,
#candidates)`` of its best candidates, as ``p`` = position *relative to the row start* (``0 <= p <
lengths[r]``), in its first ``n`` columns, and ``-1`` fills the rest of the ``topk`` columns. (Upstream's K =
min(2048, len): a row with fewer than ``topk`` candidates keeps all of them.)

**Order and ties are not part of the contract**: the kept ids may come in any order, and where several
candidates tie with the K-th best value any of them may be kept. Every consumer (sparse MLA, the chunked
indexer's buffer, the key-sharded merge) treats a row as a set, and upstream's fastest kernels (sgl-kernel's
``fast_topk_*``) return unordered sets. Two outputs are equivalent when each row keeps the same multiset of
values: :func:`topk_mismatch` checks exactly that, and every tier is tested with it. This reference returns
one valid instance: sorted by logit descending, ties to the lower position.

The two transforms then map ``p`` to an index space:

- :func:`topk_transform_ragged`: ``offset[r] + p``. The offset is ``row_starts[r]`` unless
  ``offset_override`` is given — the chunked indexer computes a chunk's logits over a column *window* of
  the ragged key buffer and passes its rows' *global* offsets here (upstream's
  ``topk_indices_offset_override``), so every chunk writes global ids.
- :func:`topk_transform_paged`: the global KV-cache slot of request token ``p``:
  ``page_table[req[r], p // 64] * 64 + p % 64``.

Outputs are ``[R, topk]`` int32. Plain torch (the reference tier); any device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.ops.check import check_same_device, check_tensor

__all__ = [
    "topk_transform_ragged",
    "topk_transform_paged",
    "topk_positions",
    "order_keys",
    "key_positions",
    "Select",
    "ragged_transform",
    "paged_transform",
    "bind_select",
    "adopt_contract",
    "topk_mismatch",
]

# The selection step, ``(logits, topk, lengths, row_starts) -> [R, topk]`` int32 positions (contract of
# :func:`topk_positions`, inputs already checked). Faster tiers pass their own to :func:`ragged_transform` /
# :func:`paged_transform`, so the checks and the id mapping exist once.
Select = Callable[[torch.Tensor, int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

# Rows per chunk so the sort never holds more than ~16M elements at once.
_MAX_SORT_ELEMS = 1 << 24


def _check_rows(
    logits: torch.Tensor, topk: int, row_starts: torch.Tensor | None, lengths: torch.Tensor, values: bool = True
) -> None:
    check_tensor(logits, "logits", ndim=2, dtype=torch.float32)
    R, W = logits.shape
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk: expected a positive int, got {topk!r}")
    check_tensor(lengths, "lengths", shape=(R,), dtype=torch.int32)
    if row_starts is not None:
        check_tensor(row_starts, "row_starts", shape=(R,), dtype=torch.int32)
    if R == 0 or not values:
        return
    starts = row_starts if row_starts is not None else torch.zeros_like(lengths)
    bad = (lengths < 0) | (starts < 0) | (starts.long() + lengths.long() > W)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"row_starts/lengths: row {r} asks for columns [{int(starts[r])}, {int(starts[r]) + int(lengths[r])}) "
            f"outside logits' [0, {W})"
        )


def topk_positions(
    logits: torch.Tensor, topk: int, lengths: torch.Tensor, row_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """The shared selection: ``[R, topk]`` int32 positions relative to each row's start, ``-1`` fill.

    Args:
        logits: ``[R, W]`` float32.
        topk: K >= 1.
        lengths: ``[R]`` int32, candidates a row scores (0 gives an all ``-1`` row).
        row_starts: ``[R]`` int32 first candidate column (default 0).
    """
    _check_rows(logits, topk, row_starts, lengths)
    return _topk_positions(logits, topk, lengths, row_starts)


_POS_MASK = (1 << 31) - 1  # positions are < 2^31 (int32)


def order_keys(values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One int64 key per candidate, ordered like (value descending, position ascending); ``-1`` if invalid.

    The float's bits map to an order-preserving unsigned 32-bit value placed above the inverted 31-bit
    position, so a single ``torch.topk`` gives the exact, deterministic order that a stable descending sort
    would (used by the key-sharded merge, whose rows are short). ``values`` float32, ``positions`` int64 in
    ``[0, 2^31)``; ``-0.0`` and ``+0.0`` get the same key. Decode with :func:`key_positions`.
    """
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0: -0.0 -> +0.0; .long() sign-extends
    u = torch.where(bits < 0, ~bits, bits | (1 << 31)) & 0xFFFFFFFF
    return torch.where(valid, (u << 31) | (_POS_MASK - positions.clamp(0, _POS_MASK)), -1)


def key_positions(keys: torch.Tensor) -> torch.Tensor:
    """Positions back from :func:`order_keys` keys (``-1`` for invalid keys), int64."""
    return torch.where(keys >= 0, _POS_MASK - (keys & _POS_MASK), -1)


def _topk_positions(
    logits: torch.Tensor, topk: int, lengths: torch.Tensor, row_starts: torch.Tensor | None
) -> torch.Tensor:
    R, W = logits.shape
    device = logits.device
    out = torch.full((R, topk), -1, dtype=torch.int32, device=device)
    keep = min(topk, W)
    if R == 0 or keep == 0:
        return out
    cols = torch.arange(W, device=device)
    step = max(1, _MAX_SORT_ELEMS // max(W, 1))
    for r0 in range(0, R, step):
        lg = logits[r0 : r0 + step]
        start = row_starts[r0 : r0 + step, None].long() if row_starts is not None else 0
        rel = cols[None, :] - start  # [r, W] position relative to the row start
        inside = (rel >= 0) & (rel < lengths[r0 : r0 + step, None].long())
        # `> -inf` is False for -inf and NaN: neither is a candidate.
        masked = torch.where(inside & (lg > float("-inf")), lg, torch.full_like(lg, float("-inf")))
        # Stable descending sort: equal logits keep ascending column order, so ties go to the lower id.
        # (A single torch.topk over order_keys gives the same ids but measured 1.2-1.3x slower on H100 for
        # K=2048 over 8K-32K columns: benchmark/results/topk_*.json. The Triton tier's radix select is the
        # fast path: nsa_tp.ops.triton.topk.)
        vals, idx = torch.sort(masked, dim=1, descending=True, stable=True)
        vals, idx = vals[:, :keep], idx[:, :keep]
        pos = idx - start
        out[r0 : r0 + step, :keep] = torch.where(vals > float("-inf"), pos, torch.full_like(pos, -1)).to(torch.int32)
    return out


def ragged_transform(
    select: Select,
    logits: torch.Tensor,
    topk: int,
    *,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    offset_override: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Top-k ids in the ragged (concatenated keys) space: ``[R, topk]`` int32, ``-1`` fill.

    The one declaration of the ragged transform: every tier binds its selection step with
    :func:`bind_select`, and the public op (:func:`nsa_tp.ops.topk_transform_ragged`) adds ``backend=``.

    Args:
        select: the selection step (:data:`Select`); the reference's is :func:`topk_positions`'s.
        logits: ``[R, W]`` float32 (e.g. from ``fp8_mqa_logits``, or a chunk computed over a column window).
        topk: K >= 1.
        row_starts: ``[R]`` int32, the row's first candidate column in ``logits`` (``ks`` for full logits).
        lengths: ``[R]`` int32, number of candidates (``ke - ks``).
        offset_override: ``[R]`` int32, added instead of ``row_starts`` — the rows' global offsets when
            ``logits`` is a chunk over a column window.
        check_values: range-check ``row_starts``/``lengths`` (one host sync). ``False`` only for inputs
            validated once per batch (the indexer's per-layer path); shapes and dtypes are always checked.

    Returns: ``offset[r] + p`` for each kept candidate ``p`` (see module docstring), else ``-1``.
    """
    check_tensor(row_starts, "row_starts", ndim=1, dtype=torch.int32)
    _check_rows(logits, topk, row_starts, lengths, check_values)
    offsets = row_starts
    if offset_override is not None:
        check_tensor(offset_override, "offset_override", shape=(logits.shape[0],), dtype=torch.int32)
        offsets = offset_override
    check_same_device(logits=logits, row_starts=row_starts, lengths=lengths, offsets=offsets)
    pos = select(logits, topk, lengths, row_starts)
    return torch.where(pos >= 0, pos + offsets[:, None], pos)


def paged_transform(
    select: Select,
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
    """Top-k ids as global KV-cache slots: ``[R, topk]`` int32, ``-1`` fill (the one declaration of the paged
    transform; tiers bind ``select`` with :func:`bind_select`).

    Args:
        select: the selection step (:data:`Select`).
        logits: ``[R, W]`` float32 (decode: ``fp8_paged_mqa_logits``'s ``[B, max_seq_len]``).
        topk: K >= 1.
        lengths: ``[R]`` int32, the request's token count the row may attend (decode: seq_lens).
        page_table: ``[B, max_pages]`` int32, request -> cache pages (page size ``page_size``).
        row_to_req: ``[R]`` int32 request of each row (default: row r is request r, needs R == B).
        row_starts: ``[R]`` int32 column of the row's token 0 in ``logits`` (default 0).
        page_size: tokens per page (64).
        check_values: as in :func:`ragged_transform` (also skips the ``row_to_req`` range check).
            Page ids are never checked here: the page table is validated once per batch by its builder.

    Returns: ``page_table[req, p // page_size] * page_size + p % page_size`` for kept positions ``p``.
    """
    _check_rows(logits, topk, row_starts, lengths, check_values)
    R = logits.shape[0]
    check_tensor(page_table, "page_table", ndim=2, dtype=torch.int32)
    B, max_pages = page_table.shape
    if page_size < 1:
        raise ValueError(f"page_size: expected >= 1, got {page_size}")
    if row_to_req is None:
        if R != B:
            raise ValueError(f"row_to_req: needed when logits has {R} rows but page_table has {B} requests")
        req = torch.arange(R, device=logits.device)
    else:
        check_tensor(row_to_req, "row_to_req", shape=(R,), dtype=torch.int32)
        if check_values and R and bool(((row_to_req < 0) | (row_to_req >= B)).any()):
            raise ValueError(f"row_to_req: expected request ids in [0, {B})")
        req = row_to_req.long()
    if check_values and R and bool((lengths.long() > max_pages * page_size).any()):
        raise ValueError(f"lengths: a row is longer than page_table holds ({max_pages} pages x {page_size})")
    check_same_device(logits=logits, lengths=lengths, page_table=page_table, row_to_req=req)
    pos = select(logits, topk, lengths, row_starts).long()
    safe = pos.clamp_min(0)
    slots = page_table[req[:, None], safe // page_size].long() * page_size + safe % page_size
    return torch.where(pos >= 0, slots, torch.full_like(slots, -1)).to(torch.int32)


def bind_select(
    select: Select, *, trusted: Select | None = None
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """A tier's two top-k ops, ``(topk_transform_ragged, topk_transform_paged)``: :func:`ragged_transform` and
    :func:`paged_transform` with ``select`` as the selection step (``trusted`` instead, when given, for calls
    with ``check_values=False``). Signatures and docstrings are those two functions', less ``select``."""

    def pick(check_values: bool) -> Select:
        return select if check_values or trusted is None else trusted

    def topk_transform_ragged(logits: torch.Tensor, topk: int, *, check_values: bool = True,
                              **kwargs: Any) -> torch.Tensor:
        return ragged_transform(pick(check_values), logits, topk, check_values=check_values, **kwargs)

    def topk_transform_paged(logits: torch.Tensor, topk: int, *, check_values: bool = True,
                             **kwargs: Any) -> torch.Tensor:
        return paged_transform(pick(check_values), logits, topk, check_values=check_values, **kwargs)

    for fn, spec in ((topk_transform_ragged, ragged_transform), (topk_transform_paged, paged_transform)):
        adopt_contract(fn, spec, drop="select")
    return topk_transform_ragged, topk_transform_paged


def adopt_contract(fn: Callable[..., Any], spec: Callable[..., Any], *, drop: str | None = None,
           add: inspect.Parameter | None = None) -> None:
    """Give ``fn`` the docstring and signature of ``spec`` (less the parameter ``drop``, plus ``add``)."""
    sig = inspect.signature(spec)
    params = [p for p in sig.parameters.values() if p.name != drop] + ([add] if add is not None else [])
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    fn.__doc__ = spec.__doc__


# The reference tier's ops: the plain-torch selection (a stable sort), one valid instance of the contract.
topk_transform_ragged, topk_transform_paged = bind_select(_topk_positions)


def topk_mismatch(
    got: torch.Tensor, ref: torch.Tensor, value_of: Callable[[torch.Tensor], torch.Tensor]
) -> str | None:
    """None if ``got`` is a valid top-k output equivalent to ``ref``, else the first problem, in words.

    ``got`` and ``ref`` are ``[R, topk]`` int32 outputs of a top-k op for the same inputs (ids in any index
    space: positions, ragged ids or cache slots). ``value_of(ids)`` maps a ``[R, topk]`` int64 id tensor
    (``-1`` entries clamped to 0) to the candidates' logits ``[R, topk]`` float32, and must give ``NaN`` or
    ``-inf`` for an id that is not a candidate of its row. Equivalent means, per row: the same number ``n``
    of kept ids, all in the first ``n`` columns, ``-1`` after them, no id twice, every kept id a selectable
    candidate, and the multiset of kept values equal to the reference's (so ties may be broken either way).
    """
    if got.shape != ref.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if got.dtype != torch.int32:
        return f"dtype {got.dtype} is not int32"
    if got.numel() == 0:
        return None
    kept, kept_ref = got >= 0, ref >= 0
    n, n_ref = kept.sum(1), kept_ref.sum(1)
    for name, bad in (
        ("kept-id count differs from the reference", n != n_ref),
        ("a -1 comes before a kept id", (kept.int().diff(dim=1) > 0).any(1)),
        ("an id below -1", (got < -1).any(1)),
    ):
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            return f"row {r}: {name} (got {got[r].tolist()[:16]}..., reference {ref[r].tolist()[:16]}...)"
    # Distinct negatives stand in for -1 so that only kept ids can collide.
    fill = -1 - torch.arange(got.shape[1], device=got.device)
    srt = torch.sort(torch.where(kept, got.long(), fill), 1)[0]
    dup = (srt.diff(dim=1) == 0).any(1)
    if bool(dup.any()):
        return f"row {int(dup.nonzero()[0, 0])}: an id is kept twice"
    vals = value_of(got.long().clamp_min(0)).float()
    unselectable = kept & ~(vals > float("-inf"))
    if bool(unselectable.any()):
        r, c = (int(i) for i in unselectable.nonzero()[0])
        return f"row {r}: id {int(got[r, c])} is not a selectable candidate (value {float(vals[r, c])})"
    vals_ref = value_of(ref.long().clamp_min(0)).float()
    # Kept values sorted descending, -inf after them; +0.0 == -0.0 compares equal.
    a = torch.sort(torch.where(kept, vals, float("-inf")), 1, descending=True)[0]
    b = torch.sort(torch.where(kept_ref, vals_ref, float("-inf")), 1, descending=True)[0]
    diff = a != b
    if bool(diff.any()):
        r, c = (int(i) for i in diff.nonzero()[0])
        return f"row {r}: the {c}-th best kept value is {float(a[r, c])}, the reference keeps {float(b[r, c])}"
    return None
