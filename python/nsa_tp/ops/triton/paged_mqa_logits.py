"""fp8 MQA logits over the paged index-K cache (the lightning indexer, decode) in Triton.

Semantics: :func:`nsa_tp.ops.reference.fp8_paged_mqa_logits`.

Index-K cache page layout (64 tokens a page, ``64 * 132 = 8448`` bytes)::

    [   0, 8192)  64 tokens x 128 float8_e4m3fn, token-major
    [8192, 8448)  64 x float32 dequantization scales, one per token

Token ``j`` of request ``b`` lives in page ``page_table[b, j // 64]`` at offset ``j % 64``.

Design. Decode is memory bound (132 bytes a key, 64 x 128 fp8 MACs a key): one program per (request,
block of ``BLOCK_N`` keys) gathers whole pages, keeps the request's ``q [H, D]`` resident, and runs one fp8
tensor-core product ``K [BLOCK_N, D] @ q^T [D, H]`` per block; blocks past the request's length only write
``-inf``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa_tp.ops._contracts import check_paged_logits_args
from nsa_tp.ops.triton import _common
from nsa_tp.ops.triton._common import cdiv
from nsa_tp.ops.triton.mqa_logits import weighted_relu_sum

__all__ = ["PAGE_SIZE", "INDEX_DIM", "PAGE_BYTES", "PagedLogitsConfig", "DEFAULT_PAGED_CONFIG", "fp8_paged_mqa_logits"]

PAGE_SIZE = 64
INDEX_DIM = 128
PAGE_BYTES = PAGE_SIZE * (INDEX_DIM + 4)  # 8448: values then one float32 scale per token


@dataclasses.dataclass(frozen=True)
class PagedLogitsConfig:
    block_n: int  # keys per program, a multiple of the 64-token page: 64, 128, 256 or 512
    num_warps: int


# The default launch shape (the one place to change after a measurement): 256 keys = 4 pages, 33 KB of
# cache per program, enough bytes in flight per SM; benchmark/bench_mqa_logits.py times the alternatives.
DEFAULT_PAGED_CONFIG = PagedLogitsConfig(block_n=256, num_warps=8)


@triton.jit
def _paged_mqa_logits_kernel(
    q_ptr, stride_qb, stride_qh,
    cache_ptr, cache_f32_ptr,
    w_ptr, stride_wb,
    seq_lens_ptr,
    pt_ptr, stride_pb,
    out_ptr, stride_ob,
    H, P, max_pages, max_seq_len,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_out = offs_n < max_seq_len
    seq_len = tl.load(seq_lens_ptr + b)
    if n0 >= seq_len:
        tl.store(out_ptr + b * stride_ob + offs_n, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=in_out)
    else:
        offs_d = tl.arange(0, 128)
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        live = (offs_n < seq_len) & (offs_n // 64 < max_pages)
        page = tl.load(pt_ptr + b * stride_pb + offs_n // 64, mask=live, other=-1)
        live = live & (page >= 0) & (page < P)  # a bad page id gives -inf, never an out-of-bounds read
        page = tl.where(live, page, 0).to(tl.int64)
        slot = offs_n % 64
        kt = tl.load(cache_ptr + page[:, None] * 8448 + slot[:, None] * 128 + offs_d[None, :],
                     mask=live[:, None], other=0)
        kt = kt.to(tl.float8e4nv, bitcast=True)
        k_scale = tl.load(cache_f32_ptr + page * 2112 + 2048 + slot, mask=live, other=0.0)  # 8448 / 4, 8192 / 4
        qt = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
                     mask=h_mask[:, None], other=0.0)
        w = tl.load(w_ptr + b * stride_wb + offs_h, mask=h_mask, other=0.0)
        acc = tl.dot(kt, tl.trans(qt))  # [BLOCK_N, BLOCK_H] fp32
        row = tl.where(live, weighted_relu_sum(acc, k_scale, w), float("-inf"))
        tl.store(out_ptr + b * stride_ob + offs_n, row, mask=in_out)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    index_k_cache: torch.Tensor,
    weights: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    max_seq_len: int,
    config: PagedLogitsConfig | None = None,
) -> torch.Tensor:
    """``logits [B, max_seq_len]`` float32 for one query token per request.

    Args:
        q: ``[B, H, 128]`` float8_e4m3fn, last dim contiguous.
        index_k_cache: ``[P, 8448]`` uint8 pages (layout in the module docstring).
        weights: ``[B, H]`` float32.
        seq_lens: ``[B]`` int32 keys per request.
        page_table: ``[B, max_pages]`` int32 page ids.
        max_seq_len: columns of the output; ``logits[b, j] = -inf`` for ``j >= seq_lens[b]`` (and for a
            token whose page id is outside ``[0, P)``).
        config: launch shape override (benchmarks); default :data:`DEFAULT_PAGED_CONFIG`.

    Semantics: :func:`nsa_tp.ops.reference.fp8_paged_mqa_logits`.
    """
    max_seq_len = int(max_seq_len)
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len: expected >= 0, got {max_seq_len}")
    check_paged_logits_args(q, index_k_cache, weights, seq_lens, page_table, max_seq_len)
    B, H, _ = q.shape
    if q.stride(2) != 1 or weights.stride(1) != 1 or page_table.stride(1) != 1:
        raise ValueError("q, weights, page_table: expected the last dim contiguous")
    if not index_k_cache.is_contiguous():
        raise ValueError("index_k_cache: expected a contiguous tensor")

    out = _common.alloc((B, max_seq_len), torch.float32, q.device)
    if B == 0 or max_seq_len == 0:
        return out
    P = index_k_cache.shape[0]
    cfg = config or DEFAULT_PAGED_CONFIG
    if cfg.block_n % PAGE_SIZE or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"config.block_n: expected a power-of-two multiple of {PAGE_SIZE}, got {cfg.block_n}")
    grid = (B, cdiv(max_seq_len, cfg.block_n))
    _paged_mqa_logits_kernel[grid](
        q, q.stride(0), q.stride(1),
        index_k_cache, index_k_cache.view(torch.float32),
        weights, weights.stride(0),
        seq_lens.contiguous(),
        page_table, page_table.stride(0),
        out, out.stride(0),
        H, P, page_table.shape[1], max_seq_len,
        BLOCK_H=max(16, triton.next_power_of_2(H)),
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    return out
