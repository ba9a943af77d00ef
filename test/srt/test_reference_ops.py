"""Reference ops against independent float64 implementations and hand-computed cases.

Covers fp8 block quantization, the Hadamard transform, RoPE (both layouts, YaRN), the ragged and paged fp8
MQA logits, sparse MLA prefill/decode over bf16 and fp8 caches, the decode plan, and the input checks.
"""

from __future__ import annotations

import math

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import reference, reference_tier
from nsa_tp.ops.hadamard import hadamard_transform
from nsa_tp.ops.index_cache import (
    INDEX_PAGE_BYTES,
    gather_index_k,
    new_index_k_cache,
    slots_from_page_table,
    store_index_k,
)
from nsa_tp.ops.kv_format import pack_fp8_kv
from nsa_tp.ops.plan import DecodePlan
from nsa_tp.ops.quant import dequantize_fp8_blocks, quantize_fp8_blocks
from nsa_tp.ops.registry import BackendUnavailableError
from nsa_tp.ops.rope import apply_rope, rope_cos_sin, yarn_inv_freq

NEG_INF = float("-inf")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output"
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def assert_same_inf(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf positions differ"
    assert not torch.isnan(got).any(), "NaN in output"


# ----------------------------------------------------------------------------- fp8 block quantization


def test_quant_hand_case_and_roundtrip():
    x = torch.zeros(2, 256)
    x[0, :128] = torch.linspace(-896.0, 896.0, 128)  # absmax 896 -> scale 2 exactly
    x[0, 128:] = 0.0  # an all-zero block gets the 1e-4 floor, not 0
    x[1] = torch.randn(256) * 3
    q, s = quantize_fp8_blocks(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    assert s[0, 0].item() == pytest.approx(2.0)
    assert s[0, 1].item() == pytest.approx(1e-4 / 448.0)
    back = dequantize_fp8_blocks(q, s)
    assert back[0, 128:].abs().max().item() == 0.0
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 on normal values
    assert rel_err(back, x) < 0.05


def test_quant_pow2_scales_are_powers_of_two_and_cover_absmax():
    x = torch.randn(7, 3, 128, dtype=torch.bfloat16) * 5
    q, s = quantize_fp8_blocks(x, pow2_scale=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert (x.float().abs().amax(-1) <= 448.0 * s[..., 0] * (1 + 1e-6)).all()  # no clipping
    assert rel_err(dequantize_fp8_blocks(q, s), x.float()) < 0.06


def test_quant_rejects_bad_input():
    with pytest.raises(ValueError, match="block"):
        quantize_fp8_blocks(torch.randn(4, 100))
    with pytest.raises(ValueError, match="x: expected dtype"):
        quantize_fp8_blocks(torch.randint(0, 5, (4, 128)))


# ----------------------------------------------------------------------------- Hadamard


def sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("d", [1, 2, 8, 128])
def test_hadamard_matches_matrix(d):
    x = torch.randn(5, 3, d, dtype=torch.float64)
    want = x @ sylvester(d) * d**-0.5
    assert torch.allclose(hadamard_transform(x), want, atol=1e-12)
    assert torch.allclose(hadamard_transform(x, scale=1.0), x @ sylvester(d), atol=1e-10)


def test_hadamard_preserves_dot_products_and_dtype():
    q, k = torch.randn(16, 128), torch.randn(16, 128)
    hq, hk = hadamard_transform(q), hadamard_transform(k)
    assert torch.allclose((hq * hk).sum(-1), (q * k).sum(-1), atol=1e-4)
    assert hadamard_transform(q.bfloat16()).dtype == torch.bfloat16


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.randn(2, 96))


# ----------------------------------------------------------------------------- RoPE


def rope_complex(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Independent float64 rotation via complex numbers; x [T, H, R], angles [T, R/2]."""
    half = angles.shape[-1]
    x = x.double()
    re, im = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    z = torch.complex(re, im)
    z = z * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    if interleaved:
        return torch.stack([z.real, z.imag], -1).flatten(-2)
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_complex_rotation_on_first_dims(interleaved):
    T, H = 9, 3
    pos = torch.tensor([0, 1, 2, 7, 100, 4095, 4096, 50000, 163839])
    cos, sin = rope_cos_sin(pos, 64, 10000.0, factor=40.0, original_max_position=4096)
    x = torch.randn(T, H, 128)
    y = apply_rope(x, cos, sin, interleaved=interleaved)
    inv = yarn_inv_freq(64, 10000.0, factor=40.0, original_max_position=4096).double()
    want = rope_complex(x[..., :64], pos.double()[:, None] * inv[None], interleaved)
    assert torch.allclose(y[..., :64].double(), want, atol=1e-4)
    assert torch.equal(y[..., 64:], x[..., 64:])  # the nope half passes through untouched
    assert torch.equal(y[0], x[0])  # position 0 is the identity


def test_yarn_frequencies():
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert torch.allclose(yarn_inv_freq(64, 10000.0).double(), plain, rtol=1e-6)
    yarn = yarn_inv_freq(64, 10000.0, factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1).double()
    # high-frequency pairs (many turns inside 4096 tokens) are kept, the slowest are interpolated by 1/40
    assert yarn[0] == pytest.approx(1.0)
    assert yarn[-1] == pytest.approx(plain[-1].item() / 40.0, rel=1e-5)
    low = math.floor(64 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000.0)))
    assert torch.allclose(yarn[: low + 1], plain[: low + 1], rtol=1e-6)
    assert (yarn <= plain * (1 + 1e-6)).all() and (yarn >= plain / 40.0 * (1 - 1e-6)).all()


def test_rope_rejects_bad_input():
    cos, sin = rope_cos_sin(torch.arange(4), 64)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(torch.randn(5, 2, 128), cos, sin, interleaved=False)
    with pytest.raises(ValueError, match="rotary_dim"):
        yarn_inv_freq(63)


# ----------------------------------------------------------------------------- fp8 MQA logits (ragged)


def logits_f64(q8, k8, k_scale, weights, ks, ke):
    q, k = q8.double(), k8.double() * k_scale.double()[:, None]
    s = torch.relu(torch.einsum("thd,nd->thn", q, k))
    out = torch.einsum("thn,th->tn", s, weights.double())
    cols = torch.arange(k.shape[0])
    inside = (cols[None] >= ks[:, None].long()) & (cols[None] < ke[:, None].long())
    return out.masked_fill(~inside, NEG_INF)


@pytest.mark.parametrize("H", [1, 3, 16, 128])
def test_fp8_mqa_logits_vs_float64(H):
    T, N, D = 11, 77, 128
    q8, _ = quantize_fp8_blocks(torch.randn(T, H, D))
    k8, ksc = quantize_fp8_blocks(torch.randn(N, D))
    w = torch.randn(T, H)
    ks = torch.randint(0, N, (T,), dtype=torch.int32)
    ke = torch.minimum(ks + torch.randint(0, 40, (T,), dtype=torch.int32), torch.tensor(N, dtype=torch.int32))
    ks[0], ke[0] = 5, 5  # an empty row
    ks[1], ke[1] = 0, N  # a full row
    got = ops.fp8_mqa_logits(q8, (k8, ksc[:, 0]), w, ks, ke, backend="reference")
    want = logits_f64(q8, k8, ksc[:, 0], w, ks, ke)
    assert_same_inf(got, want)
    fin = torch.isfinite(want)
    assert rel_err(got[fin], want[fin]) < 1e-3


# ----------------------------------------------------------------------------- index-K cache + paged logits


def test_index_cache_byte_layout_hand_case():
    cache = new_index_k_cache(2)
    k = torch.zeros(1, 128)
    k[0, 5] = 3.0
    k8, s = quantize_fp8_blocks(k)
    store_index_k(cache, torch.tensor([64 + 37]), k8, s[:, 0])  # page 1, offset 37
    page = cache[1]
    assert page[37 * 128 + 5].item() == k8.view(torch.uint8)[0, 5].item()
    assert page[8192 + 4 * 37 : 8192 + 4 * 38].view(torch.float32).item() == s[0, 0].item()
    assert cache[0].count_nonzero() == 0 and page[: 37 * 128].count_nonzero() == 0
    g, gs = gather_index_k(cache, torch.tensor([101, 0], dtype=torch.int32))
    assert torch.equal(g[0].view(torch.uint8), k8[0].view(torch.uint8)) and gs[0] == s[0, 0] and gs[1] == 0


def test_index_cache_rejects_bad_slots():
    cache = new_index_k_cache(2)
    k8, s = quantize_fp8_blocks(torch.randn(1, 128))
    with pytest.raises(ValueError, match="slots: slot 128"):
        store_index_k(cache, torch.tensor([128]), k8, s[:, 0])
    with pytest.raises(ValueError, match="index_k_cache"):
        gather_index_k(torch.zeros(2, 100, dtype=torch.uint8), torch.tensor([0]))


def build_paged_index(seq_lens: list[int], num_pages: int, seed: int = 0):
    """Random keys for each request, pages scattered over the cache; returns cache, page_table, keys."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(1, max(-(-s // 64) for s in seq_lens))
    perm = torch.randperm(num_pages, generator=g)
    page_table = torch.full((len(seq_lens), max_pages + 1), -7, dtype=torch.int32)  # junk past the used pages
    used = 0
    keys = []
    cache = new_index_k_cache(num_pages)
    for b, s in enumerate(seq_lens):
        n = -(-s // 64)
        page_table[b, :n] = perm[used : used + n].int()
        used += n
        k8, ksc = quantize_fp8_blocks(torch.randn(s, 128, generator=g))
        slots = slots_from_page_table(page_table, torch.arange(s), torch.full((s,), b))
        store_index_k(cache, slots, k8, ksc[:, 0])
        keys.append((k8, ksc[:, 0]))
    return cache, page_table, keys


@pytest.mark.parametrize("H", [1, 3, 16, 128])
def test_fp8_paged_mqa_logits_vs_float64(H):
    seq_lens = [0, 1, 63, 64, 65, 200]
    cache, page_table, keys = build_paged_index(seq_lens, num_pages=12, seed=H)
    B, L = len(seq_lens), 256
    q8, _ = quantize_fp8_blocks(torch.randn(B, H, 128))
    w = torch.randn(B, H)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    got = ops.fp8_paged_mqa_logits(q8, cache, w, sl, page_table, L, backend="reference")
    assert got.shape == (B, L) and got.dtype == torch.float32
    want = torch.full((B, L), NEG_INF, dtype=torch.float64)
    for b, (k8, ksc) in enumerate(keys):
        n = seq_lens[b]
        want[b, :n] = logits_f64(q8[b : b + 1], k8, ksc, w[b : b + 1], torch.tensor([0]), torch.tensor([n]))[0]
    assert_same_inf(got, want)
    fin = torch.isfinite(want)
    assert rel_err(got[fin], want[fin]) < 1e-3


def test_fp8_paged_mqa_logits_rejects_bad_input():
    cache, page_table, _ = build_paged_index([10, 70], num_pages=3)
    q8, _ = quantize_fp8_blocks(torch.randn(2, 4, 128))
    w, sl = torch.randn(2, 4), torch.tensor([10, 70], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seq_len"):
        ops.fp8_paged_mqa_logits(q8, cache, w, sl, page_table, 64 * page_table.shape[1] + 1, backend="reference")
    with pytest.raises(ValueError, match="seq_lens"):
        ops.fp8_paged_mqa_logits(q8, cache, w, sl, page_table, 64, backend="reference")
    bad = page_table.clone()
    bad[1, 1] = 3  # a used page outside the 3-page cache
    with pytest.raises(ValueError, match="page_table"):
        ops.fp8_paged_mqa_logits(q8, cache, w, sl, bad, 128, backend="reference")
    with pytest.raises(ValueError, match="weights"):
        ops.fp8_paged_mqa_logits(q8, cache, w.double(), sl, page_table, 128, backend="reference")
    with pytest.raises(ValueError, match="q: expected head dim 128"):
        ops.fp8_paged_mqa_logits(q8[..., :64], cache, w, sl, page_table, 128, backend="reference")
    with pytest.raises(ValueError, match="index_k_cache"):
        ops.fp8_paged_mqa_logits(q8, cache[:, :100], w, sl, page_table, 128, backend="reference")
    assert cache.shape[1] == INDEX_PAGE_BYTES


# ----------------------------------------------------------------------------- sparse MLA


def kv_rows_f64(kv: torch.Tensor) -> torch.Tensor:
    """Independent decoding of a [N, 1, 576] bf16 or [N, 1, 656] fp8-format cache to float64 [N, 576]."""
    if kv.shape[-1] == 576:
        return kv[:, 0].double()
    b = kv[:, 0].view(torch.uint8)
    nope = b[:, :512].contiguous().view(torch.float8_e4m3fn).double().view(-1, 4, 128)
    scale = b[:, 512:528].contiguous().view(torch.float32).double()
    rope = b[:, 528:].contiguous().view(torch.bfloat16).double()
    return torch.cat([(nope * scale[..., None]).view(-1, 512), rope], -1)


def sparse_f64(q, kv, indices, sm_scale, d_v=512):
    rows = kv_rows_f64(kv)
    N = rows.shape[0]
    T, H, _ = q.shape
    out = torch.zeros(T, H, d_v, dtype=torch.float64)
    lse = torch.full((T, H), NEG_INF, dtype=torch.float64)
    for t in range(T):
        ids = [i for i in indices[t, 0].tolist() if 0 <= i < N]
        if not ids:
            continue
        k = rows[ids]
        s = q[t].double() @ k.T * sm_scale
        m = s.max(-1, keepdim=True).values
        p = torch.exp(s - m)
        out[t] = (p / p.sum(-1, keepdim=True)) @ k[:, :d_v]
        lse[t] = (m + p.sum(-1, keepdim=True).log())[:, 0]
    return out, lse


def random_indices(T, K, N, g):
    idx = torch.randint(0, N, (T, 1, K), dtype=torch.int32, generator=g)
    drop = torch.rand(T, 1, K, generator=g) < 0.3
    idx[drop] = -1
    idx[0] = -1  # a row with no valid index
    if T > 2:
        idx[1, 0, ::2] = N + 5  # out of range counts as "no token"
    return idx


@pytest.mark.parametrize("H", [1, 3, 16, 128])
@pytest.mark.parametrize("K", [1, 100, 300])
@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_mla_fwd_vs_float64(H, K, fp8):
    g = torch.Generator().manual_seed(H * 1000 + K + fp8)
    T, N = 5, 257
    q = torch.randn(T, H, 576, generator=g).bfloat16()
    kv = torch.randn(N, 1, 576, generator=g).bfloat16()
    if fp8:
        kv = pack_fp8_kv(kv)
    idx = random_indices(T, K, N, g)
    sm = 576**-0.5
    out, max_logits, lse = ops.sparse_mla_fwd(q, kv, idx, sm, backend="reference")
    want_out, want_lse = sparse_f64(q, kv, idx, sm)
    assert out.shape == (T, H, 512) and out.dtype == torch.bfloat16
    assert rel_err(out, want_out) < 1e-2
    assert_same_inf(lse, want_lse)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the empty row
    fin = torch.isfinite(want_lse)
    assert torch.allclose(lse[fin].double(), want_lse[fin], atol=1e-3, rtol=1e-4)
    assert (max_logits[fin] <= lse[fin] + 1e-5).all()


def paged_latent(num_pages, fp8, g):
    kv = torch.randn(num_pages, 64, 1, 576, generator=g).bfloat16()
    return pack_fp8_kv(kv) if fp8 else kv


@pytest.mark.parametrize("H", [1, 16, 128])
@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_mla_decode_vs_float64_with_plan(H, fp8):
    g = torch.Generator().manual_seed(7 + H + fp8)
    B, K, pages = 4, 200, 5
    cache = paged_latent(pages, fp8, g)
    q = torch.randn(B, H, 576, generator=g).bfloat16()
    idx = random_indices(B, K, pages * 64, g)
    plan = ops.plan_sparse_mla_decode(B, H, K, kv_dtype=cache.dtype, device="cpu", backend="reference")
    assert isinstance(plan, DecodePlan) and plan.tier == "reference" and plan.data is None
    out, lse = ops.sparse_mla_decode(q, cache, idx, 0.05, plan=plan)
    want_out, want_lse = sparse_f64(q, cache.reshape(-1, 1, cache.shape[-1]), idx, 0.05)
    assert rel_err(out, want_out) < 1e-2
    assert_same_inf(lse, want_lse)
    # without a plan, forced reference: identical
    out2, lse2 = ops.sparse_mla_decode(q, cache, idx, 0.05, backend="reference")
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_decode_plan_mismatch_and_foreign_tier():
    g = torch.Generator().manual_seed(1)
    cache = paged_latent(2, False, g)
    q = torch.randn(3, 16, 576).bfloat16()
    idx = torch.zeros(3, 1, 64, dtype=torch.int32)
    plan = ops.plan_sparse_mla_decode(3, 16, 128, kv_dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="topk 128"):
        ops.sparse_mla_decode(q, cache, idx, 0.1, plan=plan)
    plan_fp8 = ops.plan_sparse_mla_decode(3, 16, 64, kv_dtype="fp8_e4m3", device="cpu")
    with pytest.raises(ValueError, match="fp8_e4m3 cache"):
        ops.sparse_mla_decode(q, cache, idx, 0.1, plan=plan_fp8)
    foreign = DecodePlan("flashmla", 3, 16, 64, "bfloat16", torch.device("cpu"))
    with pytest.raises(ValueError, match="conflicts with the plan"):
        ops.sparse_mla_decode(q, cache, idx, 0.1, plan=foreign, backend="reference")
    # a plan runs the tier that built it: "auto" routes to flashmla, which is not importable on CPU CI
    with pytest.raises(BackendUnavailableError):
        ops.sparse_mla_decode(q, cache, idx, 0.1, plan=foreign)
    with pytest.raises(ValueError, match="plan: built by tier 'flashmla'"):
        reference.sparse_mla_decode(q, cache, idx, 0.1, plan=foreign)
    with pytest.raises(ValueError, match="kv_dtype"):
        ops.plan_sparse_mla_decode(3, 16, 64, kv_dtype="int8", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        ops.plan_sparse_mla_decode(0, 16, 64, kv_dtype="bfloat16", device="cpu")


def test_sparse_mla_decode_rejects_bad_cache():
    q = torch.randn(2, 4, 576).bfloat16()
    idx = torch.zeros(2, 1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache: expected \\[num_pages, 64, 1"):
        ops.sparse_mla_decode(q, torch.zeros(3, 32, 1, 576, dtype=torch.bfloat16), idx, 0.1, backend="reference")
    with pytest.raises(ValueError, match="kv_cache"):
        ops.sparse_mla_decode(q, torch.zeros(3, 64, 1, 576), idx, 0.1, backend="reference")
    with pytest.raises(ValueError, match="q: expected dtype bfloat16"):
        ops.sparse_mla_decode(q.float(), torch.zeros(3, 64, 1, 576, dtype=torch.bfloat16), idx, 0.1,
                              backend="reference")


def test_new_ops_are_registered_in_the_reference_tier():
    for op in ("fp8_paged_mqa_logits", "sparse_mla_decode", "plan_sparse_mla_decode",
               "topk_transform_ragged", "topk_transform_paged"):
        assert op in reference_tier.TIER.ops
        assert ops.explain(op)["reference"] == "ok"


def test_auto_decode_plan_moves_to_a_tier_that_runs_the_inputs(monkeypatch, caplog):
    """An auto plan is made before the cache is seen; when its tier declines the call's inputs (FlashMLA's fp8
    decode and a strided cache), the call runs on the next tier auto would pick, logged once. A forced plan
    raises instead. Driven on CPU by a stand-in "flashmla" tier (reference arithmetic, declines strided caches)."""
    import dataclasses
    import logging

    from nsa_tp.ops import reference as ref
    from nsa_tp.ops import registry

    def plan_fn(*a, **k):
        return dataclasses.replace(ref.plan_sparse_mla_decode(*a, **k), tier="flashmla")

    def decode_fn(q, cache, idx, scale, d_v=512, *, plan):
        return ref.sparse_mla_decode(q, cache, idx, scale, d_v, plan=dataclasses.replace(plan, tier="reference"))

    def decode_supports(q, cache, idx, scale=None, d_v=512, *, plan=None):
        if getattr(plan, "tier", None) != "flashmla":
            return "plan: not a flashmla plan"
        return None if cache.is_contiguous() else "kv_cache: needs a contiguous cache"

    base = registry.get_tier("reference").ops
    fake = registry.Tier("flashmla", lambda: None, {
        "plan_sparse_mla_decode": registry.OpImpl(plan_fn, base["plan_sparse_mla_decode"].supports),
        "sparse_mla_decode": registry.OpImpl(decode_fn, decode_supports)})
    real_load = registry._load
    monkeypatch.setattr(registry, "_load", lambda name: fake if name == "flashmla" else real_load(name))

    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 64, 1, 640, generator=gen).to(torch.bfloat16)
    strided, dense = wide[..., :576], wide[..., :576].contiguous()
    q = torch.randn(2, 16, 576, generator=gen).to(torch.bfloat16)
    idx = torch.randint(-1, 256, (2, 1, 32), generator=gen, dtype=torch.int32)
    want = ref.sparse_mla_decode(q, dense, idx, 576**-0.5)
    plan = ops.plan_sparse_mla_decode(2, 16, 32, kv_dtype="bfloat16", device="cpu")
    assert plan.tier == "flashmla" and plan.by_auto
    with registry.record_tiers() as calls:
        got_dense = ops.sparse_mla_decode(q, dense, idx, 576**-0.5, plan=plan)
    assert [t for _, t in calls] == ["flashmla"]
    with caplog.at_level(logging.WARNING, logger="nsa_tp.ops"), registry.record_tiers() as calls:
        got_strided = ops.sparse_mla_decode(q, strided, idx, 576**-0.5, plan=plan)
        ops.sparse_mla_decode(q, strided, idx, 576**-0.5, plan=plan)
    assert [t for _, t in calls if _ == "sparse_mla_decode"] == ["reference", "reference"]
    moved = [r.getMessage() for r in caplog.records if "declines these inputs" in r.getMessage()]
    assert len(moved) == 1 and "flashmla" in moved[0] and "contiguous" in moved[0] and "runs reference" in moved[0]
    for got in (got_dense, got_strided):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    forced = ops.plan_sparse_mla_decode(2, 16, 32, kv_dtype="bfloat16", device="cpu", backend="flashmla")
    assert not forced.by_auto
    with pytest.raises(ops.BackendUnavailableError, match="contiguous"):
        ops.sparse_mla_decode(q, strided, idx, 576**-0.5, plan=forced)
