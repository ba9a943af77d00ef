"""Benchmark cases for the kernel tiers: input builders, per-tier runners, and one result row per case.

Each row: the op, the tier, the shape, the median time, useful TFLOP/s (the work the contract asks for),
executed TFLOP/s (what the tier actually computes, e.g. FlashMLA's heads padded to 64), GB/s over the
bytes that must move, and the fraction of the matching ceiling measured in the same run.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.bench.timing import Ceilings, median_ms
from nsa_tp.ops.kv_format import D_LATENT, D_QK, FP8_BYTES_PER_TOKEN, pack_fp8_kv

__all__ = ["Row", "BenchCase", "sparse_mla_rows", "decode_rows", "logits_rows", "paged_logits_rows", "sweep_rows"]

_BF16_ROW = 2 * D_QK  # bytes of one bf16 latent row


@dataclasses.dataclass
class Row:
    op: str
    tier: str
    shape: dict[str, Any]
    ms: float | None
    useful_tflops: float | None = None
    executed_tflops: float | None = None
    gbps: float | None = None
    frac_ceiling: float | None = None  # of the matmul (compute-bound ops) or copy (memory-bound ops) ceiling
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BenchCase:
    name: str
    fn: Callable[[], object]


def _flash_mla() -> Any | None:
    try:
        return importlib.import_module("flash_mla")
    except Exception:  # noqa: BLE001 - absent or broken: the anchor is then reported as missing
        return None


def _timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> tuple[float | None, str]:
    """Median ms of ``fn(*args, **kwargs)``, or None and the reason it could not run."""
    try:
        fn(*args, **kwargs)  # compile / first-call work stays out of the timing
        torch.cuda.synchronize()
        return median_ms(lambda: fn(*args, **kwargs)), ""
    except Exception as e:  # noqa: BLE001 - a tier that cannot run this shape is a row with the reason
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def _gbps(nbytes: float, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def _frac(value: float | None, ceiling: float | None) -> float | None:
    return None if value is None or not ceiling else value / ceiling


def _mla_accuracy(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float, cfg: Any = None,
                  rows: int = 128) -> str:
    """``||out - ref|| / ||ref||`` (and the same for lse) on the first ``rows`` tokens, for the notes."""
    from nsa_tp.ops import reference
    from nsa_tp.ops.triton.sparse_mla import sparse_mla_fwd_split

    q, idx = q[:rows], idx[:rows]
    out, _, lse = sparse_mla_fwd_split(q, kv, idx, sm_scale, 1, cfg)
    r_out, _, r_lse = reference.sparse_mla_fwd(q, kv, idx, sm_scale)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    return f"rel err vs reference: out {rel(out, r_out):.1e}, lse {rel(lse, r_lse):.1e}"


def _flashmla_tier() -> Any | None:
    """Our FlashMLA tier (head padding, legacy SM90 kernels), or None where it cannot run."""
    from nsa_tp.ops.registry import BackendUnavailableError, get_tier

    try:
        return get_tier("flashmla")
    except BackendUnavailableError:
        return None


def _random_kv(n: int, fp8: bool, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[n, 1, 576]`` bf16 or ``[n, 1, 656]`` packed fp8, built in chunks to bound the fp32 temporaries."""
    out = torch.empty(n, 1, FP8_BYTES_PER_TOKEN if fp8 else D_QK, dtype=torch.uint8 if fp8 else torch.bfloat16,
                      device=device)
    step = 1 << 18
    for i in range(0, n, step):
        x = torch.randn(min(step, n - i), 1, D_QK, device=device, generator=gen, dtype=torch.bfloat16)
        out[i : i + step] = pack_fp8_kv(x) if fp8 else x
    return out


