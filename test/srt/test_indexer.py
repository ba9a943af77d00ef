"""The lightning indexer: projections vs float64, prefill with cached prefixes and decode vs brute force,
chunked == unchunked (hypothesis), the token-parallel row hook, DP padding rows, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_tp.attention.indexer import (
    Indexer,
    IndexerWeights,
    build_decode_index_batch,
    build_prefill_index_batch,
)
from nsa_tp.ops.index_cache import gather_index_k, new_index_k_cache, store_index_k
from nsa_tp.ops.rope import rope_cos_sin, yarn_inv_freq

HIDDEN, QLORA = 64, 32
BIG = 1 << 40  # a budget that never chunks


def make_weights(H: int, seed: int) -> IndexerWeights:
    g = torch.Generator().manual_seed(seed)
    return IndexerWeights(
        wq_b=torch.randn(H * 128, QLORA, generator=g) * QLORA**-0.5,
        wk=torch.randn(128, HIDDEN, generator=g) * HIDDEN**-0.5,
        k_norm_weight=1 + 0.1 * torch.randn(128, generator=g),
        k_norm_bias=0.1 * torch.randn(128, generator=g),
        weights_proj=torch.randn(H, HIDDEN, generator=g) * HIDDEN**-0.5,
    )


def cos_sin(positions):
    return rope_cos_sin(torch.as_tensor(positions, dtype=torch.int64), 64, 10000.0, factor=40.0,
                        original_max_position=4096)


class Scenario:
    """Requests with cached prefixes: prefix keys already in the index-K cache, pages scattered."""

    def __init__(self, prefix_lens, extend_lens, *, H=4, topk=16, num_pages=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prefix, self.extend = list(prefix_lens), list(extend_lens)
        self.seq = [p + e for p, e in zip(self.prefix, self.extend, strict=True)]
        need = [-(-s // 64) for s in self.seq]
        self.num_pages = num_pages or sum(need) + 2
        perm = torch.randperm(self.num_pages, generator=g).tolist()
        self.page_table = torch.full((len(self.seq), max(need) + 1), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(need):
            self.page_table[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
            used += n
        self.cache = new_index_k_cache(self.num_pages)
        self.indexer = Indexer(make_weights(H, seed), topk=topk, backend="reference")
        # every token's hidden state and q_lora (prefix ones only feed the cache)
        self.x = [torch.randn(s, HIDDEN, generator=g) for s in self.seq]
        self.q_lora = [torch.randn(s, QLORA, generator=g) for s in self.seq]
        for b, p in enumerate(self.prefix):
            if p:
                cos, sin = cos_sin(range(p))
                k8, ks = self.indexer.project_k(self.x[b][:p], cos, sin)
                store_index_k(self.cache, self.slots(b, 0, p), k8, ks)

    def slots(self, b, start, end):
        pos = torch.arange(start, end)
        return self.page_table[b, pos // 64].long() * 64 + pos % 64

    def new_rows(self, pad=0):
        """x, q_lora, cos, sin of the batch's new tokens in request order, plus `pad` DP-padding rows."""
        xs = [self.x[b][p:] for b, p in enumerate(self.prefix)]
        qs = [self.q_lora[b][p:] for b, p in enumerate(self.prefix)]
        pos = [torch.arange(p, s) for p, s in zip(self.prefix, self.seq, strict=True)]
        x, q, pos = torch.cat(xs), torch.cat(qs), torch.cat(pos)
        x = torch.cat([x, torch.full((pad, HIDDEN), float("nan"))])  # padding rows must never be read
        q = torch.cat([q, torch.full((pad, QLORA), float("nan"))])
        cos, sin = cos_sin(torch.cat([pos, torch.zeros(pad, dtype=torch.int64)]))
        return x, q, cos, sin

    def brute_force_rows(self):
        """Per new token: (float64 logits over its causal keys, their slots), from the stored cache."""
        x, q, cos, sin = self.new_rows()
        q8, w = self.indexer.project_q(q, x, cos, sin)
        rows, t = [], 0
        for b, (p, s) in enumerate(zip(self.prefix, self.seq, strict=True)):
            slots = self.slots(b, 0, s)
            k8, ksc = gather_index_k(self.cache, slots)
            k = k8.double() * ksc.double()[:, None]
            for i in range(s - p):
                n = p + i + 1
                logit = (torch.relu(q8[t].double() @ k[:n].T) * w[t].double()[:, None]).sum(0)
                rows.append((logit, slots[:n]))
                t += 1
        return rows


