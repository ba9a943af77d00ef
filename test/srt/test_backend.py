"""The NSA backend end to end on CPU: prefill with cached prefixes, decode, DP-padded batches, bf16 and fp8
latent caches, chunked indexer logits, and no device query / budget read on the per-layer path."""

from __future__ import annotations

import pytest
import torch

from nsa_tp.attention import chunking
from nsa_tp.attention.backend import NSABackend
from nsa_tp.attention.indexer import Indexer, IndexerWeights
from nsa_tp.attention.metadata import ForwardMetadataBuilder
from nsa_tp.ops.index_cache import gather_index_k, new_index_k_cache, store_index_k
from nsa_tp.ops.kv_format import pack_fp8_kv
from nsa_tp.ops.rope import rope_cos_sin

HIDDEN, QLORA, H_IDX = 64, 32, 4
SM_SCALE = 576**-0.5


def cos_sin(pos):
    return rope_cos_sin(torch.as_tensor(pos, dtype=torch.int64), 64, 10000.0, factor=40.0,
                        original_max_position=4096)


class Layer:
    """One layer's state: scattered pages, latent + index-K caches, per-token inputs."""

    def __init__(self, prefix, extend, *, heads=3, topk=48, fp8=False, num_pages=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.g, self.heads, self.topk, self.fp8 = g, heads, topk, fp8
        self.seq = [p + e for p, e in zip(prefix, extend, strict=True)]
        self.num_pages = num_pages
        perm = torch.randperm(num_pages, generator=g).tolist()
        width = max(-(-(s + 4) // 64) for s in self.seq)  # room for decode steps
        self.page_table = torch.full((len(self.seq), width), -1, dtype=torch.int32)
        used = 0
        for b in range(len(self.seq)):
            self.page_table[b] = torch.tensor(perm[used : used + width], dtype=torch.int32)
            used += width
        assert used <= num_pages
        w = IndexerWeights(
            wq_b=torch.randn(H_IDX * 128, QLORA, generator=g) * QLORA**-0.5,
            wk=torch.randn(128, HIDDEN, generator=g) * HIDDEN**-0.5,
            k_norm_weight=torch.ones(128), k_norm_bias=torch.zeros(128),
            weights_proj=torch.randn(H_IDX, HIDDEN, generator=g) * HIDDEN**-0.5,
        )
        self.indexer = Indexer(w, topk=topk, backend="reference")
        self.index_k = new_index_k_cache(num_pages)
        shape = (num_pages, 64, 1, 656 if fp8 else 576)
        self.latent = torch.zeros(shape, dtype=torch.uint8 if fp8 else torch.bfloat16)
        self.x, self.q_lora = {}, {}
        for b, p in enumerate(prefix):  # the cached prefix: latent rows and index keys already stored
            self.add_tokens(b, 0, p, store_index=True)

    def slots(self, b, start, end):
        pos = torch.arange(start, end)
        return self.page_table[b, pos // 64].long() * 64 + pos % 64

    def add_tokens(self, b, start, end, *, store_index=False):
        """New tokens [start, end) of request b: hidden inputs, and their latent rows written to the cache
        (the caller's job before the backend runs)."""
        n = end - start
        x, ql = torch.randn(n, HIDDEN, generator=self.g), torch.randn(n, QLORA, generator=self.g)
        self.x.setdefault(b, []).append(x)
        self.q_lora.setdefault(b, []).append(ql)
        rows = torch.randn(n, 576, generator=self.g).bfloat16()
        flat = self.latent.view(-1, self.latent.shape[-1])
        flat[self.slots(b, start, end)] = pack_fp8_kv(rows) if self.fp8 else rows
        if store_index and n:
            cos, sin = cos_sin(range(start, end))
            k8, ks = self.indexer.project_k(x, cos, sin)
            store_index_k(self.index_k, self.slots(b, start, end), k8, ks)
        return x, ql

    def latent_f64(self):
        flat = self.latent.view(-1, self.latent.shape[-1])
        if not self.fp8:
            return flat.double()
        b = flat.view(torch.uint8)
        nope = b[:, :512].contiguous().view(torch.float8_e4m3fn).double().view(-1, 4, 128)
        scale = b[:, 512:528].contiguous().view(torch.float32).double()
        rope = b[:, 528:].contiguous().view(torch.bfloat16).double()
        return torch.cat([(nope * scale[..., None]).view(-1, 512), rope], -1)


def batch_inputs(layer, news, pad):
    """news: [(b, start, end)] new tokens in request order; returns padded x, q_lora, cos, sin, q_latent."""
    xs, qs, pos = [], [], []
    for b, s, e in news:
        x, ql = layer.add_tokens(b, s, e)
        xs.append(x)
        qs.append(ql)
        pos.append(torch.arange(s, e))
    x, ql, pos = torch.cat(xs), torch.cat(qs), torch.cat(pos)
    T = x.shape[0]
    x = torch.cat([x, torch.full((pad, HIDDEN), float("nan"))])  # DP padding: never read by the indexer
    ql = torch.cat([ql, torch.full((pad, QLORA), float("nan"))])
    cos, sin = cos_sin(torch.cat([pos, torch.zeros(pad, dtype=torch.int64)]))
    q = torch.randn(T + pad, layer.heads, 576, generator=layer.g).bfloat16()
    q[T:] = 0
    return x, ql, cos, sin, q, pos


def expected(layer, news, x, ql, cos, sin, q, pos):
    """Independent float64: brute-force causal top-k (ties to the lower position) + sparse attention."""
    T = pos.shape[0]
    q8, w = layer.indexer.project_q(ql[:T], x[:T], cos[:T], sin[:T])
    kv = layer.latent_f64()
    out = torch.zeros(q.shape[0], layer.heads, 512, dtype=torch.float64)
    t = 0
    for b, s, e in news:
        for i in range(e - s):
            n = s + i + 1
            slots = layer.slots(b, 0, n)
            k8, ksc = gather_index_k(layer.index_k, slots)
            keys = k8.double() * ksc.double()[:, None]
            logit = (torch.relu(q8[t].double() @ keys.T) * w[t].double()[:, None]).sum(0)
            order = sorted(range(n), key=lambda j: (-float(logit[j]), j))[: layer.topk]
            rows = kv[slots[order]]
            sc = q[t].double() @ rows.T * SM_SCALE
            p = torch.softmax(sc, -1)
            out[t] = p @ rows[:, :512]
            t += 1
    return out


def rel(a, b):
    assert not torch.isnan(a).any()
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_prefill_then_decode(fp8, pad):
    prefix, extend = [0, 70, 5], [4, 3, 50]
    layer = Layer(prefix, extend, fp8=fp8, seed=1 + fp8)
    backend = NSABackend(sm_scale=SM_SCALE, backend="reference")
    builder = ForwardMetadataBuilder(num_heads=3, topk=48, kv_dtype="fp8_e4m3" if fp8 else "bfloat16",
                                     device="cpu", backend="reference", num_pages=layer.num_pages)
    # ---- prefill with cached prefixes, DP-padded
    news = [(b, p, p + e) for b, (p, e) in enumerate(zip(prefix, extend, strict=True))]
    x, ql, cos, sin, q, pos = batch_inputs(layer, news, pad)
    meta = builder.prefill(layer.seq, prefix, layer.page_table, num_padded=q.shape[0])
    assert meta.num_tokens == 57 and meta.num_padded == 57 + pad and not meta.is_decode
    assert torch.equal(meta.positions, pos) and meta.cu_extend.tolist() == [0, 4, 7, 57]
    assert meta.kv_starts.tolist() == [0, 4, 77]
    out = backend.forward(q, x, ql, cos, sin, layer.indexer, layer.latent, layer.index_k, meta)
    assert out.shape == (57 + pad, 3, 512) and out.dtype == torch.bfloat16
    assert rel(out, expected(layer, news, x, ql, cos, sin, q, pos)) < 1e-2
    assert (out[57:] == 0).all()
    # ---- one decode step, DP-padded
    news = [(b, s, s + 1) for b, s in enumerate(layer.seq)]
    layer.seq = [s + 1 for s in layer.seq]
    x, ql, cos, sin, q, pos = batch_inputs(layer, news, pad)
    meta = builder.decode(layer.seq, layer.page_table, num_padded=3 + pad)
    assert meta.is_decode and meta.decode_plan.tier == "reference" and meta.decode_plan.batch_size == 3 + pad
    assert meta.cache_seqlens.tolist() == layer.seq + [0] * pad
    out = backend.forward(q, x, ql, cos, sin, layer.indexer, layer.latent, layer.index_k, meta)
    assert out.shape == (3 + pad, 3, 512)
    assert rel(out, expected(layer, news, x, ql, cos, sin, q, pos)) < 1e-2
    assert (out[3:] == 0).all()


def test_chunked_logits_give_the_same_output(monkeypatch):
    monkeypatch.delenv(chunking.BUDGET_ENV, raising=False)
    prefix, extend = [60, 0], [30, 40]
    outs = []
    for budget_mb in (None, 0.002):  # 2 KiB: many chunks
        layer = Layer(prefix, extend, seed=9)
        builder = ForwardMetadataBuilder(num_heads=3, topk=48, kv_dtype="bfloat16", device="cpu",
                                         backend="reference", logits_budget_mb=budget_mb)
        news = [(b, p, p + e) for b, (p, e) in enumerate(zip(prefix, extend, strict=True))]
        x, ql, cos, sin, q, _ = batch_inputs(layer, news, 0)
        meta = builder.prefill(layer.seq, prefix, layer.page_table)
        assert (len(meta.logits_chunks) > 4) == (budget_mb is not None)
        outs.append(NSABackend(sm_scale=SM_SCALE).forward(q, x, ql, cos, sin, layer.indexer, layer.latent,
                                                          layer.index_k, meta))
    assert torch.equal(outs[0], outs[1])


def test_per_layer_forward_queries_nothing(monkeypatch):
    """The budget is read once per batch (in the builder); layers never query the device."""
    monkeypatch.delenv(chunking.BUDGET_ENV, raising=False)
    calls = []

    def counting_free_memory(device):
        calls.append(device)
        return None

    monkeypatch.setattr(chunking, "_free_device_memory", counting_free_memory)
    prefix, extend = [10, 0], [6, 7]
    layer = Layer(prefix, extend, seed=4)
    builder = ForwardMetadataBuilder(num_heads=3, topk=48, kv_dtype="bfloat16", device="cpu")
    news = [(b, p, p + e) for b, (p, e) in enumerate(zip(prefix, extend, strict=True))]
    x, ql, cos, sin, q, _ = batch_inputs(layer, news, 2)
    meta = builder.prefill(layer.seq, prefix, layer.page_table, num_padded=q.shape[0])
    assert len(calls) == 1
    backend = NSABackend(sm_scale=SM_SCALE)
    first = backend.forward(q, x, ql, cos, sin, layer.indexer, layer.latent, layer.index_k, meta)  # tier probes

    def boom(*_a, **_k):
        raise AssertionError("device property queried on the per-layer path")

    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    for _layer in range(3):
        out = backend.forward(q, x, ql, cos, sin, layer.indexer, layer.latent, layer.index_k, meta)
        assert torch.equal(out, first)
    assert len(calls) == 1


def test_bad_input():
    layer = Layer([0], [5], seed=2)
    builder = ForwardMetadataBuilder(num_heads=3, topk=48, kv_dtype="bfloat16", device="cpu")
    x, ql, cos, sin, q, _ = batch_inputs(layer, [(0, 0, 5)], 0)
    with pytest.raises(ValueError, match="num_padded"):
        builder.prefill(layer.seq, [0], layer.page_table, num_padded=4)
    meta = builder.prefill(layer.seq, [0], layer.page_table)
    backend = NSABackend(sm_scale=SM_SCALE)
    with pytest.raises(ValueError, match="q_latent"):
        backend.forward(q[:, :2], x, ql, cos, sin, layer.indexer, layer.latent, layer.index_k, meta)
    with pytest.raises(ValueError, match="latent_cache"):
        backend.forward(q, x, ql, cos, sin, layer.indexer, pack_fp8_kv(layer.latent), layer.index_k, meta)
    other = Indexer(layer.indexer.w, topk=16)
    with pytest.raises(ValueError, match="indexer: top-k 16"):
        backend.forward(q, x, ql, cos, sin, other, layer.latent, layer.index_k, meta)
    with pytest.raises(ValueError, match="kv_dtype"):
        ForwardMetadataBuilder(num_heads=3, topk=48, kv_dtype="int4", device="cpu")
    with pytest.raises(ValueError, match="sm_scale"):
        NSABackend(sm_scale=0.0)
    with pytest.raises(ValueError, match="seq_lens"):
        builder.decode([], layer.page_table)
