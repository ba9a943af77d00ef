"""Token-parallel extend inside SGLang (``nsa_tp.integrations.sglang.token_parallel``) against SGLang 0.5.23.

- pure: the switch (``--nsa-token-parallel`` / ``NSA_TP_TOKEN_PARALLEL``), the strategy choice, the cost file;
- SGLang's real ``ForwardBatch`` (extend, mixed, decode, target-verify) -> the per-batch plan;
- registration: the ``"dsa"`` factory in SGLang's real attention registry, the one indexer hook, the version gate;
- gloo, 2 and 4 ranks: on a mixed extend batch with cached prefixes and DP padding rows, built as SGLang's real
  ``ForwardBatch``, ``DSAMetadata`` and ``DSAIndexerMetadata`` (torch top-k backend), the ``tokens`` sparse core
  of the registered backend subclass (bf16 and fp8 cache, FlashMLA-sparse and FlashMLA-KV entries) equals the
  ``heads`` path, and the ``indexer`` split of ``Indexer._get_topk_ragged`` (unchunked and chunked) equals
  upstream's all-rows result.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from importlib.util import find_spec

import pytest
import torch

from nsa_tp.integrations.sglang import attention_hooks
from nsa_tp.integrations.sglang import token_parallel as tp
from nsa_tp.integrations.sglang.token_parallel import backend as tp_backend
from nsa_tp.integrations.sglang.token_parallel import plan as tp_plan
from nsa_tp.token_parallel import Costs

# Made-up costs of the right magnitudes (no card's): the policy's arithmetic, not a measurement.
TOY = Costs(card="NVIDIA H200", date="-", command="test", indexer_ns_per_row_key=0.2,
            sparse_ns_per_token=((64, 500.0), (128, 900.0)), decode_indexer_ns_per_key=0.5,
            decode_indexer_fixed_us=100.0, merge_us=50.0, a2a_latency_us=240.0, a2a_gbytes_per_s=220.0,
            gather_latency_us=240.0, gather_gbytes_per_s=220.0, collectives_source="test")

INSTALL = "bash scripts/install_sglang_cpu.sh"
needs_sglang = pytest.mark.skipif(find_spec("sglang") is None, reason=f"sglang is not installed (run `{INSTALL}`)")
pytestmark = pytest.mark.sglang

D_QK, D_V, K, IDX_HEADS, IDX_DIM = 576, 512, 8, 4, 128
HEADS = 8  # global q heads: 4 per rank at attn_tp 2, 2 at attn_tp 4
REQS = [(6, 5), (0, 9), (13, 4), (20, 1)]  # (cached prefix, new tokens): chunked, fresh, radix hit, decode-like
PAD_ROWS = 3  # DP-attention padding rows after the real ones


# ------------------------------------------------------------------------------------------------ switch


@pytest.mark.parametrize(("value", "want"), [(None, "auto"), ("", "auto"), ("ON", "on"), (" off ", "off"),
                                             ("indexer", "indexer"), ("auto", "auto")])
def test_mode_from_env(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(tp.ENV_MODE, raising=False)
    else:
        monkeypatch.setenv(tp.ENV_MODE, value)
    assert tp.token_parallel_mode() == want


def test_mode_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv(tp.ENV_MODE, "tokens-please")
    with pytest.raises(ValueError, match=r"NSA_TP_TOKEN_PARALLEL: expected one of auto, on, off, indexer"):
        tp.token_parallel_mode()


def test_cli_flag_sets_env_and_is_not_a_server_arg(monkeypatch):
    monkeypatch.delenv(tp.ENV_MODE, raising=False)
    parser = argparse.ArgumentParser()
    tp.add_cli_flag(parser)
    tp.add_cli_flag(parser)  # twice on one parser: one flag
    ns = parser.parse_args(["--nsa-token-parallel", "on"])
    assert os.environ[tp.ENV_MODE] == "on" and not hasattr(ns, "nsa_token_parallel")
    with pytest.raises(SystemExit):
        parser.parse_args(["--nsa-token-parallel", "maybe"])


# ----------------------------------------------------------------------------------------- strategy choice


@pytest.mark.parametrize(("mode", "world", "ext", "want"), [
    ("off", 8, [4096], "heads"), ("on", 1, [4096], "heads"), ("on", 8, [0, 0], "heads"),
    ("on", 8, [4096], "tokens"), ("indexer", 2, [5], "indexer"), ("auto", 8, [32768], "heads"),
])
def test_choice_forced_and_without_costs(mode, world, ext, want):
    strategy, reason = tp.choose_extend_strategy(mode, world, [0] * len(ext), ext, 16, None)
    assert strategy == want, reason


@pytest.mark.parametrize(("world", "prefix", "ext"), [(8, [0], [32768]), (8, [0], [16]), (2, [30000, 0], [2048, 7]),
                                                   (4, [0, 0, 0], [512, 8192, 3]), (8, [131000], [1024])])
def test_auto_is_the_shared_policy(world, prefix, ext):
    from nsa_tp.token_parallel import BatchShape, choose

    got, why = tp.choose_extend_strategy("auto", world, prefix, ext, 128 // world, TOY)
    keys = [p + i + 1 for p, e in zip(prefix, ext, strict=True) for i in range(e)]
    shape = BatchShape(num_tokens=len(keys), mean_keys=sum(keys) / len(keys), max_keys=max(keys), num_heads=128,
                       world=world)
    assert got == choose(shape, TOY, "auto").strategy, why
    assert "ms" in why  # the reason carries the predicted times (the server log shows why auto chose)


def test_auto_switches_only_for_a_gain_above_the_margin():
    assert tp.choose_extend_strategy("auto", 8, [0], [32768], 16, TOY)[0] != "heads"
    assert tp.choose_extend_strategy("auto", 8, [0], [16], 16, TOY)[0] == "heads"  # latency-bound
    d = TOY.to_dict()
    d["margin"] = 0.99  # a 99% gain asked for: none predicted
    assert tp.choose_extend_strategy("auto", 8, [0], [32768], 16, type(TOY).from_dict(d))[0] == "heads"


def test_cost_file_must_match_the_card(tmp_path, monkeypatch):
    monkeypatch.delenv(tp.ENV_COSTS, raising=False)
    assert tp.load_costs("Card Never Measured")[0] is None
    f = tmp_path / "costs.json"
    f.write_text(json.dumps({"costs": TOY.to_dict()}))
    monkeypatch.setenv(tp.ENV_COSTS, str(f))
    costs, why = tp.load_costs("NVIDIA H200")
    assert costs == TOY, why
    other, why = tp.load_costs("NVIDIA B200")
    assert other is None and "measured on 'NVIDIA H200'" in why
    f.write_text("{not json")
    assert "unreadable" in tp.load_costs("NVIDIA H200")[1]


# -------------------------------------------------------------------------- SGLang's real batch -> the plan


def _forward_batch(mode_name: str = "EXTEND", reqs=REQS):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    prefix = [p for p, _ in reqs]
    ext = [e for _, e in reqs]
    seq = torch.tensor([p + e for p, e in reqs], dtype=torch.int64)
    T = sum(ext)
    return ForwardBatch(
        forward_mode=getattr(ForwardMode, mode_name), batch_size=len(reqs),
        input_ids=torch.zeros(T + PAD_ROWS, dtype=torch.int64), req_pool_indices=torch.arange(len(reqs)),
        seq_lens=seq, out_cache_loc=torch.arange(T), seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq,
        extend_seq_lens_cpu=ext, extend_prefix_lens_cpu=prefix, extend_num_tokens=T,
    )


@needs_sglang
@pytest.mark.parametrize("world", [2, 4, 8])
def test_auto_in_a_live_server_needs_collectives_measured_on_this_card(world, tmp_path, monkeypatch):
    """A one-GPU record borrows its collectives from another card's NCCL run: a projection. Inside SGLang auto then
    keeps upstream's path (and says why); a record whose collectives were measured on its own card decides;
    a forced split still reads the borrowed record (its rows are weighed by it)."""
    import dataclasses

    long = _forward_batch("EXTEND", [(0, 32768)])
    f = tmp_path / "costs.json"
    monkeypatch.setenv(tp.ENV_COSTS, str(f))
    f.write_text(json.dumps({"costs": dataclasses.replace(TOY, collectives_card="NVIDIA H100").to_dict()}))
    plan = tp.plan_extend(long, 0, world, HEADS // world, mode="auto", card=TOY.card)
    assert plan.strategy == "heads" and "borrows its collectives" in plan.reason, plan.reason
    forced = tp.plan_extend(long, 0, world, HEADS // world, mode="on", card=TOY.card)
    assert forced.strategy == "tokens" and len(set(forced.splits)) > 1  # weighed by the record: causal rows
    f.write_text(json.dumps({"costs": dataclasses.replace(TOY, collectives_card=TOY.card).to_dict()}))
    plan = tp.plan_extend(long, 0, world, HEADS // world, mode="auto", card=TOY.card)
    assert plan.strategy != "heads", plan.reason


@needs_sglang
@pytest.mark.parametrize("world", [2, 4, 8])
def test_plan_from_real_forward_batch(world):
    fb = _forward_batch()
    plans = [tp.plan_extend(fb, r, world, HEADS // world, mode="on") for r in range(world)]
    assert {p.strategy for p in plans} == {"tokens"} and len({p.splits for p in plans}) == 1
    T = sum(e for _, e in REQS)
    assert plans[0].num_real == T and sum(len(p.rows) for p in plans) == T
    assert [p.rows.start for p in plans] == sorted(p.rows.start for p in plans)  # contiguous, in rank order
    # Balanced by causal work: one 32K-context chunk (16K prefix + 16K new), the later rows score more keys.
    long = _forward_batch("EXTEND", [(16384, 16384)])
    plans = [tp.plan_extend(long, r, world, HEADS // world, mode="on", costs=TOY) for r in range(world)]
    sizes = [len(p.rows) for p in plans]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], sizes
    c = TOY
    cost = [c.indexer_ns_per_row_key * (16384 + i + 1) + c.sparse_ns(HEADS) for i in range(16384)]
    work = [sum(cost[p.rows.start : p.rows.stop]) for p in plans]
    assert max(work) - min(work) <= 2 * max(cost), (sizes, work)


@needs_sglang
@pytest.mark.parametrize(("mode_name", "want"), [("MIXED", "tokens"), ("DECODE", "heads"),
                                                 ("TARGET_VERIFY", "heads"), ("IDLE", "heads")])
def test_plan_by_forward_mode(mode_name, want):
    plan = tp.plan_extend(_forward_batch(mode_name), 0, 2, 4, mode="on")
    assert plan.strategy == want, plan.reason


@needs_sglang
def test_plan_auto_without_costs_keeps_upstream(monkeypatch):
    monkeypatch.delenv(tp.ENV_COSTS, raising=False)
    monkeypatch.setenv(tp.ENV_MODE, "auto")
    plan = tp.plan_extend(_forward_batch(), 1, 4, 2)
    assert plan.strategy == "heads" and "no measured costs" in plan.reason
    monkeypatch.setenv("NSA_TP_SGLANG_PLUGIN", "0")  # the plugin's own off switch wins over "on"
    assert tp.plan_extend(_forward_batch(), 0, 4, 2, mode="on").strategy == "heads"


def test_plan_is_built_once_per_batch(monkeypatch):
    calls = []
    real = tp_plan.plan_extend
    monkeypatch.setattr(tp_plan, "plan_extend", lambda *a, **k: calls.append(1) or real(*a, **k))
    mode = types.SimpleNamespace(is_extend_without_speculative=lambda: True)
    fb = types.SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=[3], extend_prefix_lens_cpu=[0])
    monkeypatch.setenv(tp.ENV_MODE, "on")
    first = tp.plan_for(fb, None, 8)
    assert tp.plan_for(fb, None, 8) is first and len(calls) == 1
    assert first.strategy == "heads"  # one rank (no group): nothing to split
    fb.extend_seq_lens_cpu = [5]  # a runner refilled the same object for the next batch: planned again
    again = tp.plan_for(fb, None, 8)
    assert again is not first and again.key[2] == (5,) and len(calls) == 2


# --------------------------------------------------------------------------------- registration, version


@needs_sglang
def test_register_backend_in_sglang_registry(monkeypatch):
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend

    saved = attention_registry.ATTENTION_BACKENDS["dsa"]
    try:
        monkeypatch.setenv(tp.ENV_MODE, "auto")
        monkeypatch.delenv(tp.ENV_COSTS, raising=False)
        assert tp.register_in_model_process() == []  # auto without costs: no plan but heads, nothing registered
        assert attention_registry.ATTENTION_BACKENDS["dsa"] is saved
        monkeypatch.setenv(tp.ENV_MODE, "on")
        specs = tp.register_in_model_process()
        assert specs == [(tp.INDEXER_TARGET, tp.around_get_topk_ragged, "AROUND")]
        factory = attention_registry.ATTENTION_BACKENDS["dsa"]
        assert factory is not saved
        cls = tp.make_backend_class()
        assert issubclass(cls, DeepseekSparseAttnBackend)
        # the hooked target exists under the same name in this SGLang (and in 0.5.17: see the docs table)
        from sglang.srt.layers.attention.dsa.dsa_indexer import Indexer

        assert callable(Indexer._get_topk_ragged)
        attention_registry.ATTENTION_BACKENDS["dsa"] = saved
        monkeypatch.setenv(tp.ENV_MODE, "off")
        assert tp.register_in_model_process() == []
        assert attention_registry.ATTENTION_BACKENDS["dsa"] is saved  # off: upstream's factory untouched
    finally:
        attention_registry.ATTENTION_BACKENDS["dsa"] = saved


def test_version_gate_places_no_token_parallel_hook(monkeypatch):
    from nsa_tp.integrations.sglang import plugin

    touched = []
    monkeypatch.setattr(tp_backend, "register_in_model_process", lambda: touched.append(1) or [])
    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "0.5.24")
    assert plugin.register(role="scheduler") == [] and touched == []
    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "0.5.16")
    assert plugin.register(role="scheduler") == [] and touched == []


# ------------------------------------------------------------------ gloo: tokens / indexer == heads path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _indexer_metadata(fb):
    """SGLang's own ragged extend metadata for ``fb``: ks/ke/row->request from the backend's real
    ``_cal_indexer_k_start_end``, and ``DSAIndexerMetadata`` over ``DSAMetadata`` with the torch top-k."""
    from sglang.srt.layers.attention.dsa.dsa_indexer_metadata import DSAIndexerMetadata
    from sglang.srt.layers.attention.dsa.dsa_topk_backend import DSATopKBackend, TopkTransformMethod
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend, DSAMetadata

    (ks, ke), tok2req = DeepseekSparseAttnBackend._cal_indexer_k_start_end(types.SimpleNamespace(device="cpu"), fb)
    seq = fb.seq_lens.to(torch.int32)
    ext = torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int32)
    cu_q = torch.nn.functional.pad(ext.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(seq.cumsum(0), (1, 0)).to(torch.int32)
    attn = DSAMetadata(
        page_size=64, cache_seqlens_int32=seq, max_seq_len_q=int(ext.max()), max_seq_len_k=int(seq.max()),
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, page_table_1=None, real_page_table=torch.zeros(len(seq), 1),
        dsa_cache_seqlens_int32=(ke - ks).clamp_max(K), dsa_cu_seqlens_q=torch.arange(len(ks) + 1),
        dsa_cu_seqlens_k=torch.nn.functional.pad((ke - ks).clamp_max(K).cumsum(0), (1, 0)),
        dsa_extend_seq_lens_list=list(fb.extend_seq_lens_cpu), dsa_seqlens_expanded=ke - ks,
        topk_indices_offset=ks.clone(), indexer_k_start_end=(ks, ke), token_to_batch_idx=tok2req,
        seq_lens_sum=int(seq.sum()),
    )
    return DSAIndexerMetadata(attn_metadata=attn, topk_transform_method=TopkTransformMethod.RAGGED,
                              topk_backend=DSATopKBackend.TORCH, force_unfused_topk=True)


def _upstream_topk_ragged(k_fp8, k_scale, chunk_rows):
    """Upstream's ``_get_topk_ragged`` restated for CPU (its kernels swapped for nsa-tp's reference tier),
    in its two shapes: all rows at once, and the chunked loop (``chunk_rows`` rows, offsets overridden)."""
    from nsa_tp import ops

    def original(indexer, enable_dual_stream, forward_batch, layer_id, q_fp8, weights, metadata,
                 topk_result=None):
        if topk_result is None:
            topk_result = torch.full((q_fp8.shape[0], indexer.index_topk), -1, dtype=torch.int32)
        ks, ke = metadata.get_indexer_kvcache_range()
        q_offset = ks.shape[0]
        assert q_fp8[:q_offset].shape[0] != 0  # upstream asserts this too
        w = weights.squeeze(-1)
        lens = metadata.get_seqlens_expanded()
        if chunk_rows is None:
            logits = ops.fp8_mqa_logits(q_fp8[:q_offset], (k_fp8, k_scale), w[:q_offset], ks, ke,
                                        backend="reference")
            assert logits.shape[0] == len(lens)
            topk_result[:q_offset] = metadata.topk_transform(logits, indexer.index_topk, ks=ks)
            return topk_result
        offset = metadata.attn_metadata.topk_indices_offset
        for start in range(0, q_offset, chunk_rows):
            end = min(start + chunk_rows, q_offset)
            logits = ops.fp8_mqa_logits(q_fp8[start:end], (k_fp8, k_scale), w[start:end], ks[start:end],
                                        ke[start:end], backend="reference")
            topk_result[start:end] = metadata.topk_transform(
                logits, indexer.index_topk, ks=ks[start:end], ke_offset=lens[start:end],
                topk_indices_offset_override=offset[start:end])
        return topk_result

    return original


def _rank_case(ctx, world: int) -> dict:
    """One rank: the tokens sparse core and the indexer split on the mixed batch, against the heads path."""
    import os

    os.environ[tp.ENV_MODE] = "on"
    os.environ["NSA_TP_SGLANG_BACKEND"] = "reference"
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend

    from nsa_tp import ops
    from nsa_tp.integrations.sglang import verify
    from nsa_tp.ops.kv_format import pack_fp8_kv

    group = torch.distributed.group.WORLD  # the launcher initialises the default group: all ranks
    tp_plan.attn_tp_group = lambda: group  # SGLang's attention TP group is this gloo group here
    rank = ctx.rank
    h = HEADS // world
    T = sum(e for _, e in REQS)
    rows = T + PAD_ROWS
    sm = D_QK**-0.5
    out: dict = {}

    def heads_core(self, q_all, kv_cache, v_head_dim, page_table_1, sm_scale, topk_length=None, **extra):
        """Upstream's FlashMLA core stand-in (CPU): this rank's heads, every row, the reference tier."""
        return ops.sparse_mla_fwd(q_all, kv_cache, page_table_1.unsqueeze(1), sm_scale, v_head_dim,
                                  backend="reference")[0]

    def heads_kv(self, q_all, kv_cache, v_head_dim, sm_scale, layer, metadata, page_table_1, **extra):
        q = q_all.reshape(-1, layer.tp_q_head_num, D_QK)
        return heads_core(self, q, kv_cache.view(-1, 1, kv_cache.shape[-1]), v_head_dim, page_table_1,
                          sm_scale).unsqueeze(1)

    DeepseekSparseAttnBackend._forward_flashmla_sparse = heads_core  # this rank process only
    DeepseekSparseAttnBackend._forward_flashmla_kv = heads_kv

    # --- sparse core: the registered backend subclass, as forward_extend calls it
    cls = tp.make_backend_class()
    backend = object.__new__(cls)  # the sparse-core methods read no construction state
    backend.num_q_heads = h
    backend.dsa_prefill_impl, backend.use_mha = "flashmla_sparse", False
    fb = _forward_batch("EXTEND")
    plan = backend._nsa_tp_plan_for(fb)
    out["splits"], out["strategy"] = plan.splits, plan.strategy
    g = _gen(7)
    n_kv = 64 * 2
    q_all = torch.randn(rows, HEADS, D_QK, generator=g).bfloat16()
    kv = (torch.randn(n_kv, 1, D_QK, generator=g) * 0.5).bfloat16()
    ids = torch.randint(-1, n_kv + 3, (rows, K), generator=g, dtype=torch.int32)  # -1 and >= N: "no token"
    ids[2] = -1  # a row with no valid index: out 0
    ids[T:] = -1  # DP padding rows: upstream pads their top-k with -1
    own_only = torch.full_like(ids, -1)  # what a tokens batch's indexer leaves: this rank's rows only
    own_only[plan.rows.start : plan.rows.stop] = ids[plan.rows.start : plan.rows.stop]
    q_local = q_all[:, rank * h : (rank + 1) * h].contiguous()
    layer = types.SimpleNamespace(tp_q_head_num=h)
    for name, cache in (("bf16", kv), ("fp8", pack_fp8_kv(kv))):
        heads = heads_core(None, q_local, cache, D_V, ids, sm)
        backend._nsa_tp_plan = plan  # what forward_extend sets for the call; the FlashMLA hooks read it
        got = attention_hooks.around_flashmla_sparse(heads_core, backend, q_local, cache, D_V, own_only, sm,
                                                     topk_length=None)
        out[f"sparse_{name}"] = _rel(got, heads)
        out[f"sparse_{name}_pad_zero"] = bool((got[T:] == 0).all())
        out[f"sparse_{name}_empty_zero"] = bool((got[2] == 0).all())
        pool = cache.view(-1, 64, 1, cache.shape[-1])
        got_kv = attention_hooks.around_flashmla_kv(heads_kv, backend, q_local, pool, D_V, sm, layer, None, own_only)
        out[f"kv_{name}"] = _rel(got_kv.squeeze(1), heads)
        out[f"kv_{name}_shape"] = tuple(got_kv.shape)
        # an input the tokens core does not take (an attention sink): the usual path on the regathered table
        sink = torch.zeros(h)
        fell = attention_hooks.around_flashmla_sparse(heads_core, backend, q_local, cache, D_V, own_only, sm,
                                                      topk_length=None, attn_sink=sink)
        out[f"fallback_{name}"] = _rel(fell, heads)
    os.environ[verify.ENV_VERIFY] = "1"
    attention_hooks.around_flashmla_sparse(heads_core, backend, q_local, kv, D_V, own_only, sm)
    os.environ[verify.ENV_VERIFY] = "0"
    out["verify_sparse"] = verify.worst().get("token-parallel _forward_flashmla_sparse")
    backend._nsa_tp_plan = None
    # a batch whose prefill runs an implementation nsa-tp does not route: tokens becomes indexer
    other = object.__new__(cls)
    other.num_q_heads, other.dsa_prefill_impl, other.use_mha = h, "tilelang", False
    out["downgrade"] = other._nsa_tp_plan_for(_forward_batch("EXTEND")).strategy
    os.environ["SGLANG_DSA_TOPK_BROADCAST"] = "1"  # rank 0's whole table broadcast: own rows only would break it
    out["downgrade_broadcast"] = backend._nsa_tp_plan_for(_forward_batch("EXTEND")).strategy
    del os.environ["SGLANG_DSA_TOPK_BROADCAST"]

    # --- indexer: Indexer._get_topk_ragged split over the group, real SGLang metadata
    n_keys = int(fb.seq_lens.sum())
    k_fp8 = torch.randn(n_keys, IDX_DIM, generator=g).clamp(-448, 448).to(torch.float8_e4m3fn)
    k_scale = torch.rand(n_keys, generator=g) + 0.5
    q_fp8 = torch.randn(rows, IDX_HEADS, IDX_DIM, generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(rows, IDX_HEADS, 1, generator=g)
    indexer = types.SimpleNamespace(index_topk=K)
    fb_idx = _forward_batch("EXTEND")
    os.environ[tp.ENV_MODE] = "indexer"
    tp.plan_for(fb_idx, group, h)
    for strategy, batch in (("tokens", fb), ("indexer", fb_idx)):
        mine = getattr(batch, tp.PLAN_ATTR)
        assert mine.strategy == strategy, mine
        metadata = _indexer_metadata(batch)
        for chunk in (None, 3):
            original = _upstream_topk_ragged(k_fp8, k_scale, chunk)
            want = original(indexer, False, batch, 0, q_fp8, weights, metadata)
            for prealloc in (False, True):  # True: the piecewise-graph split op's static padded buffer
                buf = torch.full((rows, K), -7, dtype=torch.int32) if prealloc else None
                got = tp.around_get_topk_ragged(original, indexer, False, batch, 0, q_fp8, weights, metadata, buf)
                key = f"indexer_{strategy}_chunk{chunk}_prealloc{prealloc}"
                r = mine.rows if strategy == "tokens" else range(T)  # tokens: only this rank's rows are filled
                same = got[r.start : r.stop].sort(dim=1).values.equal(want[r.start : r.stop].sort(dim=1).values)
                others = torch.cat([got[: r.start], got[r.stop : T]])
                out[key] = bool(same and got.shape == (rows, K) and (others == -1).all())
                out[key + "_pad"] = bool((got[T:] == (-7 if prealloc else -1)).all())
        os.environ[verify.ENV_VERIFY] = "1"
        tp.around_get_topk_ragged(_upstream_topk_ragged(k_fp8, k_scale, None), indexer, False, batch, 0, q_fp8,
                                  weights, metadata)
        os.environ[verify.ENV_VERIFY] = "0"
    out["verify_indexer"] = verify.worst().get("token-parallel Indexer._get_topk_ragged")
    return out


def _launch(world: int) -> list[dict]:
    from nsa_tp.parallel.launch import launch

    return launch(_rank_case, world, (world,), backend="gloo", timeout_s=600)


@needs_sglang
@pytest.mark.parametrize("world", [2, 4])
def test_tokens_and_indexer_equal_heads_path_gloo(world):
    results = _launch(world)
    assert len({r["splits"] for r in results}) == 1  # every rank planned the same split
    assert sum(results[0]["splits"]) == sum(e for _, e in REQS)
    for rank, r in enumerate(results):
        assert r["strategy"] == "tokens" and r["downgrade"] == r["downgrade_broadcast"] == "indexer", r
        for name in ("bf16", "fp8"):
            # The same reference math on the same rows: only bf16 output rounding may differ (DESIGN: < 1e-2).
            assert r[f"sparse_{name}"] < 1e-2, (rank, name, r)
            assert r[f"kv_{name}"] < 1e-2, (rank, name, r)
            assert r[f"fallback_{name}"] < 1e-2, (rank, name, r)
            assert r[f"sparse_{name}_pad_zero"] and r[f"sparse_{name}_empty_zero"], (rank, r)
            assert r[f"kv_{name}_shape"] == (sum(e for _, e in REQS) + PAD_ROWS, 1, HEADS // world, D_V)
        for strategy in ("tokens", "indexer"):
            for chunk in (None, 3):
                for prealloc in (False, True):
                    key = f"indexer_{strategy}_chunk{chunk}_prealloc{prealloc}"
                    assert r[key] and r[key + "_pad"], (rank, key, r)
        calls, worst = r["verify_sparse"]
        assert calls == 1 and worst < 1e-2, r["verify_sparse"]
        calls, worst = r["verify_indexer"]
        assert calls == 2 and worst == 0.0, r["verify_indexer"]


def test_indexer_hook_ignores_a_stale_plan():
    """A plan cached for an earlier batch on a refilled ForwardBatch object never splits this batch's rows."""
    mode = types.SimpleNamespace(is_extend_without_speculative=lambda: True)
    fb = types.SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=[4], extend_prefix_lens_cpu=[0])
    stale = tp.ExtendPlan("tokens", "test", (2, 2), 0, tp.batch_key(fb))
    fb.extend_seq_lens_cpu = [6]
    setattr(fb, tp.PLAN_ATTR, stale)
    calls = []

    def original(*args):
        calls.append(args)
        return "upstream"

    q, w = torch.zeros(6, 4, 128), torch.zeros(6, 4, 1)
    assert tp.around_get_topk_ragged(original, "indexer", True, fb, 3, q, w, "meta") == "upstream"
    assert calls[0][4] is q and calls[0][6] == "meta" and calls[0][1] is True  # upstream's own call, untouched


def test_decision_is_cached_per_batch_shape():
    """Serving repeats shapes (chunked-prefill chunks, same-length prompts): the per-row work runs once a shape."""
    mode = types.SimpleNamespace(is_extend_without_speculative=lambda: True)
    tp_plan._decide.cache_clear()
    plans = []
    for lens in ([4096, 3], [4096, 3], [4096, 4]):
        fb = types.SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=lens, extend_prefix_lens_cpu=[100, 0])
        plans.append(tp.plan_extend(fb, 1, 4, 32, mode="on"))
    info = tp_plan._decide.cache_info()
    assert (info.hits, info.misses) == (1, 2)
    assert plans[0] == plans[1] and plans[0].splits != plans[2].splits and sum(plans[2].splits) == 4100