def assert_topk_row(got_row, logits, slots, topk):
    """got_row holds the top-min(topk, len) slots by logit (ties aside: compare selected values)."""
    valid = got_row[got_row >= 0].long()
    k = min(topk, logits.shape[0])
    assert valid.shape[0] == k and (got_row[k:] == -1).all()
    assert len(set(valid.tolist())) == k, "duplicate ids"
    by_slot = dict(zip(slots.tolist(), logits.tolist(), strict=True))
    got_vals = sorted((by_slot[s] for s in valid.tolist()), reverse=True)
    want_vals = sorted(logits.tolist(), reverse=True)[:k]
    assert torch.allclose(torch.tensor(got_vals), torch.tensor(want_vals), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- projections


def test_projections_vs_float64():
    H = 4
    ix = Indexer(make_weights(H, 3), topk=8, pow2_scale=True)
    T = 6
    g = torch.Generator().manual_seed(5)
    x, ql = torch.randn(T, HIDDEN, generator=g), torch.randn(T, QLORA, generator=g)
    pos = torch.tensor([0, 1, 5, 900, 5000, 100000])
    cos, sin = cos_sin(pos)
    w = make_weights(H, 3)
    inv = yarn_inv_freq(64, 10000.0, factor=40.0, original_max_position=4096).double()
    rot = torch.polar(torch.ones(T, 32, dtype=torch.float64), pos.double()[:, None] * inv)
    had = torch.ones(1, 1, dtype=torch.float64)
    while had.shape[0] < 128:
        had = torch.cat([torch.cat([had, had], 1), torch.cat([had, -had], 1)], 0)
    had = had / 128**0.5

    def rope_neox(v):  # v [T, ..., 128]: NeoX rotation of the first 64 dims
        z = torch.complex(v[..., :32], v[..., 32:64]) * rot.view(T, *([1] * (v.dim() - 2)), 32)
        return torch.cat([z.real, z.imag, v[..., 64:]], -1)

    q_ref = rope_neox((ql.double() @ w.wq_b.double().T).view(T, H, 128)) @ had
    k_lin = x.double() @ w.wk.double().T
    k_ln = (k_lin - k_lin.mean(-1, keepdim=True)) / torch.sqrt(k_lin.var(-1, unbiased=False, keepdim=True) + 1e-6)
    k_ref = rope_neox(k_ln * w.k_norm_weight.double() + w.k_norm_bias.double()) @ had

    q8, weights = ix.project_q(ql, x, cos, sin)
    k8, k_scale = ix.project_k(x, cos, sin)
    # weights = proj(x) * H^-0.5 * 128^-0.5 * q_scale with q_scale a power of two covering the head's absmax
    base = (x.double() @ w.weights_proj.double().T) * H**-0.5 * 128**-0.5
    q_scale = weights.double() / base
    assert torch.allclose(torch.exp2(torch.log2(q_scale).round()), q_scale, rtol=1e-5)
    amax = q_ref.abs().amax(-1) / 448
    assert ((q_scale >= amax * (1 - 1e-5)) & (q_scale <= 2 * amax * (1 + 1e-5))).all()
    deq_q = q8.double() * q_scale[..., None]
    assert (deq_q - q_ref).norm() / q_ref.norm() < 0.06
    deq_k = k8.double() * k_scale.double()[:, None]
    assert (deq_k - k_ref).norm() / k_ref.norm() < 0.06


# ----------------------------------------------------------------------------- prefill / decode


@pytest.mark.parametrize("budget", [BIG, 2000])
def test_prefill_with_cached_prefixes_vs_brute_force(budget):
    sc = Scenario(prefix_lens=[0, 70, 10], extend_lens=[5, 3, 40], topk=16)
    batch = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=budget, device="cpu",
                                      num_pages=sc.num_pages)
    if budget != BIG:
        assert len(batch.chunks) > 1
    x, q, cos, sin = sc.new_rows(pad=3)  # DP padding rows (NaN) are never touched
    out = sc.indexer.forward(x, q, cos, sin, sc.cache, batch)
    assert out.shape == (sum(sc.extend), 16) and out.dtype == torch.int32
    rows = sc.brute_force_rows()
    for t, (logits, slots) in enumerate(rows):
        assert_topk_row(out[t], logits, slots, 16)
    # the new keys were stored at the batch's slots
    k8, _ = gather_index_k(sc.cache, batch.store_slots)
    k_new, _ = sc.indexer.project_k(x[: len(batch.store_slots)], cos[: len(batch.store_slots)],
                                    sin[: len(batch.store_slots)])
    assert torch.equal(k8.view(torch.uint8), k_new.view(torch.uint8))


def test_prefill_ragged_index_space():
    sc = Scenario(prefix_lens=[3, 0], extend_lens=[2, 4], topk=4)
    batch = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu")
    x, q, cos, sin = sc.new_rows()
    slots = sc.indexer.forward(x, q, cos, sin, sc.cache, batch)
    q8, w = sc.indexer.project_q(q, x, cos, sin)
    ragged = sc.indexer.topk_prefill(q8, w, sc.cache, batch, index_space="ragged")
    # ragged ids of request 1 start at request 0's 5 keys; mapping them through key_slots gives the slots
    assert ragged[2:].max() >= 5 and (ragged[2:][ragged[2:] >= 0] >= 5).all()
    assert torch.equal(torch.where(ragged >= 0, batch.key_slots[ragged.clamp_min(0)].int(), ragged), slots)
    assert (ragged[2, 1:] == -1).all()  # the first new token of a fresh request sees only itself


