"""fp8 MQA logits over ragged key ranges (the lightning indexer, prefill) in Triton.

Semantics: :func:`nsa_tp.ops.reference.fp8_mqa_logits`
(``logits[t, j] = sum_h relu(q[t,h] . k[j] * k_scale[j]) * weights[t,h]`` for ``ks[t] <= j < ke[t]``,
``-inf`` elsewhere).

Design. One program owns a block of ``BLOCK_N`` keys, kept in registers/shared memory as fp8, and walks a
block of ``BLOCK_T`` query tokens: per token one fp8 tensor-core product ``K [BLOCK_N, D] @ q_t^T [D, H]``
with fp32 accumulation, then the epilogue (scale, relu, weight, sum over heads) on ``[BLOCK_N, H]``. Keys
are the MMA's M dimension so the sum over heads stays inside a thread quad (no cross-warp reduction), and
the resident key block is what bounds the L2 traffic (every token's q is re-read once per key block).
A (key block, token block) pair that no token's ``[ks, ke)`` touches only writes ``-inf`` — for causal
prefill that skips about half of the products.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa_tp.ops._contracts import check_mqa_logits_args
from nsa_tp.ops.triton import _common
from nsa_tp.ops.triton._common import cdiv

__all__ = ["MQALogitsConfig", "default_config", "fp8_mqa_logits", "weighted_relu_sum"]


@dataclasses.dataclass(frozen=True)
class MQALogitsConfig:
    block_n: int  # keys per program (MMA M)
    block_t: int  # query tokens each program walks
    num_warps: int
    num_stages: int


def default_config(num_tokens: int, num_keys: int) -> MQALogitsConfig:
    """Chosen from the H100 sweep in docs/kernels.md."""
    return MQALogitsConfig(128, 64, 4, 3)


@triton.jit
def weighted_relu_sum(acc, k_scale, w):
    """``[BLOCK_N, H]`` fp32 dot -> ``[BLOCK_N]``: ``sum_h relu(acc * k_scale) * w``."""
    return tl.sum(tl.maximum(acc * k_scale[:, None], 0.0) * w[None, :], 1)


@triton.jit
def _mqa_logits_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, stride_kn,
    ksc_ptr,
    w_ptr, stride_wt,
    ks_ptr, ke_ptr,
    out_ptr, stride_ot,
    T, N, H, D,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    t0 = tl.program_id(1) * BLOCK_T
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    ks_blk = tl.load(ks_ptr + offs_t, mask=t_mask, other=0)
    ke_blk = tl.load(ke_ptr + offs_t, mask=t_mask, other=0)
    touches = t_mask & (ks_blk < ke_blk) & (ks_blk < n0 + BLOCK_N) & (ke_blk > n0)
    if tl.max(touches.to(tl.int32), 0) == 0:
        # No row of this token block scores these keys: the whole tile is -inf.
        ptrs = out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
        tl.store(ptrs, tl.full([BLOCK_T, BLOCK_N], float("-inf"), tl.float32),
                 mask=t_mask[:, None] & n_mask[None, :])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        kt = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                     mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        k_scale = tl.load(ksc_ptr + offs_n, mask=n_mask, other=0.0)
        for i in range(BLOCK_T):
            t = tl.minimum(t0 + i, T - 1).to(tl.int64)  # past T: recompute the last row, store masked off
            qt = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                         mask=h_mask[:, None] & (offs_d[None, :] < D), other=0.0)
            w = tl.load(w_ptr + t * stride_wt + offs_h, mask=h_mask, other=0.0)
            acc = tl.dot(kt, tl.trans(qt))  # [BLOCK_N, BLOCK_H] fp32, fp8 tensor cores
            row = weighted_relu_sum(acc, k_scale, w)
            lo = tl.load(ks_ptr + t)
            hi = tl.load(ke_ptr + t)
            row = tl.where((offs_n >= lo) & (offs_n < hi), row, float("-inf"))
            tl.store(out_ptr + t * stride_ot + offs_n, row, mask=n_mask & (t0 + i < T))


def _block(x: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(x))


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    config: MQALogitsConfig | None = None,
) -> torch.Tensor:
    """``logits [T, N]`` float32.

    Args:
        q: ``[T, H, D]`` float8_e4m3fn, last dim contiguous.
        kv: ``(k [N, D] float8_e4m3fn, k_scale [N] float32)``.
        weights: ``[T, H]`` float32.
        ks, ke: ``[T]`` int32; row t scores keys ``ks[t] <= j < ke[t]``, ``-inf`` elsewhere.
        config: launch shape override (benchmarks); default from :func:`default_config`.

    Semantics: :func:`nsa_tp.ops.reference.fp8_mqa_logits`.
    """
    k, k_scale, _ = check_mqa_logits_args(q, kv, weights, ks, ke)
    T, H, D = q.shape
    N = k.shape[0]
    if q.stride(2) != 1 or k.stride(1) != 1 or weights.stride(1) != 1:
        raise ValueError("q, kv[0], weights: expected the last dim contiguous")
    k_scale, ks, ke = k_scale.contiguous(), ks.contiguous(), ke.contiguous()

    out = _common.alloc((T, N), torch.float32, q.device)
    if T == 0 or N == 0:
        return out
    cfg = config or default_config(T, N)
    grid = (cdiv(N, cfg.block_n), cdiv(T, cfg.block_t))
    _mqa_logits_kernel[grid](
        q, q.stride(0), q.stride(1),
        k, k.stride(0),
        k_scale,
        weights, weights.stride(0),
        ks, ke,
        out, out.stride(0),
        T, N, H, D,
        BLOCK_H=_block(H, 16),
        BLOCK_D=_block(D, 32),
        BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
