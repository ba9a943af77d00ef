"""The indexer held to DeepGEMM's own grid (issue 25): fp8 MQA logits, ragged and paged, and the top-k.

Grid (the categories of DeepGEMM's ``tests/test_attention.py``; the code is ours): 64 index heads of dim 128;
prompts of 2048 / 8192 query rows over 8192 / 65536 keys, each with causal ranges (row t scores keys
``[0, N - S + t + 1)``) and context-parallel ranges (two halves of the rows over two different windows); the
paged decode grid, batch 64 / 128 x 1 / 2 query rows per request (MTP) x contexts around 8192 / 32768 tokens
(0.7x..1.3x), 64-token pages scattered over a cache with spare pages, outputs ``max_model_len = 111000``
wide. DeepGEMM also runs 32-token pages; nsa-tp's index-K cache has 64-token pages only.

Checks, per tier: the ``-inf`` positions equal the reference tier's exactly; the difference
``1 - 2<x,y> / (|x|^2 + |y|^2)`` over the finite entries below 1e-3; 20 repeated calls bitwise equal, for the
logits and for the top-2048 ids taken from them (ties decided the same way on every call), every returned
id a selectable candidate of its row. CPU (CI): scaled-down shapes, the reference tier against an
independent float64 oracle (its own reading of the cache bytes). GPU (``-m gpu``): the full grid for
``triton``, ``deep_gemm`` and ``auto`` against the reference tier; the top-k for ``triton``, ``sgl_kernel``,
``auto`` and ``reference``.
"""

from __future__ import annotations

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops.index_cache import INDEX_PAGE_BYTES, INDEX_PAGE_SIZE

