"""How an attention TP group splits a batch's sparse attention: the cost model and the per-batch choice.

What is split over the group, per batch (:func:`choose_strategy`):

- ``"heads"``  — pure TP (upstream): every rank scores every token, sparse core on its padded heads.
- ``"tokens"`` — token-parallel: prefill, or decode with at least ``W`` requests (requests are tokens).
- ``"keys"``   — decode with fewer than ``W`` tokens (batch 1): each rank scores a slice of every
  request's context and keeps a local top-k; the candidates are gathered and merged into the exact
  global top-k (:mod:`nsa_tp.token_parallel.merge`); the sparse core stays split by heads.

Everything here is pure host-side arithmetic (no tensors, no device queries), built once per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nsa_tp.parallel.layout import TOKEN_PARALLEL_MODES, ParallelLayout
from nsa_tp.token_parallel.plan import _check_count, causal_mean_keys

__all__ = [
    "TokenParallelCosts",
    "DEFAULT_COSTS",
    "STRATEGIES",
    "token_costs",
    "predict_ms",
    "choose_strategy",
    "choose_token_parallel",
    "crossover_tokens",
    "crossover_decode_context",
    "describe_policy",
]

STRATEGIES = ("heads", "tokens", "keys")
D_QK = 576  # absorbed q: 512 latent + 64 rope (what heads_to_tokens sends)
D_V = 512  # latent output (what tokens_to_heads sends back)


# --------------------------------------------------------------------------------------------------
# Cost model and policy
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

    def __post_init__(self) -> None:
        table = tuple(sorted((int(h), float(ns)) for h, ns in self.sparse_ns_per_token))
        if not table or any(h < 1 or not ns > 0 for h, ns in table):
            raise ValueError(f"sparse_ns_per_token: expected ((heads >= 1, ns > 0), ...), got {table}")
        object.__setattr__(self, "sparse_ns_per_token", table)

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
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name != "margin"]
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


def token_costs(key_counts: Sequence[int], costs: TokenParallelCosts = DEFAULT_COSTS,
                num_heads: int = 128) -> list[float]:
    """Predicted time (ns) of each token in token-parallel mode: its indexer row plus its sparse row.

    ``key_counts[t]`` is how many keys token ``t`` scores (``ke - ks``); a token with none costs nothing.
    Feed to :func:`plan_token_split` to balance causal prefill.
    """
    per_row = costs.sparse_ns(num_heads)
    return [costs.indexer_ns_per_row_key * k + (per_row if k > 0 else 0.0) for k in key_counts]


def _a2a_ms(num_tokens: int, layout: ParallelLayout, d: int, costs: TokenParallelCosts) -> float:
    w = layout.attn_tp_size
    sent = num_tokens * layout.heads_per_rank * d * 2 * (w - 1) / w  # bf16 bytes leaving this rank
    return costs.a2a_latency_us / 1e3 + sent / (costs.a2a_gbytes_per_s * 1e9) * 1e3


def predict_ms(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    strategy: str,
    *,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> dict[str, float]:
    """Predicted per-rank time (ms) of the indexer, the sparse core and the collectives under ``strategy``.

    ``context_len``: mean keys each query token scores (:func:`causal_mean_keys` for a prefill; the
    request length for decode). Decode's sparse core is left out: its time is the same in every strategy
    (memory-bound on the 2048 selected rows, whatever the head split). Returns the parts and ``"total"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    w, T = layout.attn_tp_size, num_tokens
    local = -(-T // w)  # the busiest rank of a balanced split
    parts: dict[str, float] = {}
    if is_decode:
        per_req = costs.decode_indexer_ns_per_key * context_len / 1e6
        fixed = costs.decode_indexer_fixed_us / 1e3
        if strategy == "heads":
            parts["indexer"] = fixed + T * per_req
        elif strategy == "tokens":
            parts["indexer"] = fixed + local * per_req
            parts["all_to_all"] = _a2a_ms(T, layout, D_QK, costs) + _a2a_ms(T, layout, D_V, costs)
        else:
            parts["indexer"] = fixed + T * per_req / w
            parts["gather_merge"] = costs.gather_merge_us / 1e3
    else:
        idx = costs.indexer_ns_per_row_key * context_len / 1e6  # ms per query row
        if strategy == "heads":
            parts["indexer"] = T * idx
            parts["sparse"] = T * costs.sparse_ns(layout.heads_per_rank) / 1e6
        elif strategy == "tokens":
            parts["indexer"] = local * idx
            parts["sparse"] = local * costs.sparse_ns(layout.num_attention_heads) / 1e6  # all heads, no padding
            parts["all_to_all"] = _a2a_ms(T, layout, D_QK, costs) + _a2a_ms(T, layout, D_V, costs)
        else:
            raise ValueError("strategy 'keys' is for decode only (is_decode=True)")
    parts["total"] = sum(parts.values())
    return parts


def choose_strategy(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    mode: str | None = None,
    *,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> str:
    """``"heads"``, ``"tokens"`` or ``"keys"`` for this batch (see the module docstring). Pure.

    Args:
        layout: the resolved layout (its ``attn_tp_size``, head counts and FlashMLA padding).
        num_tokens: real query tokens in the batch (decode: requests x tokens per request).
        context_len: mean keys a query token scores (see :func:`predict_ms`).
        mode: ``"auto"``, ``"on"`` or ``"off"``; ``None`` takes ``layout.token_parallel`` (the
            ``--nsa-token-parallel`` flag). ``"on"`` forces the split whenever the group has more than one
            rank and the batch is not empty; ``"auto"`` splits when the cost model predicts a gain larger
            than ``costs.margin``.
        is_decode: decode step (the indexer reads the paged index-K cache).
        costs: the measured parts (:data:`DEFAULT_COSTS`).
    """
    mode = layout.token_parallel if mode is None else mode
    if mode not in TOKEN_PARALLEL_MODES:
        raise ValueError(f"mode: expected one of {TOKEN_PARALLEL_MODES}, got {mode!r}")
    _check_count(num_tokens, "num_tokens")
    if isinstance(context_len, bool) or not isinstance(context_len, (int, float)) or context_len < 0:
        raise ValueError(f"context_len: expected a number >= 0, got {context_len!r}")
    w = layout.attn_tp_size
    if w == 1 or mode == "off" or num_tokens == 0:
        return "heads"
    split = "keys" if is_decode and num_tokens < w else "tokens"
    if mode == "on":
        return split
    base = predict_ms(layout, num_tokens, context_len, "heads", is_decode=is_decode, costs=costs)["total"]
    alt = predict_ms(layout, num_tokens, context_len, split, is_decode=is_decode, costs=costs)["total"]
    return split if alt < base * (1.0 - costs.margin) else "heads"


def choose_token_parallel(
    layout: ParallelLayout,
    num_tokens: int,
    context_len: float,
    mode: str | None = None,
    *,
    is_decode: bool = False,
    costs: TokenParallelCosts = DEFAULT_COSTS,
) -> bool:
    """True when this batch leaves pure TP (token-parallel or key-sharded decode); see :func:`choose_strategy`."""
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
    """Smallest prefill token count at which ``auto`` picks token-parallel (``None``: never up to max_tokens).

    ``context_len=None`` means a fresh causal prompt of that many tokens (mean keys ``(T+1)/2``).
    The gain grows with the token count while the collectives' fixed cost does not, so the search is valid.
    """
    def pays(t: int) -> bool:
        ctx = causal_mean_keys(0, t) if context_len is None else context_len
        return choose_strategy(layout, t, ctx, "auto", costs=costs) == "tokens"

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
    pre = f"prefill token-parallel from {t} tokens (fresh prompt)" if t else "prefill stays pure TP"
    dec = (f"decode batch 1 key-sharded from {c} context tokens" if c
           else f"decode batch 1 stays pure TP up to {longest} context")
    return f"auto: {pre}; {dec} (cost model: {costs.card}, {costs.date})"