def sparse_mla_rows(
    T: int, N: int, K: int, heads: list[int], kv_formats: list[str], ceilings: Ceilings, device: torch.device,
    with_reference: bool = False,
) -> list[Row]:
    """Prefill: Triton at the native head count; FlashMLA's kernel at the head count padded to 64."""
    from nsa_tp.ops import reference
    from nsa_tp.ops.triton.sparse_mla import sparse_mla_fwd

    gen = torch.Generator(device=device).manual_seed(1)
    fm = _flash_mla()
    fmt_tier = _flashmla_tier()
    rows: list[Row] = []
    sm_scale = D_QK**-0.5
    idx = torch.randint(0, N, (T, 1, K), device=device, dtype=torch.int32, generator=gen)
    for fmt in kv_formats:
        fp8 = fmt == "fp8"
        kv = _random_kv(N, fp8, device, gen)
        row_bytes = FP8_BYTES_PER_TOKEN if fp8 else _BF16_ROW
        for H in heads:
            q = torch.randn(T, H, D_QK, device=device, dtype=torch.bfloat16, generator=gen)
            useful = 2.0 * T * H * K * (D_QK + D_LATENT)
            moved = T * K * row_bytes + T * H * (2 * D_QK + 2 * D_LATENT + 8)  # gathered rows (mostly L2) + q/out
            shape = {"T": T, "H": H, "N": N, "K": K, "kv": fmt}
            ms, note = _timed(sparse_mla_fwd, q, kv, idx, sm_scale)
            rows.append(Row("sparse_mla_fwd", "triton", shape, ms, _tflops(useful, ms),
                            _tflops(useful, ms), _gbps(moved, ms),
                            _frac(_tflops(useful, ms), ceilings.bf16_tflops), note))
            if fp8:
                rows[-1].note = (rows[-1].note + " " + _mla_accuracy(q, kv, idx, sm_scale)).strip()
            if fm is not None and not fp8:
                hp = 64 * -(-H // 64)
                qp = q if hp == H else torch.cat([q, q.new_zeros(T, hp - H, D_QK)], dim=1)
                # The 576-dim V3.2 kernels (SM90 too) are the wheel's legacy set.
                ms_f, note_f = _timed(fm.flash_mla_sparse_fwd, qp, kv, idx, sm_scale, D_LATENT, use_legacy=True)
                executed = 2.0 * T * hp * K * (D_QK + D_LATENT)
                rows.append(Row("sparse_mla_fwd", f"flashmla@{hp}", shape, ms_f, _tflops(useful, ms_f),
                                _tflops(executed, ms_f), _gbps(moved, ms_f),
                                _frac(_tflops(executed, ms_f), ceilings.bf16_tflops),
                                (note_f + " " if note_f else "") + "kernel only, q pre-padded"))
            if fmt_tier is not None and not fp8:
                ms_t, note_t = _timed(fmt_tier.ops["sparse_mla_fwd"].fn, q, kv, idx, sm_scale)
                rows.append(Row("sparse_mla_fwd", "flashmla-tier", shape, ms_t, _tflops(useful, ms_t), None,
                                _gbps(moved, ms_t), None,
                                (note_t + " " if note_t else "") + "our FlashMLA tier: pad heads, run, trim"))
            if with_reference:
                ms_r, note_r = _timed(reference.sparse_mla_fwd, q, kv, idx, sm_scale)
                rows.append(Row("sparse_mla_fwd", "reference", shape, ms_r,
                                _tflops(useful, ms_r), note=note_r))
            del q
        del kv
    return rows


def decode_rows(batches: list[int], H: int, ctx: int, K: int, ceilings: Ceilings, device: torch.device) -> list[Row]:
    """Decode over an fp8 paged cache: ``ctx`` tokens per request, top-``K`` slots inside each request."""
    from nsa_tp.ops.triton.sparse_mla_decode import plan_sparse_mla_decode, sparse_mla_decode

    gen = torch.Generator(device=device).manual_seed(2)
    rows: list[Row] = []
    sm_scale = D_QK**-0.5
    pages_per_req = -(-ctx // 64)
    for B in batches:
        cache = _random_kv(B * pages_per_req * 64, True, device, gen).view(B * pages_per_req, 64, 1,
                                                                           FP8_BYTES_PER_TOKEN)
        base = torch.arange(B, device=device, dtype=torch.int32)[:, None, None] * (pages_per_req * 64)
        idx = (torch.randint(0, ctx, (B, 1, K), device=device, dtype=torch.int32, generator=gen) + base).contiguous()
        q = torch.randn(B, H, D_QK, device=device, dtype=torch.bfloat16, generator=gen)
        moved = B * K * FP8_BYTES_PER_TOKEN + B * H * (2 * D_QK + 2 * D_LATENT + 4) + B * K * 4
        shape = {"B": B, "H": H, "ctx": ctx, "K": K, "kv": "fp8"}
        plan = plan_sparse_mla_decode(B, H, K, kv_dtype="fp8_e4m3", device=device)
        ms, note = _timed(sparse_mla_decode, q, cache, idx, sm_scale, plan=plan)
        rows.append(Row("sparse_mla_decode", "triton", shape, ms, gbps=_gbps(moved, ms),
                        frac_ceiling=_frac(_gbps(moved, ms), ceilings.copy_gbps),
                        note=f"{plan.data.num_splits} top-k splits; {note}".strip("; ")))
        fmt_tier = _flashmla_tier()
        if fmt_tier is not None:
            try:
                fplan = fmt_tier.ops["plan_sparse_mla_decode"].fn(B, H, K, kv_dtype="fp8_e4m3", device=device)
                ms_f, note_f = _timed(fmt_tier.ops["sparse_mla_decode"].fn, q, cache, idx, sm_scale, plan=fplan)
            except Exception as e:  # noqa: BLE001
                ms_f, note_f = None, f"{type(e).__name__}: {e}"[:200]
            hp = 64 * -(-H // 64)
            rows.append(Row("sparse_mla_decode", "flashmla-tier", shape, ms_f, gbps=_gbps(moved, ms_f),
                            frac_ceiling=_frac(_gbps(moved, ms_f), ceilings.copy_gbps),
                            note=(note_f + " " if note_f else "") + f"our FlashMLA tier, heads padded to {hp}"))
        del cache
    return rows


def _logits_inputs(T: int, N: int, H: int, D: int, device: torch.device, gen: torch.Generator):
    q = torch.randn(T, H, D, device=device, generator=gen).to(torch.float8_e4m3fn)
    k = torch.randn(N, D, device=device, generator=gen).to(torch.float8_e4m3fn)
    k_scale = torch.rand(N, device=device, generator=gen) + 0.5
    w = torch.randn(T, H, device=device, generator=gen)
    # Causal prefill of the last T tokens of an N-token context: row t sees keys [0, N - T + t + 1).
    ke = (torch.arange(T, device=device, dtype=torch.int32) + (N - T + 1)).clamp(max=N)
    ks = torch.zeros(T, device=device, dtype=torch.int32)
    return q, (k, k_scale), w, ks, ke


def logits_rows(T: int, keys: list[int], H: int, D: int, ceilings: Ceilings, device: torch.device,
                config: Any = None, tier_label: str = "triton") -> list[Row]:
    from nsa_tp.ops.triton.mqa_logits import fp8_mqa_logits

    gen = torch.Generator(device=device).manual_seed(3)
    rows: list[Row] = []
    for N in keys:
        q, kv, w, ks, ke = _logits_inputs(T, N, H, D, device, gen)
        useful = 2.0 * H * D * float((ke - ks).clamp(min=0).sum())
        ms, note = _timed(fp8_mqa_logits, q, kv, w, ks, ke, config=config)
        moved = T * N * 4 + N * (D + 4) + T * H * (D + 4)
        tf = _tflops(useful, ms)
        rows.append(Row("fp8_mqa_logits", tier_label, {"T": T, "N": N, "H": H, "D": D, "mask": "causal"}, ms, tf, None,
                        _gbps(moved, ms),
                        _frac(tf, ceilings.fp8_tflops),
                        note + (f" config={config}" if config else "")))
        del q, kv
    return rows


def paged_logits_rows(batches: list[int], H: int, ctx: int, ceilings: Ceilings, device: torch.device) -> list[Row]:
    from nsa_tp.ops.triton.paged_mqa_logits import PAGE_BYTES, fp8_paged_mqa_logits

    gen = torch.Generator(device=device).manual_seed(4)
    rows: list[Row] = []
    pages = -(-ctx // 64)
    for B in batches:
        P = B * pages
        cache = torch.empty(P, PAGE_BYTES, dtype=torch.uint8, device=device)
        cache[:, :8192] = torch.randn(P, 8192, device=device, generator=gen).to(torch.float8_e4m3fn).view(torch.uint8)
        cache[:, 8192:] = (torch.rand(P, 64, device=device, generator=gen) + 0.5).view(torch.uint8)
        page_table = torch.randperm(P, device=device, generator=gen).to(torch.int32).view(B, pages)
        seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(B, H, 128, device=device, generator=gen).to(torch.float8_e4m3fn)
        w = torch.randn(B, H, device=device, generator=gen)
        ms, note = _timed(fp8_paged_mqa_logits, q, cache, w, seq_lens, page_table, ctx)
        moved = B * ctx * (132 + 4) + B * H * 132
        useful = 2.0 * B * ctx * H * 128
        rows.append(Row("fp8_paged_mqa_logits", "triton", {"B": B, "H": H, "ctx": ctx}, ms,
                        _tflops(useful, ms), None,
                        _gbps(moved, ms),
                        _frac(_gbps(moved, ms), ceilings.copy_gbps), note))
        del cache
    return rows


def sweep_rows(ceilings: Ceilings, device: torch.device, T: int, N: int, K: int) -> list[Row]:
    """Launch-config sweep for the sparse-MLA and logits kernels (how the defaults were chosen)."""
    from nsa_tp.ops.triton.mqa_logits import MQALogitsConfig
    from nsa_tp.ops.triton.sparse_mla import SparseMLAConfig, sparse_mla_fwd_split

    gen = torch.Generator(device=device).manual_seed(5)
    rows: list[Row] = []
    idx = torch.randint(0, N, (T, 1, K), device=device, dtype=torch.int32, generator=gen)
    # Alternatives to default_config (the defaults themselves are the main rows): (H, kv, config).
    grid = [
        (16, "bf16", (16, 32, 4, 3)), (16, "bf16", (16, 16, 4, 2)), (16, "bf16", (16, 64, 8, 2)),
        (32, "bf16", (32, 32, 4, 2)), (32, "bf16", (64, 64, 8, 2)),
        (64, "bf16", (64, 32, 8, 2)), (64, "bf16", (16, 32, 4, 2)),
        (16, "fp8", (16, 16, 4, 2, False)), (16, "fp8", (16, 32, 8, 2, False)), (16, "fp8", (16, 32, 8, 2, True)),
        (64, "fp8", (64, 32, 8, 2, True)),
    ]
    kvs = {"bf16": _random_kv(N, False, device, gen), "fp8": _random_kv(N, True, device, gen)}
    for H, fmt, c in grid:
        q = torch.randn(T, H, D_QK, device=device, dtype=torch.bfloat16, generator=gen)
        useful = 2.0 * T * H * K * (D_QK + D_LATENT)
        cfg = SparseMLAConfig(*c)
        ms, note = _timed(sparse_mla_fwd_split, q, kvs[fmt], idx, D_QK**-0.5, 1, cfg)
        if fmt == "fp8" and ms is not None:
            note = (note + " " + _mla_accuracy(q, kvs[fmt], idx, D_QK**-0.5, cfg)).strip()
        tf = _tflops(useful, ms)
        rows.append(Row("sweep:sparse_mla_fwd", "triton", {"T": T, "H": H, "N": N, "K": K, "kv": fmt, "config": c},
                        ms, tf, tf, None, _frac(tf, ceilings.bf16_tflops), note))
    del kvs
    for c in [(256, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 3)]:
        rows += logits_rows(4096, [65536], 64, 128, ceilings, device, config=MQALogitsConfig(*c),
                            tier_label="triton")
        rows[-1].op = "sweep:fp8_mqa_logits"
    return rows