REPEATS = 20
TOPK = 2048
FP8_MAX = 448.0


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, D]`` float -> (e4m3 ``[M, D]``, float32 scale ``[M]``), one absmax scale per row."""
    scale = x.abs().amax(dim=1).clamp_min(1e-4) / FP8_MAX
    return (x / scale[:, None]).to(torch.float8_e4m3fn), scale.float()


def ragged_ranges(S: int, N: int, kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ks, ke)`` int32 ``[S]``. causal: row t scores ``[0, N - S + t + 1)``. cp: the first half of the rows
    scores a window ending a third of the way into the keys, the second half one ending at the last key
    (each row one key further than the one before), as a context-parallel rank holding two chunks does."""
    t = torch.arange(S, device=device)
    if kind == "causal":
        return torch.zeros(S, dtype=torch.int32, device=device), (N - S + t + 1).to(torch.int32)
    half = S // 2
    first_end = max(1, N // 3 - half)
    ke = torch.where(t < half, first_end + t, N - (S - t) + 1)
    ks = torch.where(t < half, 0, ke // 4)  # the second chunk's window also starts later
    return ks.to(torch.int32), ke.clamp(1, N).to(torch.int32)


def _generator(seed: int, device) -> torch.Generator:
    """Inputs are drawn on the device they are used on (the GPU grid's caches are gigabytes)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=device).manual_seed(seed)


def logits_inputs(S: int, N: int, H: int, D: int, seed: int, device):
    gen = _generator(seed, device)
    q = torch.randn(S, H, D, generator=gen, device=gen.device).to(torch.float8_e4m3fn)
    k, k_scale = _quantize_rows(torch.randn(N, D, generator=gen, device=gen.device))
    weights = torch.randn(S, H, generator=gen, device=gen.device)
    return q, (k, k_scale), weights


def paged_inputs(B: int, next_n: int, avg_ctx: int, H: int, seed: int, device, max_model_len: int):
    """Requests with contexts in ``[0.7, 1.3) x avg_ctx``; ``B * next_n`` rows (row ``b * next_n + i`` sees
    ``ctx_b - next_n + 1 + i`` tokens), the request's page table repeated for each of its rows."""
    gen = _generator(seed, device)
    dev = gen.device
    ctx = torch.randint(int(0.7 * avg_ctx), int(1.3 * avg_ctx), (B,), generator=torch.Generator().manual_seed(seed))
    ctx = ctx.clamp(max=max_model_len)
    pages_per = (ctx + INDEX_PAGE_SIZE - 1) // INDEX_PAGE_SIZE
    num_pages = int(pages_per.sum()) + 7  # spare pages nobody's table names
    max_pages = -(-max_model_len // INDEX_PAGE_SIZE)
    order = torch.randperm(num_pages, generator=gen, device=dev).to(torch.int32)
    table = torch.zeros(B, max_pages, dtype=torch.int32, device=dev)
    first = 0
    for b in range(B):
        n = int(pages_per[b])
        table[b, :n] = order[first : first + n]
        first += n
    values, scales = _quantize_rows(torch.randn(num_pages * INDEX_PAGE_SIZE, 128, generator=gen, device=dev))
    cache = torch.empty(num_pages, INDEX_PAGE_BYTES, dtype=torch.uint8, device=dev)
    cache[:, : INDEX_PAGE_SIZE * 128] = values.view(torch.uint8).view(num_pages, -1)
    cache[:, INDEX_PAGE_SIZE * 128 :] = scales.view(num_pages, INDEX_PAGE_SIZE).view(torch.uint8)
    rows = B * next_n
    seq_lens = (ctx.repeat_interleave(next_n) - next_n + 1 + torch.arange(rows) % next_n).clamp_min(0)
    q = torch.randn(rows, H, 128, generator=gen, device=dev).to(torch.float8_e4m3fn)
    weights = torch.randn(rows, H, generator=gen, device=dev)
    page_table = table.repeat_interleave(next_n, dim=0)
    return q, cache, weights, seq_lens.to(torch.int32).to(dev), page_table


# ----------------------------------------------------------------------------------------------------------
# Oracles (float64, independent of every tier) and checks


def oracle_logits(q, kv, weights, ks, ke) -> torch.Tensor:
    k, k_scale = kv
    kf = k.double() * k_scale.double()[:, None]
    N = kf.shape[0]
    cols = torch.arange(N, device=q.device)
    out = torch.empty(q.shape[0], N, dtype=torch.float64, device=q.device)
    step = max(1, (1 << 24) // max(1, q.shape[1] * N))
    for t0 in range(0, q.shape[0], step):
        s = torch.einsum("thd,nd->thn", q[t0 : t0 + step].double(), kf).relu()
        row = torch.einsum("thn,th->tn", s, weights[t0 : t0 + step].double())
        inside = (cols >= ks[t0 : t0 + step, None]) & (cols < ke[t0 : t0 + step, None])
        out[t0 : t0 + step] = row.masked_fill(~inside, float("-inf"))
    return out


def oracle_paged_logits(q, cache, weights, seq_lens, page_table, max_seq_len) -> torch.Tensor:
    """Reads the page bytes itself: token t of a page at bytes ``[128 t, 128 t + 128)``, its float32 scale at
    byte ``8192 + 4 t``."""
    out = torch.full((q.shape[0], max_seq_len), float("-inf"), dtype=torch.float64, device=q.device)
    for r in range(q.shape[0]):
        L = int(seq_lens[r])
        if L == 0:
            continue
        j = torch.arange(L, device=q.device)
        page = page_table[r, j // INDEX_PAGE_SIZE].long()
        off = j % INDEX_PAGE_SIZE
        vals = cache[page[:, None], off[:, None] * 128 + torch.arange(128, device=q.device)]
        scale_bytes = cache[page[:, None], INDEX_PAGE_SIZE * 128 + off[:, None] * 4 + torch.arange(4, device=q.device)]
        k = vals.contiguous().view(torch.float8_e4m3fn).double() * scale_bytes.contiguous().view(torch.float32).double()
        out[r, :L] = ((q[r].double() @ k.T).relu() * weights[r].double()[:, None]).sum(0)
    return out


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2<x,y> / (|x|^2 + |y|^2)`` over the entries finite in both (0 when both are all zero)."""
    fin = torch.isfinite(x) & torch.isfinite(y)
    a, b = x[fin].double(), y[fin].double()
    denom = float((a * a + b * b).sum())
    return 0.0 if denom == 0 else 1 - 2 * float((a * b).sum()) / denom


def check_logits(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the logits"
    neg = torch.isneginf(got)
    ref_neg = torch.isneginf(want)
    if not torch.equal(neg, ref_neg):
        first = (neg != ref_neg).nonzero()[0].tolist()
        pytest.fail(f"{name}: -inf at {int(neg.sum())} entries, the reference at {int(ref_neg.sum())}; first "
                    f"differing at {first}")
    assert not torch.isposinf(got).any(), f"{name}: +inf in the logits"
    d = diff(got, want)
    assert d < 1e-3, f"{name}: difference {d:.3g} >= 1e-3"


def check_repeatable(run, first: torch.Tensor, name: str) -> None:
    """``REPEATS`` more calls, each bitwise equal to the first (NaN-free outputs, so equal() is bitwise)."""
    for i in range(REPEATS):
        again = run()
        if not torch.equal(again, first):
            bad = (again != first).nonzero()[0].tolist()
            pytest.fail(f"{name}: call {i + 2} differs from call 1, first at {bad}")


ORDER_EXACT_TOPK = ("triton", "reference")  # tiers whose top-k id order is part of what repeats bitwise
# Upstream's sgl-kernel top-k (fast_topk_v2, what SGLang runs, and what auto routes to where it is fastest) is
# neither exact nor repeatable on long rows. Measured with benchmark/topk_exactness.py on an H100 (2026-12-06,
# topk_exactness_h100_20261206.json; 21 calls per case on the grid's causal logits): at 65536 keys 8 of 2048 and
# 28 of 8192 rows selected a set of logit values other than the exact top-2048's in some call (the selected
# k-th value up to 0.46 below the exact one), and 20 of 20 repeated calls differed from the first; at 8192 keys
# it was exact and repeatable. Ours (triton, reference) were exact and bitwise repeatable everywhere. So
# upstream's tiers are held to at most 1% inexact rows per call (about 3x the worst measured), ours to none.
UPSTREAM_TOPK_INEXACT_ROWS = 0.01


def exact_topk_values(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int) -> torch.Tensor:
    """``[R, topk]``: each row's top-``topk`` logits over ``[ks, ke)``, descending (``-inf`` past the row)."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    masked = torch.where((cols >= ks[:, None]) & (cols < ke[:, None]), logits, float("-inf"))
    return masked.topk(topk, dim=1).values


def selected_values(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logits ``ids`` name, per row descending (``-inf`` for a ``-1`` id)."""
    got = torch.where(ids >= 0, logits.gather(1, ids.long().clamp_min(0)), float("-inf"))
    return got.sort(dim=1, descending=True).values


def inexact_rows(exact: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> int:
    """Rows whose selected logit values differ from ``exact`` (:func:`exact_topk_values`)."""
    return int((selected_values(logits, ids) != exact).any(dim=1).sum())


def check_topk(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, backend: str, name: str,
               topk: int = TOPK) -> None:
    """Top-k ids over each row's ``[ks, ke)``: every id a candidate of its row with a finite logit, the exact
    top-k values (upstream's tiers: in all but :data:`UPSTREAM_TOPK_INEXACT_ROWS` of the rows), and for
    :data:`ORDER_EXACT_TOPK` the same ids in the same order on every one of ``1 + REPEATS`` calls."""
    lengths = (ke - ks).clamp_min(0).to(torch.int32)

    def run():
        return ops.topk_transform_ragged(logits, topk, row_starts=ks, lengths=lengths, backend=backend)

    ids = run()
    kept = ids >= 0
    pos = torch.where(kept, ids.long() - ks.long()[:, None], 0)
    assert bool(((pos >= 0) & (pos < lengths.long()[:, None]))[kept].all()), f"{name}: an id outside its row"
    vals = logits.gather(1, (pos + ks.long()[:, None]).clamp(0, logits.shape[1] - 1))
    assert bool(torch.isfinite(vals[kept]).all()), f"{name}: a kept id has no finite logit"
    want_n = torch.isfinite(logits).sum(1).clamp(max=topk)
    assert torch.equal(kept.sum(1), want_n), f"{name}: kept-id counts differ from min(K, candidates)"
    exact = exact_topk_values(logits, ks, ke, topk)
    if backend in ORDER_EXACT_TOPK:
        assert inexact_rows(exact, logits, ids) == 0, f"{name}: not the exact top-{topk}"
        check_repeatable(run, ids, f"{name} top-k ids")
        return
    limit = UPSTREAM_TOPK_INEXACT_ROWS * logits.shape[0]
    for call in range(1 + REPEATS):
        bad = inexact_rows(exact, logits, ids if call == 0 else run())
        assert bad <= limit, f"{name}: call {call + 1}: {bad} of {logits.shape[0]} rows not the exact top-{topk}"


# ----------------------------------------------------------------------------------------------------------
# CPU: the reference tier, scaled down


@pytest.mark.parametrize("S,N", [(64, 256), (96, 1024)])
@pytest.mark.parametrize("kind", ["causal", "cp"])
def test_reference_logits_scaled_down(S, N, kind):
    q, kv, w = logits_inputs(S, N, 8, 128, seed=S + N, device="cpu")
    ks, ke = ragged_ranges(S, N, kind, "cpu")
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="reference")
    check_logits(got, oracle_logits(q, kv, w, ks, ke), "reference")
    check_repeatable(lambda: ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="reference"), got, "reference")
    tied = (got * 4).round() / 4  # heavy ties at the K-th value: the choice among them must not move
    check_topk(tied, ks, ke, "reference", "reference", topk=40)


@pytest.mark.parametrize("B,next_n", [(3, 1), (2, 2)])
def test_reference_paged_logits_scaled_down(B, next_n):
    q, cache, w, seq_lens, table = paged_inputs(B, next_n, 300, 8, seed=B * 10 + next_n, device="cpu",
                                                max_model_len=700)
    got = ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 700, backend="reference")
    check_logits(got, oracle_paged_logits(q, cache, w, seq_lens, table, 700), "reference paged")
    check_repeatable(lambda: ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 700, backend="reference"),
                     got, "reference paged")


def test_checks_can_fail():
    x = torch.tensor([[1.0, float("-inf")]])
    with pytest.raises(pytest.fail.Exception, match="-inf"):
        check_logits(torch.tensor([[1.0, 0.0]]), x, "t")
    with pytest.raises(AssertionError, match="difference"):
        check_logits(torch.tensor([[-1.0, float("-inf")]]), x, "t")
    calls = iter(range(100))
    with pytest.raises(pytest.fail.Exception, match="differs"):
        check_repeatable(lambda: torch.tensor([next(calls)]), torch.tensor([0]), "t")


# ----------------------------------------------------------------------------------------------------------
# GPU: DeepGEMM's grid


def _require(op: str, backend: str, *args, **kwargs) -> None:
    if backend in ("auto", "reference"):
        return
    reason = ops.explain(op, *args, **kwargs)[backend]
    if reason != "ok":
        pytest.skip(f"tier {backend!r} cannot run {op} here: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "deep_gemm", "auto"])
@pytest.mark.parametrize("kind", ["causal", "cp"])
@pytest.mark.parametrize("S,N", [(2048, 8192), (2048, 65536), (8192, 8192), (8192, 65536)])
def test_logits_grid_gpu(S, N, kind, backend):
    q, kv, w = logits_inputs(S, N, 64, 128, seed=S + N, device="cuda")
    ks, ke = ragged_ranges(S, N, kind, "cuda")
    _require("fp8_mqa_logits", backend, q, kv, w, ks, ke)
    want = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="reference")
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend=backend)
    check_logits(got, want, backend)
    del want
    check_repeatable(lambda: ops.fp8_mqa_logits(q, kv, w, ks, ke, backend=backend), got, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sgl_kernel", "auto", "reference"])
@pytest.mark.parametrize("S,N", [(2048, 8192), (8192, 65536)])
def test_topk_grid_gpu(S, N, backend):
    q, kv, w = logits_inputs(S, N, 64, 128, seed=S + N, device="cuda")
    ks, ke = ragged_ranges(S, N, "causal", "cuda")
    logits = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="reference")
    lengths = (ke - ks).to(torch.int32)
    _require("topk_transform_ragged", backend, logits, TOPK, row_starts=ks, lengths=lengths)
    check_topk(logits, ks, ke, backend, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "deep_gemm", "auto"])
@pytest.mark.parametrize("avg_ctx", [8192, 32768])
@pytest.mark.parametrize("B,next_n", [(64, 1), (64, 2), (128, 1)])
def test_paged_logits_grid_gpu(B, next_n, avg_ctx, backend):
    max_len = 111 * 1000
    q, cache, w, seq_lens, table = paged_inputs(B, next_n, avg_ctx, 64, seed=B + next_n + avg_ctx,
                                                device="cuda", max_model_len=max_len)
    _require("fp8_paged_mqa_logits", backend, q, cache, w, seq_lens, table, max_len)
    want = ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len, backend="reference")
    got = ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len, backend=backend)
    check_logits(got, want, backend)
    del want
    check_repeatable(lambda: ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len, backend=backend),
                     got, backend)


def test_topk_exactness_check_can_fail(monkeypatch):
    """inexact_rows counts a row that selected a non-top value; an upstream tier past the 1% bound fails, one
    under it passes, and ours must be exact."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 64, generator=gen)
    ks, ke = torch.zeros(300, dtype=torch.int32), torch.full((300,), 64, dtype=torch.int32)
    real = ops.topk_transform_ragged
    ids = real(logits, 8, row_starts=ks, lengths=ke - ks, backend="reference")
    exact = exact_topk_values(logits, ks, ke, 8)
    assert inexact_rows(exact, logits, ids) == 0

    def corrupt(rows):
        def fn(*a, backend="auto", **k):
            out = real(*a, **k, backend="reference").clone()
            worst = logits[rows].argmin(1).to(out.dtype)  # a non-top-8 candidate of each row
            out[rows, 0] = worst
            return out
        return fn

    assert inexact_rows(exact, logits, corrupt([1, 7])(logits, 8, row_starts=ks, lengths=ke - ks)) == 2
    monkeypatch.setattr(ops, "topk_transform_ragged", corrupt([4]))  # 1 of 300 rows: under 1%
    check_topk(logits, ks, ke, "sgl_kernel", "upstream", topk=8)
    monkeypatch.setattr(ops, "topk_transform_ragged", corrupt([1, 2, 3, 4]))  # 4 of 300: over 1%
    with pytest.raises(AssertionError, match="rows not the exact"):
        check_topk(logits, ks, ke, "sgl_kernel", "upstream", topk=8)
    monkeypatch.setattr(ops, "topk_transform_ragged", corrupt([4]))
    with pytest.raises(AssertionError, match="not the exact top-8"):
        check_topk(logits, ks, ke, "triton", "ours", topk=8)
