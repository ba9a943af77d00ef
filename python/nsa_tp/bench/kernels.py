"""Benchmark cases for every tier of every op, next to upstream's kernel, in the same run.

Each case (one op at one shape) is timed on every tier that can run it, through the public op with the
tier forced (``backend=<tier>``: what a user gets, checks included); every row records the tiers that really
ran (``ran``, from :func:`nsa_tp.ops.registry.record_tiers`), so a row labelled with a tier that ran another
one is caught (:func:`mislabelled`). Inside :func:`auto_pass` the same cases time only ``auto`` itself and the
case's fastest tier from the first pass, back to back (the measured auto check). Each row carries the
shape class (:func:`nsa_tp.ops.tuning.shape_class`) so a run turns into
the card's tuning table (:func:`nsa_tp.ops.tuning.table_from_rows`), and the time of upstream's kernel on
the same inputs (FlashMLA, DeepGEMM, sgl-kernel: :data:`nsa_tp.ops.tuning.UPSTREAM`) with the ratio.

Rows also give useful TFLOP/s (the work the contract asks for), GB/s over the bytes that must move, and the
fraction of the matching ceiling measured in the same run. The raw FlashMLA kernel with q pre-padded (no
pad/trim copies) is one extra row per sparse-prefill case, the anchor DESIGN.md quotes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from nsa_tp import ops
from nsa_tp.bench.timing import Ceilings, median_ms
from nsa_tp.ops import registry, tuning
from nsa_tp.ops.kv_format import D_LATENT, D_QK, FP8_BYTES_PER_TOKEN, pack_fp8_kv

__all__ = [
    "Row",
    "sparse_mla_rows",
    "decode_rows",
    "logits_rows",
    "paged_logits_rows",
    "topk_rows",
    "sweep_rows",
    "available_tiers",
    "auto_pass",
    "mislabelled",
    "case_key",
    "AUTO_CHECK_ROUNDS", "TABLE_ROUNDS", "AUTO_CHECK_TOLERANCE",
]

# Inside auto_pass(): {case_key: fastest tier of the first pass}; None outside (every tier is timed).
_AUTO_PASS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("nsa_tp_auto_pass",
                                                                                     default=None)

_BF16_ROW = 2 * D_QK  # bytes of one bf16 latent row


@dataclasses.dataclass
class Row:
    op: str
    tier: str  # a tier name, "auto", or a label for an extra (e.g. "flashmla-raw")
    shape: dict[str, Any]
    ms: float | None
    useful_tflops: float | None = None
    gbps: float | None = None
    frac_ceiling: float | None = None  # of the matmul (compute-bound ops) or copy (memory-bound ops) ceiling
    note: str = ""
    cls: str | None = None  # shape class (tier rows only: these make the tuning table)
    upstream_ms: float | None = None  # upstream's kernel on the same inputs, same run
    vs_upstream: float | None = None  # upstream_ms / ms: > 1 means faster than upstream
    ran: list[str] = dataclasses.field(default_factory=list)  # tiers the registry dispatched to, in one call

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class"] = d.pop("cls")
        return d


def available_tiers(op: str, include_reference: bool) -> list[str]:
    """Tiers that load here and implement ``op`` (the reference only when asked: it is slow at real sizes)."""
    out = []
    for name in registry.tier_names():
        if name == "reference" and not include_reference:
            continue
        try:
            tier = registry.get_tier(name)
        except registry.BackendUnavailableError:
            continue
        if op in tier.ops:
            out.append(name)
    return out


def case_key(op: str, shape: Mapping[str, Any]) -> str:
    """One case's key: the op and its shape."""
    return op + " " + json.dumps(shape, sort_keys=True)


@contextlib.contextmanager
def auto_pass(fastest: Mapping[str, str]) -> Iterator[None]:
    """Inside the block, each case times ``auto`` and its fastest tier of the first pass (``fastest``:
    :func:`case_key` -> tier) instead of every tier."""
    token = _AUTO_PASS.set(dict(fastest))
    try:
        yield
    finally:
        _AUTO_PASS.reset(token)


