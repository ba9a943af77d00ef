"""How an attention TP group splits a batch's sparse attention: the cost model and the per-batch choice.

The choice is a pure function (:func:`choose`) of the batch's shape (:class:`BatchShape`: query rows, mean
and max keys a row scores, the layer's heads, the group size) and per-op constants measured on a card
(:class:`TokenParallelCosts`). Strategies (``W`` ranks, ``H`` heads, ``h = H / W`` a rank):

===========  ======================================================  ===========================================
strategy     per rank                                                extra traffic per rank
===========  ======================================================  ===========================================
``heads``    indexer on all ``T`` rows; sparse core on ``h`` heads    none
             (padded by FlashMLA to 64 on Hopper) of all rows
``indexer``  indexer on ``~T/W`` rows; sparse core as ``heads``       all-gather of ``T x K`` int32 top-k ids
``tokens``   indexer and sparse core (all ``H`` heads, no padding)    all-to-all q ``T x h x 576`` and o
             on ``~T/W`` rows                                         ``T x h x 512`` bf16, ``(W-1)/W`` off-rank
``keys``     decode, fewer requests than ranks: the indexer's keys    all-gather of ``[B, K]`` candidates + merge
             split, candidates merged; sparse core by heads
===========  ======================================================  ===========================================

When each wins, as :func:`choose` decides with :data:`DEFAULT_COSTS` (H200, measured 2026-11-27; a fresh
causal prompt of ``T`` tokens, one request; :func:`describe_grid` computes it and
``test_policy_docstring_table`` checks this copy):

====  ========  ========  ========  ========  ========  ========
W     T=1K      T=2K      T=4K      T=8K      T=32K     T=128K
====  ========  ========  ========  ========  ========  ========
2     heads     heads     indexer   indexer   indexer   indexer
4     heads     indexer   tokens    tokens    tokens    tokens
8     heads     tokens    tokens    tokens    tokens    tokens
====  ========  ========  ========  ========  ========  ========

Why: the indexer is replicated under ``heads`` and grows with ``T x keys`` (quadratic in a causal prompt),
so splitting it pays from 1-2K tokens on (:func:`crossover_tokens`); the all-gather of ids is small (8 KiB a
row). ``tokens`` also removes the head padding (4x the sparse FLOPs at TP8 on Hopper) but moves 2.2 KB per
row and head (q out, o back); it beats ``indexer`` where the padding saved exceeds that traffic — at TP4
and TP8, not at TP2 (64 heads a rank need no padding). Very small batches stay ``heads``: every collective
has a fixed cost (~0.24 ms eager on NVLink). Decode: ``tokens`` for at least ``W`` requests, ``keys``
below, each only where it beats the replicated decode indexer (with these costs: never at batch 1; at 16
requests from 84K (TP8) to 156K (TP2) context).

Everything here is pure host-side arithmetic (no tensors, no device queries), built once per batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from nsa_tp.parallel.layout import TOKEN_PARALLEL_MODES, ParallelLayout
from nsa_tp.token_parallel.plan import _check_count, causal_mean_keys

__all__ = [
    "TokenParallelCosts",
    "DEFAULT_COSTS",
    "STRATEGIES",
    "PREFILL_STRATEGIES",
    "FORCE_MODES",
    "BatchShape",
    "predict",
    "choose",
    "token_costs",
    "predict_ms",
    "choose_strategy",
    "choose_token_parallel",
    "crossover_tokens",
    "crossover_decode_context",
    "describe_policy",
    "describe_grid",
]

STRATEGIES = ("heads", "indexer", "tokens", "keys")
PREFILL_STRATEGIES = ("heads", "indexer", "tokens")  # "keys" is decode-only
FORCE_MODES = ("heads", "indexer", "tokens")  # a mode that names a strategy forces it (tests, benchmarks)
D_QK = 576  # absorbed q: 512 latent + 64 rope (what heads_to_tokens sends)
D_V = 512  # latent output (what tokens_to_heads sends back)
ID_BYTES = 4  # an int32 top-k id (what gather_topk_rows sends)


# --------------------------------------------------------------------------------------------------
# Costs measured on a card
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenParallelCosts:
    """Per-unit times of the attention layer's parts on one card, the inputs of the per-batch policy.

    ``benchmark/bench_token_parallel.py`` measures every field and writes them (with card, date and
    command) into its JSON under ``"costs"``; :meth:`from_dict` reads that block back.
    """

    card: str
    date: str
    source: str  # where each number came from: measured (which run) or estimated (from what)
    indexer_ns_per_row_key: float  # prefill indexer: fp8 logits (64 index heads x 128) + top-k, per row x key
    # sparse MLA prefill at top-k 2048, ns per query token, by the heads a rank holds: ((heads, ns), ...)
    # as the fastest tier runs them (FlashMLA pads 16/32 to 64 on Hopper; a padding-free tier does not)
    sparse_ns_per_token: tuple[tuple[int, float], ...]
    a2a_latency_us: float  # fixed cost of one all_to_all_single in the group
    a2a_gbytes_per_s: float  # bytes one rank sends off-rank per second in all_to_all_single
    decode_indexer_ns_per_key: float  # paged decode logits + top-k, per request x context key
    decode_indexer_fixed_us: float  # launches and top-k floor of one decode indexer call
    gather_merge_us: float  # key-sharded decode: all-gather of [B, 2048] candidates + the merge top-k
    margin: float = 0.05  # switch only for a predicted gain above this fraction (measurement noise)
    # all-gather of the top-k ids ("indexer"); None: the all-to-all's numbers (both move (W-1)/W of the
    # gathered bytes through each rank's links, so the same latency and per-rank bandwidth apply)
    gather_latency_us: float | None = None
    gather_gbytes_per_s: float | None = None

    def __post_init__(self) -> None:
        table = tuple(sorted((int(h), float(ns)) for h, ns in self.sparse_ns_per_token))
        if not table or any(h < 1 or not ns > 0 for h, ns in table):
            raise ValueError(f"sparse_ns_per_token: expected ((heads >= 1, ns > 0), ...), got {table}")
        object.__setattr__(self, "sparse_ns_per_token", table)
        for name in ("indexer_ns_per_row_key", "a2a_latency_us", "a2a_gbytes_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name.endswith("_s") and v == 0):
                raise ValueError(f"{name}: expected a number >= 0 (> 0 for a bandwidth), got {v!r}")

    @property
    def gather_latency(self) -> float:
        """µs of one all-gather's fixed cost."""
        return self.a2a_latency_us if self.gather_latency_us is None else self.gather_latency_us

    @property
    def gather_bandwidth(self) -> float:
        """GB/s one rank moves off-rank in an all-gather."""
        return self.a2a_gbytes_per_s if self.gather_gbytes_per_s is None else self.gather_gbytes_per_s

    def sparse_ns(self, heads: int) -> float:
        """ns per token of the sparse core with ``heads`` heads: the measured entry for that head count,
        else the next larger measured one (a kernel pads up, never down), else the largest scaled by heads."""
        for h, ns in self.sparse_ns_per_token:
            if h >= heads:
                return ns
        h, ns = self.sparse_ns_per_token[-1]
        return ns * heads / h

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["sparse_ns_per_token"] = [list(p) for p in self.sparse_ns_per_token]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TokenParallelCosts:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"costs: missing fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})  # type: ignore[arg-type]


