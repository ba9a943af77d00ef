"""How an attention TP group splits a batch's sparse attention: the cost model and the per-batch choice.

The choice is a pure function (:func:`choose`) of the batch's shape (:class:`BatchShape`: query rows, mean
and max keys a row scores, the layer's heads, the group size) and per-op constants measured on a card
(:class:`~nsa_tp.token_parallel.costs.Costs`, one record per card). Strategies (``W`` ranks, ``H``
heads, ``h = H / W`` a rank):

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

Which wins depends on the card's measured :class:`~nsa_tp.token_parallel.costs.Costs` (one record per card,
``nsa-tp bench --costs``; :func:`describe_grid` prints the choice over prompt lengths and group sizes for a
record). The shape of the answer: the indexer is replicated under ``heads`` and grows with ``T x keys``
(quadratic in a causal prompt), so splitting it pays from some prompt length on (:func:`crossover_tokens`);
the all-gather of ids is small (8 KiB a row). ``tokens`` also removes the head padding (4x the sparse FLOPs at
TP8 on Hopper) but moves 2.2 KB per row and head (q out, o back); it beats ``indexer`` where the padding saved
exceeds that traffic. Very small batches stay ``heads``: every collective has a fixed cost. Decode: ``tokens``
for at least ``W`` requests, ``keys`` below, each only where it beats the replicated decode indexer. Without a
record for the card, ``auto`` is ``heads`` (upstream) everywhere.

Everything here is pure host-side arithmetic (no tensors, no device queries), built once per batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from nsa_tp.ops.capability import card_name
from nsa_tp.parallel.layout import TOKEN_PARALLEL_MODES, ParallelLayout
from nsa_tp.token_parallel.costs import Costs, a2a_bytes, collective_ms, even_splits, gather_bytes, load_costs
from nsa_tp.token_parallel.plan import _check_count, causal_mean_keys

__all__ = [
    "STRATEGIES",
    "PREFILL_STRATEGIES",
    "FORCE_MODES",
    "BatchShape",
    "Plan",
    "choose",
    "token_costs",
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
CANDIDATE_BYTES = 8  # a key-sharded decode candidate: fp32 score + int32 position


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """One batch's decision: the strategy, why, and the predicted busiest-rank ms of every strategy weighed
    (``predicted[s]``: its parts and ``"total"``; empty where nothing was predicted: a forced mode, a
    trivial batch, or no measured costs)."""

    strategy: str
    reason: str
    predicted: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def ms(self, strategy: str | None = None) -> float | None:
        """Predicted total ms of ``strategy`` (default: the chosen one), None where not predicted."""
        parts = self.predicted.get(strategy or self.strategy)
        return None if parts is None else parts["total"]


def _decode_parts(shape: BatchShape, strategy: str, costs: Costs) -> dict[str, float]:
    """Decode: the paged indexer per request x key plus its floor; the sparse core is left out (memory-bound
    on the 2048 selected rows: the same in every strategy)."""
    W, T, h = shape.world, shape.num_tokens, shape.heads_per_rank
    per_req = costs.decode_indexer_ns_per_key * shape.mean_keys / 1e6
    fixed = costs.decode_indexer_fixed_us / 1e3
    if strategy == "heads":
        return {"indexer": fixed + T * per_req}
    if strategy == "tokens":
        split = even_splits(T, W)
        return {"indexer": fixed + max(split) * per_req,
                "all_to_all": sum(collective_ms(a2a_bytes(split, h, d), costs.a2a_latency_us, costs.a2a_gbytes_per_s)
                                  for d in (D_QK, D_V))}
    if strategy == "keys":
        gathered = gather_bytes((T,) * W, shape.topk * CANDIDATE_BYTES)
        return {"indexer": fixed + T * per_req / W,
                "all_gather": collective_ms(gathered, costs.gather_latency_us, costs.gather_gbytes_per_s),
                "merge": costs.merge_us / 1e3}
    raise ValueError("strategy 'indexer' is for extend (prefill) batches only")


def _prefill_parts(shape: BatchShape, strategy: str, costs: Costs) -> dict[str, float]:
    """Prefill: the indexer per (row, key), split by rows the busiest rank's share ``T * mean / W`` plus at
    most one row (the split plans cut between rows); the sparse core ``sparse_ns(heads)`` per row."""
    if strategy == "keys":
        raise ValueError("strategy 'keys' is for decode only (is_decode=True)")
    W, T, h, H = shape.world, shape.num_tokens, shape.heads_per_rank, shape.num_heads
    row_keys = T * shape.mean_keys
    split_keys = min(row_keys / W + (shape.max_keys if T else 0), row_keys)
    split = even_splits(T, W)
    if strategy == "heads":
        return {"indexer": costs.indexer_ns_per_row_key * row_keys / 1e6, "sparse": T * costs.sparse_ns(h) / 1e6}
    if strategy == "indexer":
        return {"indexer": costs.indexer_ns_per_row_key * split_keys / 1e6,
                "all_gather": collective_ms(gather_bytes(split, shape.topk * ID_BYTES), costs.gather_latency_us,
                                            costs.gather_gbytes_per_s),
                "sparse": T * costs.sparse_ns(h) / 1e6}
    return {"indexer": costs.indexer_ns_per_row_key * split_keys / 1e6,
            "sparse": min(T / W + 1, T) * costs.sparse_ns(H) / 1e6,  # all heads, no padding
            "all_to_all": sum(collective_ms(a2a_bytes(split, h, d), costs.a2a_latency_us, costs.a2a_gbytes_per_s)
                              for d in (D_QK, D_V))}


def _predict(shape: BatchShape, strategy: str, costs: Costs) -> dict[str, float]:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    parts = (_decode_parts if shape.is_decode else _prefill_parts)(shape, strategy, costs)
    parts["total"] = sum(parts.values())
    return parts


def _forced(shape: BatchShape, mode: str) -> str | None:
    """The strategy a mode forces on this batch, or None under ``auto`` for a batch worth weighing."""
    if mode not in TOKEN_PARALLEL_MODES + FORCE_MODES:
        raise ValueError(f"mode: expected one of {TOKEN_PARALLEL_MODES + FORCE_MODES}, got {mode!r}")
    if shape.world == 1 or mode in ("off", "heads") or shape.num_tokens == 0:
        return "heads"
    split = ("keys" if shape.num_tokens < shape.world else "tokens") if shape.is_decode else "tokens"
    if mode in ("on", "tokens"):
        return split
    if mode == "indexer":
        return "heads" if shape.is_decode else "indexer"
    return None


def choose(shape: BatchShape, costs: Costs | None, mode: str = "auto") -> Plan:
    """The decision for this batch (pure): ``heads``, ``indexer``, ``tokens`` or ``keys``, with the reason and
    the predicted busiest-rank ms of every candidate.

    ``mode``: ``"off"`` -> ``heads``; ``"on"`` -> the full split (``tokens``; decode with fewer requests than
    ranks: ``keys``); a strategy name forces it where it applies (``indexer`` on a decode batch runs
    ``heads``); ``"auto"`` -> the candidate with the least predicted time, leaving ``heads`` only for a gain
    above ``costs.margin``, and ``heads`` (upstream) when ``costs`` is None (nothing measured on this card).
    A one-rank group or an empty batch is always ``heads``.
    """
    forced = _forced(shape, mode)
    if forced is not None:
        why = "nothing to split" if forced == "heads" and mode not in ("off", "heads") else f"{mode} (forced)"
        return Plan(forced, why)
    if costs is None:
        return Plan("heads", "auto without measured costs for this card: upstream's path")
    if shape.is_decode:
        candidates: tuple[str, ...] = ("keys" if shape.num_tokens < shape.world else "tokens",)
    else:
        candidates = ("indexer", "tokens")
    predicted = {s: _predict(shape, s, costs) for s in ("heads", *candidates)}
    best = min(candidates, key=lambda s: (predicted[s]["total"], candidates.index(s)))
    base = predicted["heads"]["total"]
    strategy = best if predicted[best]["total"] < base * (1.0 - costs.margin) else "heads"
    times = ", ".join(f"{s} {p['total']:.3f} ms" for s, p in predicted.items())
    return Plan(strategy, f"auto ({costs.card} {costs.date}): {times}", predicted)


def describe_grid(costs: Costs | None, worlds: Sequence[int] = (2, 4, 8),
                  tokens: Sequence[int] = (1024, 2048, 4096, 8192, 32768, 131072),
                  num_heads: int = 128) -> list[list[str]]:
    """``auto``'s choice for a fresh causal prompt of each length, one row per group size:
    ``[[W, choice(T0), choice(T1), ...], ...]``."""
    return [[str(w), *(choose(BatchShape(t, causal_mean_keys(0, t), t, num_heads, w), costs).strategy
                       for t in tokens)] for w in worlds]


# --------------------------------------------------------------------------------------------------
# Layout-level helpers (the same choice, from a resolved layout)
# --------------------------------------------------------------------------------------------------


def token_costs(key_counts: Sequence[int], costs: Costs | None, num_heads: int = 128) -> list[float]:
    """Predicted time (ns) of each token in token-parallel mode: its indexer row plus its sparse row, the
    weights :func:`nsa_tp.token_parallel.plan.plan_token_split` balances causal prefill by. ``key_counts[t]``
    is how many keys token ``t`` scores; a token with none costs nothing. ``costs=None`` (nothing measured on
    this card, a forced split): the key counts themselves, i.e. balanced by the indexer's work alone, as the
    ``indexer`` split is (no invented per-row constant)."""
    if costs is None:
        return [float(k) for k in key_counts]
    per_row = costs.sparse_ns(num_heads)
    return [costs.indexer_ns_per_row_key * k + (per_row if k > 0 else 0.0) for k in key_counts]


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


def crossover_tokens(layout: ParallelLayout, costs: Costs | None, *, max_tokens: int = 1 << 20) -> int | None:
    """Smallest fresh causal prompt at which ``auto`` leaves pure TP (``None``: never up to max_tokens).
    The gain grows with the token count while the collectives' fixed cost does not, so the search is valid."""
    return _first_true(1, max_tokens, lambda t: choose(
        BatchShape.of(layout, t, causal_mean_keys(0, t), t), costs).strategy != "heads")


