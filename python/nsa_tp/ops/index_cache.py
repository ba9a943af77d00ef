"""The paged index-K cache: the indexer's fp8 keys, 64 tokens a page, one ``uint8`` row a page.

Byte layout of one page (``[num_pages, 64 * 132]`` uint8, per layer; DeepGEMM's paged-MQA-logits layout)::

    [   0, 8192)  64 tokens x 128 float8_e4m3fn   token-major: token t at bytes t*128 .. t*128+127
    [8192, 8448)  64 x float32                    token t's dequantization scale at byte 8192 + 4*t

A token's *global slot* is ``page * 64 + offset``; a request's token ``j`` lives at slot
``page_table[b, j // 64] * 64 + j % 64``. Keys are stored as ``value = fp8 * scale`` (one scale per token:
the 128-dim key is one quantization block).
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_same_device, check_tensor

__all__ = [
    "INDEX_PAGE_SIZE",
    "INDEX_HEAD_DIM",
    "INDEX_PAGE_BYTES",
    "new_index_k_cache",
    "store_index_k",
    "gather_index_k",
    "store_index_k_unchecked",
    "gather_index_k_unchecked",
    "slots_from_page_table",
]

INDEX_PAGE_SIZE = 64
INDEX_HEAD_DIM = 128
_SCALE_OFFSET = INDEX_PAGE_SIZE * INDEX_HEAD_DIM  # 8192: the scales follow the 64 tokens' values
INDEX_PAGE_BYTES = INDEX_PAGE_SIZE * (INDEX_HEAD_DIM + 4)  # 64 * 132 = 8448


def new_index_k_cache(num_pages: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed ``[num_pages, 8448]`` uint8 cache (zero bytes = key 0 with scale 0.0)."""
    if num_pages < 1:
        raise ValueError(f"num_pages: expected >= 1, got {num_pages}")
    return torch.zeros(num_pages, INDEX_PAGE_BYTES, dtype=torch.uint8, device=device)


def _views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views into the cache: values ``[P, 64, 128]`` uint8 and scales ``[P, 64]`` float32 (writable)."""
    values = cache[:, :_SCALE_OFFSET].view(cache.shape[0], INDEX_PAGE_SIZE, INDEX_HEAD_DIM)
    scales = cache[:, _SCALE_OFFSET:].view(torch.float32)
    return values, scales


def _check_cache(cache: torch.Tensor, name: str = "index_k_cache") -> None:
    check_tensor(cache, name, shape=(None, INDEX_PAGE_BYTES), dtype=torch.uint8)
    if cache.stride(1) != 1 or cache.stride(0) % 4:
        raise ValueError(f"{name}: expected row-contiguous storage (got strides {cache.stride()})")


def _check_slots(slots: torch.Tensor, num_slots: int, name: str = "slots") -> None:
    check_tensor(slots, name, ndim=1, dtype=(torch.int32, torch.int64))
    if slots.numel() and bool(((slots < 0) | (slots >= num_slots)).any()):
        bad = slots[(slots < 0) | (slots >= num_slots)][0]
        raise ValueError(f"{name}: slot {int(bad)} is outside the cache's [0, {num_slots})")


def store_index_k(cache: torch.Tensor, slots: torch.Tensor, k_fp8: torch.Tensor, k_scale: torch.Tensor) -> None:
    """Write ``M`` keys in place: ``slots [M]`` int32/int64, ``k_fp8 [M, 128]`` e4m3, ``k_scale [M]`` float32.

    Duplicate slots: one of the writes wins (unspecified which), as with any scatter.
    """
    _check_cache(cache)
    _check_slots(slots, cache.shape[0] * INDEX_PAGE_SIZE)
    M = slots.shape[0]
    check_tensor(k_fp8, "k_fp8", shape=(M, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn)
    check_tensor(k_scale, "k_scale", shape=(M,), dtype=torch.float32)
    check_same_device(index_k_cache=cache, slots=slots, k_fp8=k_fp8, k_scale=k_scale)
    store_index_k_unchecked(cache, slots, k_fp8, k_scale)


def store_index_k_unchecked(
    cache: torch.Tensor, slots: torch.Tensor, k_fp8: torch.Tensor, k_scale: torch.Tensor
) -> None:
    """:func:`store_index_k` without the checks (slots validated once per batch by the caller)."""
    values, scales = _views(cache)
    page, off = slots.long() // INDEX_PAGE_SIZE, slots.long() % INDEX_PAGE_SIZE
    values[page, off] = k_fp8.view(torch.uint8)
    scales[page, off] = k_scale


def gather_index_k(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``slots [M]`` -> ``(k_fp8 [M, 128] float8_e4m3fn, k_scale [M] float32)`` (copies)."""
    _check_cache(cache)
    _check_slots(slots, cache.shape[0] * INDEX_PAGE_SIZE)
    check_same_device(index_k_cache=cache, slots=slots)
    return gather_index_k_unchecked(cache, slots)


def gather_index_k_unchecked(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_index_k` without the checks."""
    values, scales = _views(cache)
    page, off = slots.long() // INDEX_PAGE_SIZE, slots.long() % INDEX_PAGE_SIZE
    return values[page, off].view(torch.float8_e4m3fn), scales[page, off]


def slots_from_page_table(page_table: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Global slots of token ``positions[i]`` of request ``rows[i]``: ``[M]`` int64.

    ``page_table [B, max_pages]`` int32 (page size 64), ``positions [M]`` and ``rows [M]`` int32/int64.
    Positions must fall inside the table (``0 <= pos < max_pages * 64``); page ids are not range-checked
    here (the caller knows the cache size).
    """
    check_tensor(page_table, "page_table", ndim=2, dtype=torch.int32)
    check_tensor(positions, "positions", ndim=1, dtype=(torch.int32, torch.int64))
    check_tensor(rows, "rows", shape=(positions.shape[0],), dtype=(torch.int32, torch.int64))
    B, max_pages = page_table.shape
    if positions.numel():
        if bool(((positions < 0) | (positions >= max_pages * INDEX_PAGE_SIZE)).any()):
            raise ValueError(f"positions: expected 0 <= position < {max_pages * INDEX_PAGE_SIZE} (page table width)")
        if bool(((rows < 0) | (rows >= B)).any()):
            raise ValueError(f"rows: expected request ids in [0, {B})")
    pos = positions.long()
    return page_table[rows.long(), pos // INDEX_PAGE_SIZE].long() * INDEX_PAGE_SIZE + pos % INDEX_PAGE_SIZE
