"""One rank holding everything: weights (seeded, safetensors, fp8 checkpoints), sharding, and the layer
checked against an independent float64 un-absorbed MLA."""

from __future__ import annotations

import pytest
import torch

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, request_inputs, run_case
from nsa_tp.model.sharding import shard_weights
from nsa_tp.model.weights import (
    LayerWeights,
    WeightsError,
    expected_shapes,
    hf_names,
    load_layer_weights,
    random_weights,
    save_layer_weights,
)
from nsa_tp.ops.kv_format import pack_fp8_kv, unpack_fp8_kv
from nsa_tp.ops.rope import yarn_inv_freq
from nsa_tp.parallel import resolve_layout


def small_config(**kw) -> NSAConfig:
    """Real head dims (576/512, 128 nope + 64 rope, 64 index heads x 128), small hidden and q_lora for speed."""
    base = dict(hidden_size=256, q_lora_rank=128, num_attention_heads=32)
    base.update(kw)
    return NSAConfig(**base)

# ---------------------------------------------------------------------------------------------- weights


def test_random_weights_deterministic_and_shaped():
    cfg = small_config()
    a, b, c = random_weights(cfg, seed=3), random_weights(cfg, seed=3), random_weights(cfg, seed=4)
    for name, shape in expected_shapes(cfg).items():
        assert tuple(getattr(a, name).shape) == shape
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert getattr(a, name).dtype == torch.bfloat16
    assert not torch.equal(a.q_b_proj, c.q_b_proj)


def test_safetensors_roundtrip_and_errors(tmp_path):
    cfg = small_config()
    w = random_weights(cfg, seed=1)
    path = tmp_path / "layer.safetensors"
    save_layer_weights(w, path, layer=5)
    back = load_layer_weights(path, 5, cfg)
    for name, t in w.items():
        assert torch.equal(getattr(back, name), t), name
    with pytest.raises(WeightsError, match=r"model\.layers\.4\.self_attn\.q_a_proj\.weight' is missing"):
        load_layer_weights(path, 4, cfg)
    with pytest.raises(WeightsError, match=r"q_b_proj\.weight' expected shape"):
        load_layer_weights(path, 5, cfg.replace(num_attention_heads=16))


def test_hf_names_are_deepseek_v32():
    names = hf_names(7)
    assert names["kv_a_proj_with_mqa"] == "model.layers.7.self_attn.kv_a_proj_with_mqa.weight"
    assert names["idx_k_norm_bias"] == "model.layers.7.self_attn.indexer.k_norm.bias"
    assert names["idx_weights_proj"] == "model.layers.7.self_attn.indexer.weights_proj.weight"
    assert len(set(names.values())) == 12


