"""Token-parallel attention, pure parts: split plans, key shards, the per-batch policy, exact top-k merge,
fp8 wire packing. No process groups here (see test_token_parallel_dist.py)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from nsa_tp.ops.topk import topk_positions
from nsa_tp.parallel import resolve_layout
from nsa_tp.parallel.collectives import a2a_bytes_per_rank, fp8_pack_rows, fp8_row_bytes, fp8_unpack_rows
from nsa_tp.token_parallel.core import shard_page_table
from nsa_tp.token_parallel.costs import Costs
from nsa_tp.token_parallel.merge import local_topk, merge_topk
from nsa_tp.token_parallel.plan import (
    TokenSplit,
    causal_key_counts,
    causal_mean_keys,
    plan_index_split,
    plan_key_shards,
    plan_token_split,
    transient_buffers,
    transient_peak_bytes,
)
from nsa_tp.token_parallel.policy import (
    BatchShape,
    Plan,
    choose,
    crossover_decode_context,
    crossover_tokens,
    describe_grid,
    token_costs,
)

# ---------------------------------------------------------------------------------------------- split plans


@pytest.mark.parametrize("T,W", [(0, 2), (1, 4), (3, 4), (4, 4), (7, 2), (10, 3), (4097, 8)])
def test_even_split_counts(T, W):
    s = plan_token_split(T, W)
    assert sum(s.splits) == T and len(s.splits) == W and s.num_rows == T
    assert max(s.splits) - min(s.splits) <= 1
    assert list(s.splits) == sorted(s.splits, reverse=True)  # the first ranks take the extra token
    covered = [t for r in range(W) for t in s.rows(r)]
    assert covered == list(range(T))  # contiguous, disjoint, in order


def test_split_with_dp_padding_rows():
    s = plan_token_split(7, 2, num_rows=8)  # 7 real tokens padded to 8 for the MLP sync
    assert s.splits == (4, 3) and s.num_real == 7 and s.num_rows == 8
    assert list(s.rows(1)) == [4, 5, 6]
    with pytest.raises(ValueError, match="num_rows"):
        plan_token_split(7, 2, num_rows=6)


@pytest.mark.parametrize("T,W", [(1, 2), (5, 4), (64, 2), (300, 4), (1000, 8)])
def test_cost_balanced_split_bounds_the_busiest_rank(T, W):
    rng = random.Random(T * 31 + W)
    keys = sorted(rng.randrange(0, 5000) for _ in range(T))  # causal-ish: later tokens score more keys
    costs = token_costs(keys, _SLOW_NET)
    s = plan_token_split(T, W, costs=costs)
    assert sum(s.splits) == T
    per_rank = [sum(costs[i] for i in s.rows(r)) for r in range(W)]
    # Each cut lands within one token of the ideal share: no rank exceeds total/W + one token's cost.
    assert max(per_rank) <= sum(costs) / W + max(costs) + 1e-6


def test_cost_balanced_split_beats_count_split_on_causal_prefill():
    T, W = 32768, 2
    costs = token_costs([t + 1 for t in range(T)], _SLOW_NET)  # a fresh causal prompt: token t scores t+1 keys
    even = plan_token_split(T, W)
    bal = plan_token_split(T, W, costs=costs)

    def busiest(s):
        return max(sum(costs[i] for i in s.rows(r)) for r in range(W))

    assert bal.splits[0] > bal.splits[1]  # the early (cheap) tokens go together
    # The indexer row of token t costs ~t: the even split leaves rank 1 with 3/4 of the indexer work.
    assert busiest(bal) <= sum(costs) / W + max(costs)
    assert busiest(bal) < 0.9 * busiest(even)


def test_split_rejects_bad_input():
    for bad in (dict(num_tokens=-1, world=2), dict(num_tokens=3, world=0), dict(num_tokens=True, world=2)):
        with pytest.raises(ValueError):
            plan_token_split(**bad)
    with pytest.raises(ValueError, match="one cost per token"):
        plan_token_split(3, 2, costs=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        plan_token_split(2, 2, costs=[1.0, float("nan")])
    with pytest.raises(ValueError, match="rank"):
        plan_token_split(3, 2).rows(2)


def test_causal_mean_keys():
    assert causal_mean_keys(0, 1) == 1
    assert causal_mean_keys(0, 4) == (1 + 2 + 3 + 4) / 4
    assert causal_mean_keys(100, 3) == 102
    assert causal_mean_keys(5, 0) == 0


# ---------------------------------------------------------------------------------------------- key shards


@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_key_shards_cover_each_context_once_page_aligned(W):
    lens = [0, 1, 63, 64, 65, 130, 1000, 131072]
    shards = plan_key_shards(lens, W)
    assert len(shards) == W
    for b, L in enumerate(lens):
        seen = []
        for sh in shards:
            assert sh.key_start[b] == sh.page_start[b] * 64
            assert sh.key_len[b] <= sh.num_pages[b] * 64
            seen.extend(range(sh.key_start[b], sh.key_start[b] + sh.key_len[b]))
        assert seen == list(range(L))
        sizes = [sh.num_pages[b] for sh in shards]
        assert max(sizes) - min(sizes) <= 1  # balanced to a page


@pytest.mark.parametrize("W", [2, 3, 4])
def test_shard_page_table_matches_the_plan(W):
    lens = [0, 5, 64, 200, 700]
    max_pages = 12
    table = torch.arange(len(lens) * max_pages, dtype=torch.int32).reshape(len(lens), max_pages) * 7 % 97
    for r, plan in enumerate(plan_key_shards(lens, W)):
        sh = shard_page_table(table, torch.tensor(lens, dtype=torch.int32), r, W)
        local, local_lens, start = sh.page_table, sh.seq_lens, sh.key_start
        assert sh.width == local.shape[1] * 64 and start.dtype == torch.int32
        assert local.shape == (len(lens), -(-max_pages // W))
        assert local_lens.tolist() == list(plan.key_len) and start.tolist() == list(plan.key_start)
        for b in range(len(lens)):
            n = plan.num_pages[b]
            assert local[b, :n].tolist() == table[b, plan.page_start[b] : plan.page_start[b] + n].tolist()


# ---------------------------------------------------------------------------------------------- policy

_TOY = Costs(
    card="toy", date="-", command="test", indexer_ns_per_row_key=0.02,
    sparse_ns_per_token=((64, 473.6), (128, 947.2)),  # FlashMLA-like: 16/32 heads cost what 64 do
    decode_indexer_ns_per_key=1.0, decode_indexer_fixed_us=40.0, merge_us=5.0,
    a2a_latency_us=30.0, a2a_gbytes_per_s=300.0, gather_latency_us=30.0, gather_gbytes_per_s=300.0,
    collectives_source="test",
)


def _ch(lay, T, mean, mode="auto", *, max_keys=None, decode=False, costs=_TOY) -> str:
    return choose(BatchShape.of(lay, T, mean, max_keys, is_decode=decode), costs, mode).strategy


def test_policy_modes_and_trivial_groups():
    tp8 = resolve_layout(8, sm_major=9)
    tp1 = resolve_layout(1, sm_major=9)
    dp8 = resolve_layout(8, 8, True, sm_major=9)
    assert _ch(tp8, 32768, 16384, "off") == "heads"
    assert _ch(tp8, 1, 10, "on") == "tokens"
    assert _ch(tp8, 3, 100000, "on", decode=True) == "keys"  # 3 requests < 8 ranks
    assert _ch(tp8, 8, 100000, "on", decode=True) == "tokens"
    assert _ch(tp8, 0, 0, "on") == "heads"  # nothing to split
    for lay in (tp1, dp8):  # one-rank attention groups never split
        assert _ch(lay, 32768, 16384, "on") == "heads"
    # forced modes need no costs; auto without costs is upstream's heads, and says why
    assert _ch(tp8, 32768, 16384, "on", costs=None) == "tokens"
    plan = choose(BatchShape.of(tp8, 32768, 16384), None)
    assert plan.strategy == "heads" and "without measured costs" in plan.reason and plan.ms() is None
    with pytest.raises(ValueError, match="mode"):
        _ch(tp8, 8, 8, "maybe")
    with pytest.raises(ValueError, match="context_len"):
        _ch(tp8, 8, -1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        _ch(tp8, -3, 8.0)


def test_auto_policy_follows_the_cost_model():
    tp8 = resolve_layout(8, sm_major=9)
    # Long prefill at TP8: 16 heads padded to 64 plus a replicated indexer -> token-parallel pays.
    assert _ch(tp8, 32768, causal_mean_keys(0, 32768), max_keys=32768) == "tokens"
    # A handful of tokens: the collectives' fixed cost dominates.
    assert _ch(tp8, 2, 2.0) == "heads"
    for lay in (resolve_layout(2, sm_major=9), resolve_layout(4, sm_major=9), tp8):
        t = crossover_tokens(lay, _TOY)
        if t is None:
            continue
        assert _ch(lay, t, causal_mean_keys(0, t), max_keys=t) != "heads"
        assert t == 1 or _ch(lay, t - 1, causal_mean_keys(0, t - 1), max_keys=t - 1) == "heads"
    # Padding makes TP8 pay earlier than TP2, whose 64 heads need no padding on Hopper.
    assert crossover_tokens(tp8, _TOY) < (crossover_tokens(resolve_layout(2, sm_major=9), _TOY) or 10**9)
    assert crossover_tokens(tp8, None) is None  # nothing measured: never leaves upstream's path


def _fresh(T: int, W: int, *, H: int = 128) -> BatchShape:
    return BatchShape(T, causal_mean_keys(0, T), T, H, W)


def test_predict_by_hand():
    """One shape, every part computed here from the documented formulas (toy costs, TP4, 8192 fresh tokens)."""
    T, W, h, K = 8192, 4, 32, 2048
    plan = choose(_fresh(T, W), _TOY)
    mean = (T + 1) / 2
    frac = 3 / 4
    heads, idx, tok = (plan.predicted[s] for s in ("heads", "indexer", "tokens"))
    assert heads["indexer"] == pytest.approx(0.02 * T * mean / 1e6)
    assert heads["sparse"] == pytest.approx(T * 473.6 / 1e6)  # 32 heads cost the 64-head entry (padding)
    share = 0.02 * (T * mean / W + T) / 1e6  # a quarter of the row-keys plus at most one (the longest) row
    assert idx["indexer"] == pytest.approx(share) and tok["indexer"] == pytest.approx(share)
    assert idx["all_gather"] == pytest.approx(30e-3 + T * K * 4 * frac / 300e9 * 1e3)
    assert idx["sparse"] == pytest.approx(heads["sparse"])
    assert tok["sparse"] == pytest.approx((T / W + 1) * 947.2 / 1e6)
    assert tok["all_to_all"] == pytest.approx(2 * 30e-3 + T * h * (576 + 512) * 2 * frac / 300e9 * 1e3)
    for parts in (heads, idx, tok):
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert plan.ms() == plan.predicted[plan.strategy]["total"]
    # the gather's own latency and bandwidth
    slow = dataclasses.replace(_TOY, gather_latency_us=100.0, gather_gbytes_per_s=10.0)
    assert choose(_fresh(T, W), slow).predicted["indexer"]["all_gather"] == pytest.approx(
        0.1 + T * K * 4 * frac / 10e9 * 1e3)


_GRID_T = [0, 1, 7, 64, 512, 2048, 8192, 32768, 131072]
_SLOW_NET = dataclasses.replace(_TOY, a2a_latency_us=240.0, a2a_gbytes_per_s=100.0, gather_latency_us=240.0,
                                gather_gbytes_per_s=100.0, indexer_ns_per_row_key=0.2, merge_us=900.0)


@pytest.mark.parametrize("W", [1, 2, 4, 8])
@pytest.mark.parametrize("costs", [_TOY, _SLOW_NET], ids=["toy", "slow-net"])
def test_choice_over_a_grid(W, costs):
    """The choice is the cheapest allowed strategy, leaves heads only past the margin, and never picks a
    strategy that does not apply (indexer on decode, keys on prefill, tokens on decode with < W requests)."""
    for T in _GRID_T:
        for decode in (False, True):
            for mean, mx in ([(causal_mean_keys(0, T), T), (4096.0, 8192)] if not decode else [(1000.0, 1000),
                                                                                              (65536.0, 65536)]):
                if T == 0:
                    mean, mx = 0.0, 0
                shape = BatchShape(T, mean, mx, 128, W, decode)
                plan = choose(shape, costs)
                got = plan.strategy
                assert choose(shape, costs) == plan  # pure: same input, same answer
                if W == 1 or T == 0:
                    assert got == "heads"
                    continue
                allowed = (["keys"] if T < W else ["tokens"]) if decode else ["indexer", "tokens"]
                assert got in ["heads", *allowed], (shape, got)
                totals = {s: plan.predicted[s]["total"] for s in ["heads", *allowed]}
                best = min(allowed, key=totals.__getitem__)
                if got == "heads":
                    assert totals[best] >= totals["heads"] * (1 - costs.margin), (shape, totals)
                else:
                    assert got == best and totals[got] < totals["heads"] * (1 - costs.margin), (shape, totals)
                # forced modes
                assert choose(shape, costs, "off").strategy == "heads" == choose(shape, costs, "heads").strategy
                assert choose(shape, costs, "on").strategy == allowed[-1]
                assert choose(shape, costs, "indexer").strategy == ("heads" if decode else "indexer")


@pytest.mark.parametrize("W", [2, 4, 8])
def test_fresh_prompts_once_split_stay_split(W):
    """Longer fresh prompts never go back to heads: the gain grows with T, the collectives' fixed cost does not."""
    left = False
    for T in [2**k for k in range(4, 18)]:
        got = choose(_fresh(T, W), _SLOW_NET).strategy
        left = left or got != "heads"
        assert not (left and got == "heads"), (W, T)
    assert left


