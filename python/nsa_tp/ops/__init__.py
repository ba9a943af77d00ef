"""Stateless kernels: one contract each, several tiers behind one dispatcher.

Public entry points (contracts in ``DESIGN.md``; semantics defined by :mod:`nsa_tp.ops.reference` and
:mod:`nsa_tp.ops.topk`):

- :func:`sparse_mla_fwd` — sparse MLA over top-k selected KV rows, any head count.
- :func:`plan_sparse_mla_decode` / :func:`sparse_mla_decode` — sparse MLA decode over the paged latent
  cache; the plan is built once per batch and runs on the tier that built it.
- :func:`fp8_mqa_logits` — the lightning indexer's fp8 MQA logits over ragged key ranges.
- :func:`fp8_paged_mqa_logits` — the same for decode, over the paged index-K cache.
- :func:`topk_transform_ragged` / :func:`topk_transform_paged` — logits rows -> top-k ids.

Helpers (not dispatched): :mod:`nsa_tp.ops.quant`, :mod:`nsa_tp.ops.hadamard`, :mod:`nsa_tp.ops.rope`,
:mod:`nsa_tp.ops.index_cache`, :mod:`nsa_tp.ops.kv_format`.

``backend="auto"`` takes the fastest tier that supports the inputs here; ``"reference"``, ``"triton"``
and ``"flashmla"`` force one and raise :class:`BackendUnavailableError` if it cannot run.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.ops import topk as _topk
from nsa_tp.ops.plan import DecodePlan
from nsa_tp.ops.registry import BackendUnavailableError, auto_tier, dispatch, explain, get_tier, tier_names

__all__ = [
    "sparse_mla_fwd",
    "plan_sparse_mla_decode",
    "sparse_mla_decode",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "topk_transform_ragged",
    "topk_transform_paged",
    "DecodePlan",
    "BackendUnavailableError",
    "explain",
    "tier_names",
]


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [T,H,512] bf16, max_logits [T,H] f32, lse [T,H] f32)``.

    Semantics: :func:`nsa_tp.ops.reference.sparse_mla_fwd`.
    """
    return dispatch("sparse_mla_fwd", backend, q, kv, indices, sm_scale, d_v)


def plan_sparse_mla_decode(
    batch_size: int,
    num_heads: int,
    topk: int,
    *,
    kv_dtype: object,
    device: torch.device | str,
    backend: str = "auto",
) -> DecodePlan:
    """Build a :class:`DecodePlan` once per batch (``kv_dtype``: ``"bfloat16"`` / ``"fp8_e4m3"`` or the
    cache's torch dtype). ``plan.tier`` is the tier that will run :func:`sparse_mla_decode` with it.

    Semantics: :func:`nsa_tp.ops.reference.plan_sparse_mla_decode`.
    """
    plan = dispatch("plan_sparse_mla_decode", backend, batch_size, num_heads, topk, kv_dtype=kv_dtype, device=device)
    return dataclasses.replace(plan, by_auto=True) if backend == "auto" else plan


# An auto plan whose tier declined a call's inputs -> the plan that runs them instead: made once per plan (the plan
# serves every layer of its batch), logged once per (tier, reason).
_REPLANS: weakref.WeakKeyDictionary[DecodePlan, DecodePlan] = weakref.WeakKeyDictionary()
_REPLAN_LOGGED: set[tuple[str, str]] = set()


def _auto_replan(plan: DecodePlan, args: tuple[Any, ...]) -> DecodePlan:
    """For an auto plan (made before the cache was seen) whose tier declined these inputs: a plan of the tier
    auto picks for the inputs themselves, the declining tier left out."""
    other = _REPLANS.get(plan)
    if other is None:
        reason = get_tier(plan.tier).ops["sparse_mla_decode"].supports(*args, plan=plan)
        name = auto_tier("sparse_mla_decode", *args, skip=plan.tier)
        if (plan.tier, str(reason)) not in _REPLAN_LOGGED:
            _REPLAN_LOGGED.add((plan.tier, str(reason)))
            logging.getLogger("nsa_tp.ops").warning(
                "nsa_tp.ops auto: sparse_mla_decode was planned for %s, which declines these inputs (%s): runs %s",
                plan.tier, reason, name)
        other = plan_sparse_mla_decode(plan.batch_size, plan.num_heads, plan.topk, kv_dtype=plan.kv_dtype,
                                       device=plan.device, backend=name)
        _REPLANS[plan] = other
    return other


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    *,
    plan: DecodePlan | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,512] bf16, lse [B,H] f32)`` over the paged latent cache with global-slot indices.

    With a ``plan`` the plan's tier runs (``backend`` must be ``"auto"`` or that tier's name); a plan built by
    ``backend="auto"`` whose tier declines these inputs runs on the next tier auto would pick (logged once).
    Semantics: :func:`nsa_tp.ops.reference.sparse_mla_decode`.
    """
    if plan is not None:
        if not isinstance(plan, DecodePlan):
            raise ValueError(f"plan: expected a DecodePlan from plan_sparse_mla_decode, got {type(plan).__name__}")
        if backend not in ("auto", plan.tier):
            raise ValueError(f"backend: {backend!r} conflicts with the plan, which was built by tier {plan.tier!r}")
        backend = plan.tier
    args = (q, kv_cache, indices, sm_scale, d_v)
    try:
        return dispatch("sparse_mla_decode", backend, *args, plan=plan)
    except BackendUnavailableError:  # the tier's supports() declined (before any kernel ran)
        if plan is None or not plan.by_auto:
            raise
        other = _auto_replan(plan, args)
        return dispatch("sparse_mla_decode", other.tier, *args, plan=other)


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``logits [T, N]`` float32; see :func:`nsa_tp.ops.reference.fp8_mqa_logits`."""
    return dispatch("fp8_mqa_logits", backend, q, kv, weights, ks, ke)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    index_k_cache: torch.Tensor,
    weights: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    max_seq_len: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``logits [B, max_seq_len]`` float32; see :func:`nsa_tp.ops.reference.fp8_paged_mqa_logits`."""
    return dispatch("fp8_paged_mqa_logits", backend, q, index_k_cache, weights, seq_lens, page_table, max_seq_len)


def _topk_op(name: str, spec: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The public top-k op ``name``: ``spec``'s contract (:mod:`nsa_tp.ops.topk`, declared there once) plus
    ``backend=``. Every tier implementing the top-k ops accepts ``check_values=False`` (skips the value range
    checks, a host sync, for inputs validated once per batch)."""

    def op(*args: Any, backend: str = "auto", **kwargs: Any) -> torch.Tensor:
        return dispatch(name, backend, *args, **kwargs)

    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="str")
    _topk.adopt_contract(op, spec, add=backend)
    op.__name__ = op.__qualname__ = name
    return op


topk_transform_ragged = _topk_op("topk_transform_ragged", _topk.topk_transform_ragged)
topk_transform_paged = _topk_op("topk_transform_paged", _topk.topk_transform_paged)
