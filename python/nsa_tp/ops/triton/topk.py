"""Top-k selection as one fused Triton kernel: a coarse histogram, then a radix select over few candidates.

Same contract as :mod:`nsa_tp.ops.topk` (the reference): per row ``r`` the candidates are the columns
``[row_starts[r], row_starts[r] + lengths[r])`` of ``logits [R, W]`` float32, ``-inf`` and NaN are never
selected, the row keeps ``n = min(topk, #candidates)`` of its best as positions relative to the row start in
its first ``n`` columns, ``-1`` fills the rest. Order and the choice among ties at the K-th value are free
(the contract's own words); :func:`~nsa_tp.ops.topk.topk_mismatch` is the check. The checks and the ragged /
paged id mapping are the reference's own (:func:`~nsa_tp.ops.topk.ragged_transform`, ``paged_transform``).

A persistent grid (enough programs to fill the GPU once), each program takes rows ``pid, pid + P, ...``:

1. A row with at most ``topk`` candidates keeps every valid one: one compaction pass, no histogram.
2. Otherwise every candidate gets the order-preserving uint32 key of its logit (:func:`order_keys`' encoding,
   ``-0.0`` as ``+0.0``, 0 for non-candidates) and a *coarse digit*: a monotone map of the key onto ``BINS``
   bins (sign, 2 mantissa bits, and the exponent clamped to a window of ``BINS / 8`` octaves around 1.0,
   like a float16's top byte). One histogram of the digits (one read of the row) gives the bin ``b*`` that
   holds the K-th best and ``above``, the count in higher bins.
3. A compaction pass (a re-read from L2, or none when the row is register-resident, ``n <= BLOCK``): keys
   in bins above ``b*`` are kept outright (written to the output); keys in ``b*`` go to a per-program
   buffer of ``CAP`` (value, position) pairs. Any monotone digit is correct; the window only decides how few
   candidates land in ``b*`` (about 1-3% of a row of N(0, 1) logits).
4. A radix select with 8-bit digits over the candidates only (three rounds when ``b*`` fixes the key's top
   11 bits, else four) finds the exact threshold key ``T`` and how many keys equal to ``T`` to keep; one
   more pass over the candidates writes them. If ``b*`` holds more than ``CAP`` keys (heavy ties), the same
   rounds run over the row itself, masked to ``b*``: slower, same result.

No sort: positions come from one ``tl.cumsum`` per chunk over two packed 16-bit counters.
:data:`VARIANTS` are the measured configurations; :data:`DEFAULT_BY_WIDTH` picks one by the logits' width
(benchmark/bench_topk.py times them all next to sgl-kernel's ``fast_topk_v2``).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from nsa_tp.ops import topk as topk_ref
from nsa_tp.ops.triton import _common

__all__ = [
    "topk_positions",
    "topk_transform_ragged",
    "topk_transform_paged",
    "TopkConfig",
    "VARIANTS",
    "DEFAULT_BY_WIDTH",
    "config_for",
]


@dataclasses.dataclass(frozen=True)
class TopkConfig:
    """One kernel configuration (every field a compile-time constant of the kernel).

    block: candidates per histogram / compaction step; also the register-resident row size.
    resident: 0 = always stream the row from memory twice; 1 = rows with ``n <= block`` stay in registers
        (one read); 2 = also rows with ``n <= block / 2`` at half the size (less masked work for short rows).
    bins: coarse histogram bins (128 or 256: a warp-ballot histogram costs about one popcount per 32
        elements per 32 bins, so fewer bins are cheaper; 128 covers 2^-8..2^8, 256 covers 2^-16..2^16).
    rblock: candidates per step of the radix select over the buffer.
    cap: the per-program candidate buffer (pairs); above it the select runs over the row.
    num_warps: warps per program.
    maxnreg: register cap per thread (0: the compiler's choice), to fit more programs an SM (may spill).
    progs_per_sm: persistent programs per SM (0: as many as fit, from the compiled kernel's registers).
    """

    block: int
    resident: int
    bins: int = 128
    rblock: int = 1024
    cap: int = 4096
    num_warps: int = 8
    maxnreg: int = 0
    progs_per_sm: int = 0

    def __post_init__(self) -> None:
        for name in ("block", "rblock"):
            v = getattr(self, name)
            if v < 32 or v & (v - 1) or v > 16384:  # two counters packed in an int32: a chunk counts < 2^15
                raise ValueError(f"{name}: expected a power of two in [32, 16384], got {v}")
        if self.bins not in (32, 64, 128, 256):
            raise ValueError(f"bins: expected 32, 64, 128 or 256, got {self.bins}")
        if self.maxnreg and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"maxnreg: expected 0 or 24..255, got {self.maxnreg}")
        if self.resident not in (0, 1, 2) or self.cap < 1:
            raise ValueError(f"resident: expected 0, 1 or 2 and cap >= 1, got {self.resident}, {self.cap}")


# The configurations the benchmark times (names are stable: the JSON and DEFAULT_BY_WIDTH refer to them).
# Registers (ptxas -v for sm_90a, Triton 3.6, compiled offline): streaming 1024 keys on 4 warps 94 (5 programs
# an SM; capped at 64: 8 an SM, 44 bytes spilled), 2048 on 8 warps 104 (2 an SM); resident 4096 on 16 warps
# capped at 64 (2 an SM, 80 bytes spilled), 4096 on 32 warps 64 (28 bytes spilled), 8192 on 32 warps 64 (96
# bytes spilled). Several programs an SM overlap one row's latency-bound steps (the select over a few hundred
# candidates) with another's streaming.
VARIANTS: dict[str, TopkConfig] = {
    # Streaming only (a row of more than K = 2048 keys never fits these blocks): two passes, the second
    # from L2, many small programs an SM.
    "stream1k_w4": TopkConfig(block=1024, resident=0, rblock=512, num_warps=4),
    "stream1k_w4_r64": TopkConfig(block=1024, resident=0, rblock=512, num_warps=4, maxnreg=64),
    "stream1k_w4_b256": TopkConfig(block=1024, resident=0, bins=256, rblock=512, num_warps=4),
    "stream2k_w8": TopkConfig(block=2048, resident=0, rblock=512, num_warps=8),
    # Register-resident rows up to 4K / 8K keys (one read), streaming beyond.
    "hybrid4k_w16_r64": TopkConfig(block=4096, resident=1, rblock=512, num_warps=16, maxnreg=64),
    "hybrid4k_w32": TopkConfig(block=4096, resident=1, num_warps=32),
    "res8k_w32": TopkConfig(block=8192, resident=2, num_warps=32),
}

# THE place to change the choice after a measurement: (largest width, variant) pairs, first match wins.
# Measured on one H200 (2026-11-29, benchmark/results/topk_variants_h200_20261129.json: 4096 x 2K/8K/32K and
# 1024 x 128K, causal and full rows): stream1k_w4_r64 was the fastest variant in 7 of 8 cases and within 3% of
# the fastest in the eighth (hybrid4k_w16_r64 at 1024 x 128K causal, 1.23 vs 1.27 ms), so it is the default at
# every width. Still 2.3-4.6x slower than sgl-kernel's fast_topk_v2 there (0.14-0.47 ms).
DEFAULT_BY_WIDTH: tuple[tuple[int, str], ...] = ((1 << 62, "stream1k_w4_r64"),)


def config_for(width: int) -> TopkConfig:
    """The default configuration for logits ``width`` columns wide (:data:`DEFAULT_BY_WIDTH`)."""
    return VARIANTS[next(name for w, name in DEFAULT_BY_WIDTH if width <= w)]


@triton.jit
def _order_key(x, valid):
    """uint32 key, larger for a larger float; 0 where ``valid`` is False or ``x`` is -inf / NaN."""
    ok = valid & (x > float("-inf"))  # False for NaN too
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the reference
    b = x.to(tl.uint32, bitcast=True)
    k = tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)
    return tl.where(ok, k, tl.zeros_like(k))


@triton.jit
def _coarse(key, BINS: tl.constexpr):
    """Monotone map of a key onto ``[0, BINS)``: sign, then exponent (clamped) and 2 mantissa bits.

    ``code = key >> 21`` is 1024 + (|x|'s 8 exponent and top 2 mantissa bits) for x >= 0 and 1023 - the
    same for x < 0. Each sign gets ``BINS / 2`` codes of a window starting at ``LO``, centred on |x| = 1.
    """
    HALF: tl.constexpr = BINS // 2
    LO: tl.constexpr = 4 * 127 - HALF // 2
    code = (key >> 21).to(tl.int32)
    up = tl.minimum(tl.maximum(code - (1024 + LO), 0), HALF - 1)
    dn = tl.minimum(tl.maximum((1023 - LO) - code, 0), HALF - 1)
    return tl.where(code >= 1024, HALF + up, HALF - 1 - dn)


@triton.jit
def _pick(hist, rem, bins):
    """The bin holding the ``rem``-th largest entry of ``hist`` and the count in the bins above it."""
    total = tl.sum(hist, 0)
    ge = total - tl.cumsum(hist, 0) + hist  # entries in bins >= b, non-increasing
    b = tl.sum((ge >= rem).to(tl.int32), 0) - 1
    return b, tl.sum(tl.where(bins > b, hist, 0), 0)


@triton.jit
def _emit(key, d, pos, bstar, out_row, vbuf, pbuf, n_gt, n_eq, to_buf):
    """Keys in bins above ``bstar`` to the output (slots from ``n_gt``), keys in ``bstar`` to the buffer."""
    valid = key != 0
    gt = (valid & (d > bstar)).to(tl.int32)
    eq = (valid & (d == bstar)).to(tl.int32)
    packed = tl.cumsum(gt + (eq << 16), 0)  # two running counts in one scan (a chunk holds <= 2^14)
    tl.store(out_row + n_gt + (packed & 0xFFFF) - 1, pos, mask=gt != 0)
    slot = n_eq + (packed >> 16) - 1
    tl.store(vbuf + slot, key.to(tl.int32, bitcast=True), mask=(eq != 0) & to_buf)
    tl.store(pbuf + slot, pos, mask=(eq != 0) & to_buf)
    s = tl.sum(gt + (eq << 16), 0)
    return n_gt + (s & 0xFFFF), n_eq + (s >> 16)


@triton.jit
def _src(row, vbuf, pbuf, i, m, bstar, from_buf, BINS: tl.constexpr):
    """Candidate keys and positions ``i`` (< m) of the buffer, or of the row masked to bin ``bstar``."""
    inside = i < m
    if from_buf:
        key = tl.load(vbuf + i, mask=inside, other=0).to(tl.uint32, bitcast=True)
        pos = tl.load(pbuf + i, mask=inside, other=0)
    else:
        key = _order_key(tl.load(row + i, mask=inside, other=float("-inf")), inside)
        key = tl.where(_coarse(key, BINS) == bstar, key, tl.zeros_like(key))
        pos = i
    return key, pos


@triton.jit
def _round(row, vbuf, pbuf, m, bstar, from_buf, prefix, rem,
           SHIFT: tl.constexpr, FIRST: tl.constexpr, RBLOCK: tl.constexpr, BINS: tl.constexpr):
    """One 8-bit radix round over the candidates matching ``prefix`` above bit ``SHIFT + 8``."""
    offs = tl.arange(0, RBLOCK)
    hist = tl.zeros([256], dtype=tl.int32)
    for c0 in range(0, m, RBLOCK):
        key, pos = _src(row, vbuf, pbuf, c0 + offs, m, bstar, from_buf, BINS)
        match = key != 0
        if not FIRST:
            match = match & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        hist += tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=match)
    b, above = _pick(hist, rem, tl.arange(0, 256))
    return prefix | (b.to(tl.uint32) << SHIFT), rem - above


@triton.jit
def _refine(row, vbuf, pbuf, m, bstar, from_buf, need, out_row, base,
            RBLOCK: tl.constexpr, BINS: tl.constexpr):
    """Keep the best ``need`` candidates of bin ``bstar``: written to ``out_row[base : base + need]``."""
    HALF: tl.constexpr = BINS // 2
    LO: tl.constexpr = 4 * 127 - HALF // 2
    # An unclamped bin fixes the code (key >> 21), so the top byte is known and round 0 is skipped.
    exact = ((bstar > HALF) & (bstar < BINS - 1)) | ((bstar > 0) & (bstar < HALF - 1))
    code = tl.where(bstar >= HALF, 1024 + LO + (bstar - HALF), 1023 - LO - (HALF - 1 - bstar))
    prefix = tl.where(exact, (code.to(tl.uint32) >> 3) << 24, 0).to(tl.uint32)
    skip = exact.to(tl.int32)
    rem = need
    for p in tl.static_range(4):
        if p == 0:
            if skip == 0:
                prefix, rem = _round(row, vbuf, pbuf, m, bstar, from_buf, prefix, rem, 24, True, RBLOCK, BINS)
        else:
            prefix, rem = _round(row, vbuf, pbuf, m, bstar, from_buf, prefix, rem, 24 - 8 * p, False, RBLOCK,
                                 BINS)
    # need == 0 (no valid candidate) leaves prefix all ones and rem 0: nothing is written.
    thresh = prefix
    take_eq = rem
    n_gt_all = need - take_eq  # candidates strictly above the threshold
    offs = tl.arange(0, RBLOCK)
    n_gt = need * 0
    n_eq = need * 0
    for c0 in range(0, m, RBLOCK):
        key, pos = _src(row, vbuf, pbuf, c0 + offs, m, bstar, from_buf, BINS)
        gt = (key > thresh).to(tl.int32)
        eq = ((key == thresh) & (key != 0)).to(tl.int32)
        packed = tl.cumsum(gt + (eq << 16), 0)
        tl.store(out_row + base + n_gt + (packed & 0xFFFF) - 1, pos, mask=gt != 0)
        eq_rank = n_eq + (packed >> 16) - 1
        tl.store(out_row + base + n_gt_all + eq_rank, pos, mask=(eq != 0) & (eq_rank < take_eq))
        s = tl.sum(gt + (eq << 16), 0)
        n_gt += s & 0xFFFF
        n_eq += s >> 16


@triton.jit
def _resident(row, n, topk, out_row, vbuf, pbuf, RB: tl.constexpr, BINS: tl.constexpr, CAP: tl.constexpr):
    """Steps 2-3 for a row of ``n <= RB`` candidates: one read, histogram and compaction from registers.

    Returns ``(kept, b*, above, candidates in b*)``.
    """
    pos = tl.arange(0, RB)
    inside = pos < n
    key = _order_key(tl.load(row + pos, mask=inside, other=float("-inf")), inside)
    d = _coarse(key, BINS)
    hist = tl.histogram(d, BINS, mask=key != 0)
    rem = tl.minimum(tl.sum(hist, 0), topk)
    bins = tl.arange(0, BINS)
    bstar, above = _pick(hist, rem, bins)
    cnt = tl.sum(tl.where(bins == bstar, hist, 0), 0)
    to_buf = cnt <= CAP
    _emit(key, d, pos, bstar, out_row, vbuf, pbuf, above * 0, above * 0, to_buf)
    return rem, bstar, above, cnt


@triton.jit
def _stream(row, n, topk, out_row, vbuf, pbuf, BLOCK: tl.constexpr, BINS: tl.constexpr, CAP: tl.constexpr):
    """Steps 2-3 for any row: a histogram pass and a compaction pass in ``BLOCK`` chunks (the second hits L2).

    Returns what :func:`_resident` does.
    """
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for c0 in range(0, n, BLOCK):
        pos = c0 + offs
        inside = pos < n
        key = _order_key(tl.load(row + pos, mask=inside, other=float("-inf")), inside)
        hist += tl.histogram(_coarse(key, BINS), BINS, mask=key != 0)
    rem = tl.minimum(tl.sum(hist, 0), topk)
    bins = tl.arange(0, BINS)
    bstar, above = _pick(hist, rem, bins)
    cnt = tl.sum(tl.where(bins == bstar, hist, 0), 0)
    to_buf = cnt <= CAP
    n_gt = above * 0
    n_eq = above * 0
    for c0 in range(0, n, BLOCK):
        pos = c0 + offs
        inside = pos < n
        key = _order_key(tl.load(row + pos, mask=inside, other=float("-inf")), inside)
        n_gt, n_eq = _emit(key, _coarse(key, BINS), pos, bstar, out_row, vbuf, pbuf, n_gt, n_eq, to_buf)
    return rem, bstar, above, cnt


@triton.jit(do_not_specialize=["stride_row", "stride_out", "R", "topk", "nprog"])  # fewer compiles
def _topk_kernel(
    logits_ptr, stride_row, starts_ptr, lengths_ptr, out_ptr, stride_out, buf_ptr, R, topk, nprog,
    HAS_STARTS: tl.constexpr, BLOCK: tl.constexpr, RESIDENT: tl.constexpr, BINS: tl.constexpr,
    RBLOCK: tl.constexpr, CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    vbuf = buf_ptr + pid.to(tl.int64) * (2 * CAP)  # [CAP] keys (int32 bits), then [CAP] positions
    pbuf = vbuf + CAP
    offs = tl.arange(0, BLOCK)
    for r0 in range(0, R, nprog):  # rows pid, pid + nprog, ...
        r = r0 + pid
        if r < R:
            n = tl.load(lengths_ptr + r)
            row = logits_ptr + r.to(tl.int64) * stride_row
            if HAS_STARTS:
                row += tl.load(starts_ptr + r)
            out_row = out_ptr + r.to(tl.int64) * stride_out
            tl.debug_barrier()  # the previous row's readers of the buffer are done before it is rewritten
            if n <= topk:  # keep every valid candidate: one compaction pass
                kept = n * 0
                for c0 in range(0, n, BLOCK):
                    pos = c0 + offs
                    ok = _order_key(tl.load(row + pos, mask=pos < n, other=float("-inf")), pos < n) != 0
                    tl.store(out_row + kept + tl.cumsum(ok.to(tl.int32), 0) - 1, pos, mask=ok)
                    kept += tl.sum(ok.to(tl.int32), 0)
            else:
                if RESIDENT == 2:
                    if n <= BLOCK // 2:
                        kept, bstar, above, cnt = _resident(row, n, topk, out_row, vbuf, pbuf, BLOCK // 2, BINS, CAP)
                    elif n <= BLOCK:
                        kept, bstar, above, cnt = _resident(row, n, topk, out_row, vbuf, pbuf, BLOCK, BINS, CAP)
                    else:
                        kept, bstar, above, cnt = _stream(row, n, topk, out_row, vbuf, pbuf, BLOCK, BINS, CAP)
                elif RESIDENT == 1:
                    if n <= BLOCK:
                        kept, bstar, above, cnt = _resident(row, n, topk, out_row, vbuf, pbuf, BLOCK, BINS, CAP)
                    else:
                        kept, bstar, above, cnt = _stream(row, n, topk, out_row, vbuf, pbuf, BLOCK, BINS, CAP)
                else:
                    kept, bstar, above, cnt = _stream(row, n, topk, out_row, vbuf, pbuf, BLOCK, BINS, CAP)
                tl.debug_barrier()  # the buffer was written by other threads of this program
                to_buf = cnt <= CAP
                _refine(row, vbuf, pbuf, tl.where(to_buf, cnt, n), bstar, to_buf, kept - above, out_row, above,
                        RBLOCK, BINS)
            for c0 in range(kept, topk, BLOCK):  # -1 after the kept ids
                tl.store(out_row + c0 + offs, tl.full([BLOCK], -1, tl.int32), mask=c0 + offs < topk)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Persistent programs an SM holds at once, per (config, HAS_STARTS, device): read from the kernel the first
# launch compiled (registers, threads, shared memory). The first launch runs one program per SM.
_PER_SM: dict[tuple[TopkConfig, bool, int], int] = {}


def _occupancy(kernel, num_warps: int, device: torch.device) -> int:
    try:  # the compiled kernel's resources (Triton 3.x names); 2 programs an SM if they cannot be read
        n_regs, smem = int(kernel.n_regs), int(kernel.metadata.shared)
    except (AttributeError, TypeError, ValueError):
        return 2
    props = torch.cuda.get_device_properties(device)
    threads = 32 * num_warps
    regs = max(1, -(-n_regs // 8) * 8) * threads
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs  # 64K on every SM80-SM100
    by_threads = props.max_threads_per_multi_processor // threads
    by_smem = props.shared_memory_per_multiprocessor // smem if smem else by_threads
    return max(1, min(by_regs, by_threads, by_smem))


def topk_positions(
    logits: torch.Tensor,
    topk: int,
    lengths: torch.Tensor,
    row_starts: torch.Tensor | None = None,
    *,
    config: TopkConfig | str | None = None,
) -> torch.Tensor:
    """The selection step (contract of :func:`nsa_tp.ops.topk.topk_positions`; inputs already checked).

    ``logits`` must have unit column stride. ``config``: a :class:`TopkConfig`, a :data:`VARIANTS` name, or
    None for :func:`config_for` (the measured default for this width).
    """
    R, W = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits: expected unit column stride")
    cfg = VARIANTS[config] if isinstance(config, str) else (config or config_for(W))
    out = _common.alloc((R, topk), torch.int32, logits.device)
    if R == 0:
        return out
    has_starts = row_starts is not None
    on_gpu = logits.device.type == "cuda" and not _interpreted()
    key = (cfg, has_starts, logits.device.index or 0)
    per_sm = cfg.progs_per_sm or (_PER_SM.get(key, 1) if on_gpu else 2)
    # As many programs as fit, trimmed so each takes the same number of rows (no tail of programs with one more).
    progs = _common.cdiv(R, _common.cdiv(R, _common.num_sms(logits.device) * per_sm))
    buf = _common.alloc((progs, 2, cfg.cap), torch.int32, logits.device)
    starts = row_starts if has_starts else lengths  # any int32 pointer; unused without starts
    extra = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and on_gpu else {}
    kernel = _topk_kernel[(progs,)](
        logits, logits.stride(0), starts, lengths, out, out.stride(0), buf, R, topk, progs,
        HAS_STARTS=has_starts, BLOCK=cfg.block, RESIDENT=cfg.resident, BINS=cfg.bins, RBLOCK=cfg.rblock,
        CAP=cfg.cap, num_warps=cfg.num_warps, **extra,
    )
    if on_gpu and not cfg.progs_per_sm and key not in _PER_SM:
        _PER_SM[key] = _occupancy(kernel, cfg.num_warps, logits.device)
    return out


# The two top-k ops with the fused selection (same kept set as the reference); contract: nsa_tp.ops.topk.
topk_transform_ragged, topk_transform_paged = topk_ref.bind_select(topk_positions)