def test_fp8_block_checkpoint_is_dequantized(tmp_path):
    from safetensors.torch import save_file

    cfg = small_config()
    w = random_weights(cfg, seed=2)
    names = hf_names(0)
    tensors = {names[k]: v for k, v in w.items()}
    # q_b_proj as the released checkpoint stores it: e4m3 values + one fp32 scale per 128x128 block.
    qb = w.q_b_proj.float()
    rows, cols = qb.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scale = torch.rand(br, bc) + 0.5
    full_scale = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    q8 = (qb / full_scale).to(torch.float8_e4m3fn)
    tensors[names["q_b_proj"]] = q8
    tensors[names["q_b_proj"] + "_scale_inv"] = scale
    save_file(tensors, str(tmp_path / "model.safetensors"))
    back = load_layer_weights(tmp_path, 0, cfg, dtype=torch.float32)
    assert torch.allclose(back.q_b_proj, q8.float() * full_scale)
    del tensors[names["q_b_proj"] + "_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="scale_inv' is missing"):
        load_layer_weights(tmp_path, 0, cfg)


# ---------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("tp,dp,dpa", [(1, 1, False), (2, 1, False), (4, 1, False), (4, 2, True), (4, 4, True)])
def test_shards_reassemble_the_whole(tp, dp, dpa):
    cfg = small_config()
    w = random_weights(cfg, seed=0)
    layout = resolve_layout(tp, dp, dpa, num_attention_heads=cfg.num_attention_heads, sm_major=9)
    shards = [shard_weights(w, cfg, layout, r) for r in range(layout.attn_tp_size)]
    assert all(s.heads == layout.heads_per_rank for s in shards)
    assert torch.equal(torch.cat([s.weights.q_b_proj for s in shards]), w.q_b_proj)
    assert torch.equal(torch.cat([s.weights.kv_b_proj for s in shards]), w.kv_b_proj)
    assert torch.equal(torch.cat([s.weights.o_proj for s in shards], dim=1), w.o_proj)
    for s in shards:  # replicated parts are whole on every rank
        assert torch.equal(s.weights.kv_a_proj_with_mqa, w.kv_a_proj_with_mqa)
        assert torch.equal(s.weights.idx_wq_b, w.idx_wq_b)
    with pytest.raises(ValueError, match="attn_tp_rank"):
        shard_weights(w, cfg, layout, layout.attn_tp_size)


def test_shard_rejects_mismatched_layout():
    cfg = small_config()
    w = random_weights(cfg)
    with pytest.raises(ValueError, match="num_attention_heads=32"):
        shard_weights(w, cfg, resolve_layout(2, sm_major=9), 0)  # layout built for 128 heads


def _rope64(x: torch.Tensor, pos: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """Interleaved rope as complex rotation in float64: pairs (x[2i], x[2i+1]) turn by pos * inv_freq[i]."""
    inv = yarn_inv_freq(
        cfg.qk_rope_head_dim, cfg.rope_theta, factor=cfg.rope_scaling_factor,
        original_max_position=cfg.rope_original_max_position_embeddings,
        beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
    ).double()
    ang = pos.double()[:, None] * inv[None, :]  # [L, 32]
    rot = torch.polar(torch.ones_like(ang), ang)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot.view(shape)).flatten(-2)


def naive_layer_fp64(
    w: LayerWeights, cfg: NSAConfig, x: torch.Tensor, selected: list[torch.Tensor], fp8_cache: bool = False
) -> torch.Tensor:
    """Un-absorbed MLA in float64 for one request: ``x [L, hidden]``; row t attends to positions ``selected[t]``.

    k_nope and v are decompressed from the latent through kv_b_proj (no absorption), so this checks the
    absorbed path independently. ``fp8_cache``: the cached ``[c_kv | k_pe]`` goes through the 656-byte
    format first (the storage rounding is part of the contract, not an error of the layer).
    """
    W = {k: v.double() for k, v in w.items()}
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    L = x.shape[0]
    pos = torch.arange(L)
    xd = x.double()

    def rms(v, g):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * g

    q = (rms(xd @ W["q_a_proj"].T, W["q_a_layernorm"]) @ W["q_b_proj"].T).view(L, H, dn + dr)
    q_nope, q_pe = q[..., :dn], _rope64(q[..., dn:], pos, cfg)
    kv = xd @ W["kv_a_proj_with_mqa"].T
    c = rms(kv[:, : cfg.kv_lora_rank], W["kv_a_layernorm"])
    k_pe = _rope64(kv[:, cfg.kv_lora_rank :], pos, cfg)  # [L, 64], shared by all heads
    if fp8_cache:
        cached = unpack_fp8_kv(pack_fp8_kv(torch.cat([c, k_pe], -1).float()), torch.float64)
        c, k_pe = cached[:, : cfg.kv_lora_rank], cached[:, cfg.kv_lora_rank :]
    kvb = (c @ W["kv_b_proj"].T).view(L, H, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    out = torch.zeros(L, H, dv, dtype=torch.float64)
    for t in range(L):
        s = selected[t]
        scores = torch.einsum("hd,shd->hs", q_nope[t], k_nope[s]) + torch.einsum("hd,sd->hs", q_pe[t], k_pe[s])
        p = torch.softmax(scores * cfg.softmax_scale, dim=-1)
        out[t] = torch.einsum("hs,shd->hd", p, v[s])
    return out.reshape(L, H * dv) @ W["o_proj"].T


# ---------------------------------------------------------------------------------------------- the layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the layer output"
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "fp8_e4m3"])
def test_layer_matches_float64_unabsorbed_mla(kv_cache_dtype):
    """Dense regime (top-k >= every context): the sparse path must equal causal MLA, prefill and decode."""
    cfg = small_config()
    reqs = (Request(0, 45), Request(70, 23), Request(5, 1))  # crosses a page; a cached prefix; a 1-token prefill
    case = RunCase(tp=1, cfg=cfg, requests=reqs, decode_steps=2, kv_cache_dtype=kv_cache_dtype, seed=11)
    res = run_case(None, case)
    w = random_weights(cfg, seed=11)
    for i, r in enumerate(reqs):
        L = r.prefix_len + r.new_len + case.decode_steps
        x = request_inputs(cfg, 11, i, L, torch.device("cpu")).float()
        ref = naive_layer_fp64(w, cfg, x, [torch.arange(t + 1) for t in range(L)], kv_cache_dtype == "fp8_e4m3")
        s0, s1 = r.prefix_len, r.prefix_len + r.new_len
        assert res.prefill[i].shape == (r.new_len, cfg.hidden_size)
        assert _rel(res.prefill[i], ref[s0:s1]) < 1e-2, (i, "prefill")
        for k in range(case.decode_steps):
            assert _rel(res.decode[k][i], ref[s1 + k : s1 + k + 1]) < 1e-2, (i, "decode", k)