def test_describe_grid_is_choose():
    rows = describe_grid(_TOY, tokens=(1024, 32768))
    assert [r[0] for r in rows] == ["2", "4", "8"]
    assert rows[2][2] == choose(_fresh(32768, 8), _TOY).strategy
    assert {c for r in describe_grid(None) for c in r[1:]} == {"heads"}


def test_batch_shape_checks():
    with pytest.raises(ValueError, match="max_keys"):
        BatchShape(4, 10.0, 5, 128, 2)
    with pytest.raises(ValueError, match="num_heads"):
        BatchShape(4, 10.0, 10, 128, 3)
    with pytest.raises(ValueError, match="mean_keys"):
        BatchShape(4, float("nan"), 10, 128, 2)
    with pytest.raises(ValueError, match="mode"):
        choose(BatchShape(4, 1.0, 1, 128, 2), _TOY, "keys")
    assert isinstance(choose(BatchShape(4, 1.0, 1, 128, 2), _TOY), Plan)


# ---------------------------------------------------------------------------------------------- transient memory


def test_transient_buffers_by_hand():
    split = TokenSplit((5, 3, 0, 1), 11)  # 9 real rows, 2 DP padding rows, an empty rank, a one-row rank
    h, K = 4, 16
    assert transient_buffers("heads", split, 0, h, K) == {} == transient_buffers("keys", split, 0, h, K)
    t0 = transient_buffers("tokens", split, 0, h, K)
    assert t0 == {"q_recv": 4 * 5 * h * 576 * 2, "q_tokens": 5 * 16 * 576 * 2, "o_core": 5 * 16 * 512 * 2,
                  "o_send": 4 * 5 * h * 512 * 2, "out": 11 * h * 512 * 2}
    assert transient_peak_bytes("tokens", split, 0, h, K) == 2 * 5 * 16 * 576 * 2
    assert transient_buffers("tokens", split, 2, h, K) == {"out": 11 * h * 512 * 2}  # no rows: nothing moves in
    t3 = transient_buffers("tokens", split, 3, h, K)  # one row: the regrouped views need no copy
    assert set(t3) == {"q_recv", "o_core", "out"}
    assert transient_peak_bytes("tokens", split, 3, h, K) == t3["q_recv"] + t3["o_core"]
    i1 = transient_buffers("indexer", split, 1, h, K)
    assert i1 == {"ids_block": 5 * K * 4, "ids_gathered": 4 * 5 * K * 4, "out": 11 * K * 4}
    assert transient_peak_bytes("indexer", split, 1, h, K) == 5 * 5 * K * 4
    one = TokenSplit((9,), 10)  # one rank: no exchange, no regrouping
    assert transient_buffers("tokens", one, 0, h, K) == {"o_core": 9 * h * 512 * 2, "out": 10 * h * 512 * 2}
    assert transient_buffers("indexer", one, 0, h, K) == {"out": 10 * K * 4}
    with pytest.raises(ValueError, match="rank"):
        transient_buffers("tokens", split, 4, h, K)
    with pytest.raises(ValueError, match="strategy"):
        transient_buffers("rows", split, 0, h, K)


