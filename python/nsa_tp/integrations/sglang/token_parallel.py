"""Token-parallel DSA prefill inside SGLang's attention TP group (``--tp N``, or ``--dp D --enable-dp-attention``
with ``attn_tp = N / D >= 2``); see docs/sglang_token_parallel.md.

Three roles, kept apart (STYLE.md, "Living inside a host engine"):

- **switch** — ``--nsa-token-parallel auto|on|off|indexer`` (sets ``NSA_TP_TOKEN_PARALLEL`` for every SGLang
  process) and :func:`token_parallel_mode`;
- **adapter** — :func:`plan_extend` turns SGLang's ``ForwardBatch`` into one frozen :class:`ExtendPlan` per
  batch (the strategy, and which contiguous rows each rank owns), cached on the batch object and read by
  every layer;
- **executors** — the backend subclass (:func:`make_backend_class`, registered under SGLang's own ``"dsa"``
  name through ``register_attention_backend``) runs the sparse core of a ``tokens`` batch through the shared
  core :func:`nsa_tp.token_parallel.tokens_sparse_mla` (q heads -> tokens, all heads, no padding, tokens ->
  heads); :func:`around_get_topk_ragged` (the one HookRegistry hook this module adds) runs upstream's own
  indexer top-k on this rank's query rows only for an ``indexer`` or ``tokens`` batch, then
  :func:`nsa_tp.token_parallel.gather_topk_rows` gives every rank the whole ``[T, K]``.

The algorithm (splits, cost model, collectives, sparse core) is :mod:`nsa_tp.token_parallel`'s, shared with
nsa-tp's own layer; this module only translates SGLang's batch and calls it.

Strategies (every rank of the group sees the same batch and the same settings, so all choose the same one,
which their collectives need):

- ``heads``: upstream's code, unchanged. Always under decode, target-verify, draft-extend, ``attn_tp == 1``,
  a batch with no real tokens, or ``auto`` without measured costs for this card.
- ``indexer``: each rank's indexer scores ``1/attn_tp`` of the query rows; the ids are all-gathered; the sparse
  core stays upstream's. Only when forced (``--nsa-token-parallel indexer``): the shared cost model does not
  price it yet, so ``auto`` never picks it.
- ``tokens``: the indexer split above (its rows = the rank's token rows), plus the sparse core
  token-parallel over all heads. ``auto`` picks it where :func:`nsa_tp.token_parallel.choose`
  predicts it faster from costs measured on this card.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from nsa_tp.integrations.sglang import verify
from nsa_tp.integrations.sglang._log import log_once, logger
from nsa_tp.integrations.sglang._switch import ops_backend, plugin_enabled
from nsa_tp.ops.capability import get_capability
from nsa_tp.ops.kv_format import D_LATENT, D_QK
from nsa_tp.token_parallel import (
    BatchShape,
    TokenSplit,
    causal_key_counts,
    choose,
    gather_topk_rows,
    plan_index_split,
    plan_token_split,
    tokens_sparse_mla,
)
from nsa_tp.token_parallel.costs import ENV_COSTS, Costs, load_costs
from nsa_tp.token_parallel.policy import token_costs

__all__ = [
    "ENV_MODE", "ENV_COSTS", "MODES", "FLAG", "PLAN_ATTR", "HOOKS",
    "token_parallel_mode", "add_cli_flag", "load_costs", "choose_extend_strategy",
    "ExtendPlan", "plan_extend", "plan_for", "extend_rows",
    "around_get_topk_ragged", "make_backend_class", "register_backend", "hook_targets",
]

ENV_MODE = "NSA_TP_TOKEN_PARALLEL"
MODES = ("auto", "on", "off", "indexer")  # on = tokens for every eligible batch; indexer = the indexer split only
FLAG = "--nsa-token-parallel"
PLAN_ATTR = "nsa_tp_extend_plan"  # the per-batch plan, cached on SGLang's ForwardBatch object

# The one hook this module places (HookRegistry, AROUND): the indexer's ragged (extend) top-k. Same name and
# signature in 0.5.17 and 0.5.23: (self, enable_dual_stream, forward_batch, layer_id, q_fp8 [T,64,128] fp8,
# weights [T,64,1] fp32, metadata, topk_result=None) -> [T, 2048] int32. Called by the eager indexer and by
# the piecewise-CUDA-graph indexer split op (which runs eagerly), so one hook covers both.
INDEXER_TARGET = "sglang.srt.layers.attention.dsa.dsa_indexer.Indexer._get_topk_ragged"
HOOKS = {INDEXER_TARGET: "AROUND"}


# ---------------------------------------------------------------------------------------------------- switch


def token_parallel_mode() -> str:
    """``NSA_TP_TOKEN_PARALLEL`` (``auto`` when unset); an unknown value raises ``ValueError`` naming it."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


