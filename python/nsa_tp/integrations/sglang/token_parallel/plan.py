"""The adapter: SGLang's extend batch -> one frozen :class:`ExtendPlan` per batch (strategy and row split),
built once (in the backend's ``init_forward_metadata``), cached on the ``ForwardBatch`` and read by every layer.

Reads only host data (``forward_mode``, ``extend_prefix_lens_cpu``, ``extend_seq_lens_cpu``; :mod:`.._compat`)
and hands the decision to :mod:`nsa_tp.token_parallel` (``choose``, ``plan_token_split``, ``plan_index_split``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch.distributed as dist

from nsa_tp.integrations.sglang import _compat
from nsa_tp.integrations.sglang._log import log_once
from nsa_tp.integrations.sglang._switch import plugin_enabled, token_parallel_mode
from nsa_tp.ops.capability import card_name
from nsa_tp.token_parallel import (
    BatchShape,
    Costs,
    TokenSplit,
    causal_key_counts,
    choose,
    plan_index_split,
    plan_token_split,
)
from nsa_tp.token_parallel.costs import load_costs
from nsa_tp.token_parallel.policy import token_costs

__all__ = ["PLAN_ATTR", "ExtendPlan", "choose_extend_strategy", "extend_rows", "batch_key",
           "plan_extend", "plan_for", "current_plan", "attn_tp_group", "tokens_blocked"]

PLAN_ATTR = "nsa_tp_extend_plan"  # the per-batch plan, cached on SGLang's ForwardBatch object


def choose_extend_strategy(mode: str, world: int, prefix_lens: list[int], extend_lens: list[int],
                           heads_per_rank: int, costs: Costs | None) -> tuple[str, str]:
    """Pure: the strategy for one extend batch (``heads`` | ``indexer`` | ``tokens``) and the reason.

    The shared policy decides (:func:`nsa_tp.token_parallel.choose` on a :class:`~nsa_tp.token_parallel.BatchShape`
    of this batch): ``auto`` takes the least predicted time and leaves ``heads`` only for a gain above
    ``costs.margin``; ``costs=None`` under ``auto`` (nothing measured on this card) keeps ``heads``.
    """
    keys = causal_key_counts([p + e for p, e in zip(prefix_lens, extend_lens, strict=True)], prefix_lens)
    T = len(keys)
    shape = BatchShape(num_tokens=T, mean_keys=sum(keys) / T if T else 0.0, max_keys=max(keys, default=0),
                       num_heads=heads_per_rank * world, world=world)
    plan = choose(shape, costs, mode)
    if mode != "auto":
        return plan.strategy, f"{mode} (forced)" if plan.strategy != "heads" else f"{mode}: nothing to split"
    return plan.strategy, f"{T} rows, {shape.mean_keys:.0f} keys a row; {plan.reason}"


@dataclasses.dataclass(frozen=True)
class ExtendPlan:
    """One extend batch's strategy inside the attention TP group (built once per batch, read by every layer).

    ``splits``: real query rows per rank, contiguous, in rank order (rows ``>= sum(splits)`` are DP padding).
    """

    strategy: str
    reason: str
    splits: tuple[int, ...]
    rank: int
    key: tuple = ()  # batch_key() of the batch it was built for

    @property
    def num_real(self) -> int:
        return sum(self.splits)

    @property
    def rows(self) -> range:
        start = sum(self.splits[: self.rank])
        return range(start, start + self.splits[self.rank])

    def split(self, num_rows: int) -> TokenSplit:
        return TokenSplit(self.splits, num_rows)


def extend_rows(forward_batch: Any) -> tuple[list[int], list[int]] | None:
    """``(prefix_lens, extend_lens)`` of a plain extend batch from SGLang's host lists, or None when the
    batch is not one (decode, idle, target-verify, draft-extend) or does not carry them."""
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None or not mode.is_extend_without_speculative():
        return None
    extend = getattr(forward_batch, "extend_seq_lens_cpu", None)
    prefix = getattr(forward_batch, "extend_prefix_lens_cpu", None)
    if extend is None or prefix is None or len(extend) != len(prefix):
        return None
    return [int(p) for p in prefix], [int(e) for e in extend]


def batch_key(forward_batch: Any) -> tuple:
    """What a plan depends on, from host data: a plan cached on a ``ForwardBatch`` object is reused only while
    the object still describes the same rows (a runner may refill one object for the next batch)."""
    mode = getattr(forward_batch, "forward_mode", None)
    return (mode, tuple(getattr(forward_batch, "extend_prefix_lens_cpu", None) or ()),
            tuple(getattr(forward_batch, "extend_seq_lens_cpu", None) or ()))


def plan_extend(forward_batch: Any, rank: int, world: int, heads_per_rank: int, *, mode: str | None = None,
                costs: Costs | None = None, card: str | None = None) -> ExtendPlan:
    """The :class:`ExtendPlan` for this batch on ``rank`` of an attention TP group of ``world`` ranks.

    Reads ``forward_mode``, ``extend_prefix_lens_cpu`` and ``extend_seq_lens_cpu`` (host lists; no device
    sync). The split balances the causal work: token ``i`` of a request with prefix ``p`` scores ``p + i + 1``
    keys (a chunked-prefill chunk behind a 30K prefix costs like the end of a 32K prompt).
    """
    mode = token_parallel_mode() if mode is None else mode
    if not plugin_enabled():
        mode = "off"
    key = batch_key(forward_batch)
    rows = extend_rows(forward_batch)
    if rows is None:
        return ExtendPlan("heads", "not a plain extend batch", (0,) * world, rank, key)
    prefix, extend = rows
    if world < 2 or mode == "off":  # nothing to split: skip the per-row work below
        return ExtendPlan("heads", "attention TP group of 1" if world < 2 else "switched off",
                          (sum(extend),) + (0,) * (world - 1), rank, key)
    if costs is None:  # the card's one record (also weighs a forced split's rows, borrowed collectives or not)
        costs, why = load_costs(card, serving=mode == "auto")
        if costs is None and mode == "auto":
            return ExtendPlan("heads", f"auto: {why}", (sum(extend),) + (0,) * (world - 1), rank, key)
    strategy, reason, splits = _decide(mode, world, tuple(prefix), tuple(extend), heads_per_rank, costs)
    return ExtendPlan(strategy, reason, splits, rank, key)


@functools.lru_cache(maxsize=256)
def _decide(mode: str, world: int, prefix: tuple[int, ...], extend: tuple[int, ...], heads_per_rank: int,
            costs: Costs | None) -> tuple[str, str, tuple[int, ...]]:
    """Strategy, reason and row split of one batch shape: pure, so cached (the per-row work is ~40 ms of host
    time at 64K rows, and serving repeats shapes: chunked-prefill chunks, same-length prompts)."""
    strategy, reason = choose_extend_strategy(mode, world, list(prefix), list(extend), heads_per_rank, costs)
    if strategy == "heads":
        return "heads", reason, (sum(extend),) + (0,) * (world - 1)
    keys = causal_key_counts([p + e for p, e in zip(prefix, extend, strict=True)], list(prefix))
    if strategy == "indexer":
        split = plan_index_split(keys, world)
    else:  # rows weighed by indexer + all-heads sparse work (the costs only weigh rows here, not choose)
        split = plan_token_split(len(keys), world, costs=token_costs(keys, costs, heads_per_rank * world))
    return strategy, reason, split.splits


def plan_for(forward_batch: Any, group: Any, heads_per_rank: int, core_is_ours: str | None = None) -> ExtendPlan:
    """The batch's plan, built on the first call (first layer) and cached on the batch object.

    ``core_is_ours``: None when this batch's sparse core will reach the ``tokens`` path, else why not (an
    upstream prefill implementation we do not route, dense MHA for short prompts): a ``tokens`` plan then
    becomes ``indexer`` (the indexer split still applies; the ids are gathered for upstream's core).
    """
    plan = getattr(forward_batch, PLAN_ATTR, None)
    if plan is None or plan.key != batch_key(forward_batch):
        rank, world = rank_world(group)
        plan = plan_extend(forward_batch, rank, world, heads_per_rank, card=card_name())
        if plan.strategy == "tokens" and core_is_ours is not None:
            plan = dataclasses.replace(plan, strategy="indexer", reason=f"{plan.reason}; tokens -> indexer: "
                                       f"{core_is_ours}")
        setattr(forward_batch, PLAN_ATTR, plan)
        if plan.strategy != "heads" or world > 1:
            log_once(f"tp-plan-{plan.strategy}-{world}", "token-parallel extend: strategy=%s (%s), "
                     "attn_tp=%d, rows per rank %s", plan.strategy, plan.reason, world, plan.splits)
    return plan


def rank_world(group: Any) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@functools.cache
def _attn_tp_group_getter() -> Any:
    return _compat.resolve(_compat.ATTN_TP_GROUP)  # resolved once: the executors ask for the group every layer


def attn_tp_group() -> Any:
    """SGLang's attention TP group (its torch ``ProcessGroup``); ``None`` outside a distributed run."""
    coord = _attn_tp_group_getter()()
    return None if coord.world_size == 1 else coord.device_group


def tokens_blocked(backend: Any) -> str | None:
    """Why this batch cannot leave every rank with only its own top-k rows (``tokens``), or None.

    Our sparse core must be the one that runs (FlashMLA entries, no dense MHA), and nothing may read the whole
    top-k table: SGLang's ``SGLANG_DSA_TOPK_BROADCAST`` (rank 0's table sent to all) or its indexer top-k
    capturer (top-k returned to the client) would see the other ranks' rows as -1.
    """
    impl = getattr(backend, "dsa_prefill_impl", None)
    if getattr(backend, "use_mha", False):
        return "dense MHA prefill for this batch (short prompts)"
    if impl not in _compat.ROUTED_IMPLS:
        return f"prefill implementation {impl!r} is not one nsa-tp routes ({', '.join(_compat.ROUTED_IMPLS)})"
    try:
        envs = _compat.resolve(_compat.SGLANG_ENVS)
        get_global_indexer_capturer = _compat.resolve(_compat.INDEXER_CAPTURER)
    except (ImportError, AttributeError) as e:  # a release without them cannot have them switched on
        log_once("tp-blocked-import", "token-parallel: %s (topk broadcast / capturer checks skipped)", e)
        return None
    if envs.SGLANG_DSA_TOPK_BROADCAST.get():
        return "SGLANG_DSA_TOPK_BROADCAST sends rank 0's whole top-k table to every rank"
    if get_global_indexer_capturer() is not None:
        return "the indexer top-k capturer reads the whole top-k table"
    return None


def current_plan(forward_batch: Any) -> ExtendPlan | None:
    """The plan cached on ``forward_batch`` if it was built for the rows the object holds now, else None (a
    runner may refill one object for the next batch: the backend plans that one)."""
    plan = getattr(forward_batch, PLAN_ATTR, None)
    return plan if plan is not None and plan.key == batch_key(forward_batch) else None