# Measured on 4x H200 (one host, NVLink) on 2026-11-27 by `benchmark/bench_token_parallel.py --world 4`
# (benchmark/results/token_parallel_h200x4_20261127.json, its "costs" block): indexer and sparse core on one
# GPU at the largest prefill, all-to-all latency/bandwidth and the decode indexer in the group, without CUDA
# graphs (eager timings, what a prefill sees). The 64-head sparse entry is the FlashMLA tier at T=4096,
# N=32768, K=2048 on H200 (benchmark/results/flashmla_padding_h200.json: 2.16 ms / 4096 tokens), since the
# token-parallel run measured 16, 32 and 128 heads only. The decode numbers make key sharding lose at every
# context on 2-4 GPUs: the batch-1 indexer is launch-bound (1.1-1.2 ms eager, 0.09-0.12 ms in a graph) and
# the candidate gather + merge alone costs ~0.9 ms, so `auto` keeps the replicated indexer for decode.
DEFAULT_COSTS = TokenParallelCosts(
    card="NVIDIA H200",
    date="2026-11-27",
    source="measured: benchmark/results/token_parallel_h200x4_20261127.json (costs block); 64-head sparse "
           "entry from benchmark/results/flashmla_padding_h200.json",
    indexer_ns_per_row_key=0.2808,
    sparse_ns_per_token=((16, 482.0), (32, 503.4), (64, 527.3), (128, 901.1)),
    a2a_latency_us=242.5,
    a2a_gbytes_per_s=220.7,
    decode_indexer_ns_per_key=0.4887,
    decode_indexer_fixed_us=1142.5,
    gather_merge_us=914.9,
)