def crossover_decode_context(layout: ParallelLayout, costs: Costs | None, batch: int = 1, *,
                             max_context: int = 1 << 22) -> int | None:
    """Smallest context at which ``auto`` leaves pure TP for a decode batch of ``batch`` requests."""
    return _first_true(1, max_context, lambda c: choose(
        BatchShape.of(layout, batch, c, is_decode=True), costs).strategy != "heads")


def describe_policy(layout: ParallelLayout, costs: Costs | None = None, card: str | None = None) -> str:
    """One line for ``nsa-tp plan``: what ``--nsa-token-parallel`` does per batch under this layout, with the
    costs of ``card`` (default: ``costs`` as given, else this machine's GPU, via :func:`load_costs`)."""
    w = layout.attn_tp_size
    if w == 1:
        return "n/a (1-rank attention group)"
    if layout.token_parallel == "off":
        return "off: pure TP for every batch"
    if layout.token_parallel == "on":
        return (f"on: every batch; prefill and decode with >= {w} requests split tokens over the {w} ranks, "
                f"decode with < {w} requests shards the indexer's keys")
    if costs is None:
        costs, why = load_costs(card if card is not None else card_name(), serving=True)
        if costs is None:
            return f"auto: pure TP (upstream) for every batch: {why}"
    longest = 163840  # DeepSeek-V3.2's max_position_embeddings: no crossover past it matters
    t = crossover_tokens(layout, costs, max_tokens=longest)
    c = crossover_decode_context(layout, costs, max_context=longest)
    if t:
        at = choose(BatchShape.of(layout, t, causal_mean_keys(0, t), t), costs).strategy
        big = choose(BatchShape.of(layout, longest, causal_mean_keys(0, longest), longest), costs).strategy
        pre = f"prefill token-parallel ({at if at == big else f'{at}, {big} at {longest}'}) from {t} tokens"
    else:
        pre = "prefill stays pure TP"
    dec = (f"decode batch 1 key-sharded from {c} context tokens" if c
           else f"decode batch 1 stays pure TP up to {longest} context")
    return f"auto: {pre} (fresh prompt); {dec} (cost model: {costs.card}, {costs.date})"


