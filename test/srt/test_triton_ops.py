"""The Triton tier against the reference tier (the oracle), on fresh random data over odd shapes.

GPU tests (``@pytest.mark.gpu``): sparse MLA prefill for H in 1..128 (bf16 and fp8 KV, K not a multiple of
the tile, rows with no valid id), the top-k split + merge path, decode with a plan, ragged and paged fp8 MQA
logits. Every kernel allocation is poisoned with NaN first (``_common.alloc`` is the single seam), so an
element a kernel forgot to write fails the NaN check. CPU tests: the tier reports why it cannot run, the
``supports`` reasons, the ``auto`` ranking table, and the bench command's plumbing.
"""

from __future__ import annotations

import json

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import reference
from nsa_tp.ops.kv_format import pack_fp8_kv
from nsa_tp.ops.registry import BackendUnavailableError, get_tier

NEG_INF = float("-inf")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output (an unwritten element, or a real NaN)"
    fin = torch.isfinite(want)
    g, w = got[fin].double(), want[fin].double()
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def assert_same_inf(got: torch.Tensor, want: torch.Tensor) -> None:
    assert not torch.isnan(got).any(), "NaN in output"
    bad = torch.isneginf(got) != torch.isneginf(want)
    assert not bad.any(), f"-inf positions differ, first at {bad.nonzero()[0].tolist()}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton-tier allocation starts as NaN (floats) or 0x7F bytes."""
    from nsa_tp.ops.triton import _common

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(127)
        return t

    monkeypatch.setattr(_common, "alloc", alloc)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _mla_inputs(T, H, N, K, fp8, gen):
    q = torch.randn(T, H, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(N, 1, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    # ids in [-1, N + 8): -1 and >= N are both "no token"
    idx = torch.randint(-1, N + 8, (T, 1, K), device="cuda", dtype=torch.int32, generator=gen)
    idx[0] = -1  # a row with no valid id
    if T > 2:
        idx[2] = N + 3  # only out-of-range ids: also empty
    return q, (pack_fp8_kv(kv) if fp8 else kv), idx


# The default fp8 path rounds the dequantized tile (fp8 x scale) to bf16 once, as FlashMLA does; the
# reference keeps it in fp32, so its scores differ by up to a bf16 ulp of k: 1e-2 (the bf16-path bound)
# for every output there, 1e-3 for lse / max_logits where the kernel sees exactly the reference's inputs.
STATS_TOL = {"bf16": 1e-3, "fp8-exact": 1e-3, "fp8": 1e-2}


def _check_mla(got, want, stats_tol=1e-3):
    out, ml, lse = got
    r_out, r_ml, r_lse = want
    assert out.dtype == torch.bfloat16 and ml.dtype == torch.float32 and lse.dtype == torch.float32
    assert_same_inf(lse, r_lse)
    assert_same_inf(ml, r_ml)
    assert rel_err(out, r_out) < 1e-2
    assert rel_err(lse, r_lse) < stats_tol
    assert rel_err(ml, r_ml) < stats_tol
    empty = torch.isneginf(r_lse)
    assert (out[empty] == 0).all(), "empty rows must give out = 0"


# ----------------------------------------------------------------------------- sparse MLA (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("H", [1, 2, 3, 8, 16, 32, 64, 128])
def test_sparse_mla_fwd_matches_reference(H, fp8, poisoned):
    gen = _gen(100 + H + fp8)
    q, kv, idx = _mla_inputs(37, H, 1000, 300, fp8, gen)
    sm_scale = 576**-0.5
    got = ops.sparse_mla_fwd(q, kv, idx, sm_scale, backend="triton")
    _check_mla(got, reference.sparse_mla_fwd(q, kv, idx, sm_scale), STATS_TOL["fp8" if fp8 else "bf16"])


@pytest.mark.gpu
@pytest.mark.parametrize("H", [1, 16, 20, 64, 128])
def test_sparse_mla_fwd_exact_fp8_variant(H, poisoned):
    """The exact-scale fp8 kernel (``exact_fp8=True``) against the reference, at several head blocks."""
    from nsa_tp.ops.triton.sparse_mla import SparseMLAConfig, sparse_mla_fwd_split

    gen = _gen(150 + H)
    q, kv, idx = _mla_inputs(29, H, 900, 300, True, gen)
    cfg = SparseMLAConfig(16 if H <= 32 else 64, 32, 8, 2, exact_fp8=True)
    _check_mla(sparse_mla_fwd_split(q, kv, idx, 576**-0.5, 1, cfg), reference.sparse_mla_fwd(q, kv, idx, 576**-0.5),
               STATS_TOL["fp8-exact"])


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("H", [16, 128])
def test_sparse_mla_fwd_topk_2048(H, fp8, poisoned):
    gen = _gen(200 + H + fp8)
    q, kv, idx = _mla_inputs(19, H, 5003, 2048, fp8, gen)
    sm_scale = 0.1  # sharper softmax than 1/sqrt(d): exercises the running max
    _check_mla(ops.sparse_mla_fwd(q, kv, idx, sm_scale, backend="triton"),
               reference.sparse_mla_fwd(q, kv, idx, sm_scale), STATS_TOL["fp8" if fp8 else "bf16"])


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 5, 64])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_sparse_mla_split_merge(splits, fp8, poisoned):
    from nsa_tp.ops.triton.sparse_mla import sparse_mla_fwd_split

    gen = _gen(300 + splits + fp8)
    q, kv, idx = _mla_inputs(5, 20, 700, 330, fp8, gen)
    idx[1, 0, :200] = -1  # whole splits with no valid id: they must weigh 0 in the merge
    sm_scale = 576**-0.5
    _check_mla(sparse_mla_fwd_split(q, kv, idx, sm_scale, num_splits=splits),
               reference.sparse_mla_fwd(q, kv, idx, sm_scale), STATS_TOL["fp8" if fp8 else "bf16"])


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("B,H", [(1, 16), (5, 3), (64, 16), (2, 128)])
def test_sparse_mla_decode_with_plan(B, H, fp8, poisoned):
    gen = _gen(400 + B + H + fp8)
    pages, K = 3 * B + 1, 257
    kv = torch.randn(pages * 64, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = (pack_fp8_kv(kv) if fp8 else kv).view(pages, 64, 1, -1)
    q = torch.randn(B, H, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = torch.randint(-1, pages * 64, (B, 1, K), device="cuda", dtype=torch.int32, generator=gen)
    idx[B - 1] = -1
    plan = ops.plan_sparse_mla_decode(B, H, K, kv_dtype=cache.dtype, device="cuda", backend="triton")
    assert plan.tier == "triton"
    out, lse = ops.sparse_mla_decode(q, cache, idx, 576**-0.5, plan=plan)
    r_out, r_lse = reference.sparse_mla_decode(q, cache, idx, 576**-0.5)
    assert_same_inf(lse, r_lse)
    assert rel_err(out, r_out) < 1e-2
    assert rel_err(lse, r_lse) < STATS_TOL["fp8" if fp8 else "bf16"]
    with pytest.raises(ValueError, match="plan"):
        ops.sparse_mla_decode(q[:, :1].contiguous() if H > 1 else q.repeat(1, 2, 1), cache, idx, 0.1, plan=plan)


@pytest.mark.gpu
def test_sparse_mla_rejects_bad_inputs():
    from nsa_tp.ops.triton.sparse_mla import sparse_mla_fwd

    q = torch.randn(4, 16, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(100, 1, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.zeros(4, 1, 64, device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla_fwd(q, kv, idx.long(), 0.1)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla_fwd(q, kv, idx, 0.1, d_v=256)
    with pytest.raises(ValueError, match="q"):
        sparse_mla_fwd(q[..., :512].contiguous(), kv, idx, 0.1)
    with pytest.raises(BackendUnavailableError, match="d_qk"):
        ops.sparse_mla_fwd(q[..., :512].contiguous(), kv, idx, 0.1, backend="triton")


# ----------------------------------------------------------------------------- fp8 MQA logits (GPU)


def _logits_inputs(T, N, H, D, gen, neg_scales=True):
    q = torch.randn(T, H, D, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    k = torch.randn(N, D, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    k_scale = torch.rand(N, device="cuda", generator=gen) + 0.05
    if neg_scales:  # the contract is relu(q.k * scale): a negative scale must flip, not be folded out
        k_scale[::7] *= -1
    w = torch.randn(T, H, device="cuda", generator=gen)
    return q, (k, k_scale), w


@pytest.mark.gpu
@pytest.mark.parametrize("H", [1, 8, 64, 128])
def test_fp8_mqa_logits_ragged(H, poisoned):
    gen = _gen(500 + H)
    T, N, D = 301, 1000, 128
    q, kv, w = _logits_inputs(T, N, H, D, gen)
    ks = torch.randint(0, N, (T,), device="cuda", dtype=torch.int32, generator=gen)
    ke = (ks + torch.randint(0, 600, (T,), device="cuda", dtype=torch.int32, generator=gen)).clamp(max=N)
    ks[:3], ke[:3] = 17, 17  # empty ranges
    ks[3], ke[3] = 900, 100  # inverted: empty too
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="triton")
    want = reference.fp8_mqa_logits(q, kv, w, ks, ke)
    assert_same_inf(got, want)
    assert rel_err(got, want) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("T,N", [(512, 2048), (77, 3001)])
def test_fp8_mqa_logits_causal_skips_blocks(T, N, poisoned):
    gen = _gen(600 + T)
    q, kv, w = _logits_inputs(T, N, 64, 128, gen)
    ke = (torch.arange(T, device="cuda", dtype=torch.int32) + (N - T + 1))
    ks = torch.zeros(T, device="cuda", dtype=torch.int32)
    ks[T // 2 :] = N // 3  # a sliding start for half the rows
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="triton")
    want = reference.fp8_mqa_logits(q, kv, w, ks, ke)
    assert_same_inf(got, want)
    assert rel_err(got, want) < 1e-3


# Every launch shape benchmark/bench_mqa_logits.py times (keep the two lists in step): each must be right
# before its time means anything. (block_n, block_t, warps, stages[, maxnreg])
_LOGITS_CONFIGS = [
    (64, 4, 4, 3), (64, 4, 4, 4), (64, 2, 4, 3, 128), (128, 2, 4, 3), (128, 2, 4, 4), (128, 2, 8, 3, 128),
    (128, 2, 8, 3), (128, 1, 4, 3), (128, 4, 8, 3), (256, 2, 8, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _LOGITS_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("neg_scales", [False, True], ids=["scale>=0", "negative-scales"])
def test_fp8_mqa_logits_configs(cfg, neg_scales, poisoned):
    """Each launch shape, both epilogues (scale folded after the head sum / exact per head), ragged + causal rows,
    empty and inverted ranges, T and N not multiples of any block."""
    from nsa_tp.ops.triton.mqa_logits import MQALogitsConfig, fp8_mqa_logits

    gen = _gen(800 + sum(cfg[:4]) + neg_scales)
    T, N = 333, 2500
    q, kv, w = _logits_inputs(T, N, 64, 128, gen, neg_scales)
    ks = torch.randint(0, N, (T,), device="cuda", dtype=torch.int32, generator=gen)
    ke = (ks + torch.randint(0, 1500, (T,), device="cuda", dtype=torch.int32, generator=gen)).clamp(max=N)
    ks[T // 2 :] = 0  # causal rows for the second half
    ke[T // 2 :] = torch.arange(T - T // 2, device="cuda", dtype=torch.int32) + (N - T + 1)
    ks[:3], ke[:3] = 17, 17  # empty
    ks[3], ke[3] = 900, 100  # inverted: empty too
    ks[4], ke[4] = 0, N  # the whole row
    got = fp8_mqa_logits(q, kv, w, ks, ke, config=MQALogitsConfig(*cfg))
    want = reference.fp8_mqa_logits(q, kv, w, ks, ke)
    assert_same_inf(got, want)
    assert rel_err(got, want) < 1e-3


def test_fp8_mqa_logits_default_for_head_counts():
    """default_config keeps the stacked q rows (tokens x padded heads) within the MMA's width."""
    pytest.importorskip("triton", reason="the kernel module needs Triton")
    from nsa_tp.ops.triton.mqa_logits import DEFAULT_CONFIG, default_config

    for heads in (1, 8, 16, 64, 128):
        cfg = default_config(4096, 65536, heads)
        assert cfg.block_t * max(16, heads) <= 256 and cfg.block_t >= 1
    assert default_config(4096, 65536, 64) == DEFAULT_CONFIG


def _paged_inputs(B, H, P, max_pages, gen):
    cache = torch.empty(P, 8448, dtype=torch.uint8, device="cuda")
    cache[:, :8192] = torch.randn(P, 8192, device="cuda", generator=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    cache[:, 8192:] = (torch.rand(P, 64, device="cuda", generator=gen) + 0.05).view(torch.uint8)
    page_table = torch.randperm(P, device="cuda", generator=gen)[: B * max_pages].to(torch.int32)
    q = torch.randn(B, H, 128, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    w = torch.randn(B, H, device="cuda", generator=gen)
    return q, cache, w, page_table.view(B, max_pages).contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("B,H", [(1, 64), (7, 16), (3, 3)])
@pytest.mark.parametrize("cfg", [None, (64, 4), (128, 4), (256, 4), (512, 8)],
                         ids=lambda c: "default" if c is None else str(c))
def test_fp8_paged_mqa_logits(B, H, cfg, poisoned):
    gen = _gen(700 + B + H)
    max_pages = 9
    q, cache, w, page_table = _paged_inputs(B, H, B * max_pages + 5, max_pages, gen)
    max_seq_len = 555  # not a multiple of the page or the block
    seq_lens = torch.randint(0, max_seq_len + 1, (B,), device="cuda", dtype=torch.int32, generator=gen)
    seq_lens[0] = 0 if B > 1 else 300
    if B > 2:
        seq_lens[2] = max_seq_len
    if cfg is None:
        got = ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, page_table, max_seq_len, backend="triton")
    else:
        from nsa_tp.ops.triton.paged_mqa_logits import PagedLogitsConfig, fp8_paged_mqa_logits

        got = fp8_paged_mqa_logits(q, cache, w, seq_lens, page_table, max_seq_len, config=PagedLogitsConfig(*cfg))
    want = reference.fp8_paged_mqa_logits(q, cache, w, seq_lens, page_table, max_seq_len)
    assert got.shape == (B, max_seq_len)
    assert_same_inf(got, want)
    assert rel_err(got, want) < 1e-3


# ----------------------------------------------------------------------------- CPU: reasons and plumbing


def test_tier_reports_why_it_cannot_run_here():
    from nsa_tp.ops.triton import available

    reason = available()
    if torch.cuda.is_available() and reason is None:
        assert get_tier("triton").name == "triton"
    else:
        assert isinstance(reason, str) and reason
        with pytest.raises(BackendUnavailableError, match="triton"):
            get_tier("triton")


def test_supports_reasons_on_cpu_tensors():
    from nsa_tp.ops.triton import TIER

    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    idx = torch.zeros(2, 1, 8, dtype=torch.int32)
    assert "not on CUDA" in TIER.ops["sparse_mla_fwd"].supports(q, kv, idx, 0.1)
    q8 = torch.zeros(2, 4, 128).to(torch.float8_e4m3fn)
    assert "not on CUDA" in TIER.ops["fp8_mqa_logits"].supports(q8, None, None, None, None)
    assert "not CUDA" in TIER.ops["plan_sparse_mla_decode"].supports(1, 16, 2048, kv_dtype="bfloat16", device="cpu")


def test_bench_without_gpu_or_from_json(tmp_path, capsys):
    from nsa_tp.cli import main

    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--out", str(tmp_path)]) == 2
        assert "CUDA" in capsys.readouterr().err
    results = {
        "card": "test card",
        "ceilings": {"fp8_tflops": 1000.0},
        "rows": [
            {"op": "sparse_mla_fwd", "tier": "triton", "shape": {"T": 8, "H": h, "N": 9, "K": 4, "kv": "bf16"},
             "ms": 1.0 / h, "useful_tflops": 1.0}
            for h in (16, 32)
        ] + [
            {"op": "fp8_mqa_logits", "tier": "triton", "shape": {"T": 8, "N": n, "H": 64, "D": 128},
             "ms": 1.0, "useful_tflops": float(n)}
            for n in (4096, 8192)
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # no PNG can be drawn: said on stderr, nonzero (issue 15), not a silent 0
        assert main(["bench", "--plot-from", str(path)]) == 1
        assert "needs matplotlib" in capsys.readouterr().err
        return
    assert main(["bench", "--plot-from", str(path)]) == 0
    assert (tmp_path / "r_sparse_mla.png").stat().st_size > 0
    assert (tmp_path / "r_logits.png").stat().st_size > 0
