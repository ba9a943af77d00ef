"""The ``"sgl_kernel"`` tier: upstream's production top-k selection, ``sgl_kernel.fast_topk_v2``, from the optional
``sglang-kernel`` wheel (written against 0.4.5, the build SGLang 0.5.17 runs).

Ops (contracts and semantics as :mod:`nsa_tp.ops.topk`): ``topk_transform_ragged`` and ``topk_transform_paged``.
The vendor kernel is the *selection step* only (:data:`nsa_tp.ops.topk.Select`, positions relative to the row
start); the checks and the ragged / paged id mapping are the reference's own
(:func:`~nsa_tp.ops.topk.ragged_transform`, :func:`~nsa_tp.ops.topk.paged_transform`), so they cannot drift.

What ``fast_topk_v2(score, lengths, topk, row_starts)`` does (one 1024-thread block per row, radix select on
the float's order-preserving bits), and what this module does about it:

- **K = 2048 only** (the wheel asserts it): ``supports()`` rejects any other ``topk``.
- **score**: CUDA float32 ``[R, W]`` with unit column stride (rows are read through ``stride(0)``);
  ``lengths`` / ``row_starts`` int32, read by raw pointer (made contiguous here). Row ``r`` scores columns
  ``[row_starts[r], row_starts[r] + lengths[r])`` — the contract's candidates.
- **Rows with ``lengths[r] <= 2048``**: the kernel writes ``0, 1, ..., lengths[r] - 1`` and ``-1`` after,
  *without reading the values*; longer rows get an unordered set of 2048 positions (ties broken by thread
  order). Order and tie choice are free in our contract; but a ``-inf`` or NaN candidate is *not*
  selectable, and the kernel keeps it (a short row keeps every position; a long row with fewer than 2048
  finite candidates fills up with ``-inf``). So every output is checked once: each kept position's logit is
  gathered, positions whose logit is ``-inf`` / NaN (or that fall outside the row: defensive) become ``-1``,
  and the kept ones are moved to the front, in the kernel's order. On CUDA that check is one fused Triton
  kernel (:mod:`nsa_tp.ops.triton.topk_fixup`, one program a row; the torch version took ~0.7 ms of 0.89 ms
  at 4096 x 8192 on an H200). Where Triton cannot import, the tier is unavailable and says so (a 2.5x slower
  torch fix-up under the sgl-kernel name would misreport upstream's speed); :func:`fixup_positions_torch`
  is the definition the kernel matches bit for bit. That is exact for any ``-inf`` pattern.
- **NaN in a row longer than 2048**: the kernel's key ranks a (positive) NaN above every finite value, so such a
  row can lose finite candidates to NaNs, which the check then drops. With ``check_values=True`` (the
  default, which already syncs once for the range checks) those rows are found (the fix-up flags a kept NaN
  in a row longer than 2048) and recomputed by the reference selection, so the contract holds exactly. With
  ``check_values=False`` (the indexer's per-layer path, no host sync) the logits must be NaN-free inside the
  candidate ranges, which the logits ops guarantee (finite products inside the ranges).
- ``R == 0`` or ``W == 0`` returns without a launch (a zero-sized grid is a launch error).

``fast_topk_transform_fused`` (page-size-1 tables) and ``fast_topk_transform_ragged_fused`` (ragged ids) fuse the
id mapping into the kernel, but they write mapped ids, which the ``-inf`` check above would have to map back;
the mapping here is a gather over ``[R, 2048]``, cheap next to the selection, so they are not used.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch

from nsa_tp.ops import topk as topk_ref
from nsa_tp.ops.capability import get_capability, import_error
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = ["TIER", "TOPK", "select_positions", "fixup_positions_torch", "topk_transform_ragged", "topk_transform_paged"]

_PACKAGE = "sgl_kernel"
TOPK = 2048  # the only K fast_topk_v2 is built for (DeepSeek-V3.2's index_topk)
_MIN_SM_MAJOR = 9  # the wheel ships SM90 and SM100 builds of its kernels
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Availability (probed once per process) and the wheel's module


def _triton_fixup() -> ModuleType:
    """The fused fix-up kernel's module (importable: :func:`_available` checked it)."""
    return importlib.import_module("nsa_tp.ops.triton.topk_fixup")


