"""Boundary checks shared by every tier of one op contract, so that the tiers cannot drift apart.

Each ``check_*`` function raises the ``ValueError`` that every tier raises for a bad argument (named,
expected vs got; see :mod:`nsa_tp.ops.check`) and returns what its callers go on to use. Only what is
the same in every tier lives here: a tier's own extra rules (Triton's contiguity, the reference tier's
value range checks, how strictly ``max_seq_len`` is typed) stay in the tier.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_same_device, check_tensor
from nsa_tp.ops.index_cache import INDEX_HEAD_DIM, INDEX_PAGE_BYTES, INDEX_PAGE_SIZE
from nsa_tp.ops.kv_format import LATENT_PAGE_SIZE
from nsa_tp.ops.plan import kv_cache_dtype_of, normalize_kv_dtype

__all__ = [
    "check_mqa_logits_args",
    "check_paged_logits_args",
    "positive_ints_error",
    "check_decode_plan_args",
    "check_decode_args",
]



def check_mqa_logits_args(
    q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """``fp8_mqa_logits``: q ``[T, H, D]`` e4m3, kv ``(k [N, D] e4m3, k_scale [N] f32)``, weights ``[T, H]``
    f32, ks / ke ``[T]`` int32, all on one device. Returns ``(k, k_scale, device)``.
    """
    check_tensor(q, "q", ndim=3, dtype=torch.float8_e4m3fn)
    T, H, D = q.shape
    if not (isinstance(kv, (tuple, list)) and len(kv) == 2):
        raise ValueError("kv: expected a tuple (k [N, D] float8_e4m3fn, k_scale [N] float32)")
    k, k_scale = kv
    check_tensor(k, "kv[0] (k)", shape=(None, D), dtype=torch.float8_e4m3fn)
    N = k.shape[0]
    check_tensor(k_scale, "kv[1] (k_scale)", shape=(N,), dtype=torch.float32)
    check_tensor(weights, "weights", shape=(T, H), dtype=torch.float32)
    check_tensor(ks, "ks", shape=(T,), dtype=torch.int32)
    check_tensor(ke, "ke", shape=(T,), dtype=torch.int32)
    device = check_same_device(q=q, k=k, k_scale=k_scale, weights=weights, ks=ks, ke=ke)
    return k, k_scale, device


def check_paged_logits_args(
    q: torch.Tensor, index_k_cache: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor,
    page_table: torch.Tensor, max_seq_len: int,
) -> torch.device:
    """``fp8_paged_mqa_logits``: q ``[B, H, 128]`` e4m3, index_k_cache ``[P, 8448]`` uint8, weights ``[B, H]``
    f32, seq_lens ``[B]`` int32, page_table ``[B, max_pages]`` int32, ``max_seq_len <= max_pages * 64``, all on
    one device; returns the device.

    ``max_seq_len`` must already be an int >= 0: the tiers differ in how strictly they type it.
    """
    check_tensor(q, "q", ndim=3, dtype=torch.float8_e4m3fn)
    B, H, D = q.shape
    if D != INDEX_HEAD_DIM:
        raise ValueError(f"q: expected head dim {INDEX_HEAD_DIM} (the index-K cache holds 128 values a token), got {D}")
    check_tensor(index_k_cache, "index_k_cache", shape=(None, INDEX_PAGE_BYTES), dtype=torch.uint8)
    check_tensor(weights, "weights", shape=(B, H), dtype=torch.float32)
    check_tensor(seq_lens, "seq_lens", shape=(B,), dtype=torch.int32)
    check_tensor(page_table, "page_table", ndim=2, dtype=torch.int32)
    if page_table.shape[0] != B:
        raise ValueError(f"page_table: expected {B} rows (one per request), got {tuple(page_table.shape)}")
    max_pages = page_table.shape[1]
    if max_seq_len > max_pages * INDEX_PAGE_SIZE:
        raise ValueError(f"max_seq_len: {max_seq_len} exceeds the page table's {max_pages} pages x {INDEX_PAGE_SIZE}")
    return check_same_device(q=q, index_k_cache=index_k_cache, weights=weights, seq_lens=seq_lens,
                             page_table=page_table)


def positive_ints_error(**values: object) -> str | None:
    """The message for the first value that is not a positive int (a bool is not one), else ``None``.

    A message rather than an exception: FlashMLA's ``supports`` hook reports it as a reason.
    """
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name}: expected a positive int, got {value!r}"
    return None


def check_decode_plan_args(
    batch_size: int, num_heads: int, topk: int, kv_dtype: object, device: torch.device | str
) -> tuple[str, torch.device]:
    """``plan_sparse_mla_decode``: positive int shapes, a known cache format. Returns ``(kv_dtype name, device)``."""
    error = positive_ints_error(batch_size=batch_size, num_heads=num_heads, topk=topk)
    if error:
        raise ValueError(error)
    return normalize_kv_dtype(kv_dtype), torch.device(device)


def check_decode_args(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor) -> str:
    """``sparse_mla_decode``: kv_cache ``[num_pages, 64, 1, 576 | 656]`` in a known format, q ``[B, H, D]``
    bfloat16, indices ``[B, 1, K]`` int32. Returns the cache format (``"bfloat16"`` / ``"fp8_e4m3"``).

    The shapes against each other and the device are checked later, by the plan (:meth:`DecodePlan.check`)
    or by the sparse-MLA op the tier runs.
    """
    check_tensor(kv_cache, "kv_cache", ndim=4)
    if kv_cache.shape[1] != LATENT_PAGE_SIZE or kv_cache.shape[2] != 1:
        raise ValueError(
            "kv_cache: expected [num_pages, 64, 1, 576 | 656] (page size 64, one latent head), "
            f"got {tuple(kv_cache.shape)}"
        )
    kind = kv_cache_dtype_of(kv_cache)  # raises on a format that is neither bf16 nor the fp8 656-byte one
    check_tensor(q, "q", ndim=3, dtype=torch.bfloat16)
    check_tensor(indices, "indices", ndim=3, dtype=torch.int32)
    return kind
