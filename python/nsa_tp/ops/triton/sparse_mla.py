"""Padding-free sparse MLA forward in Triton, for any head count, bf16 or fp8 (656-byte) KV.

Semantics: :func:`nsa_tp.ops.reference.sparse_mla_fwd`.

Design (why it is fast at 16 heads). All heads of a query token attend to the *same* top-k KV rows, so one
program takes one token and a block of ``BLOCK_H`` of its heads, gathers ``BLOCK_K`` KV rows at a time by
pointer arithmetic from the indices, and reuses each gathered tile for every head of the block — once for
``S = Q K^T`` (512 latent + 64 rope dims) and once for ``O += P V`` (V is the first 512 dims of the same
rows, so the tile is loaded once). Softmax is online in fp32 with ``exp2``. A head count below the
block is masked in registers: nothing is padded in memory, and the gathered bytes — the cost that does not
shrink with the head count — are read once per token, not once per padded head group.

fp8 KV is dequantized in the kernel (the gathered bytes drop from 1152 to 656 a row), two ways
(``SparseMLAConfig.exact_fp8``): exactly, e4m3 -> bf16 (exact) with the per-128 scales applied to the fp32
scores and to the probabilities, 4 chunked dots a step; or FlashMLA's way, the tile times its scales rounded
once to bf16 in registers, then used like a bf16 tile (fewer, larger dots).

When ``T * ceil(H / BLOCK_H)`` programs cannot fill the GPU (decode: one token per request), the top-k is
split across programs (flash-decoding) and a second kernel merges the partial results by their lse.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa_tp.ops.check import check_same_device, check_tensor
from nsa_tp.ops.kv_format import D_LATENT, D_QK, is_fp8_kv
from nsa_tp.ops.triton import _common
from nsa_tp.ops.triton._common import LN2, LOG2E, cdiv, num_sms

__all__ = ["SparseMLAConfig", "default_config", "choose_num_splits", "sparse_mla_fwd", "sparse_mla_fwd_split"]

# Byte offsets inside a 656-byte fp8 row, in units of the view that reads them.
_FP8_SCALE_OFF_F32 = D_LATENT // 4  # scales at byte 512 = float32 index 128
_FP8_ROPE_OFF_BF16 = (D_LATENT + 16) // 2  # rope at byte 528 = bf16 index 264
_LN2 = tl.constexpr(LN2)  # log2 -> natural-log units, read inside the kernels


@dataclasses.dataclass(frozen=True)
class SparseMLAConfig:
    """Launch shape: heads per program, gathered rows per step, warps, pipeline stages."""

    block_h: int
    block_k: int
    num_warps: int
    num_stages: int
    # fp8 cache only. True: scales applied exactly to scores / probabilities, per 128-dim tile (4 dots a
    # step). False: dequantize the tile to bf16 in registers (one rounding, as FlashMLA does), 1 dot a step.
    exact_fp8: bool = True


def default_config(num_heads: int, fp8: bool) -> SparseMLAConfig:
    """Per head count, from the H100 sweep in docs/kernels.md (register budgets read off the compiler).

    Up to 32 heads: blocks of 16 heads, 4 warps, 32 gathered rows a step (Ampere-style MMA; 32 heads run
    as two programs, each gathering its own copy of the rows — measured faster than one 32-head program).
    From 64 heads: blocks of 64 on Hopper's warpgroup MMA. fp8: the bf16-rounded dequantization (FlashMLA's
    numerics) unless ``exact_fp8`` is asked for.
    """
    if num_heads <= 32:
        return SparseMLAConfig(16, 32, 4, 2, exact_fp8=False)
    return SparseMLAConfig(64, 64, 8, 2, exact_fp8=False)


def choose_num_splits(num_tokens: int, num_heads: int, topk: int, cfg: SparseMLAConfig, sms: int) -> int:
    """Top-k splits so that about two waves of programs run; 1 when the tokens alone fill the GPU."""
    base = num_tokens * cdiv(num_heads, cfg.block_h)
    tiles = max(1, cdiv(topk, cfg.block_k))
    if base >= sms:
        return 1
    want = min(tiles, cdiv(2 * sms, base))
    per_split = cdiv(tiles, want)  # tiles per split; recompute the count so no split is empty by design
    return cdiv(tiles, per_split)


@triton.jit
def _online_softmax(s, valid, m_i, l_i, qk_scale_log2):
    """One step of the online softmax on raw scores ``s [BLOCK_H, BLOCK_K]``; returns (p, alpha, m, l)."""
    s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_stats(ml_ptr, lse_ptr, m_ptrs, m_i, l_i, h_mask, PARTIAL: tl.constexpr):
    """max_logits and lse: log2 units for a partial (merged later), natural log for the final result."""
    has = l_i > 0.0
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # empty row: -inf
    if PARTIAL:
        tl.store(ml_ptr + m_ptrs, m_i, mask=h_mask)
        tl.store(lse_ptr + m_ptrs, lse2, mask=h_mask)
    else:
        tl.store(ml_ptr + m_ptrs, m_i * _LN2, mask=h_mask)
        tl.store(lse_ptr + m_ptrs, lse2 * _LN2, mask=h_mask)


@triton.jit
def _store_out(o_ptrs, acc, inv, h_mask, PARTIAL: tl.constexpr):
    if PARTIAL:
        tl.store(o_ptrs, acc * inv[:, None], mask=h_mask[:, None])
    else:
        tl.store(o_ptrs, (acc * inv[:, None]).to(tl.bfloat16), mask=h_mask[:, None])


@triton.jit
def _attend_rounded(q_row, h_mask, nope_ptr, stride_nope, scale_ptr, stride_scale, rope_ptr, stride_rope,
                    idx_row, k_lo, k_per_split, K, N, qk_scale_log2, o_ptrs, ROPE_OFF: tl.constexpr,
                    SCALE_OFF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                    PARTIAL: tl.constexpr):
    """bf16 rows, or fp8 rows dequantized to bf16 in registers (FlashMLA's numerics): one 512-dim tile a step.

    Stores the output rows at ``o_ptrs``; returns the running max and sum ``(m_i, l_i)`` in log2 units.
    """
    offs_d = tl.arange(0, 512)
    offs_r = tl.arange(0, 64)
    # Q is loop-invariant: [BLOCK_H, 512] latent + [BLOCK_H, 64] rope (the compiler keeps it in shared memory).
    qn = tl.load(q_row + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    qr = tl.load(q_row + 512 + offs_r[None, :], mask=h_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, 512], tl.float32)
    # k_per_split is a multiple of BLOCK_K; only the last split can run past K (masked).
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1)
        valid = (ids >= 0) & (ids < N)
        rows = tl.where(valid, ids, 0).to(tl.int64)  # int64: N * row bytes can pass 2^31
        if FP8:
            # e4m3 -> fp32 is exact; x the row's 4 tile scales; one rounding to bf16 (FlashMLA's dequant numerics).
            raw = tl.load(nope_ptr + rows[:, None] * stride_nope + offs_d[None, :], mask=valid[:, None], other=0)
            vals = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            sc = tl.load(scale_ptr + rows[:, None] * stride_scale + SCALE_OFF + tl.arange(0, 4)[None, :],
                         mask=valid[:, None], other=0.0)
            kn = tl.reshape(tl.reshape(vals, [BLOCK_K, 4, 128]) * sc[:, :, None], [BLOCK_K, 512]).to(tl.bfloat16)
        else:
            kn = tl.load(nope_ptr + rows[:, None] * stride_nope + offs_d[None, :], mask=valid[:, None], other=0.0)
        kr = tl.load(rope_ptr + rows[:, None] * stride_rope + ROPE_OFF + offs_r[None, :],
                     mask=valid[:, None], other=0.0)
        s = tl.dot(qn, tl.trans(kn))
        s = tl.dot(qr, tl.trans(kr), s)
        p, alpha, m_i, l_i = _online_softmax(s, valid, m_i, l_i, qk_scale_log2)
        acc = tl.dot(p.to(tl.bfloat16), kn, acc * alpha[:, None])  # V = the same gathered rows' first 512 dims
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # empty row: out = 0
    _store_out(o_ptrs + offs_d[None, :], acc, inv, h_mask, PARTIAL)
    return m_i, l_i


@triton.jit
def _fp8_chunk(raw_row, sc_row, valid, offs_c, c: tl.constexpr):
    """Latent chunk ``c`` (128 dims) of the gathered fp8 rows: bf16 values (e4m3 fits bf16 exactly) + scale."""
    x = tl.load(raw_row + c * 128 + offs_c[None, :], mask=valid[:, None], other=0)
    sc = tl.load(sc_row + c, mask=valid, other=0.0)
    return x.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16), sc


@triton.jit
def _attend_exact_fp8(q_row, h_mask, raw_ptr, stride_raw, scale_ptr, stride_scale, rope_ptr, stride_rope,
                      idx_row, k_lo, k_per_split, K, N, qk_scale_log2, o_ptrs, ROPE_OFF: tl.constexpr,
                      SCALE_OFF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PARTIAL: tl.constexpr):
    """fp8 rows with the scales applied exactly, per 128-dim tile, to the fp32 scores and to the probabilities
    (``S = sum_c (q_c . k8_c) * scale_c``, ``O_c += (P * scale_c) @ k8_c``), so the only roundings are the ones
    the bf16 path has (bf16 P); the fp8 values themselves convert to bf16 exactly. Same outputs as
    :func:`_attend_rounded`.
    """
    offs_c = tl.arange(0, 128)
    offs_r = tl.arange(0, 64)
    q0 = tl.load(q_row + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q1 = tl.load(q_row + 128 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q2 = tl.load(q_row + 256 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q3 = tl.load(q_row + 384 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    qr = tl.load(q_row + 512 + offs_r[None, :], mask=h_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc1 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc2 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc3 = tl.zeros([BLOCK_H, 128], tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1)
        valid = (ids >= 0) & (ids < N)
        rows = tl.where(valid, ids, 0).to(tl.int64)
        raw_row = raw_ptr + rows[:, None] * stride_raw
        sc_row = scale_ptr + rows * stride_scale + SCALE_OFF
        k0, sc0 = _fp8_chunk(raw_row, sc_row, valid, offs_c, 0)
        k1, sc1 = _fp8_chunk(raw_row, sc_row, valid, offs_c, 1)
        k2, sc2 = _fp8_chunk(raw_row, sc_row, valid, offs_c, 2)
        k3, sc3 = _fp8_chunk(raw_row, sc_row, valid, offs_c, 3)
        kr = tl.load(rope_ptr + rows[:, None] * stride_rope + ROPE_OFF + offs_r[None, :],
                     mask=valid[:, None], other=0.0)
        s = tl.dot(qr, tl.trans(kr))
        s += tl.dot(q0, tl.trans(k0)) * sc0[None, :]
        s += tl.dot(q1, tl.trans(k1)) * sc1[None, :]
        s += tl.dot(q2, tl.trans(k2)) * sc2[None, :]
        s += tl.dot(q3, tl.trans(k3)) * sc3[None, :]
        p, alpha, m_i, l_i = _online_softmax(s, valid, m_i, l_i, qk_scale_log2)
        acc0 = tl.dot((p * sc0[None, :]).to(tl.bfloat16), k0, acc0 * alpha[:, None])
        acc1 = tl.dot((p * sc1[None, :]).to(tl.bfloat16), k1, acc1 * alpha[:, None])
        acc2 = tl.dot((p * sc2[None, :]).to(tl.bfloat16), k2, acc2 * alpha[:, None])
        acc3 = tl.dot((p * sc3[None, :]).to(tl.bfloat16), k3, acc3 * alpha[:, None])
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    o_ptrs = o_ptrs + offs_c[None, :]
    _store_out(o_ptrs, acc0, inv, h_mask, PARTIAL)
    _store_out(o_ptrs + 128, acc1, inv, h_mask, PARTIAL)
    _store_out(o_ptrs + 256, acc2, inv, h_mask, PARTIAL)
    _store_out(o_ptrs + 384, acc3, inv, h_mask, PARTIAL)
    return m_i, l_i


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, stride_qt, stride_qh,
    nope_ptr, stride_nope,
    scale_ptr, stride_scale,
    rope_ptr, stride_rope,
    idx_ptr, stride_it,
    out_ptr, stride_os, stride_ot, stride_oh,
    ml_ptr, lse_ptr, stride_ms, stride_mt,
    H, N, K, k_per_split,
    qk_scale_log2,
    ROPE_OFF: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8: tl.constexpr,
    EXACT_FP8: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """One program: token ``t``, heads ``[h0, h0 + BLOCK_H)``, top-k slice ``split`` (the whole top-k unless
    ``PARTIAL``). ``EXACT_FP8`` (fp8 rows only) picks :func:`_attend_exact_fp8` over :func:`_attend_rounded`."""
    t = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    idx_row = idx_ptr + t * stride_it
    o_ptrs = out_ptr + split * stride_os + t * stride_ot + offs_h[:, None] * stride_oh
    k_lo = split * k_per_split
    if EXACT_FP8:
        m_i, l_i = _attend_exact_fp8(q_row, h_mask, nope_ptr, stride_nope, scale_ptr, stride_scale, rope_ptr,
                                     stride_rope, idx_row, k_lo, k_per_split, K, N, qk_scale_log2, o_ptrs,
                                     ROPE_OFF, SCALE_OFF, BLOCK_H, BLOCK_K, PARTIAL)
    else:
        m_i, l_i = _attend_rounded(q_row, h_mask, nope_ptr, stride_nope, scale_ptr, stride_scale, rope_ptr,
                                   stride_rope, idx_row, k_lo, k_per_split, K, N, qk_scale_log2, o_ptrs,
                                   ROPE_OFF, SCALE_OFF, BLOCK_H, BLOCK_K, FP8, PARTIAL)
    _store_stats(ml_ptr, lse_ptr, split * stride_ms + t * stride_mt + offs_h, m_i, l_i, h_mask, PARTIAL)


@triton.jit
def _combine_kernel(
    po_ptr, pm_ptr, plse_ptr,
    out_ptr, ml_ptr, lse_ptr,
    TH, S,
    BLOCK_S: tl.constexpr,
):
    """Merge ``S`` partial results of one (token, head): weights ``2^(lse_s - lse)``; empty splits weigh 0."""
    th = tl.program_id(0).to(tl.int64)  # flat (token, head)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    lse2 = tl.load(plse_ptr + offs_s * TH + th, mask=s_mask, other=float("-inf"))
    m2 = tl.load(pm_ptr + offs_s * TH + th, mask=s_mask, other=float("-inf"))
    top = tl.max(lse2, 0)
    top_use = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse2 - top_use)
    total = tl.sum(w, 0)
    wn = tl.where(total > 0.0, w / tl.where(total > 0.0, total, 1.0), 0.0)
    offs_d = tl.arange(0, 512)
    o = tl.load(po_ptr + (offs_s[:, None] * TH + th) * 512 + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(o * wn[:, None], 0)
    tl.store(out_ptr + th * 512 + offs_d, out.to(tl.bfloat16))
    lse = tl.where(total > 0.0, (top + tl.log2(tl.where(total > 0.0, total, 1.0))) * _LN2,
                   float("-inf"))
    tl.store(lse_ptr + th, lse)
    tl.store(ml_ptr + th, tl.max(m2, 0) * _LN2)


def _validate(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> None:
    check_tensor(q, "q", ndim=3, dtype=torch.bfloat16)
    T, H, d_qk = q.shape
    if d_qk != D_QK:
        raise ValueError(f"q: expected last dim {D_QK} (512 latent + 64 rope), got {d_qk}")
    if q.stride(2) != 1:
        raise ValueError("q: expected the last dim contiguous")
    check_tensor(kv, "kv", ndim=3)
    if kv.shape[1] != 1:
        raise ValueError(f"kv: expected shape [N, 1, 576] bf16 or [N, 1, 656] uint8, got {tuple(kv.shape)}")
    if not is_fp8_kv(kv):
        check_tensor(kv, "kv", shape=(None, 1, D_QK), dtype=torch.bfloat16)
    if kv.stride(2) != 1:
        raise ValueError("kv: expected the last dim contiguous (any row stride)")
    check_tensor(indices, "indices", shape=(T, 1, None), dtype=torch.int32)
    if indices.stride(2) != 1:
        raise ValueError("indices: expected the last dim contiguous")
    if d_v != D_LATENT:
        raise ValueError(f"d_v: the Triton kernel supports d_v={D_LATENT}, got {d_v}")
    check_same_device(q=q, kv=kv, indices=indices)


def _fp8_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[N, 656]`` fp8-format rows as bytes, strided as given when the scales can be read as float32 in place.

    The kernel reads the scales through a float32 view and the rope through a bf16 view of the same bytes,
    which needs a row stride and a start offset that are multiples of 4 bytes. Any padded stride that is
    (every allocator's padding is) runs without a copy; an odd-byte stride or offset is copied once here.
    """
    raw = rows.view(torch.uint8)
    if raw.stride(0) % 4 or raw.storage_offset() % 4:
        raw = raw.contiguous()
    return raw


def _kv_operands(kv: torch.Tensor, fp8: bool) -> tuple[tuple, int, int]:
    """The kernel's kv operands: ``(nope, stride, scale, stride, rope, stride)``, ``ROPE_OFF`` and ``SCALE_OFF``.

    bf16 rows serve all three reads; fp8 rows are read as bytes, float32 scales and bf16 rope of the same memory.
    """
    rows = kv[:, 0]  # [N, 1, D] -> [N, D]: a view that keeps the caller's row stride (no copy)
    if not fp8:
        return (rows, rows.stride(0)) * 3, D_LATENT, 0
    raw = _fp8_rows(rows)  # [N, 656] bytes
    scale, rope = raw.view(torch.float32), raw.view(torch.bfloat16)  # the same bytes as f32 / bf16
    args = (raw, raw.stride(0), scale, scale.stride(0), rope, rope.stride(0))
    return args, _FP8_ROPE_OFF_BF16, _FP8_SCALE_OFF_F32


def sparse_mla_fwd_split(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    num_splits: int | None = None,
    config: SparseMLAConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sparse_mla_fwd` with an explicit top-k split count and launch config (plans and benchmarks).

    ``num_splits=None`` picks one from the SM count (:func:`choose_num_splits`).
    """
    _validate(q, kv, indices, D_LATENT)
    T, H, _ = q.shape
    K = indices.shape[2]
    N = kv.shape[0]
    fp8 = is_fp8_kv(kv)
    cfg = config or default_config(H, fp8)
    if num_splits is None:
        num_splits = choose_num_splits(T, H, K, cfg, num_sms(q.device))
    tiles = max(1, cdiv(K, cfg.block_k))
    num_splits = max(1, min(int(num_splits), tiles))
    k_per_split = cdiv(tiles, num_splits) * cfg.block_k
    num_splits = max(1, cdiv(K, k_per_split))

    kv_args, rope_off, scale_off = _kv_operands(kv, fp8)
    out = _common.alloc((T, H, D_LATENT), torch.bfloat16, q.device)
    max_logits = _common.alloc((T, H), torch.float32, q.device)
    lse = _common.alloc((T, H), torch.float32, q.device)
    if T == 0 or H == 0:
        return out, max_logits, lse
    partial = num_splits > 1
    if partial:
        # [S, T, H, 512] fp32 partial outputs (normalized per split) + log2-unit max and lse per split.
        p_out = _common.alloc((num_splits, T, H, D_LATENT), torch.float32, q.device)
        p_ml = _common.alloc((num_splits, T, H), torch.float32, q.device)
        p_lse = _common.alloc((num_splits, T, H), torch.float32, q.device)
        dst = (p_out, p_ml, p_lse, T * H * D_LATENT, T * H)
    else:
        dst = (out, max_logits, lse, 0, 0)
    o_t, ml_t, lse_t, stride_os, stride_ms = dst
    grid = (T, cdiv(H, cfg.block_h), num_splits)
    _sparse_mla_fwd_kernel[grid](
        q, q.stride(0), q.stride(1),
        *kv_args,
        indices, indices.stride(0),
        o_t, stride_os, H * D_LATENT, D_LATENT,
        ml_t, lse_t, stride_ms, H,
        H, N, K, k_per_split,
        float(sm_scale) * LOG2E,
        ROPE_OFF=rope_off,
        SCALE_OFF=scale_off,
        BLOCK_H=cfg.block_h,
        BLOCK_K=cfg.block_k,
        FP8=fp8,
        EXACT_FP8=fp8 and cfg.exact_fp8,
        PARTIAL=partial,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if partial:
        _combine_kernel[(T * H,)](
            p_out, p_ml, p_lse, out, max_logits, lse, T * H, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out, max_logits, lse


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA forward for any ``H >= 1``.

    Args:
        q: ``[T, H, 576]`` bfloat16, last dim contiguous (any token / head strides).
        kv: ``[N, 1, 576]`` bfloat16 or ``[N, 1, 656]`` uint8 / float8_e4m3fn (the fp8 format of
            :mod:`nsa_tp.ops.kv_format`), last dim contiguous, any row stride (read in place; an fp8 row
            stride or offset that is not a multiple of 4 bytes is copied once, see :func:`_fp8_rows`).
        indices: ``[T, 1, K]`` int32, last dim contiguous (any row stride); any id ``< 0`` or ``>= N``
            means "no token" and is never read: loads of invalid rows are masked, so NaN / inf in a slot
            that no valid id names never reaches the outputs.
        sm_scale: softmax scale on ``q . k``.
        d_v: must be 512.

    Returns:
        ``out [T, H, 512]`` bfloat16, ``max_logits [T, H]`` and ``lse [T, H]`` float32 (natural log of
        ``sum exp(sm_scale * q.k)``). A row without a valid index gives out = 0, max_logits = lse = -inf.
        Semantics: :func:`nsa_tp.ops.reference.sparse_mla_fwd`.
    """
    _validate(q, kv, indices, d_v)
    return sparse_mla_fwd_split(q, kv, indices, sm_scale)