def test_sparse_layer_matches_float64_on_the_indexers_selection(monkeypatch):
    """Sparse regime (top-k 24 < contexts): the layer equals un-absorbed MLA over exactly the keys the
    indexer chose (recorded from ``Indexer.forward``, slots mapped back to positions)."""
    from nsa_tp.attention.indexer import DecodeIndexBatch, Indexer

    records = []
    real_forward = Indexer.forward

    def recording(self, x, q_lora, cos, sin, index_k_cache, batch):
        out = real_forward(self, x, q_lora, cos, sin, index_k_cache, batch)
        records.append((batch, out.clone()))
        return out

    monkeypatch.setattr(Indexer, "forward", recording)
    cfg = small_config(index_topk=24)
    reqs = (Request(0, 50), Request(40, 9))
    case = RunCase(tp=1, cfg=cfg, requests=reqs, decode_steps=2, seed=3)
    res = run_case(None, case)
    assert len(records) == 4  # prefix fill, prefill, 2 decode steps

    def positions_of(batch, out) -> list[torch.Tensor]:
        """Per row: the selected positions in its request (slot -> position via the batch's own tables)."""
        rows = []
        for r in range(out.shape[0]):
            if isinstance(batch, DecodeIndexBatch):
                pages, context = batch.page_table[r].tolist(), int(batch.seq_lens[r])
                slot_to_pos = {p * 64 + o: j * 64 + o for j, p in enumerate(pages) if p >= 0 for o in range(64)}
            else:
                keys = batch.key_slots[int(batch.ks[r]) : int(batch.ke[r])].tolist()
                context, slot_to_pos = len(keys), {s: j for j, s in enumerate(keys)}
            sel = [slot_to_pos[s] for s in out[r].tolist() if s >= 0]
            assert len(sel) == len(set(sel)) == min(cfg.index_topk, context)  # distinct, K = min(topk, len)
            assert max(sel) < context  # causal
            rows.append(torch.tensor(sorted(sel)))
        return rows

    pre_batch, pre_out = records[1]
    pre_sel = positions_of(pre_batch, pre_out)
    dec_sel = [positions_of(b, o) for b, o in records[2:]]
    w = random_weights(cfg, seed=3)
    row = 0
    for i, r in enumerate(reqs):
        L = r.prefix_len + r.new_len + case.decode_steps
        s1 = r.prefix_len + r.new_len
        selected = [torch.arange(t + 1) for t in range(L)]
        for j in range(r.new_len):
            selected[r.prefix_len + j] = pre_sel[row + j]
        for k in range(case.decode_steps):
            selected[s1 + k] = dec_sel[k][i]
        row += r.new_len
        assert max(len(s) for s in selected[r.prefix_len :]) <= cfg.index_topk
        x = request_inputs(cfg, 3, i, L, torch.device("cpu")).float()
        ref = naive_layer_fp64(w, cfg, x, selected)
        assert _rel(res.prefill[i], ref[r.prefix_len : s1]) < 1e-2, i
        for k in range(case.decode_steps):
            assert _rel(res.decode[k][i], ref[s1 + k : s1 + k + 1]) < 1e-2, (i, k)