batches = st.lists(st.tuples(st.integers(0, 70), st.integers(1, 12)), min_size=1, max_size=4)


@settings(max_examples=12, deadline=None)
@given(batches, st.integers(600, 6000), st.integers(0, 2**16))
def test_chunked_equals_unchunked(reqs, budget, seed):
    sc = Scenario([p for p, _ in reqs], [e for _, e in reqs], H=2, topk=8, seed=seed)
    x, q, cos, sin = sc.new_rows()
    full = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu")
    widest = max(sc.seq) * 4
    if widest > budget:
        with pytest.raises(ValueError, match="alone needs"):
            build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=budget, device="cpu")
        return
    chunked = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=budget, device="cpu")
    for c in chunked.chunks:
        assert (c.rows.stop - c.rows.start) * (c.hi - c.lo) * 4 <= budget
    a = sc.indexer.forward(x, q, cos, sin, sc.cache, full)
    b = sc.indexer.forward(x, q, cos, sin, sc.cache, chunked)
    for t, (logits, slots) in enumerate(sc.brute_force_rows()):
        assert_topk_row(a[t], logits, slots, 8)
        assert_topk_row(b[t], logits, slots, 8)


def test_token_parallel_rows_hook():
    sc = Scenario(prefix_lens=[20, 0], extend_lens=[6, 9], topk=8)
    x, q, cos, sin = sc.new_rows()
    full = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu")
    part = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu",
                                     q_rows=slice(4, 11))
    a = sc.indexer.forward(x, q, cos, sin, sc.cache, full)
    b = sc.indexer.forward(x, q, cos, sin, sc.cache, part)
    assert b.shape == (7, 8) and torch.equal(a[4:11], b)
    assert part.store_slots.shape[0] == 15  # every rank still stores all new keys


@pytest.mark.parametrize("budget", [BIG, 700])
def test_decode_vs_brute_force(budget):
    # decode step: each request's last token is new, the rest cached
    sc = Scenario(prefix_lens=[0, 64, 130, 9], extend_lens=[1, 1, 1, 1], topk=32)
    batch = build_decode_index_batch(sc.seq, sc.page_table, budget_bytes=budget, device="cpu",
                                     num_pages=sc.num_pages)
    if budget != BIG:
        assert len(batch.chunks) > 1
    x, q, cos, sin = sc.new_rows(pad=2)
    out = sc.indexer.forward(x, q, cos, sin, sc.cache, batch)
    assert out.shape == (4, 32)
    for t, (logits, slots) in enumerate(sc.brute_force_rows()):
        assert_topk_row(out[t], logits, slots, 32)


def test_bad_input():
    sc = Scenario(prefix_lens=[2], extend_lens=[3])
    bad = sc.page_table.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="page_table: request 0 uses a page"):
        build_prefill_index_batch(sc.seq, sc.prefix, bad, budget_bytes=BIG, device="cpu")
    with pytest.raises(ValueError, match="prefix_lens: request 0"):
        build_prefill_index_batch([2], [3], sc.page_table, budget_bytes=BIG, device="cpu")
    with pytest.raises(ValueError, match="q_rows"):
        build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu",
                                  q_rows=slice(0, 9))
    with pytest.raises(ValueError, match="seq_lens: every decoding request"):
        build_decode_index_batch([0], sc.page_table, budget_bytes=BIG, device="cpu")
    with pytest.raises(ValueError, match="alone needs"):
        build_decode_index_batch([65], torch.tensor([[0, 1]], dtype=torch.int32), budget_bytes=100, device="cpu")
    batch = build_prefill_index_batch(sc.seq, sc.prefix, sc.page_table, budget_bytes=BIG, device="cpu")
    x, q, cos, sin = sc.new_rows()
    with pytest.raises(ValueError, match="x: expected"):
        sc.indexer.forward(x[:, :10], q, cos, sin, sc.cache, batch)
    with pytest.raises(ValueError, match="q_lora"):
        sc.indexer.forward(x, q[:, :5], cos, sin, sc.cache, batch)
    with pytest.raises(ValueError, match="index_k_cache"):
        sc.indexer.forward(x, q, cos, sin, sc.cache[:, :64], batch)
    with pytest.raises(ValueError, match="wq_b"):
        w = make_weights(4, 0)
        IndexerWeights(w.wq_b[:100], w.wk, w.k_norm_weight, w.k_norm_bias, w.weights_proj)
    with pytest.raises(ValueError, match="topk"):
        Indexer(make_weights(4, 0), topk=0)
