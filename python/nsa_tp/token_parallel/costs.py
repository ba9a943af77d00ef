"""The one cost record per card (:class:`Costs`), the one collective model, and where the record is read from.

A :class:`Costs` record is written by one command on the card, ``nsa-tp bench --costs`` (upstream's kernels
present; :mod:`nsa_tp.bench.costs`), as ``ops/measured/costs_<card-slug>.json`` beside the card's tuning
table, and never edited by hand. Every reader goes through :func:`load_costs`: the SGLang plugin's ``auto``,
nsa-tp's own layer, ``nsa-tp plan`` and ``benchmark/bench_tp_projection.py``. ``NSA_TP_TOKEN_PARALLEL_COSTS``
names another file of the same format (an override, e.g. a record measured a minute ago). A card without a
record has no costs: ``auto`` then keeps upstream's ``heads`` everywhere.

The collective model (all-to-all and all-gather alike): ``latency + bytes / bandwidth``, where ``bytes`` is the
most any rank sends or receives (:func:`a2a_bytes`, :func:`gather_bytes`) and latency / bandwidth come from the
record (taken from a committed NCCL measurement that the record cites: one GPU cannot time them).

Pure host-side arithmetic and a cached file read; no tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from nsa_tp.ops.tuning import MEASURED_DIR, card_slug

__all__ = [
    "Costs", "ENV_COSTS", "costs_path", "load_costs", "collective_ms", "a2a_bytes", "gather_bytes", "even_splits",
]

ENV_COSTS = "NSA_TP_TOKEN_PARALLEL_COSTS"


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per-unit times of the attention layer's parts on one card: the inputs of :func:`~nsa_tp.token_parallel.choose`.

    ``kernels``: ``((field, what produced it), ...)`` — the op, shape and tier behind each measured number;
    ``collectives_source``: the committed file (and its card, GPU count, date) the collective fields are from.
    """

    card: str
    date: str
    command: str  # the command that wrote the record
    indexer_ns_per_row_key: float  # prefill indexer: fp8 logits (64 index heads x 128) + top-k, per row x key
    # sparse MLA prefill at top-k 2048, ns per query row, by the heads a rank holds: ((heads, ns), ...), as the
    # tier ``auto`` runs them (FlashMLA pads 16/32 to 64 on Hopper; a padding-free tier does not)
    sparse_ns_per_token: tuple[tuple[int, float], ...]
    decode_indexer_ns_per_key: float  # paged decode logits + top-k, per request x context key
    decode_indexer_fixed_us: float  # the decode indexer's floor (launches, top-k of a short row)
    merge_us: float  # key-sharded decode: merging the ranks' [B, 2048] candidates (the all-gather is modeled)
    a2a_latency_us: float  # one small all_to_all_single in the group
    a2a_gbytes_per_s: float  # bytes one rank moves per second in a large all_to_all_single
    gather_latency_us: float  # the same for all_gather_into_tensor
    gather_gbytes_per_s: float
    collectives_source: str
    kernels: tuple[tuple[str, str], ...] = ()
    margin: float = 0.05  # leave heads only for a predicted gain above this fraction (measurement noise)
    collectives_card: str = ""  # the card of the NCCL run behind the collective fields ("": not recorded)

    @property
    def collectives_measured_here(self) -> bool:
        """Whether the collective fields were measured on this record's own card (not borrowed from another)."""
        return bool(self.collectives_card) and card_slug(self.collectives_card) == card_slug(self.card)

    def __post_init__(self) -> None:
        table = tuple(sorted((int(h), float(ns)) for h, ns in self.sparse_ns_per_token))
        if not table or any(h < 1 or not ns > 0 for h, ns in table):
            raise ValueError(f"sparse_ns_per_token: expected ((heads >= 1, ns > 0), ...), got {table}")
        object.__setattr__(self, "sparse_ns_per_token", table)
        object.__setattr__(self, "kernels", tuple((str(k), str(v)) for k, v in self.kernels))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type != "float":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or (
                    f.name.endswith("_per_s") and v == 0):
                raise ValueError(f"{f.name}: expected a number >= 0 (> 0 for a bandwidth), got {v!r}")

    def sparse_ns(self, heads: int) -> float:
        """ns per row of the sparse core with ``heads`` heads: the measured entry for that head count, else
        the next larger measured one (a kernel pads up, never down), else the largest scaled by heads."""
        for h, ns in self.sparse_ns_per_token:
            if h >= heads:
                return ns
        h, ns = self.sparse_ns_per_token[-1]
        return ns * heads / h

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["sparse_ns_per_token"] = [list(p) for p in self.sparse_ns_per_token]
        d["kernels"] = dict(self.kernels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Costs:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"costs: missing fields {missing}")
        kw = {f.name: d[f.name] for f in fields if f.name in d}
        if isinstance(kw.get("kernels"), dict):
            kw["kernels"] = tuple(kw["kernels"].items())  # type: ignore[union-attr]
        return cls(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The collective model
# --------------------------------------------------------------------------------------------------


def collective_ms(nbytes: float, latency_us: float, gbytes_per_s: float) -> float:
    """One collective: fixed latency plus the busiest rank's bytes over its bandwidth."""
    return latency_us / 1e3 + nbytes / (gbytes_per_s * 1e9) * 1e3


def a2a_bytes(splits: Sequence[int], heads_per_rank: int, d: int, elem_bytes: int = 2) -> int:
    """The most bytes any rank sends or receives regrouping ``[T, h, d]`` over ``splits``: rank ``r`` sends its
    heads of the other ranks' rows, ``(T - t_r) h d``, and receives the others' heads of its rows,
    ``t_r (W-1) h d``."""
    T, n = sum(splits), len(splits)
    return max(max(T - t, t * (n - 1)) for t in splits) * heads_per_rank * d * elem_bytes if n > 1 else 0


def gather_bytes(splits: Sequence[int], row_bytes: int) -> int:
    """Bytes each rank receives in an all-gather of equal blocks: ``W - 1`` blocks of ``max(splits)`` rows."""
    return (len(splits) - 1) * max(splits, default=0) * row_bytes


def even_splits(rows: int, world: int) -> tuple[int, ...]:
    base, extra = divmod(rows, world)
    return tuple(base + (r < extra) for r in range(world))


# --------------------------------------------------------------------------------------------------
# Where the record is read from
# --------------------------------------------------------------------------------------------------


def costs_path(card: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """``<folder>/costs_<card-slug>.json`` (default folder: the committed ``nsa_tp/ops/measured/``)."""
    return Path(folder if folder is not None else MEASURED_DIR) / f"costs_{card_slug(card)}.json"


def load_costs(card: str | None, *, serving: bool = False) -> tuple[Costs | None, str]:
    """The record for ``card`` (``NSA_TP_TOKEN_PARALLEL_COSTS`` first, then the committed file), or None and
    why not. Read once per path, modification time and size (not once per batch).

    ``serving=True`` (a live SGLang server, and ``nsa-tp plan`` describing one): also None for a record whose
    collectives were borrowed from another card's NCCL run (:attr:`Costs.collectives_measured_here`): a one-GPU
    record is a projection, not a measurement of this host, so ``auto`` keeps upstream's path on it."""
    if card is None:
        return None, "no measured costs (no GPU: no card to read them for)"
    env = os.environ.get(ENV_COSTS, "").strip()
    path = Path(env) if env else costs_path(card)
    where = f"{ENV_COSTS}={env}" if env else str(path)
    if not env and not path.is_file():
        return None, f"no measured costs for {card} ({path.name} not in nsa_tp/ops/measured; `nsa-tp bench --costs`)"
    try:
        st = os.stat(path)
        costs = _read(str(path), st.st_mtime_ns, st.st_size)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        return None, f"{where} unreadable: {type(e).__name__}: {e}"
    if card_slug(costs.card) != card_slug(card):
        return None, f"{where} was measured on {costs.card!r}, this card is {card!r}"
    if serving and not costs.collectives_measured_here:
        source = costs.collectives_card or "card not recorded"
        return None, (f"the {costs.card} record borrows its collectives ({source}): upstream's path until a "
                      "multi-GPU run on this card measures them (--nsa-token-parallel on forces token-parallel)")
    return costs, f"costs measured on {costs.card} ({costs.date})"


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> Costs:
    with open(path) as f:
        data = json.load(f)
    return Costs.from_dict(data.get("costs", data))