def test_layer_rejects_bad_input():
    from nsa_tp.model.attention import NSAAttention
    from nsa_tp.parallel.groups import single_rank_groups

    cfg = small_config()
    lay = resolve_layout(1, num_attention_heads=cfg.num_attention_heads, sm_major=9)
    sw = shard_weights(random_weights(cfg), cfg, lay, 0)
    with pytest.raises(ValueError, match="unknown attention core"):
        NSAAttention(cfg, sw, single_rank_groups(lay), core="nope")
    lay2 = resolve_layout(2, num_attention_heads=cfg.num_attention_heads, sm_major=9)
    with pytest.raises(ValueError, match="weights are for attn_tp rank"):
        NSAAttention(cfg, shard_weights(random_weights(cfg), cfg, lay2, 1), single_rank_groups(lay))


# ---------------------------------------------------------------------------------------------- caches


def test_page_allocator_and_request_pages():
    from nsa_tp.attention.kv_cache import CacheFullError, NSACaches, PageAllocator

    alloc = PageAllocator(3)
    assert alloc.alloc(2) == [0, 1] and alloc.num_free == 1
    with pytest.raises(CacheFullError, match="need 2 pages, 1 of 3 free"):
        alloc.alloc(2)
    alloc.free([1])
    with pytest.raises(ValueError, match="already free"):
        alloc.free([1])
    with pytest.raises(ValueError, match="outside"):
        alloc.free([7])

    caches = NSACaches(5)
    caches.reserve(7, 70)  # 2 pages
    caches.reserve(3, 10)  # 1 page
    caches.reserve(7, 130)  # grows to 3 pages, keeps the first two
    assert caches.slots(7, 62, 66).tolist() == [62, 63, 64, 65]
    assert caches.slots(7, 128, 130).tolist() == [3 * 64, 3 * 64 + 1]  # its third page is page 3
    assert caches.page_table([3, 7]).tolist() == [[2, -1, -1], [0, 1, 3]]
    with pytest.raises(ValueError, match="outside request 3"):
        caches.slots(3, 5, 11)
    caches.release(7)
    assert caches.allocator.num_free == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8_e4m3"])
def test_latent_cache_store_roundtrip(dtype):
    from nsa_tp.attention.kv_cache import PagedLatentCache
    from nsa_tp.ops.kv_format import unpack_fp8_kv

    cache = PagedLatentCache(2, dtype)
    rows = torch.randn(5, 576)
    slots = torch.tensor([0, 63, 64, 100, 127])
    cache.store(slots, rows)
    flat = cache.flat()
    got = unpack_fp8_kv(flat[slots, 0]) if dtype == "fp8_e4m3" else flat[slots, 0].float()
    tol = 0.07 if dtype == "fp8_e4m3" else 1e-2  # e4m3 keeps 3 mantissa bits
    assert (got - rows).norm() / rows.norm() < tol
    assert flat[1].float().abs().sum() == 0  # untouched slots stay zero
    with pytest.raises(ValueError, match="slots"):
        cache.store(torch.tensor([128]), rows[:1])
    with pytest.raises(ValueError, match="latent"):
        cache.store(slots, rows[:, :512])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PagedLatentCache(1, "fp16")
