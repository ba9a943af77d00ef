"""Reference tier: plain torch, float32 math, any device. The definition of correct for every tier.

Each function validates its inputs with :func:`nsa_tp.ops.check.check_tensor` and works in bounded
memory (row chunks), so it can serve as a slow-but-real fallback on CPU as well as the test oracle.
"""

from __future__ import annotations

import torch

from nsa_tp.ops._contracts import (
    check_decode_args,
    check_decode_plan_args,
    check_mqa_logits_args,
    check_paged_logits_args,
)
from nsa_tp.ops.check import check_same_device, check_tensor
from nsa_tp.ops.kv_format import D_QK, is_fp8_kv, unpack_fp8_kv
from nsa_tp.ops.plan import DecodePlan

__all__ = ["sparse_mla_fwd", "fp8_mqa_logits", "fp8_paged_mqa_logits", "plan_sparse_mla_decode", "sparse_mla_decode"]

# Rows per chunk so that the reference never materializes more than ~64M fp32 scores at once.
_MAX_CHUNK_ELEMS = 1 << 26


def _rows_per_chunk(per_row: int, total: int) -> int:
    return max(1, min(total, _MAX_CHUNK_ELEMS // max(per_row, 1)))


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA forward (FlashMLA's sparse-prefill contract) for any head count.

    Args:
        q: ``[T, H, 576]`` bfloat16 (float16/float32 accepted) — absorbed queries, H >= 1.
        kv: ``[N, 1, 576]`` bfloat16, or the fp8 format ``[N, 1, 656]`` uint8 / float8_e4m3fn
            (see :mod:`nsa_tp.ops.kv_format`). Any strides (this tier is the oracle, not the hot path: it
            dequantizes / upcasts the whole cache to float32, a copy).
        indices: ``[T, 1, K]`` int32 — KV rows each query attends to; any id ``< 0`` or ``>= N`` means
            "no token". Duplicate ids are attended twice (as FlashMLA does). Any strides.
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value dim, the first ``d_v`` dims of each kv row (512).

    Returns:
        ``out [T, H, d_v]`` bfloat16, ``max_logits [T, H]`` float32, ``lse [T, H]`` float32 where
        ``lse = log(sum_j exp(sm_scale * q . k_j))`` (natural log) over valid ids. A row with no valid id
        gives ``out = 0``, ``max_logits = -inf`` and ``lse = -inf``. The outputs depend only on the kv
        slots the valid ids name: NaN or inf in any other slot never reaches them.
    """
    check_tensor(q, "q", ndim=3, dtype=(torch.bfloat16, torch.float16, torch.float32))
    T, H, d_qk = q.shape
    if d_qk != D_QK:
        raise ValueError(f"q: expected last dim {D_QK} (512 latent + 64 rope), got {d_qk}")
    check_tensor(kv, "kv", ndim=3)
    if kv.shape[1] != 1:
        raise ValueError(f"kv: expected shape [N, 1, 576] (one latent head), got {tuple(kv.shape)}")
    if is_fp8_kv(kv):
        kv_f = unpack_fp8_kv(kv[:, 0], torch.float32)
    else:
        check_tensor(kv, "kv", shape=(None, 1, D_QK), dtype=(torch.bfloat16, torch.float16, torch.float32))
        kv_f = kv[:, 0].float()
    N = kv_f.shape[0]
    check_tensor(indices, "indices", ndim=3, dtype=torch.int32)
    if indices.shape[0] != T or indices.shape[1] != 1:
        raise ValueError(f"indices: expected shape [{T}, 1, K], got {tuple(indices.shape)}")
    if not 0 < d_v <= D_QK:
        raise ValueError(f"d_v: expected 0 < d_v <= {D_QK}, got {d_v}")
    device = check_same_device(q=q, kv=kv, indices=indices)

    K = indices.shape[2]
    out = torch.empty(T, H, d_v, dtype=torch.bfloat16, device=device)
    max_logits = torch.empty(T, H, dtype=torch.float32, device=device)
    lse = torch.empty(T, H, dtype=torch.float32, device=device)
    step = _rows_per_chunk(H * K + K * D_QK, T)
    for t0 in range(0, T, step):
        idx = indices[t0 : t0 + step, 0].long()  # [t, K]
        valid = (idx >= 0) & (idx < N)
        # Invalid ids gather slot 0 as a stand-in, then the stand-in rows are zeroed *before* any product: a
        # NaN / inf in a slot that no valid id names must not reach the output (0 * NaN is NaN).
        rows = kv_f[torch.where(valid, idx, 0)] if N else kv_f.new_zeros(*idx.shape, D_QK)  # [t, K, 576]
        rows = torch.where(valid[..., None], rows, 0.0)
        scores = torch.einsum("thd,tkd->thk", q[t0 : t0 + step].float(), rows) * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        m = scores.amax(dim=-1)  # [t, H], -inf for empty rows
        l_ = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - torch.where(torch.isinf(l_), 0.0, l_)[..., None])  # 0 where masked
        out[t0 : t0 + step] = torch.einsum("thk,tkd->thd", p, rows[..., :d_v]).to(torch.bfloat16)
        max_logits[t0 : t0 + step] = m
        lse[t0 : t0 + step] = l_
    return out, max_logits, lse


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
) -> torch.Tensor:
    """The lightning indexer's logits (DeepGEMM's ``fp8_mqa_logits`` contract).

    Args:
        q: ``[T, H, D]`` float8_e4m3fn — index queries (H index heads, D = 128).
        kv: ``(k [N, D] float8_e4m3fn, k_scale [N] float32)`` — index keys and their dequant scales.
        weights: ``[T, H]`` float32 — per-head weights (already include every scale factor).
        ks, ke: ``[T]`` int32 — row t scores keys ``ks[t] <= j < ke[t]``.

    Returns:
        ``logits [T, N]`` float32 with ``logits[t, j] = sum_h relu(q[t,h] . k[j] * k_scale[j]) * weights[t,h]``
        inside ``[ks[t], ke[t])`` and ``-inf`` elsewhere.
    """
    k, k_scale, device = check_mqa_logits_args(q, kv, weights, ks, ke)
    T, H, _ = q.shape
    N = k.shape[0]

    k_f = k.float() * k_scale[:, None]  # [N, D]
    cols = torch.arange(N, device=device)
    logits = torch.empty(T, N, dtype=torch.float32, device=device)
    step = _rows_per_chunk(H * N, T)
    for t0 in range(0, T, step):
        qs = q[t0 : t0 + step].float()  # [t, H, D]
        s = torch.relu(torch.einsum("thd,nd->thn", qs, k_f))
        rows = torch.einsum("thn,th->tn", s, weights[t0 : t0 + step])
        inside = (cols[None, :] >= ks[t0 : t0 + step, None].long()) & (cols[None, :] < ke[t0 : t0 + step, None].long())
        logits[t0 : t0 + step] = rows.masked_fill(~inside, float("-inf"))
    return logits


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    index_k_cache: torch.Tensor,
    weights: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    max_seq_len: int,
) -> torch.Tensor:
    """The indexer's decode logits over the paged index-K cache (DeepGEMM's ``fp8_paged_mqa_logits``).

    Args:
        q: ``[B, H, 128]`` float8_e4m3fn — one index query per request (its q scale folded into weights).
        index_k_cache: ``[P, 8448]`` uint8 — see :mod:`nsa_tp.ops.index_cache` for the byte layout.
        weights: ``[B, H]`` float32.
        seq_lens: ``[B]`` int32, ``0 <= seq_lens[b] <= max_seq_len``.
        page_table: ``[B, max_pages]`` int32, request -> pages; entries for pages a request uses must be
            valid page ids (``< P``), the rest are ignored.
        max_seq_len: output width, ``<= max_pages * 64``.

    Returns:
        ``logits [B, max_seq_len]`` float32: ``sum_h relu(q[b,h] . k_j * scale_j) * weights[b,h]`` for
        ``j < seq_lens[b]`` (``k_j`` = token ``j`` of request ``b``: page ``page_table[b, j // 64]``,
        offset ``j % 64``), ``-inf`` for ``j >= seq_lens[b]``.
    """
    from nsa_tp.ops.index_cache import INDEX_PAGE_SIZE, _check_cache, gather_index_k_unchecked

    # Strictly an int here (the Triton tier coerces with int()); checked first, the shared checks compare it.
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 0:
        raise ValueError(f"max_seq_len: expected an int >= 0, got {max_seq_len!r}")
    device = check_paged_logits_args(q, index_k_cache, weights, seq_lens, page_table, max_seq_len)
    _check_cache(index_k_cache)  # and row-contiguous storage, which the byte views below rely on
    B, H, D = q.shape
    P, max_pages = index_k_cache.shape[0], page_table.shape[1]
    if B and bool(((seq_lens < 0) | (seq_lens > max_seq_len)).any()):
        raise ValueError(f"seq_lens: expected 0 <= seq_lens[b] <= max_seq_len ({max_seq_len})")
    used = torch.arange(max_pages, device=device)[None, :] * INDEX_PAGE_SIZE < seq_lens[:, None]
    if bool((used & ((page_table < 0) | (page_table >= P))).any()):
        raise ValueError(f"page_table: a page a request uses is outside the cache's [0, {P})")

    logits = torch.full((B, max_seq_len), float("-inf"), dtype=torch.float32, device=device)
    if B == 0 or max_seq_len == 0:
        return logits
    j = torch.arange(max_seq_len, device=device)
    step = _rows_per_chunk(max_seq_len * (D + H), B)
    for b0 in range(0, B, step):
        sl = seq_lens[b0 : b0 + step, None]
        inside = j[None, :] < sl  # [b, L]
        pages = page_table[b0 : b0 + step, j // INDEX_PAGE_SIZE].long()  # [b, L]
        slots = torch.where(inside, pages * INDEX_PAGE_SIZE + j % INDEX_PAGE_SIZE, torch.zeros_like(pages))
        k, scale = gather_index_k_unchecked(index_k_cache, slots.reshape(-1))
        k = k.float().reshape(*slots.shape, D)  # [b, L, D]
        scale = scale.reshape(slots.shape)
        s = torch.relu(torch.einsum("bhd,bld->bhl", q[b0 : b0 + step].float(), k) * scale[:, None, :])
        rows = torch.einsum("bhl,bh->bl", s, weights[b0 : b0 + step])
        logits[b0 : b0 + step] = rows.masked_fill(~inside, float("-inf"))
    return logits


def plan_sparse_mla_decode(
    batch_size: int,
    num_heads: int,
    topk: int,
    *,
    kv_dtype: object,
    device: torch.device | str,
) -> DecodePlan:
    """The reference tier's decode plan: validates the batch shape, holds no data (``data=None``)."""
    kind, dev = check_decode_plan_args(batch_size, num_heads, topk, kv_dtype, device)
    return DecodePlan(
        tier="reference", batch_size=batch_size, num_heads=num_heads, topk=topk, kv_dtype=kind, device=dev, data=None
    )


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    *,
    plan: DecodePlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode over the paged latent cache (FlashMLA's ``flash_mla_with_kvcache`` with indices).

    Args:
        q: ``[B, H, 576]`` bfloat16 — one query token per request.
        kv_cache: ``[num_pages, 64, 1, 576]`` bfloat16, or the fp8 format ``[num_pages, 64, 1, 656]`` uint8.
        indices: ``[B, 1, K]`` int32 global slots ``page * 64 + offset``; any id ``< 0`` or
            ``>= num_pages * 64`` means "no token"; other slots never reach the outputs (NaN there is harmless).
        sm_scale, d_v: as :func:`sparse_mla_fwd`.
        plan: ``None`` or a plan built by this tier (checked against the inputs).

    Returns:
        ``(out [B, H, d_v] bfloat16, lse [B, H] float32)`` — exactly :func:`sparse_mla_fwd` on the cache
        flattened to ``[num_pages * 64, 1, D]``; an empty row gives out = 0, lse = -inf.
    """
    check_decode_args(q, kv_cache, indices)
    if plan is not None:
        if not isinstance(plan, DecodePlan):
            raise ValueError(f"plan: expected a DecodePlan from plan_sparse_mla_decode, got {type(plan).__name__}")
        if plan.tier != "reference":
            raise ValueError(f"plan: built by tier {plan.tier!r}, cannot run on the reference tier")
        plan.check(q, kv_cache, indices)
    flat = kv_cache.reshape(-1, 1, kv_cache.shape[-1])  # [pages, 64, 1, D] -> [N, 1, D], slot = page*64 + off
    out, _max_logits, lse = sparse_mla_fwd(q, flat, indices, sm_scale, d_v)
    return out, lse