class _ModeAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        os.environ[ENV_MODE] = str(values)  # inherited by every SGLang subprocess (started after parsing)


def add_cli_flag(parser: argparse.ArgumentParser) -> None:
    """Add :data:`FLAG` to SGLang's parser once; not a ``ServerArgs`` field (``default=SUPPRESS``)."""
    if FLAG in parser._option_string_actions:
        return
    parser.add_argument(
        FLAG, action=_ModeAction, choices=MODES, default=argparse.SUPPRESS,
        help=f"nsa-tp token-parallel DSA prefill inside the attention TP group (sets {ENV_MODE}): auto = only "
             f"where measured faster on this card ({ENV_COSTS}), else upstream; on = always tokens; "
             "indexer = split only the indexer rows; off = upstream.",
    )


# --------------------------------------------------------------------------------------------------- adapter


def choose_extend_strategy(mode: str, world: int, prefix_lens: list[int], extend_lens: list[int],
                           heads_per_rank: int, costs: Costs | None) -> tuple[str, str]:
    """Pure: the strategy for one extend batch (``heads`` | ``indexer`` | ``tokens``) and the reason.

    The shared policy decides (:func:`nsa_tp.token_parallel.choose` on a :class:`~nsa_tp.token_parallel.BatchShape`
    of this batch): ``auto`` takes the least predicted time and leaves ``heads`` only for a gain above
    ``costs.margin``; ``costs=None`` under ``auto`` (nothing measured on this card) keeps ``heads``.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "auto" and costs is None:
        return "heads", "auto without measured costs for this card"
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
    if costs is None:  # the card's one record (also weighs a forced split's rows)
        costs, why = load_costs(card)
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
        rank, world = _rank_world(group)
        plan = plan_extend(forward_batch, rank, world, heads_per_rank, card=_card())
        if plan.strategy == "tokens" and core_is_ours is not None:
            plan = dataclasses.replace(plan, strategy="indexer", reason=f"{plan.reason}; tokens -> indexer: "
                                       f"{core_is_ours}")
        setattr(forward_batch, PLAN_ATTR, plan)
        if plan.strategy != "heads" or world > 1:
            log_once(f"tp-plan-{plan.strategy}-{plan.reason}", "token-parallel extend: strategy=%s (%s), "
                     "attn_tp=%d, rows per rank %s", plan.strategy, plan.reason, world, plan.splits)
    return plan


def _rank_world(group: Any) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _card() -> str | None:
    """This GPU's name from the cached capability probe (a lookup per batch, not a driver query)."""
    return get_capability().name if torch.cuda.is_available() else None


def _attn_tp_group() -> Any:
    """SGLang's attention TP group (its torch ``ProcessGroup``); ``None`` outside a distributed run."""
    from sglang.srt.distributed.parallel_state import get_attn_tp_group  # 0.5.17 and 0.5.23

    coord = get_attn_tp_group()
    return None if coord.world_size == 1 else coord.device_group


# ------------------------------------------------------------------------------------------------ executors


