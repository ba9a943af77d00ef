"""Reference tier: plain torch, float32 math, any device. The definition of correct for every tier.

Each function validates its inputs with :func:`nsa_tp.ops._check.check_tensor` and works in bounded
memory (row chunks), so it can serve as a slow-but-real fallback on CPU as well as the test oracle.
"""

from __future__ import annotations

import torch

from nsa_tp.ops._check import check_same_device, check_tensor
from nsa_tp.ops.kv_format import D_QK, is_fp8_kv, unpack_fp8_kv

__all__ = ["sparse_mla_fwd", "fp8_mqa_logits"]

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
            (see :mod:`nsa_tp.ops.kv_format`).
        indices: ``[T, 1, K]`` int32 — KV rows each query attends to; ``-1`` or ``>= N`` means "no token".
            Duplicate ids are attended twice (as FlashMLA does).
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value dim, the first ``d_v`` dims of each kv row (512).

    Returns:
        ``out [T, H, d_v]`` bfloat16, ``max_logits [T, H]`` float32, ``lse [T, H]`` float32 where
        ``lse = log(sum_j exp(sm_scale * q . k_j))`` (natural log) over valid ids. A row with no valid id
        gives ``out = 0``, ``max_logits = -inf`` and ``lse = -inf``.
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
        rows = kv_f[idx.clamp(0, max(N - 1, 0))] if N else kv_f.new_zeros(*idx.shape, D_QK)  # [t, K, 576]
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
