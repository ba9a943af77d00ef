"""Split plans of token-parallel attention: which rows (or which keys) each rank of an attention TP group owns.

Pure host-side arithmetic (no tensors, no device queries), built once per batch; every rank of the group
computes the same plan from the same host data, so no rank ever has to ask another where a row went.

- :func:`plan_token_split` — ``tokens``: contiguous row slices, balanced by the predicted per-token cost
  (indexer row + all-heads sparse row, :func:`nsa_tp.token_parallel.policy.token_costs`).
- :func:`plan_index_split` — ``indexer``: the same kind of slices, balanced by the indexer's cost alone (a
  row's key count), because under ``indexer`` the sparse core stays split by heads.
- :func:`plan_key_shards` — ``keys`` (decode with fewer requests than ranks): page-aligned key ranges.
- :func:`transient_buffers` / :func:`transient_peak_bytes` — the memory each strategy's exchange allocates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "TokenSplit",
    "KeyShard",
    "plan_token_split",
    "plan_index_split",
    "plan_key_shards",
    "causal_mean_keys",
    "causal_key_counts",
    "transient_buffers",
    "transient_peak_bytes",
]


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """Which contiguous token rows each rank of the group owns in token-parallel mode.

    Rows ``[0, num_real)`` are real tokens, split as ``splits`` (rank ``r``: ``rows(r)``); rows
    ``[num_real, num_rows)`` are DP padding (for the MLP sync) that no rank computes: their output is 0,
    as under pure TP where their top-k row is all -1.
    """

    splits: tuple[int, ...]
    num_rows: int

    @property
    def world(self) -> int:
        return len(self.splits)

    @property
    def num_real(self) -> int:
        return sum(self.splits)

    @property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for s in self.splits:
            out.append(out[-1] + s)
        return tuple(out)

    def rows(self, rank: int) -> range:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank: expected 0 <= rank < {self.world}, got {rank}")
        off = self.offsets
        return range(off[rank], off[rank + 1])

    @property
    def max_split(self) -> int:
        """Rows of the busiest rank (the padded block size of an all-gather over the group)."""
        return max(self.splits, default=0)


def _check_count(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def plan_token_split(
    num_tokens: int,
    world: int,
    *,
    num_rows: int | None = None,
    costs: Sequence[float] | None = None,
) -> TokenSplit:
    """Split ``num_tokens`` real tokens into ``world`` contiguous slices.

    Args:
        num_tokens: real tokens in the batch (>= 0; fewer than ``world`` leaves some ranks empty).
        world: ranks in the attention TP group (>= 1).
        num_rows: rows of q including DP padding (>= ``num_tokens``; default ``num_tokens``).
        costs: optional per-token cost (``len == num_tokens``, each >= 0), e.g. :func:`token_costs`.
            Without it the counts differ by at most one (the first ranks take the extra). With it the
            cuts balance the cumulative cost: rank ``r`` ends at the first token whose prefix cost reaches
            ``(r+1)/world`` of the total, so no rank exceeds its share by more than one token's cost.
            Causal prefill needs this: the last token of a 32K prompt scores 32K keys, the first one.

    Returns:
        :class:`TokenSplit` with ``splits`` summing to ``num_tokens``.
    """
    _check_count(num_tokens, "num_tokens")
    _check_count(world, "world", 1)
    rows = num_tokens if num_rows is None else _check_count(num_rows, "num_rows")
    if rows < num_tokens:
        raise ValueError(f"num_rows: expected >= num_tokens ({num_tokens}), got {rows}")
    if costs is None:
        base, extra = divmod(num_tokens, world)
        return TokenSplit(tuple(base + (r < extra) for r in range(world)), rows)
    c = [float(x) for x in costs]
    if len(c) != num_tokens:
        raise ValueError(f"costs: expected one cost per token ({num_tokens}), got {len(c)}")
    if any(not math.isfinite(x) or x < 0 for x in c):
        raise ValueError("costs: expected finite non-negative values")
    total = sum(c)
    if total == 0:
        return plan_token_split(num_tokens, world, num_rows=rows)
    cuts, acc, t = [], 0.0, 0
    for r in range(1, world):
        target = total * r / world
        while t < num_tokens and acc + c[t] / 2 < target:  # cut where the token's midpoint passes the share
            acc += c[t]
            t += 1
        cuts.append(t)
    bounds = [0, *cuts, num_tokens]
    return TokenSplit(tuple(bounds[i + 1] - bounds[i] for i in range(world)), rows)


def causal_mean_keys(prefix_len: int, extend_len: int) -> float:
    """Mean keys a query token scores when ``extend_len`` new tokens follow ``prefix_len`` cached ones."""
    _check_count(prefix_len, "prefix_len")
    _check_count(extend_len, "extend_len")
    return prefix_len + (extend_len + 1) / 2 if extend_len else 0.0


def causal_key_counts(seq_lens: Sequence[int], prefix_lens: Sequence[int]) -> list[int]:
    """Keys each query row of an extend batch scores, in row order: request ``b``'s new token ``i`` (0-based)
    sees its ``prefix_lens[b]`` cached tokens and the ``i + 1`` new ones up to itself (causal)."""
    seq = [_check_count(s, f"seq_lens[{i}]") for i, s in enumerate(seq_lens)]
    pre = [_check_count(p, f"prefix_lens[{i}]") for i, p in enumerate(prefix_lens)]
    if len(seq) != len(pre):
        raise ValueError(f"prefix_lens: expected {len(seq)} values (one per request), got {len(pre)}")
    for b, (s, p) in enumerate(zip(seq, pre, strict=True)):
        if p > s:
            raise ValueError(f"prefix_lens[{b}]: expected <= seq_lens[{b}] ({s}), got {p}")
    return [p + i + 1 for s, p in zip(seq, pre, strict=True) for i in range(s - p)]


def plan_index_split(key_counts: Sequence[int], world: int, *, num_rows: int | None = None) -> TokenSplit:
    """The ``indexer`` strategy's split: contiguous query rows per rank, balanced by the indexer's work.

    The indexer's time on a row is proportional to the keys it scores (fp8 logits over ``ke - ks`` columns,
    then a top-k over them), so the cuts balance ``sum(key_counts)`` — the sparse core is not part of this
    split (it stays split by heads). ``key_counts[t]``: keys row ``t`` scores (:func:`causal_key_counts`);
    ``num_rows``: q rows including DP padding (those rows belong to no rank: their top-k row is all -1).
    """
    keys = [_check_count(k, f"key_counts[{i}]") for i, k in enumerate(key_counts)]
    return plan_token_split(len(keys), world, num_rows=num_rows, costs=keys)


# --------------------------------------------------------------------------------------------------
# Key shards (decode with batch < W)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyShard:
    """One rank's slice of every request's context for the key-sharded decode indexer.

    Request ``b``'s pages ``[page_start[b], page_start[b] + num_pages[b])`` of its page table, i.e. token
    positions ``[key_start[b], key_start[b] + key_len[b])``. Slices of one request over the ranks are
    disjoint and cover ``[0, seq_len)`` exactly; a request shorter than the group leaves some ranks empty.
    """

    page_start: tuple[int, ...]
    num_pages: tuple[int, ...]
    key_start: tuple[int, ...]
    key_len: tuple[int, ...]

    @property
    def max_keys(self) -> int:
        return max(self.key_len, default=0)


def plan_key_shards(seq_lens: Sequence[int], world: int, page_size: int = 64) -> tuple[KeyShard, ...]:
    """Split each request's context ``[0, seq_lens[b])`` into ``world`` page-aligned slices, one per rank.

    Page-aligned so that each rank's slice is a column range of the page table and the paged logits
    kernel reads whole pages; rank ``r`` takes pages ``[r*P//W, (r+1)*P//W)`` of the ``P = ceil(L/page)``.
    """
    _check_count(world, "world", 1)
    _check_count(page_size, "page_size", 1)
    lens = [_check_count(v, f"seq_lens[{i}]") for i, v in enumerate(seq_lens)]
    shards = []
    for r in range(world):
        ps, npg, ks, kl = [], [], [], []
        for L in lens:
            pages = -(-L // page_size)
            p0, p1 = r * pages // world, (r + 1) * pages // world
            k0, k1 = p0 * page_size, min(p1 * page_size, L)
            ps.append(p0)
            npg.append(p1 - p0)
            ks.append(k0)
            kl.append(max(k1 - k0, 0))
        shards.append(KeyShard(tuple(ps), tuple(npg), tuple(ks), tuple(kl)))
    return tuple(shards)




# --------------------------------------------------------------------------------------------------
# Transient memory of the exchanges
# --------------------------------------------------------------------------------------------------


def transient_buffers(strategy: str, split: TokenSplit, rank: int, heads_per_rank: int, topk: int = 2048, *,
                      d_qk: int = 576, d_v: int = 512) -> dict[str, int]:
    """Bytes of every buffer the strategy's exchange allocates on ``rank`` for one layer, by name.

    What :func:`nsa_tp.token_parallel.core.tokens_sparse_mla` (``tokens``: bf16 queries, ``fp8_q=False``,
    ``out_chunks=1``, absorbed) and :func:`~nsa_tp.token_parallel.core.gather_topk_rows` (``indexer``)
    allocate, besides the indexer's and the sparse core's own work, which every strategy has (``heads``'s
    indexer scores all rows and its core runs all rows: both allocate more than here). ``t`` = this rank's
    rows, ``W`` ranks, ``h`` heads a rank, ``H = W*h``, ``K`` = top-k; ``o_core`` is the sparse core's output
    on this rank's rows, listed because it is live between the two exchanges; ``out`` is the result (the
    same ``[rows, h, 512]`` as ``heads`` returns). Zero-byte buffers are left out. A rank holding at most one
    row needs no regrouping copy (its transposed view is already contiguous).

    - ``tokens``: ``q_recv [W*t, h, 576]``, ``q_tokens [t, H, 576]`` (regrouped), ``o_core [t, H, 512]``,
      ``o_send [W*t, h, 512]`` (regrouped) bf16, ``out [rows, h, 512]`` bf16.
    - ``indexer``: ``ids_block [max_t, K]``, ``ids_gathered [W, max_t, K]``, ``out [rows, K]`` int32
      (uneven splits travel padded to the largest, ``max_t``: all-gather takes equal blocks).
    - ``heads`` (and ``keys``, whose candidates are the decode indexer's): nothing.

    A one-rank group exchanges nothing: ``tokens`` keeps ``o_core`` and ``out``, ``indexer`` only ``out``.
    """
    if not isinstance(split, TokenSplit):
        raise ValueError(f"split: expected a TokenSplit, got {type(split).__name__}")
    _check_count(heads_per_rank, "heads_per_rank", 1)
    _check_count(topk, "topk", 1)
    W, rows = split.world, split.num_rows
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < W:
        raise ValueError(f"rank: expected 0 <= rank < {W}, got {rank!r}")
    t = split.splits[rank]
    H = W * heads_per_rank
    bf16, i32 = 2, 4
    if strategy in ("heads", "keys"):
        out: dict[str, int] = {}
    elif strategy == "tokens":
        regroup = t > 1 and W > 1  # [W, t, h, D] <-> [t, W, h, D] is a copy unless t <= 1 (or one rank)
        out = {
            "q_recv": W * t * heads_per_rank * d_qk * bf16 if W > 1 else 0,  # one rank: q itself, no exchange
            "q_tokens": t * H * d_qk * bf16 if regroup else 0,
            "o_core": t * H * d_v * bf16,
            "o_send": W * t * heads_per_rank * d_v * bf16 if regroup else 0,
            "out": rows * heads_per_rank * d_v * bf16,
        }
    elif strategy == "indexer":
        m = split.max_split
        out = {"ids_block": m * topk * i32, "ids_gathered": W * m * topk * i32} if W > 1 else {}
        out["out"] = rows * topk * i32
    else:
        raise ValueError(f"strategy: expected heads, indexer, tokens or keys, got {strategy!r}")
    return {k: v for k, v in out.items() if v}


def transient_peak_bytes(strategy: str, split: TokenSplit, rank: int, heads_per_rank: int, topk: int = 2048, *,
                         d_qk: int = 576, d_v: int = 512) -> int:
    """The most bytes of :func:`transient_buffers` (the result ``out`` excluded) live at one time on ``rank``.

    ``tokens`` frees each buffer once the next phase has it, so the peak is the largest phase:
    ``max(q_recv + q_tokens, q_tokens + o_core, o_core + o_send)`` = ``2 * t * H * 576 * 2`` bytes for
    ``t >= 2``. A causal prompt balanced by cost gives the first rank the most rows (its rows score the
    fewest keys): at ``T = 128K``, TP8 with H200-like costs (0.2-0.3 ns a row-key, ~900 ns a 128-head row)
    ``t`` is about ``0.34 T`` and the peak 13 GB — still less than ``heads`` spends on FlashMLA's 64-head padding
    there (q padded to ``[T, 64, 576]`` plus the ``[T, 64, 512]`` output: 18.3 GB).
    ``indexer``: ``ids_block + ids_gathered`` = ``(W + 1) * max_t * K * 4`` (both live during the gather).
    """
    b = transient_buffers(strategy, split, rank, heads_per_rank, topk, d_qk=d_qk, d_v=d_v)
    if strategy == "tokens":
        q_recv, q_tok, o_core, o_send = (b.get(k, 0) for k in ("q_recv", "q_tokens", "o_core", "o_send"))
        q_live = q_tok or q_recv  # t <= 1: the queries the core reads are the receive buffer itself
        return max(q_recv + q_tok, q_live + o_core, o_core + o_send)
    return sum(v for k, v in b.items() if k != "out")