def around_get_topk_ragged(original: Callable[..., torch.Tensor], indexer: Any, enable_dual_stream: bool,
                           forward_batch: Any, layer_id: int, q_fp8: torch.Tensor, weights: torch.Tensor,
                           metadata: Any, topk_result: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
    """``Indexer._get_topk_ragged`` with the query rows split over the attention TP group.

    Upstream's own function runs on this rank's rows only (its chunked path's per-row metadata, cut to the
    rank's rows by :class:`_RowWindow`; the index-K cache store happened before this call, on every rank).
    ``indexer``: the ``[rows, K]`` results are all-gathered (:func:`nsa_tp.token_parallel.gather_topk_rows`),
    so every rank holds the whole ``[T, K]`` top-k, as upstream. ``tokens``: nothing is gathered — the rank's
    own rows are filled and the others left -1, because the sparse core reads only its own rows (SGLang's
    transforms between here and the core work row by row). Returns ``[rows of q, K]`` int32 (into
    ``topk_result`` when given: the piecewise-graph split op's static buffer).
    """
    plan = getattr(forward_batch, PLAN_ATTR, None)
    if plan is not None and plan.key != batch_key(forward_batch):
        plan = None  # built for an earlier batch this object described: the backend plans this one
    if plan is None or plan.strategy == "heads" or extra or not plugin_enabled():
        return original(indexer, enable_dual_stream, forward_batch, layer_id, q_fp8, weights, metadata,
                        topk_result, **extra)
    rows = plan.rows
    if len(rows):
        own = original(indexer, False, forward_batch, layer_id, q_fp8[rows.start : rows.stop],
                       weights[rows.start : rows.stop], _RowWindow(metadata, rows))[: len(rows)]
    else:  # upstream's function asserts at least one row; this rank only joins the collectives
        own = torch.full((0, indexer.index_topk), -1, dtype=torch.int32, device=q_fp8.device)
    log_once(f"tp-indexer-{plan.strategy}", "token-parallel indexer active (%s): Indexer._get_topk_ragged scores "
             "%d of %d rows on this rank%s", plan.strategy, len(rows), plan.num_real,
             ", then all-gathers the top-k ids" if plan.strategy == "indexer" else "")
    if topk_result is None:
        topk_result = own.new_full((q_fp8.shape[0], own.shape[1]), -1)
    if plan.strategy == "indexer":
        topk_result[: plan.num_real] = gather_topk_rows(own, _attn_tp_group(), plan.split(plan.num_real))
    else:
        topk_result[: plan.num_real] = -1
        topk_result[rows.start : rows.stop] = own
    if verify.verify_enabled() and not _capturing(q_fp8):
        full = topk_result[: plan.num_real]
        if plan.strategy == "tokens":
            full = gather_topk_rows(own, _attn_tp_group(), plan.split(plan.num_real))
        ref = original(indexer, False, forward_batch, layer_id, q_fp8, weights, metadata)[: plan.num_real]
        differ = (full.sort(dim=1).values != ref.sort(dim=1).values).any(dim=1).float().mean().item()
        verify.record("token-parallel Indexer._get_topk_ragged", f"{plan.strategy}, rows with another top-k set",
                      differ)
    return topk_result


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _RowWindow:
    """Upstream's indexer metadata restricted to the query rows ``rows``: the row-indexed tensors (key ranges,
    causal lengths, row -> request, ragged offsets) are cut, everything keyed by key or request passes
    through. ``topk_transform`` is called the way upstream's own chunked path calls it for a row chunk.
    Used only by :func:`around_get_topk_ragged`."""

    _ROW_GETTERS = ("get_seqlens_expanded", "get_token_to_batch_idx")

    def __init__(self, metadata: Any, rows: range) -> None:
        self._m, self._rows = metadata, rows
        self.attn_metadata = _CutOffsets(metadata.attn_metadata, rows)

    def _cut(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[self._rows.start : self._rows.stop]

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._m, name)
        if name in self._ROW_GETTERS:
            return lambda: self._cut(value())
        if name == "get_indexer_kvcache_range":
            return lambda: tuple(self._cut(x) for x in value())
        if name == "topk_transform":
            return self._topk_transform
        return value

    def _topk_transform(self, logits: torch.Tensor, topk: int, ks: torch.Tensor | None = None,
                        **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("ke_offset", self.get_seqlens_expanded())
        if kwargs.get("topk_indices_offset_override") is None and kwargs.get("cu_seqlens_q") is None:
            offset = self.attn_metadata.topk_indices_offset
            if offset is not None:  # RAGGED: each row's offset into the flattened KV
                kwargs["topk_indices_offset_override"] = offset
            else:  # PAGED: each row is a length-1 query of its request (upstream's chunked path)
                kwargs["cu_seqlens_q"] = torch.ones(len(self._rows), dtype=torch.int32, device=logits.device)
                kwargs["batch_idx_list"] = self.get_token_to_batch_idx()
        return self._m.topk_transform(logits, topk, ks=ks, **kwargs)


class _CutOffsets:
    """``attn_metadata`` with ``topk_indices_offset`` cut to the window's rows (upstream's chunked path reads
    it there and slices it from row 0 of what it is given)."""

    def __init__(self, attn_metadata: Any, rows: range) -> None:
        self._a = attn_metadata
        full = getattr(attn_metadata, "topk_indices_offset", None)
        self.topk_indices_offset = None if full is None else full[rows.start : rows.stop]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)


# The upstream prefill implementations whose sparse core reaches the overrides below.
ROUTED_IMPLS = ("flashmla_sparse", "flashmla_kv")


def make_backend_class() -> type:
    """``DeepseekSparseAttnBackend`` with the ``tokens`` sparse core (imports SGLang; model processes only)."""
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend

    class NsaTpTokenParallelBackend(DeepseekSparseAttnBackend):
        """Upstream's DSA backend; on a ``tokens`` extend batch the FlashMLA sparse core runs token-parallel."""

        def _nsa_tp_plan_for(self, forward_batch: Any) -> ExtendPlan:
            return plan_for(forward_batch, _attn_tp_group(), self.num_q_heads, core_is_ours=_tokens_blocked(self))

        def init_forward_metadata(self, forward_batch: Any) -> None:
            super().init_forward_metadata(forward_batch)  # decides dsa_prefill_impl / use_mha for this batch
            self._nsa_tp_plan_for(forward_batch)  # once per batch, before any layer's indexer

        def forward_extend(self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, *args: Any,
                           **kwargs: Any) -> Any:
            self._nsa_tp_plan = self._nsa_tp_plan_for(forward_batch)
            try:
                return super().forward_extend(q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                self._nsa_tp_plan = None

        def _forward_flashmla_sparse(self, q_all: Any, kv_cache: Any, v_head_dim: int, page_table_1: Any,
                                     sm_scale: float, topk_length: Any = None, **extra: Any) -> Any:
            plan = getattr(self, "_nsa_tp_plan", None)

            def upstream(table: Any) -> Any:
                return super(NsaTpTokenParallelBackend, self)._forward_flashmla_sparse(
                    q_all, kv_cache, v_head_dim, table, sm_scale, topk_length=topk_length, **extra)

            if plan is None or plan.strategy != "tokens":
                return upstream(page_table_1)
            why = _tokens_unsupported(plan, q_all, kv_cache, v_head_dim, page_table_1, extra)
            if why is not None:  # the indexer filled only this rank's rows: rebuild the whole table first
                log_once(f"tp-sparse-fallback-{why}", "token-parallel sparse core not used (%s): upstream's core "
                         "on the gathered top-k", why)
                return upstream(_whole_table(page_table_1, plan))
            log_once("tp-sparse", "token-parallel sparse core active: _forward_flashmla_sparse -> "
                     "nsa_tp.token_parallel.tokens_sparse_mla (%d heads per rank -> all heads of 1/%d of the "
                     "rows)", q_all.shape[1], len(plan.splits))
            out = _tokens(q_all, kv_cache, page_table_1, sm_scale, v_head_dim, plan)
            if verify.verify_enabled() and not _capturing(q_all):
                ref = upstream(_whole_table(page_table_1, plan))
                verify.record("token-parallel _forward_flashmla_sparse", f"T={q_all.shape[0]} h={q_all.shape[1]}",
                              verify.relative_error(out[: plan.num_real], ref[: plan.num_real]))
            return out

        def _forward_flashmla_kv(self, q_all: Any, kv_cache: Any, v_head_dim: int, sm_scale: float, layer: Any,
                                 metadata: Any, page_table_1: Any, **extra: Any) -> Any:
            plan = getattr(self, "_nsa_tp_plan", None)

            def upstream(table: Any) -> Any:
                return super(NsaTpTokenParallelBackend, self)._forward_flashmla_kv(
                    q_all, kv_cache, v_head_dim, sm_scale, layer, metadata, table, **extra)

            if plan is None or plan.strategy != "tokens":
                return upstream(page_table_1)
            q = q_all.reshape(-1, layer.tp_q_head_num, q_all.shape[-1])  # [T, h*576] or [T, 1, h, 576] -> [T, h, 576]
            flat = kv_cache.view(-1, 1, kv_cache.shape[-1])  # the pool [pages*64, 1, D]: slots are global
            why = _tokens_unsupported(plan, q, flat, v_head_dim, page_table_1, extra)
            if why is not None:
                log_once(f"tp-kv-fallback-{why}", "token-parallel sparse core not used (%s): upstream's core on "
                         "the gathered top-k", why)
                return upstream(_whole_table(page_table_1, plan))
            log_once("tp-kv", "token-parallel sparse core active: _forward_flashmla_kv (extend) -> "
                     "nsa_tp.token_parallel.tokens_sparse_mla over the paged pool (%d heads per rank)", q.shape[1])
            out = _tokens(q, flat, page_table_1, sm_scale, v_head_dim, plan).unsqueeze(1)  # -> [T, 1, h, 512]
            if verify.verify_enabled() and not _capturing(q):
                ref = upstream(_whole_table(page_table_1, plan))
                verify.record("token-parallel _forward_flashmla_kv", f"T={q.shape[0]} h={q.shape[1]}",
                              verify.relative_error(out[: plan.num_real], ref[: plan.num_real]))
            return out

    return NsaTpTokenParallelBackend


def _tokens_blocked(backend: Any) -> str | None:
    """Why this batch cannot leave every rank with only its own top-k rows (``tokens``), or None.

    Our sparse core must be the one that runs (FlashMLA entries, no dense MHA), and nothing may read the whole
    top-k table: SGLang's ``SGLANG_DSA_TOPK_BROADCAST`` (rank 0's table sent to all) or its indexer top-k
    capturer (top-k returned to the client) would see the other ranks' rows as -1.
    """
    impl = getattr(backend, "dsa_prefill_impl", None)
    if getattr(backend, "use_mha", False):
        return "dense MHA prefill for this batch (short prompts)"
    if impl not in ROUTED_IMPLS:
        return f"prefill implementation {impl!r} is not one nsa-tp routes ({', '.join(ROUTED_IMPLS)})"
    try:
        from sglang.srt.environ import envs
        from sglang.srt.state_capturer.indexer_topk import get_global_indexer_capturer
    except ImportError as e:  # a release without them cannot have them switched on
        log_once("tp-blocked-import", "token-parallel: %s (topk broadcast / capturer checks skipped)", e)
        return None
    if envs.SGLANG_DSA_TOPK_BROADCAST.get():
        return "SGLANG_DSA_TOPK_BROADCAST sends rank 0's whole top-k table to every rank"
    if get_global_indexer_capturer() is not None:
        return "the indexer top-k capturer reads the whole top-k table"
    return None


def _whole_table(page_table_1: torch.Tensor, plan: ExtendPlan) -> torch.Tensor:
    """A ``tokens`` batch's ``[rows, K]`` table with every rank's rows (each rank computed only its own):
    one all-gather of the row blocks, for an upstream core that needs them all (fallback, verify)."""
    rows = plan.rows
    own = page_table_1[rows.start : rows.stop].to(torch.int32)
    full = page_table_1.clone()
    full[: plan.num_real] = gather_topk_rows(own, _attn_tp_group(), plan.split(plan.num_real)).to(full.dtype)
    return full


def _tokens(q: torch.Tensor, kv: torch.Tensor, page_table_1: torch.Tensor, sm_scale: float, d_v: int,
            plan: ExtendPlan) -> torch.Tensor:
    """The shared ``tokens`` core on upstream's FlashMLA inputs: ``q [T, h, 576]``, flat ``kv [N, 1, D]``,
    ``page_table_1 [T, K]`` (every row, replicated) -> ``o [T, h, d_v]``, DP padding rows 0."""
    rows = plan.rows
    topk = page_table_1[rows.start : rows.stop].to(torch.int32)  # this rank's rows only
    return tokens_sparse_mla(q, kv, topk, sm_scale, _attn_tp_group(), plan.split(q.shape[0]), d_v=d_v,
                             backend=ops_backend())


def _tokens_unsupported(plan: ExtendPlan | None, q: torch.Tensor, kv: torch.Tensor, v_head_dim: int,
                        page_table_1: torch.Tensor, extra: dict) -> str | None:
    """None when the ``tokens`` core may run on these inputs; the checks depend only on what every rank of
    the group shares (shapes, dtypes, the plan), so all ranks decide alike."""
    if plan is None or plan.strategy != "tokens":
        return "not a tokens batch"
    if extra:
        return "extra arguments " + ", ".join(extra)
    if q.dim() != 3 or q.shape[-1] != D_QK or v_head_dim != D_LATENT:
        return f"q {tuple(q.shape)} / v_head_dim {v_head_dim} outside [T, h, {D_QK}] / {D_LATENT}"
    if q.shape[0] < plan.num_real or page_table_1.dim() != 2 or page_table_1.shape[0] < plan.num_real:
        return f"q rows {q.shape[0]} / page_table_1 {tuple(page_table_1.shape)} fewer than the plan's {plan.num_real}"
    if page_table_1.shape[0] != q.shape[0]:
        return "page_table_1 rows differ from q rows"
    return None


def register_backend() -> str:
    """Point SGLang's ``"dsa"`` attention-backend factory at :func:`make_backend_class`'s subclass.

    Through SGLang's public ``register_attention_backend`` under upstream's own name: DeepSeek-V3.2 selects
    ``"dsa"`` by default and SGLang's model code compares the backend name with ``"dsa"``, so a new name would
    change upstream's code paths. Returns the name registered.
    """
    from sglang.srt.layers.attention import attention_registry  # its decorators run first, then ours wins

    cls = make_backend_class()

    @attention_registry.register_attention_backend("dsa")
    def create_nsa_tp_dsa_backend(runner: Any) -> Any:
        return cls(runner)

    return "dsa"


def hook_targets() -> dict[str, Callable[..., Any]]:
    """The HookRegistry hooks of this module: ``{target: AROUND function}`` (see :data:`HOOKS`)."""
    return {INDEXER_TARGET: around_get_topk_ragged}


def register_in_model_process() -> list[tuple[str, Callable[..., Any], str]]:
    """What :mod:`.plugin` calls in a process that runs the model: the backend, and the hook specs to place.

    Returns ``[(target, hook, "AROUND")]``. A failure logs one line and leaves upstream's backend in place.
    """
    mode = token_parallel_mode()
    if mode == "off":
        logger.info("token-parallel extend switched off (%s=off): upstream's DSA backend", ENV_MODE)
        return []
    try:
        register_backend()
    except Exception as e:  # noqa: BLE001 - any import failure means "leave upstream's backend"; say why
        logger.warning("token-parallel backend not registered: %s: %s", type(e).__name__, e)
        return []
    logger.info("token-parallel extend: mode=%s; DSA backend 'dsa' -> NsaTpTokenParallelBackend", mode)
    return [(t, h, HOOKS[t]) for t, h in hook_targets().items()]