# --------------------------------------------------------------------------------------------------
# The batch shape and the pure choice
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """What the choice needs to know about one batch of one attention TP group (host data only).

    ``num_tokens``: real query rows (decode: requests); ``mean_keys`` / ``max_keys``: keys a row scores, on
    average and at most (``ke - ks``; decode: the request's length); ``num_heads``: the layer's ``H``;
    ``world``: ranks in the attention TP group; ``is_decode``: a decode step (paged indexer).
    """

    num_tokens: int
    mean_keys: float
    max_keys: int
    num_heads: int = 128
    world: int = 1
    is_decode: bool = False
    topk: int = 2048

    def __post_init__(self) -> None:
        _check_count(self.num_tokens, "num_tokens")
        m = self.mean_keys
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0 or not math.isfinite(m):
            raise ValueError(f"mean_keys (context_len): expected a number >= 0, got {m!r}")
        _check_count(self.max_keys, "max_keys")
        if self.num_tokens and self.max_keys < m - 1e-9:
            raise ValueError(f"max_keys: expected >= mean_keys ({m}), got {self.max_keys}")
        _check_count(self.world, "world", 1)
        _check_count(self.num_heads, "num_heads", 1)
        _check_count(self.topk, "topk", 1)
        if self.num_heads % self.world:
            raise ValueError(f"num_heads: {self.num_heads} heads do not split over {self.world} ranks")

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.world

    @classmethod
    def of(cls, layout: ParallelLayout, num_tokens: int, mean_keys: float, max_keys: int | None = None, *,
           is_decode: bool = False, topk: int = 2048) -> BatchShape:
        """From a resolved layout; ``max_keys`` defaults to ``ceil(mean_keys)`` (rows of equal length)."""
        if isinstance(mean_keys, bool) or not isinstance(mean_keys, (int, float)) or not mean_keys >= 0:
            raise ValueError(f"context_len: expected a number >= 0, got {mean_keys!r}")
        mk = math.ceil(mean_keys) if max_keys is None else max_keys
        return cls(num_tokens, float(mean_keys), mk, layout.num_attention_heads, layout.attn_tp_size, is_decode,
                   topk)


def _collective_ms(off_rank_bytes: float, latency_us: float, gbytes_per_s: float) -> float:
    return latency_us / 1e3 + off_rank_bytes / (gbytes_per_s * 1e9) * 1e3


