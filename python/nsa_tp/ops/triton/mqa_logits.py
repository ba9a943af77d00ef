"""fp8 MQA logits over ragged key ranges (the lightning indexer, prefill) in Triton.

Semantics: :func:`nsa_tp.ops.reference.fp8_mqa_logits`
(``logits[t, j] = sum_h relu(q[t,h] . k[j] * k_scale[j]) * weights[t,h]`` for ``ks[t] <= j < ke[t]``,
``-inf`` elsewhere).

One launch shape, DeepGEMM's: one fp8 wgmma per step with keys as the MMA's M, so the sum over heads stays
inside a thread quad (no cross-warp reduction). A program holds ``block_t`` query tokens with all their heads
stacked as the MMA's N (``block_t x padded H`` rows of q, e.g. 4 x 64 = 256) and streams the key blocks its
rows touch through a ``num_stages`` software pipeline: ``K [BLOCK_N, D] @ q^T [D, block_t*H]``. It writes
``-inf`` on the columns none of its rows scores in the same pass (plain 16-byte stores, no reads). (The first
design, a program holding keys and walking tokens, measured 1.3-1.45x slower on an H200 on every case of
``benchmark/results/mqa_logits_h200_20261129.json`` and was deleted.)

Epilogue cost is the limit once the MMA is a real wgmma: per (key, head) it is ``max`` + ``fma`` when every
scale is >= 0 (``relu(x * s) == s * relu(x)``, the scale applied once per key after the head sum), and
``mul`` + ``max`` + ``fma`` otherwise. Which one runs is decided per call from ``min(k_scale)`` on the device
(no host sync), so a negative scale still gets the contract's exact ``relu(q.k * scale)``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa_tp.ops._contracts import check_mqa_logits_args
from nsa_tp.ops.triton import _common
from nsa_tp.ops.triton._common import cdiv

__all__ = ["MQALogitsConfig", "DEFAULT_CONFIG", "default_config", "fp8_mqa_logits", "weighted_relu_sum"]


@dataclasses.dataclass(frozen=True)
class MQALogitsConfig:
    block_n: int  # keys per MMA (its M): 64, 128 or 256
    block_t: int  # query tokens a program owns, their heads stacked as the MMA's N
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap per thread (e.g. 128: two 8-warp programs per SM), None = Triton's


# THE default launch shape (the one place to change after a measurement): 64 keys x (4 tokens x
# 64 heads) per wgmma (m64n256k32, the widest), 4 warps = one warpgroup, 3 stages of 8 KB key tiles.
# Why, from an offline sm_90a compile (Triton 3.6; no GPU here): 250 registers and 58 KB of shared memory, so
# two programs share an SM and one's epilogue can overlap the other's MMA (Triton 3.6 cannot overlap them
# inside one program: every wgmma is waited on at once). Its masked key loop issued 476 instructions a thread
# for 4.2 MFLOP, the lowest issue count per FLOP of the shapes compiled (128x2: 561 for 4.2, 64x2: 332 for
# 2.1); the unmasked loop that now runs the blocks inside every row's range issues 423. And 4 tokens a program
# halve the key bytes streamed from L2 (8.5 GB at S=4096 N=65536) against 2 tokens.
# benchmark/bench_mqa_logits.py times it against the alternatives and prints the fastest.
DEFAULT_CONFIG = MQALogitsConfig(block_n=64, block_t=4, num_warps=4, num_stages=3)


def _block_h(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def default_config(num_tokens: int, num_keys: int, num_heads: int = 64) -> MQALogitsConfig:
    """:data:`DEFAULT_CONFIG`, with the tokens per program scaled so ``block_t x padded heads`` stays what it
    is at 64 heads (the MMA's N, at most 256), and at most 8 tokens (16 tokens of 16 heads spill)."""
    rows = min(DEFAULT_CONFIG.block_t * 64, 256)
    return dataclasses.replace(DEFAULT_CONFIG, block_t=max(1, min(8, rows // _block_h(num_heads))))


@triton.jit
def weighted_relu_sum(acc, k_scale, w):
    """``[BLOCK_N, H]`` fp32 dot -> ``[BLOCK_N]``: ``sum_h relu(acc * k_scale) * w``."""
    return tl.sum(tl.maximum(acc * k_scale[:, None], 0.0) * w[None, :], 1)


@triton.jit
def _head_sum(x, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``[BLOCK_N, BLOCK_T * BLOCK_H]`` (q rows stacked token-major) -> ``[BLOCK_N, BLOCK_T]``."""
    return tl.sum(tl.reshape(x, [BLOCK_N, BLOCK_T, BLOCK_H]), 2)


@triton.jit
def _fill_neg_inf(out_rows, t_ok, start, stop, BLOCK_T: tl.constexpr, FILL_N: tl.constexpr):
    """``out_rows[i] + [start, stop) = -inf`` for the rows with ``t_ok``; aligned ``FILL_N`` column blocks so the
    stores vectorize."""
    for b in range(start // FILL_N, tl.cdiv(stop, FILL_N)):
        cols = b * FILL_N + tl.arange(0, FILL_N)
        tl.store(out_rows[:, None] + cols[None, :], tl.full([BLOCK_T, FILL_N], float("-inf"), tl.float32),
                 mask=t_ok[:, None] & (cols[None, :] >= start) & (cols[None, :] < stop))


@triton.jit
def _key_loop(qt, w, lo, hi, t_ok, out_rows, k_ptr, stride_kn, ksc_ptr, N, b_first, n_first, b_second,
                    n_total, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_T: tl.constexpr, NUM_STAGES: tl.constexpr, FOLD: tl.constexpr, MASKED: tl.constexpr):
    """``n_total`` key blocks of one program: ``b_first + i`` for ``i < n_first``, then ``b_second + ...``.

    ``FOLD``: the scale goes after the head sum (every scale >= 0). ``MASKED=False`` only for blocks inside every
    row's ``[lo, hi)`` (so also below N) of a program whose rows all exist: no column or row masks at all.
    """
    offs_d = tl.arange(0, D)
    for i in tl.range(0, n_total, num_stages=NUM_STAGES):
        b = tl.where(i < n_first, b_first + i, b_second + (i - n_first))
        offs_n = b * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_ptr + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        if MASKED:
            n_ok = offs_n < N
            kt = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            ksc = tl.load(ksc_ptr + offs_n, mask=n_ok, other=0.0)
        else:
            kt = tl.load(k_ptrs)
            ksc = tl.load(ksc_ptr + offs_n)
        acc = tl.dot(kt, qt)  # [BLOCK_N, BLOCK_T*BLOCK_H] fp32, one fp8 wgmma chain (K = D)
        if FOLD:
            s = _head_sum(tl.maximum(acc, 0.0) * w[None, :], BLOCK_N, BLOCK_T, BLOCK_H) * ksc[:, None]
        else:
            s = _head_sum(tl.maximum(acc * ksc[:, None], 0.0) * w[None, :], BLOCK_N, BLOCK_T, BLOCK_H)
        ptrs = out_rows[None, :] + offs_n[:, None]
        if MASKED:
            inside = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            tl.store(ptrs, tl.where(inside, s, float("-inf")), mask=n_ok[:, None] & t_ok[None, :])
        else:
            tl.store(ptrs, s)


@triton.jit
def _mqa_logits_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, stride_kn,
    ksc_ptr, kmin_ptr,
    w_ptr, stride_wt,
    ks_ptr, ke_ptr,
    out_ptr, stride_ot,
    T, N, H,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FILL_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Last token block first: under a causal mask the late rows score the most keys, so the longest programs
    # start in the first wave and the short ones fill the tail.
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T
    # q rows stacked token-major: row r = i * BLOCK_H + h is token t0 + i, head h. [BLOCK_T*BLOCK_H, D]
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    r_t = tl.minimum(t0 + r // BLOCK_H, T - 1).to(tl.int64)  # past T: a real row, its output masked off
    r_h = r % BLOCK_H
    r_ok = r_h < H
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + r_t[:, None] * stride_qt + r_h[:, None] * stride_qh + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)
    qt = tl.trans(q)  # [D, BLOCK_T*BLOCK_H]: resident for the whole key loop
    w = tl.load(w_ptr + r_t * stride_wt + r_h, mask=r_ok, other=0.0)

    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < T
    lo = tl.maximum(tl.load(ks_ptr + t, mask=t_ok, other=0), 0)
    hi = tl.minimum(tl.load(ke_ptr + t, mask=t_ok, other=0), N)
    live = t_ok & (lo < hi)
    # Key blocks [b0, b1) cover every column a row of this program scores; none if no row is live.
    b0 = tl.min(tl.where(live, lo, N), 0) // BLOCK_N
    b1 = tl.maximum(tl.cdiv(tl.max(tl.where(live, hi, 0), 0), BLOCK_N), b0)
    out_rows = out_ptr + t.to(tl.int64) * stride_ot  # [BLOCK_T]

    # Blocks [f0, f1) lie inside every row's range and every row exists: they run without masks (14% fewer
    # instructions a step in the sm_90a SASS); the rest of [b0, b1) (for causal rows, one or two blocks at the
    # diagonal) runs masked.
    all_live = tl.min(live.to(tl.int32), 0) == 1
    f0 = tl.minimum(tl.maximum(tl.cdiv(tl.max(tl.where(live, lo, 0), 0), BLOCK_N), b0), b1)
    f1 = tl.maximum(tl.minimum(tl.min(tl.where(live, hi, N), 0) // BLOCK_N, b1), f0)
    f1 = tl.where(all_live, f1, f0)
    # Copies of the key loop, not a branch inside one: Triton 3.6's software pipeliner rejects the branch.
    if tl.load(kmin_ptr) >= 0.0:  # every scale >= 0: apply it once per key, after the head sum
        _key_loop(qt, w, lo, hi, t_ok, out_rows, k_ptr, stride_kn, ksc_ptr, N, f0, f1 - f0, f0, f1 - f0,
                        D, BLOCK_H, BLOCK_N, BLOCK_T, NUM_STAGES, True, False)
        _key_loop(qt, w, lo, hi, t_ok, out_rows, k_ptr, stride_kn, ksc_ptr, N, b0, f0 - b0, f1,
                        (f0 - b0) + (b1 - f1), D, BLOCK_H, BLOCK_N, BLOCK_T, NUM_STAGES, True, True)
    else:  # exact relu(x * s) for negative scales; unpipelined, so its tiles cost no shared memory up front
        _key_loop(qt, w, lo, hi, t_ok, out_rows, k_ptr, stride_kn, ksc_ptr, N, b0, b1 - b0, b1, b1 - b0,
                        D, BLOCK_H, BLOCK_N, BLOCK_T, 1, False, True)

    # Columns outside [b0, b1) blocks: -inf, written here (store only) rather than by a separate fill kernel.
    _fill_neg_inf(out_rows, t_ok, 0, b0 * BLOCK_N, BLOCK_T, FILL_N)
    _fill_neg_inf(out_rows, t_ok, tl.minimum(b1 * BLOCK_N, N), N, BLOCK_T, FILL_N)


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
        q: ``[T, H, D]`` float8_e4m3fn, last dim contiguous; D a power of two in [16, 256].
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
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"q: head dim must be a power of two in [16, 256], got {D}")
    k_scale, ks, ke = k_scale.contiguous(), ks.contiguous(), ke.contiguous()

    out = _common.alloc((T, N), torch.float32, q.device)
    if T == 0 or N == 0:
        return out
    cfg = config or default_config(T, N, H)
    k_min = k_scale.amin()  # on the device: picks the folded epilogue without a host sync
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        launch["maxnreg"] = cfg.maxnreg
    args = (q, q.stride(0), q.stride(1), k, k.stride(0), k_scale, k_min, weights, weights.stride(0), ks, ke,
            out, out.stride(0), T, N, H)
    _mqa_logits_kernel[(cdiv(T, cfg.block_t),)](
        *args, D=D, BLOCK_H=_block_h(H), BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t,
        FILL_N=max(512, cfg.block_n), NUM_STAGES=cfg.num_stages, **launch,
    )
    return out