def mislabelled(rows: Sequence[Row]) -> list[str]:
    """Rows that name a tier (or ``auto``'s choice) but ran another one: a label that lies."""
    bad = []
    for r in rows:
        if r.ms is None or r.tier == "flashmla-raw":  # not run; or the raw kernel, called without the dispatcher
            continue
        want = {r.note.split()[2].rstrip(";")} if r.tier == "auto" else {r.tier}
        if set(r.ran) != want:
            bad.append(f"{r.op} {r.shape}: labelled {r.tier} ({sorted(want)}), ran {r.ran}")
    return bad


def _timer(fn: Callable[[], object], graph: bool = False) -> tuple[Callable[[], float] | None, str, list[str]]:
    """A timer for ``fn()`` (it returns the median ms of one pass), or None and the reason where ``fn`` could
    not run; the note; and the tiers its first call ran.

    ``graph=True`` times replays of ``fn`` captured in a CUDA graph: how SGLang runs decode (CUDA graphs are
    on by default), where the host-side cost of a launch is gone and small batches are GPU time only. If the
    capture fails, the eager time is reported and the note says so.
    """
    try:
        with registry.record_tiers() as calls:
            fn()  # compile / first-call work stays out of the timing
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a tier that cannot run this shape is a row with the reason
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", []
    ran = sorted({t for op, t in calls if op != "plan_sparse_mla_decode"} or {t for _, t in calls})
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            torch.cuda.synchronize()
            return (lambda: median_ms(g.replay)), "CUDA graph replay", ran
        except Exception as e:  # noqa: BLE001 - e.g. a host sync inside: time it eagerly, say so
            torch.cuda.synchronize()
            return (lambda: median_ms(fn)), f"eager (graph capture failed: {type(e).__name__})", ran
    return (lambda: median_ms(fn)), "", ran


def _timed(fn: Callable[[], object], graph: bool = False) -> tuple[float | None, str, list[str]]:
    """:func:`_timer` run once: the median ms (None where ``fn`` could not run), the note, the tiers that ran."""
    timer, note, ran = _timer(fn, graph)
    return (timer() if timer else None), note, ran


# The auto check's rounds: the fastest tier and auto are timed alternately this many times and each keeps its
# median, so a clock or temperature drift during the case hits both alike. (One pass each, back to back,
# measured the same FlashMLA kernel 9% apart on an H100, 2026-12-06: drift, not a routing error.)
AUTO_CHECK_ROUNDS = 7
TABLE_ROUNDS = 3  # the first pass (the table the router's margin is applied to) alternates its tiers the same way
AUTO_CHECK_TOLERANCE = 0.03  # issue 20's bar: auto at most 3% over the case's fastest tier, or the run fails