def predict(shape: BatchShape, strategy: str, costs: TokenParallelCosts = DEFAULT_COSTS) -> dict[str, float]:
    """Predicted time (ms) of the busiest rank under ``strategy``: its parts and ``"total"``. Pure.

    Prefill: the indexer costs ``indexer_ns_per_row_key`` per (row, key); split by rows it is the rank's
    share ``T * mean / W`` plus at most one row (``max_keys``: the split plans cut between rows). The sparse
    core costs ``sparse_ns(heads)`` per row. Collectives: latency + the bytes leaving a rank over the
    measured per-rank bandwidth. Decode's sparse core is left out (memory-bound on the 2048 selected rows:
    the same in every strategy).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    W, T, h, H = shape.world, shape.num_tokens, shape.heads_per_rank, shape.num_heads
    frac = (W - 1) / W  # the share of a regrouped or gathered tensor that crosses the wire
    parts: dict[str, float] = {}
    if shape.is_decode:
        per_req = costs.decode_indexer_ns_per_key * shape.mean_keys / 1e6
        fixed = costs.decode_indexer_fixed_us / 1e3
        if strategy == "heads":
            parts["indexer"] = fixed + T * per_req
        elif strategy == "tokens":
            parts["indexer"] = fixed + -(-T // W) * per_req
            parts["all_to_all"] = sum(_collective_ms(T * h * d * 2 * frac, costs.a2a_latency_us, costs.a2a_gbytes_per_s)
                                      for d in (D_QK, D_V))
        elif strategy == "keys":
            parts["indexer"] = fixed + T * per_req / W
            parts["gather_merge"] = costs.gather_merge_us / 1e3
        else:
            raise ValueError("strategy 'indexer' is for extend (prefill) batches only")
    else:
        if strategy == "keys":
            raise ValueError("strategy 'keys' is for decode only (is_decode=True)")
        row_keys = T * shape.mean_keys
        split_keys = row_keys / W + (shape.max_keys if T else 0)  # the busiest rank's share, one row over at most
        if strategy == "heads":
            parts["indexer"] = costs.indexer_ns_per_row_key * row_keys / 1e6
            parts["sparse"] = T * costs.sparse_ns(h) / 1e6
        elif strategy == "indexer":
            parts["indexer"] = costs.indexer_ns_per_row_key * min(split_keys, row_keys) / 1e6
            parts["all_gather"] = _collective_ms(T * shape.topk * ID_BYTES * frac, costs.gather_latency,
                                                 costs.gather_bandwidth)
            parts["sparse"] = T * costs.sparse_ns(h) / 1e6
        else:
            parts["indexer"] = costs.indexer_ns_per_row_key * min(split_keys, row_keys) / 1e6
            parts["sparse"] = min(T / W + 1, T) * costs.sparse_ns(H) / 1e6  # all heads, no padding
            parts["all_to_all"] = sum(_collective_ms(T * h * d * 2 * frac, costs.a2a_latency_us, costs.a2a_gbytes_per_s)
                                      for d in (D_QK, D_V))
    parts["total"] = sum(parts.values())
    return parts


def choose(shape: BatchShape, costs: TokenParallelCosts = DEFAULT_COSTS, mode: str = "auto") -> str:
    """The strategy for this batch: ``"heads"``, ``"indexer"``, ``"tokens"`` or ``"keys"``. Pure.

    ``mode``: ``"off"`` -> ``heads``; ``"on"`` -> the full split (``tokens``; decode with fewer requests than
    ranks: ``keys``); ``"auto"`` -> the candidate with the least predicted time (:func:`predict`), leaving
    ``heads`` only for a gain above ``costs.margin``; a strategy name forces it where it applies (``indexer``
    on a decode batch runs ``heads``). A one-rank group or an empty batch is always ``heads``.
    """
    if mode not in TOKEN_PARALLEL_MODES + FORCE_MODES:
        raise ValueError(f"mode: expected one of {TOKEN_PARALLEL_MODES + FORCE_MODES}, got {mode!r}")
    W, T = shape.world, shape.num_tokens
    if W == 1 or mode in ("off", "heads") or T == 0:
        return "heads"
    if shape.is_decode:
        split = "keys" if T < W else "tokens"
        if mode in ("on", "tokens"):
            return split
        if mode == "indexer":
            return "heads"
        candidates = (split,)
    else:
        if mode in ("on", "tokens"):
            return "tokens"
        if mode == "indexer":
            return "indexer"
        candidates = ("indexer", "tokens")
    base = predict(shape, "heads", costs)["total"]
    best = min(candidates, key=lambda s: (predict(shape, s, costs)["total"], candidates.index(s)))
    return best if predict(shape, best, costs)["total"] < base * (1.0 - costs.margin) else "heads"


def describe_grid(costs: TokenParallelCosts = DEFAULT_COSTS, worlds: Sequence[int] = (2, 4, 8),
                  tokens: Sequence[int] = (1024, 2048, 4096, 8192, 32768, 131072),
                  num_heads: int = 128) -> list[list[str]]:
    """``auto``'s choice for a fresh causal prompt of each length, one row per group size (the docstring
    table): ``[[W, choice(T0), choice(T1), ...], ...]``."""
    rows = []
    for w in worlds:
        row = [str(w)]
        for t in tokens:
            row.append(choose(BatchShape(t, causal_mean_keys(0, t), t, num_heads, w), costs))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Layout-level helpers (the same choice, from a resolved layout)
# --------------------------------------------------------------------------------------------------


def token_costs(key_counts: Sequence[int], costs: TokenParallelCosts = DEFAULT_COSTS,
                num_heads: int = 128) -> list[float]:
    """Predicted time (ns) of each token in token-parallel mode: its indexer row plus its sparse row.

    ``key_counts[t]`` is how many keys token ``t`` scores (``ke - ks``); a token with none costs nothing.
    Feed to :func:`nsa_tp.token_parallel.plan.plan_token_split` to balance causal prefill.
    """
    per_row = costs.sparse_ns(num_heads)
    return [costs.indexer_ns_per_row_key * k + (per_row if k > 0 else 0.0) for k in key_counts]


def predict_ms(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    strategy: str,
    *,
    max_keys: int | None = None,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> dict[str, float]:
    """:func:`predict` for a batch of ``num_tokens`` rows scoring ``context_len`` keys on average
    (:func:`~nsa_tp.token_parallel.plan.causal_mean_keys` for a prefill; the request length for decode)."""
    return predict(BatchShape.of(layout, num_tokens, context_len, max_keys, is_decode=is_decode), strategy, costs)


def choose_strategy(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    mode: str | None = None,
    *,
    max_keys: int | None = None,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> str:
    """:func:`choose` from a resolved layout. Pure.

    Args:
        layout: the resolved layout (its ``attn_tp_size`` and head count).
        num_tokens: real query rows in the batch (decode: requests x tokens per request).
        context_len: mean keys a row scores; ``max_keys``: the most any row scores (default: the mean).
        mode: ``"auto" | "on" | "off"`` or a strategy name to force; ``None`` takes ``layout.token_parallel``
            (the ``--nsa-token-parallel`` flag).
        is_decode: decode step (the indexer reads the paged index-K cache).
        costs: the measured parts (:data:`DEFAULT_COSTS`).
    """
    mode = layout.token_parallel if mode is None else mode
    if mode not in TOKEN_PARALLEL_MODES + FORCE_MODES:
        raise ValueError(f"mode: expected one of {TOKEN_PARALLEL_MODES + FORCE_MODES}, got {mode!r}")
    shape = BatchShape.of(layout, num_tokens, context_len, max_keys, is_decode=is_decode)
    return choose(shape, costs, mode)


def choose_token_parallel(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    mode: str | None = None,
    *,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> bool:
    """True when this batch leaves pure TP (any strategy but ``heads``); see :func:`choose_strategy`."""
    return choose_strategy(layout, num_tokens, context_len, mode, is_decode=is_decode, costs=costs) != "heads"


def _first_true(lo: int, hi: int, pred) -> int | None:  # noqa: ANN001 - a predicate monotone in its int argument
    if not pred(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def crossover_tokens(layout: ParallelLayout, context_len: float | None = None, *,
                     costs: TokenParallelCosts = DEFAULT_COSTS, max_tokens: int = 1 << 20) -> int | None:
    """Smallest prefill token count at which ``auto`` leaves pure TP (``None``: never up to max_tokens).

    ``context_len=None`` means a fresh causal prompt of that many tokens (mean keys ``(T+1)/2``, max ``T``).
    The gain grows with the token count while the collectives' fixed cost does not, so the search is valid.
    """
    def pays(t: int) -> bool:
        ctx = causal_mean_keys(0, t) if context_len is None else context_len
        mk = t if context_len is None else None
        return choose_strategy(layout, t, ctx, "auto", max_keys=mk, costs=costs) != "heads"

    return _first_true(1, max_tokens, pays)


def crossover_decode_context(layout: ParallelLayout, batch: int = 1, *,
                             costs: TokenParallelCosts = DEFAULT_COSTS, max_context: int = 1 << 22) -> int | None:
    """Smallest context at which ``auto`` leaves pure TP for a decode batch of ``batch`` requests."""
    return _first_true(1, max_context,
                       lambda c: choose_strategy(layout, batch, c, "auto", is_decode=True, costs=costs) != "heads")


def describe_policy(layout: ParallelLayout, costs: TokenParallelCosts = DEFAULT_COSTS) -> str:
    """One line for ``nsa-tp plan``: what ``--nsa-token-parallel`` does per batch under this layout."""
    w = layout.attn_tp_size
    if w == 1:
        return "n/a (1-rank attention group)"
    if layout.token_parallel == "off":
        return "off: pure TP for every batch"
    if layout.token_parallel == "on":
        return (f"on: every batch; prefill and decode with >= {w} requests split tokens over the {w} ranks, "
                f"decode with < {w} requests shards the indexer's keys")
    longest = 163840  # DeepSeek-V3.2's max_position_embeddings: no crossover past it matters
    t = crossover_tokens(layout, costs=costs, max_tokens=longest)
    c = crossover_decode_context(layout, costs=costs, max_context=longest)
    if t:
        at = choose_strategy(layout, t, causal_mean_keys(0, t), "auto", max_keys=t, costs=costs)
        big = choose_strategy(layout, longest, causal_mean_keys(0, longest), "auto", max_keys=longest, costs=costs)
        how = at if at == big else f"{at}, {big} at {longest}"
        pre = f"prefill token-parallel ({how}) from {t} tokens (fresh prompt)"
    else:
        pre = "prefill stays pure TP"
    dec = (f"decode batch 1 key-sharded from {c} context tokens" if c
           else f"decode batch 1 stays pure TP up to {longest} context")
    return f"auto: {pre}; {dec} (cost model: {costs.card}, {costs.date})"