def test_transient_peak_at_128k_tp8_is_below_flashmla_padding():
    """transient_peak_bytes' docstring: tokens' peak at 128K/TP8 (13 GB) is below the 64-head padded q and
    output FlashMLA allocates under heads (18.3 GB)."""
    T, W = 131072, 8
    keys = [i + 1 for i in range(T)]
    split = plan_token_split(T, W, costs=token_costs(keys, _SLOW_NET))
    assert split.splits[0] == max(split.splits) and 0.3 * T < split.splits[0] < 0.36 * T
    peak = max(transient_peak_bytes("tokens", split, r, 128 // W) for r in range(W))
    assert peak == 2 * split.splits[0] * 128 * 576 * 2 and 12e9 < peak < 14e9
    assert peak < T * 64 * (576 + 512) * 2


def test_index_split_balances_keys():
    keys = causal_key_counts([300, 90], [0, 40])  # a fresh 300-token prompt, then 50 new behind 40 cached
    assert keys[:3] == [1, 2, 3] and keys[300:302] == [41, 42] and len(keys) == 350
    s = plan_index_split(keys, 4, num_rows=352)
    assert s.num_real == 350 and s.num_rows == 352
    shares = [sum(keys[r.start : r.stop]) for r in (s.rows(i) for i in range(4))]
    assert max(shares) - sum(keys) / 4 <= max(keys)  # off by at most one row
    with pytest.raises(ValueError, match="prefix_lens"):
        causal_key_counts([3], [4])


def test_auto_policy_decode_key_sharding_has_a_context_crossover():
    tp2 = resolve_layout(2, sm_major=9)
    c = crossover_decode_context(tp2, _TOY)
    assert c is not None
    assert _ch(tp2, 1, c, decode=True) == "keys"
    assert _ch(tp2, 1, c - 1, decode=True) == "heads"
    parts = choose(BatchShape.of(tp2, 1, 131072, is_decode=True), _TOY).predicted["keys"]
    assert set(parts) == {"indexer", "all_gather", "merge", "total"}
    assert parts["all_gather"] == pytest.approx(30e-3 + 1 * 2048 * 8 / 300e9 * 1e3)  # one block of candidates


def test_predicted_parts_are_consistent():
    tp4 = resolve_layout(4, sm_major=9)
    T, ctx = 32768, causal_mean_keys(0, 32768)
    p = choose(BatchShape.of(tp4, T, ctx), _TOY).predicted  # max_keys defaults to the mean: one row's worth
    heads, toks = p["heads"], p["tokens"]
    assert toks["indexer"] == pytest.approx(heads["indexer"] / 4, rel=1e-3)  # the indexer divided by attn_tp
    assert heads["sparse"] == pytest.approx(toks["sparse"] * 2, rel=1e-3)  # 32 heads padded to 64 vs 128 / 4
    assert heads["total"] == pytest.approx(sum(v for k, v in heads.items() if k != "total"))
    assert toks["all_to_all"] > 0


def test_costs_round_trip_and_checks():
    d = _TOY.to_dict()
    assert Costs.from_dict(d) == _TOY and Costs.from_dict({"costs": d}["costs"]) == _TOY
    with pytest.raises(ValueError, match="missing"):
        Costs.from_dict({"card": "x"})
    with pytest.raises(ValueError, match="a2a_gbytes_per_s"):
        dataclasses.replace(_TOY, a2a_gbytes_per_s=0.0)
    assert dataclasses.replace(_TOY, margin=0.1).margin == 0.1


# ---------------------------------------------------------------------------------------------- top-k merge


def _shard_and_merge(logits: torch.Tensor, lengths: list[int], W: int, K: int) -> torch.Tensor:
    """Split each row's columns by plan_key_shards, local top-k per shard, then merge."""
    R = logits.shape[0]
    scores, positions = [], []
    for sh in plan_key_shards(lengths, W, page_size=4):
        width = max(sh.max_keys, 1)
        local = torch.full((R, width), float("-inf"))
        for r in range(R):
            k0, n = sh.key_start[r], sh.key_len[r]
            local[r, :n] = logits[r, k0 : k0 + n]
        s, p = local_topk(local, K, torch.tensor(sh.key_len, dtype=torch.int32),
                          torch.tensor(sh.key_start, dtype=torch.int32))
        scores.append(s)
        positions.append(p)
    pos, merged_scores = merge_topk(torch.stack(scores), torch.stack(positions), K)
    assert pos.dtype == torch.int32 and merged_scores.dtype == torch.float32
    return pos


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [1, 5, 16, 100])
def test_merge_equals_global_topk_exactly_with_ties(W, K):
    g = torch.Generator().manual_seed(W * 1000 + K)
    lengths = [0, 1, 3, 17, 40, 64, 99]
    N = max(lengths)
    # Integer-valued logits from a small range: many exact ties across and within shards.
    logits = torch.randint(-4, 5, (len(lengths), N), generator=g).float()
    for r, L in enumerate(lengths):
        logits[r, L:] = float("-inf")
    logits[5, 10:20] = float("-inf")  # -inf inside the range: not a candidate
    want = topk_positions(logits, K, torch.tensor(lengths, dtype=torch.int32))
    got = _shard_and_merge(logits, lengths, W, K)
    assert torch.equal(got, want)  # same total order (score desc, lower position first): identical ids


def test_merge_rows_with_fewer_than_k_candidates_and_empty_rows():
    scores = torch.full((2, 3, 4), float("-inf"))
    pos = torch.full((2, 3, 4), -1, dtype=torch.int64)
    scores[0, 0, :2] = torch.tensor([1.0, 0.5])
    pos[0, 0, :2] = torch.tensor([7, 3])
    scores[1, 0, :1] = 2.0
    pos[1, 0, :1] = 40
    scores[1, 1, 0] = float("nan")  # NaN is never a candidate
    pos[1, 1, 0] = 41
    p, s = merge_topk(scores, pos, 5)
    assert p.tolist() == [[40, 7, 3, -1, -1], [-1] * 5, [-1] * 5]
    assert s[0, :3].tolist() == [2.0, 1.0, 0.5] and torch.isneginf(s[0, 3:]).all() and torch.isneginf(s[1:]).all()


def test_merge_and_local_topk_reject_bad_input():
    with pytest.raises(ValueError, match="positions"):
        merge_topk(torch.zeros(2, 1, 3), torch.zeros(2, 1, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="scores"):
        merge_topk(torch.zeros(2, 1, 3, dtype=torch.float64), torch.zeros(2, 1, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="topk"):
        merge_topk(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="key_start"):
        local_topk(torch.zeros(2, 3), 2, torch.ones(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------- fp8 wire format


@pytest.mark.parametrize("d", [64, 512, 576])
def test_fp8_pack_round_trip(d):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(5, 3, d, generator=g) * torch.logspace(-3, 3, d)).to(torch.bfloat16)
    x[0, 0] = 0  # an all-zero row must come back as zeros, not NaN
    packed = fp8_pack_rows(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, fp8_row_bytes(d))
    back = fp8_unpack_rows(packed, d, torch.bfloat16)
    assert back.shape == x.shape and not back.isnan().any()
    assert (back[0, 0] == 0).all()
    rel = (back.float() - x.float()).norm() / x.float().norm()
    assert rel < 0.05  # e4m3: 3 mantissa bits, one scale per 64 values
    with pytest.raises(ValueError, match="divisible"):
        fp8_pack_rows(torch.zeros(2, 65))


def test_a2a_bytes_and_fp8_halves_them():
    bf16 = a2a_bytes_per_rank(4096, 16, 576, 8)
    assert bf16 == 4096 * 16 * 576 * 2 * 7 // 8
    assert a2a_bytes_per_rank(4096, 16, 576, 8, fp8=True) / bf16 == pytest.approx(612 / 1152)
    assert a2a_bytes_per_rank(4096, 16, 576, 1) == 0


# ---------------------------------------------------------------------------------------------- memory planner


def _chunk_bytes(meta) -> list[int]:
    return [(c.rows.stop - c.rows.start) * (c.hi - c.lo) * 4 for c in meta.index.chunks]


@pytest.mark.parametrize("W", [2, 4, 8])
def test_indexer_logits_memory_per_rank_drops_by_attn_tp(W):
    """A 4096-token causal prefill: each rank plans logits only for its rows, so its peak (one chunk,
    budget not binding) is ~1/attn_tp of pure TP's, and under a binding budget its total is ~1/attn_tp."""
    from nsa_tp.attention.metadata import ForwardMetadataBuilder
    from nsa_tp.token_parallel.backend import build_token_parallel_metadata

    T = 4096
    table = torch.arange(T // 64, dtype=torch.int32)[None, :]
    layout = resolve_layout(W, sm_major=9, token_parallel="on")
    big = ForwardMetadataBuilder(num_heads=layout.heads_per_rank, topk=2048, kv_dtype="bfloat16", device="cpu",
                                 backend="reference", logits_budget_mb=1024)
    pure = _chunk_bytes(big.prefill([T], [0], table))
    assert len(pure) == 1 and pure[0] == T * T * 4  # one chunk: every row x every key
    peaks = []
    for r in range(W):
        tpm = build_token_parallel_metadata(big, layout, r, seq_lens=[T], prefix_lens=[0], page_table=table)
        assert tpm.strategy == "tokens" and tpm.meta.index.num_rows == len(tpm.split.rows(r))
        peaks.append(max(_chunk_bytes(tpm.meta), default=0))
    assert max(peaks) <= pure[0] / W * 1.01  # the last rank: T/W rows x T keys
    # A binding budget (8 MiB < 64 MiB): every chunk fits it, and each rank's planned total is ~1/W.
    small = ForwardMetadataBuilder(num_heads=layout.heads_per_rank, topk=2048, kv_dtype="bfloat16", device="cpu",
                                   backend="reference", logits_budget_mb=8)
    pure_total = sum(_chunk_bytes(small.prefill([T], [0], table)))
    for r in range(W):
        b = _chunk_bytes(build_token_parallel_metadata(small, layout, r, seq_lens=[T], prefix_lens=[0],
                                                       page_table=table).meta)
        assert max(b) <= 8 << 20
        assert sum(b) <= pure_total / W * 1.25 + (8 << 20)


def test_plan_shows_the_per_batch_policy(capsys):
    from nsa_tp.cli import main
    from nsa_tp.token_parallel.policy import describe_policy

    assert main(["plan", "--tp", "8", "--sm", "90"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("token-parallel")][0]
    assert "pure TP (upstream) for every batch" in line  # no GPU here: no card, no measured costs
    auto = describe_policy(resolve_layout(8, sm_major=9), _TOY)
    t = crossover_tokens(resolve_layout(8, sm_major=9), _TOY, max_tokens=163840)
    assert f"from {t} tokens" in auto and "toy" in auto
    assert "no measured costs for Card X" in describe_policy(resolve_layout(8, sm_major=9), card="Card X")
    assert describe_policy(resolve_layout(8, sm_major=9, token_parallel="off")).startswith("off")
    assert describe_policy(resolve_layout(8, sm_major=9, token_parallel="on")).startswith("on")
    assert describe_policy(resolve_layout(8, 8, True, sm_major=9)).startswith("n/a")


def test_case_strategies_for_the_run_table():
    from nsa_tp.model.runner import Request, RunCase
    from nsa_tp.run_cmd import case_strategies

    reqs = (Request(0, 160), Request(80, 54), Request(0, 35))

    def run(tp, dp=1, dpa=False, core="token_parallel_on"):
        return case_strategies(RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, requests=reqs, core=core))

    assert run(2) == "tokens/tokens"  # 3 decode requests >= 2 ranks: split requests
    assert run(4) == "tokens/keys"  # 3 < 4 ranks: key-sharded decode indexer
    assert run(4, 2, True) == "tokens/tokens,tokens/keys"  # group 0 decodes 2 requests, group 1 one
    assert run(4, 4, True) == "heads/heads"  # full DP attention: nothing to split
    assert run(2, core="heads") == "heads/heads"
    assert run(2, core="some_other_core") == "-"


def test_sparse_cost_table_lookup():
    c = dataclasses.replace(_TOY, sparse_ns_per_token=[[128, 900.0], [16, 300.0], [64, 500.0]])
    assert c.sparse_ns_per_token == ((16, 300.0), (64, 500.0), (128, 900.0))  # sorted, tuples
    assert c.sparse_ns(16) == 300.0 and c.sparse_ns(32) == 500.0  # pads up to the next measured count
    assert c.sparse_ns(256) == pytest.approx(1800.0)  # past the table: per-head scaling of the largest
    with pytest.raises(ValueError, match="sparse_ns_per_token"):
        dataclasses.replace(_TOY, sparse_ns_per_token=())
    with pytest.raises(ValueError, match="sparse_ns_per_token"):
        dataclasses.replace(_TOY, sparse_ns_per_token=((64, 0.0),))


def test_merge_orders_negative_and_signed_zero_scores_like_the_sort():
    # -0.0 == +0.0: a tie, broken by the lower position; negative scores order below positive ones
    scores = torch.tensor([[[0.0, -1.5, -3.0e30]], [[-0.0, 2.0, -1.5]]])
    pos = torch.tensor([[[9, 4, 0]], [[3, 7, 2]]], dtype=torch.int32)
    p, s = merge_topk(scores, pos, 6)
    assert p.tolist() == [[7, 3, 9, 2, 4, 0]]
    assert s[0].tolist()[:5] == [2.0, 0.0, 0.0, -1.5, -1.5] and s[0, 5] == scores[0, 0, 2]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 200, generator=g) * 1e3
    logits[:, ::7] = logits[:, 1::7][:, : logits[:, ::7].shape[1]]  # exact float ties
    want = topk_positions(logits, 37, torch.full((3,), 200, dtype=torch.int32))
    assert torch.equal(_shard_and_merge(logits, [200] * 3, 3, 37), want)
