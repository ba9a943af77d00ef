"""Memory-bounded chunking of the indexer's logits: a pure planner and the budget it works to.

The indexer's prefill logits are a ``[rows, keys]`` float32 matrix; for a 128K-token prefill that is
64 GiB, which is how upstream OOMed. We compute it in row chunks. A chunk of rows ``[a, b)`` allocates
``(b - a) * width * 4`` bytes where ``width`` is the chunk's **column window**: the smallest key range
covering every non-empty row of the chunk, ``max(ke) - min(ks)`` over those rows (see
:func:`chunk_window`). The indexer hands the logits op exactly that window of the key buffer, so the
planner's arithmetic *is* the allocation.

Budget (:func:`resolve_logits_budget`), first match wins: the constructor / builder argument, the
``NSA_TP_INDEXER_LOGITS_BUDGET_MB`` environment variable, else a fraction of the device's free memory —
read once per batch by the metadata builder, never per layer.

Token-parallel hook: a rank that scores only its share of the rows (1/attn_tp of them) passes only those
rows' ``ks``/``ke``; the plan (and the budget) is then per rank, and the slices index the local rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from nsa_tp.ops.check import host_ints

__all__ = [
    "BUDGET_ENV",
    "DEFAULT_FREE_FRACTION",
    "CPU_DEFAULT_BUDGET_BYTES",
    "LOGITS_BYTES_PER_ELEM",
    "plan_logits_chunks",
    "chunk_window",
    "chunk_logits_bytes",
    "resolve_logits_budget",
]

BUDGET_ENV = "NSA_TP_INDEXER_LOGITS_BUDGET_MB"
LOGITS_BYTES_PER_ELEM = 4  # float32 logits
# Upstream reserved half of the free memory for the logits; we take a quarter: the chunk's top-k sort
# (values + int64 ids of the same width) also needs room next to it.
DEFAULT_FREE_FRACTION = 0.25
# On CPU there is no cheap, portable "free memory" query; 1 GiB keeps CI and the CPU runner bounded.
CPU_DEFAULT_BUDGET_BYTES = 1 << 30

RowKeys = Sequence[int] | torch.Tensor | tuple[Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor]


def _ranges(rows: RowKeys) -> tuple[list[int], list[int]]:
    """``(starts, ends)`` per row: ``(ks, ke)`` as given, or ``(0, count)`` for key counts."""
    if isinstance(rows, tuple):
        if len(rows) != 2:
            raise ValueError("rows: expected key counts [R] or a pair (ks [R], ke [R])")
        ks, ke = host_ints(rows[0], "ks"), host_ints(rows[1], "ke")
        if len(ks) != len(ke):
            raise ValueError(f"ke: expected {len(ks)} rows like ks, got {len(ke)}")
        for i, (s, e) in enumerate(zip(ks, ke, strict=True)):
            if s < 0 or e < s:
                raise ValueError(f"ks/ke: row {i} has the key range [{s}, {e}); expected 0 <= ks <= ke")
        return ks, ke
    counts = host_ints(rows, "row_key_counts")
    for i, c in enumerate(counts):
        if c < 0:
            raise ValueError(f"row_key_counts: row {i} has {c} keys; expected >= 0")
    return [0] * len(counts), counts


def chunk_window(ks: Sequence[int], ke: Sequence[int], rows: slice) -> tuple[int, int]:
    """The key window ``[lo, hi)`` a chunk allocates: ``min(ks)``..``max(ke)`` over its non-empty rows
    (``(0, 0)`` when every row is empty). Host lists in, ints out."""
    lo, hi = None, None
    for s, e in zip(ks[rows], ke[rows], strict=True):
        if e > s:
            lo = s if lo is None else min(lo, s)
            hi = e if hi is None else max(hi, e)
    return (0, 0) if lo is None else (lo, hi)


def chunk_logits_bytes(rows: RowKeys, chunk: slice) -> int:
    """fp32 bytes the chunk's logits take: ``rows * (hi - lo) * 4``."""
    ks, ke = _ranges(rows)
    lo, hi = chunk_window(ks, ke, chunk)
    return (chunk.stop - chunk.start) * (hi - lo) * LOGITS_BYTES_PER_ELEM


def plan_logits_chunks(rows: RowKeys, budget_bytes: int, *, max_rows: int | None = None) -> list[slice]:
    """Split rows into consecutive chunks whose fp32 logits each fit ``budget_bytes``.

    Args:
        rows: per-row key counts ``[R]`` (every chunk allocates ``rows x max(count)``, e.g. paged decode
            logits), or ``(ks, ke)`` per-row key ranges into the ragged key buffer (prefill; each chunk
            allocates its column window, :func:`chunk_window`). Host ints or tensors (copied to host once).
        budget_bytes: the most bytes one chunk's logits may take.
        max_rows: optional cap on rows per chunk.

    Returns:
        ``[slice(a0, a1), slice(a1, a2), ...]`` covering ``range(R)`` in order (``[]`` for no rows).
        Greedy: each chunk takes as many following rows as still fit.

    Raises:
        ValueError: a single row's logits alone exceed the budget (the message names the env var).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes: expected a positive int, got {budget_bytes!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows: expected a positive int, got {max_rows!r}")
    ks, ke = _ranges(rows)
    chunks: list[slice] = []
    start, lo, hi = 0, None, None
    for i, (s, e) in enumerate(zip(ks, ke, strict=True)):
        alone = (e - s) * LOGITS_BYTES_PER_ELEM
        if alone > budget_bytes:
            raise ValueError(
                f"rows: row {i} alone needs {alone} bytes of fp32 logits ({e - s} keys), over the indexer's "
                f"logits budget of {budget_bytes} bytes; raise {BUDGET_ENV} (MiB) or the builder's budget"
            )
        new_lo, new_hi = (lo, hi) if e == s else (s if lo is None else min(lo, s), e if hi is None else max(hi, e))
        width = 0 if new_lo is None else new_hi - new_lo
        n = i - start + 1
        if n * width * LOGITS_BYTES_PER_ELEM > budget_bytes or (max_rows is not None and n > max_rows):
            chunks.append(slice(start, i))
            start = i
            new_lo, new_hi = (None, None) if e == s else (s, e)
        lo, hi = new_lo, new_hi
    if start < len(ks):
        chunks.append(slice(start, len(ks)))
    return chunks


def _parse_mb(value: object, name: str) -> int:
    try:
        mb = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive number of MiB, got {value!r}") from None
    if not mb > 0 or mb != mb or mb == float("inf"):
        raise ValueError(f"{name}: expected a positive number of MiB, got {value!r}")
    return max(1, int(mb * (1 << 20)))


def _free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA ``device`` (one driver call); None where there is no such query (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def resolve_logits_budget(
    budget_mb: float | None, device: torch.device | str, *, free_fraction: float = DEFAULT_FREE_FRACTION
) -> int:
    """The logits budget in bytes: ``budget_mb`` if given, else ``$NSA_TP_INDEXER_LOGITS_BUDGET_MB``, else
    ``free_fraction`` of the free device memory. Call once per batch (it may query the driver)."""
    if budget_mb is not None:
        return _parse_mb(budget_mb, "logits_budget_mb")
    env = os.environ.get(BUDGET_ENV)
    if env is not None and env.strip():
        return _parse_mb(env, BUDGET_ENV)
    if not 0 < free_fraction <= 1:
        raise ValueError(f"free_fraction: expected 0 < fraction <= 1, got {free_fraction}")
    free = _free_device_memory(torch.device(device))
    if free is None:
        return CPU_DEFAULT_BUDGET_BYTES
    return max(1, int(free * free_fraction))