@functools.cache
def _available() -> str | None:
    """Why this tier cannot run in this process (None if it can). Cached; the registry asks once too."""
    err = import_error(_PACKAGE)
    if err:
        return f"{err} (install sglang-kernel==0.4.5)"
    module = importlib.import_module(_PACKAGE)
    if not hasattr(module, "fast_topk_v2"):
        version = getattr(module, "__version__", "?")
        return f"sgl_kernel {version} has no fast_topk_v2; this tier is written for sglang-kernel==0.4.5"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (sgl-kernel's top-k runs on CUDA only)"
    try:
        _triton_fixup()
    except Exception as e:  # noqa: BLE001 - any import failure is the reason this tier cannot run
        return (f"the fused -inf fix-up after fast_topk_v2 needs Triton ({type(e).__name__}: {e}); refusing "
                "rather than timing a slower torch fix-up under the sgl-kernel name")
    return None


def _sgl() -> ModuleType:
    return importlib.import_module(_PACKAGE)  # already imported by _available(); a dict lookup


# ----------------------------------------------------------------------------------------------------------
# supports(): reasons from shapes, dtypes, strides and the cached capability only (no device sync)


def _topk_supports(logits: Any = None, topk: Any = None, *_args: Any, **kwargs: Any) -> str | None:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk != TOPK:
        return f"topk is {topk!r}; sgl-kernel's fast_topk_v2 is built for topk = {TOPK} only"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        return "logits: expected an [R, W] tensor"
    if logits.dtype != torch.float32:
        return f"logits: dtype {str(logits.dtype).replace('torch.', '')}; fast_topk_v2 reads float32"
    if logits.shape[1] > 0 and logits.stride(1) != 1:
        return f"logits: fast_topk_v2 needs a unit column stride, got strides {logits.stride()}"
    devices = {t.device for t in (logits, *kwargs.values()) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        return f"inputs are on different devices ({sorted(map(str, devices))})"
    cap = get_capability(logits.device)
    if not cap.is_cuda:
        return f"inputs are on {cap.device}; sgl-kernel's top-k runs on CUDA only"
    if cap.sm_major < _MIN_SM_MAJOR:
        return f"{cap.name} is {cap.sm_label}; the sglang-kernel wheel's top-k is built for SM90 and newer"
    return None


# ----------------------------------------------------------------------------------------------------------
# The selection step


def select_positions(
    logits: torch.Tensor,
    topk: int,
    lengths: torch.Tensor,
    row_starts: torch.Tensor | None = None,
    *,
    repair_nan: bool = True,
) -> torch.Tensor:
    """The :data:`~nsa_tp.ops.topk.Select` step on ``fast_topk_v2``: ``[R, topk]`` int32 positions relative to
    the row start, kept ones first, ``-1`` fill (contract of :func:`nsa_tp.ops.topk.topk_positions`; inputs
    already checked). ``repair_nan``: recompute rows where the kernel kept a NaN (one host sync).
    """
    R, W = logits.shape
    if R == 0 or W == 0:
        return torch.full((R, topk), -1, dtype=torch.int32, device=logits.device)
    lengths = lengths.contiguous()
    starts = row_starts.contiguous() if row_starts is not None else None
    pos = _sgl().fast_topk_v2(logits, lengths, topk, row_starts=starts)  # [R, topk] int32, any order
    # CUDA (every call the tier accepts): the fused kernel. CPU is reachable only by calling this function
    # directly (supports() rejects it; the unit tests' fake wheel does it): the torch definition.
    fixup = _triton_fixup().fixup_positions if logits.is_cuda else fixup_positions_torch
    out, nan_rows = fixup(pos, logits, lengths, starts)

    if repair_nan and bool(nan_rows.any()):  # the one host sync, only when asked for
        # A row longer than K that kept a NaN may have lost finite candidates to it (see the module docstring).
        rows = nan_rows.nonzero()[:, 0]
        out[rows] = topk_ref.topk_positions(
            logits[rows], topk, lengths[rows], starts[rows] if starts is not None else None
        )
    return out


def fixup_positions_torch(
    pos: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor, row_starts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The check after ``fast_topk_v2`` in plain torch: the definition the fused kernel
    :func:`nsa_tp.ops.triton.topk_fixup.fixup_positions` matches bit for bit (tests; never run by the tier).

    ``pos [R, K]`` int32, ``logits [R, W]`` float32 (W >= 1), ``lengths`` / ``row_starts`` ``[R]`` int32 ->
    ``(out [R, K] int32, nan_rows [R] int32)``: ``out`` row = the positions inside the row (``0 <= p <
    lengths[r]``) whose logit ``logits[r, row_starts[r] + p]`` is above ``-inf`` (not NaN), in ``pos``' order,
    then ``-1``; ``nan_rows[r]`` = 1 where such an inside position had a NaN logit and ``lengths[r] > K``.
    """
    K = pos.shape[1]
    W = logits.shape[1]
    inside = (pos >= 0) & (pos < lengths[:, None])
    cols = pos.long().clamp_min(0)
    if row_starts is not None:
        cols = cols + row_starts[:, None].long()
    vals = logits.gather(1, cols.clamp_max(W - 1))  # defensive: never read past the row
    keep = inside & (vals > _NEG_INF)
    # A stable partition, kept positions first (in the kernel's order), then -1: kept entry j goes to column
    # (kept before it), dropped entry j to n_kept + (dropped before it). A permutation of the columns, so the
    # scatter writes every column once (deterministic).
    before = keep.cumsum(1)  # kept in [0, j]
    col = torch.arange(K, device=pos.device)
    dest = torch.where(keep, before - 1, before[:, -1:] + col - before)
    out = torch.empty_like(pos).scatter_(1, dest, torch.where(keep, pos, -1))
    nan_rows = ((inside & torch.isnan(vals)).any(1) & (lengths > K)).to(torch.int32)
    return out, nan_rows


_select_repairing = functools.partial(select_positions, repair_nan=True)
_select_trusting = functools.partial(select_positions, repair_nan=False)


def topk_transform_ragged(
    logits: torch.Tensor,
    topk: int,
    *,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    offset_override: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Ragged top-k ids on ``fast_topk_v2``; semantics: :func:`nsa_tp.ops.topk.topk_transform_ragged` (K = 2048)."""
    return topk_ref.ragged_transform(
        _select_repairing if check_values else _select_trusting, logits, topk, row_starts=row_starts,
        lengths=lengths, offset_override=offset_override, check_values=check_values,
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
    """Paged top-k slots on ``fast_topk_v2``; semantics: :func:`nsa_tp.ops.topk.topk_transform_paged` (K = 2048)."""
    return topk_ref.paged_transform(
        _select_repairing if check_values else _select_trusting, logits, topk, lengths=lengths,
        page_table=page_table, row_to_req=row_to_req, row_starts=row_starts, page_size=page_size,
        check_values=check_values,
    )


# Where "auto" runs it: nsa_tp.ops.tuning (upstream's kernel first unless another tier measured faster here).
TIER = Tier(
    name="sgl_kernel",
    available=_available,
    ops={
        "topk_transform_ragged": OpImpl(topk_transform_ragged, supports=_topk_supports),
        "topk_transform_paged": OpImpl(topk_transform_paged, supports=_topk_supports),
    },
)