def _interleaved(timers: Sequence[Callable[[], float] | None], rounds: int) -> list[float | None]:
    """Median over ``rounds`` alternating passes of every timer (None stays None)."""
    samples: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for s, t in zip(samples, timers, strict=True):
            if t is not None:
                s.append(t())
    return [sorted(s)[len(s) // 2] if s else None for s in samples]


def _rate(amount: float, ms: float | None, unit: float) -> float | None:
    return None if ms is None else amount / (ms * 1e-3) / unit


def _frac(value: float | None, ceiling: float | None) -> float | None:
    return None if value is None or not ceiling else value / ceiling


def _thunk(op: str, tier: str, args: tuple[Any, ...], kwargs: dict[str, Any],
           call: Callable[[str], Callable[[], object]] | None) -> Callable[[], object] | str:
    """What runs ``op`` on ``tier`` (``"auto"`` included), or why it cannot."""
    try:
        if call is not None:
            return call(tier)
        if tier != "auto":
            reason = registry.get_tier(tier).ops[op].supports(*args, **kwargs)
            if reason:
                return f"unsupported: {reason}"
        return functools.partial(registry.dispatch, op, tier, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. a plan the tier cannot build: a row with the reason
        return f"{type(e).__name__}: {e}"


def _auto_choice(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        if op == "sparse_mla_decode":  # the plan picks the tier
            B, H, K = args[0].shape[0], args[0].shape[1], args[2].shape[-1]
            return registry.auto_tier("plan_sparse_mla_decode", B, H, K, kv_dtype=args[1].dtype,
                                      device=args[0].device)
        return registry.auto_tier(op, *args, **kwargs)
    except registry.BackendUnavailableError as e:
        return f"none ({e})"


def _case_rows(
    op: str,
    shape: dict[str, Any],
    tiers: Sequence[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    useful_flops: float,
    moved_bytes: float,
    ceiling: float | None,
    compute_bound: bool,
    call: Callable[[str], Callable[[], object]] | None = None,
    graph: bool = False,
) -> list[Row]:
    """One row per tier, every row carrying upstream's time on the same inputs and the tiers that ran.

    Each tier runs ``dispatch(op, tier, *args, **kwargs)`` (what the public op does with ``backend=tier``)
    unless ``call(tier)`` builds the thunk (decode: the plan decides the tier). Inside :func:`auto_pass`: the
    case's fastest tier, then ``auto`` itself (its note names the tier it chose), both timed.
    """
    cls = tuning.shape_class(op, *args, **kwargs)
    fastest = _AUTO_PASS.get()
    if fastest is not None:
        best = fastest.get(case_key(op, shape))
        tiers = [best, "auto"] if best in tiers else []
    timed = []
    for tier in tiers:
        thunk = _thunk(op, tier, args, kwargs, call)
        prepared = _timer(thunk, graph) if not isinstance(thunk, str) else (None, thunk[:300], [])
        timed.append((tier, thunk, *prepared))
    timers = [t[2] for t in timed]
    times = _interleaved(timers, AUTO_CHECK_ROUNDS if fastest is not None else TABLE_ROUNDS)
    rows: list[Row] = []
    for (tier, _, timer, note, ran), ms in zip(timed, times, strict=True):
        if timer is None:
            rows.append(Row(op, tier, shape, None, note=note, cls=cls))
            continue
        if tier == "auto":
            note = f"auto runs {_auto_choice(op, args, kwargs)}; {note}".rstrip("; ")
        tf = _rate(useful_flops, ms, 1e12) if useful_flops else None
        gb = _rate(moved_bytes, ms, 1e9)
        rows.append(Row(op, tier, shape, ms, tf, gb, _frac(tf if compute_bound else gb, ceiling), note,
                        cls if tier != "auto" else None, ran=ran))
    del timed, timers
    up = tuning.UPSTREAM.get(op)
    up_ms = next((r.ms for r in rows if r.tier == up), None)
    for r in rows:
        r.upstream_ms = up_ms
        r.vs_upstream = None if up_ms is None or r.ms is None else up_ms / r.ms
    return rows


def _random_kv(n: int, fp8: bool, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[n, 1, 576]`` bf16 or ``[n, 1, 656]`` packed fp8, built in chunks to bound the fp32 temporaries."""
    out = torch.empty(n, 1, FP8_BYTES_PER_TOKEN if fp8 else D_QK, dtype=torch.uint8 if fp8 else torch.bfloat16,
                      device=device)
    step = 1 << 18
    for i in range(0, n, step):
        x = torch.randn(min(step, n - i), 1, D_QK, device=device, generator=gen, dtype=torch.bfloat16)
        out[i : i + step] = pack_fp8_kv(x) if fp8 else x
    return out


def _flash_mla() -> Any | None:
    try:
        return importlib.import_module("flash_mla")
    except Exception:  # noqa: BLE001 - absent or broken: the raw-kernel row is then left out
        return None


def sparse_mla_rows(
    T: int, N: int, K: int, heads: list[int], kv_formats: list[str], ceilings: Ceilings, device: torch.device,
    with_reference: bool = False,
) -> list[Row]:
    """Sparse prefill over a flat KV: every tier at the native head count (FlashMLA's tier pads to 64)."""
    gen = torch.Generator(device=device).manual_seed(1)
    fm = _flash_mla()
    tiers = available_tiers("sparse_mla_fwd", with_reference)
    rows: list[Row] = []
    sm_scale = D_QK**-0.5
    idx = torch.randint(0, N, (T, 1, K), device=device, dtype=torch.int32, generator=gen)
    for fmt in kv_formats:
        kv = _random_kv(N, fmt == "fp8", device, gen)
        row_bytes = FP8_BYTES_PER_TOKEN if fmt == "fp8" else _BF16_ROW
        for H in heads:
            q = torch.randn(T, H, D_QK, device=device, dtype=torch.bfloat16, generator=gen)
            useful = 2.0 * T * H * K * (D_QK + D_LATENT)
            moved = T * K * row_bytes + T * H * (2 * D_QK + 2 * D_LATENT + 8)  # gathered rows (mostly L2) + q/out
            shape = {"T": T, "H": H, "N": N, "K": K, "kv": fmt}
            rows += _case_rows("sparse_mla_fwd", shape, tiers, (q, kv, idx, sm_scale), {}, useful, moved,
                               ceilings.bf16_tflops, True)
            if fm is not None and fmt == "bf16" and _AUTO_PASS.get() is None:
                hp = 64 * -(-H // 64)
                qp = q if hp == H else torch.cat([q, q.new_zeros(T, hp - H, D_QK)], dim=1)
                # The 576-dim V3.2 kernels (SM90 too) are the wheel's legacy set.
                ms, note, _ = _timed(functools.partial(fm.flash_mla_sparse_fwd, qp, kv, idx, sm_scale, D_LATENT,
                                                       use_legacy=True))
                rows.append(Row("sparse_mla_fwd", "flashmla-raw", shape, ms, _rate(useful, ms, 1e12),
                                note=(note + " " if note else "") + f"FlashMLA kernel alone, q pre-padded to {hp}"))
            del q
        del kv
    return rows


def decode_rows(batches: list[int], heads: list[int], ctx: int, K: int, ceilings: Ceilings,
                device: torch.device, with_reference: bool = False) -> list[Row]:
    """Sparse MLA over the fp8 paged cache, one query row per request: decode proper (small B), and SGLang's
    fp8 prefill, which runs this same kernel with one "request" per prompt token (large B)."""
    gen = torch.Generator(device=device).manual_seed(2)
    tiers = available_tiers("sparse_mla_decode", with_reference)
    rows: list[Row] = []
    sm_scale = D_QK**-0.5
    pages = -(-ctx // 64)
    cache = _random_kv(pages * 64, True, device, gen).view(pages, 64, 1, FP8_BYTES_PER_TOKEN)
    for B in batches:
        idx = torch.randint(0, ctx, (B, 1, K), device=device, dtype=torch.int32, generator=gen)
        for H in heads:
            q = torch.randn(B, H, D_QK, device=device, dtype=torch.bfloat16, generator=gen)
            moved = B * K * FP8_BYTES_PER_TOKEN + B * H * (2 * D_QK + 2 * D_LATENT + 4) + B * K * 4
            useful = 2.0 * B * H * K * (D_QK + D_LATENT)
            shape = {"B": B, "H": H, "ctx": ctx, "K": K, "kv": "fp8"}

            def call(tier: str, q=q, idx=idx, B=B, H=H, cache=cache) -> Callable[[], object]:
                plan = ops.plan_sparse_mla_decode(B, H, K, kv_dtype="fp8_e4m3", device=device, backend=tier)
                return functools.partial(ops.sparse_mla_decode, q, cache, idx, sm_scale, plan=plan)

            # Decode-sized calls as SGLang runs them: inside CUDA graphs (prefill-sized ones eagerly).
            rows += _case_rows("sparse_mla_decode", shape, tiers, (q, cache, idx, sm_scale), {}, useful, moved,
                               ceilings.copy_gbps, False, call=call, graph=B <= 64)
            del q
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
                with_reference: bool = False) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(3)
    tiers = available_tiers("fp8_mqa_logits", with_reference)
    rows: list[Row] = []
    for N in keys:
        q, kv, w, ks, ke = _logits_inputs(T, N, H, D, device, gen)
        useful = 2.0 * H * D * float((ke - ks).clamp(min=0).sum())
        moved = T * N * 4 + N * (D + 4) + T * H * (D + 4)
        rows += _case_rows("fp8_mqa_logits", {"T": T, "N": N, "H": H, "D": D, "mask": "causal"}, tiers,
                           (q, kv, w, ks, ke), {}, useful, moved, ceilings.fp8_tflops, True)
        del q, kv
    return rows


def paged_logits_rows(batches: list[int], H: int, ctx: int, ceilings: Ceilings, device: torch.device,
                      with_reference: bool = False) -> list[Row]:
    """The decode indexer's logits over the paged index-K cache, timed as CUDA graph replays (as SGLang runs
    decode)."""
    from nsa_tp.ops.index_cache import INDEX_PAGE_BYTES as PAGE_BYTES

    gen = torch.Generator(device=device).manual_seed(4)
    tiers = available_tiers("fp8_paged_mqa_logits", with_reference)
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
        rows += _case_rows("fp8_paged_mqa_logits", {"B": B, "H": H, "ctx": ctx}, tiers,
                           (q, cache, w, seq_lens, page_table, ctx), {}, 2.0 * B * ctx * H * 128,
                           B * ctx * (132 + 4) + B * H * 132, ceilings.copy_gbps, False, graph=True)
        del cache
    return rows


def topk_rows(cases: list[tuple[int, int]], K: int, ceilings: Ceilings, device: torch.device,
              with_reference: bool = True, paged_batch: int = 64, paged_ctx: int = 32768) -> list[Row]:
    """Top-``K`` over ``R x W`` float32 logits of a causal prefill (row r of the last R tokens of a W-token
    context scores ``W - R + r + 1`` keys), ragged; and one paged decode case (``paged_batch`` requests of
    ``paged_ctx`` tokens) in a CUDA graph, as SGLang runs decode. Bytes: the candidates read once + the ids."""
    gen = torch.Generator(device=device).manual_seed(6)
    rows: list[Row] = []
    for R, W in cases:
        logits = torch.randn(R, W, device=device, generator=gen)
        lengths = (torch.arange(R, device=device, dtype=torch.int32) + (W - R + 1)).clamp(1, W)
        starts = torch.zeros(R, device=device, dtype=torch.int32)
        moved = 4.0 * float(lengths.sum()) + 4.0 * R * K
        rows += _case_rows(
            "topk_transform_ragged", {"R": R, "W": W, "K": K, "rows": "causal"},
            available_tiers("topk_transform_ragged", with_reference), (logits, K),
            {"row_starts": starts, "lengths": lengths, "offset_override": None, "check_values": False},
            0.0, moved, ceilings.copy_gbps, False,
        )
        del logits
    B, W = paged_batch, paged_ctx
    logits = torch.randn(B, W, device=device, generator=gen)
    pages = -(-W // 64)
    page_table = torch.randperm(B * pages, device=device, generator=gen).to(torch.int32).view(B, pages)
    lengths = torch.full((B,), W, device=device, dtype=torch.int32)
    rows += _case_rows(
        "topk_transform_paged", {"R": B, "W": W, "K": K, "rows": "decode"},
        available_tiers("topk_transform_paged", with_reference), (logits, K),
        {"lengths": lengths, "page_table": page_table, "row_to_req": None, "row_starts": None, "page_size": 64,
         "check_values": False},
        0.0, 4.0 * B * W + 4.0 * B * K, ceilings.copy_gbps, False, graph=True,  # eager: dispatch was 6% of it
    )
    return rows


def sweep_rows(ceilings: Ceilings, device: torch.device, T: int, N: int, K: int) -> list[Row]:
    """Launch-config sweep for our sparse-MLA kernel (how its Triton defaults were chosen; the logits and top-k
    variants have their own benchmarks: benchmark/bench_mqa_logits.py, benchmark/bench_topk.py)."""
    from nsa_tp.ops.triton.sparse_mla import SparseMLAConfig, sparse_mla_fwd_split

    gen = torch.Generator(device=device).manual_seed(5)
    rows: list[Row] = []
    idx = torch.randint(0, N, (T, 1, K), device=device, dtype=torch.int32, generator=gen)
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
        ms, note, _ = _timed(functools.partial(sparse_mla_fwd_split, q, kvs[fmt], idx, D_QK**-0.5, 1, cfg))
        tf = _rate(useful, ms, 1e12)
        rows.append(Row("sweep:sparse_mla_fwd", "triton", {"T": T, "H": H, "N": N, "K": K, "kv": fmt, "config": c},
                        ms, tf, None, _frac(tf, ceilings.bf16_tflops), note))
    return rows
