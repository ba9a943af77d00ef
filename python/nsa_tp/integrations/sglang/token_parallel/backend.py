"""Registration: the backend subclass that plans each extend batch, and the one indexer hook — placed only
where token-parallel can run.

:func:`make_backend_class` is upstream's ``DeepseekSparseAttnBackend`` plus two overrides and nothing else:
``init_forward_metadata`` builds the batch's plan once (:func:`..plan.plan_for`) and ``forward_extend``
hands it to the FlashMLA hooks for the call (the sparse core itself is intercepted once, by
:mod:`..attention_hooks`). It is registered through SGLang's public ``register_attention_backend`` under
upstream's own name (DeepSeek-V3.2 selects ``"dsa"`` by default and SGLang's model code compares the name, so
a new name would change upstream's code paths), and only when a plan other than ``heads`` is possible:

- at plugin load (:func:`register_in_model_process`): not when switched off, nor under ``auto`` without a
  readable cost file (``auto`` then keeps upstream on every batch);
- at backend construction (the registered factory): upstream's own class when the attention TP group has one
  rank (``--tp 1``, full DP attention).

Each "not here" is logged once, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nsa_tp.integrations.sglang import _compat
from nsa_tp.integrations.sglang._log import log_once, logger
from nsa_tp.integrations.sglang._switch import ENV_MODE, token_parallel_mode
from nsa_tp.integrations.sglang.token_parallel import plan as _plan
from nsa_tp.integrations.sglang.token_parallel.indexer import around_get_topk_ragged
from nsa_tp.integrations.sglang.token_parallel.sparse import PLAN_ON_BACKEND
from nsa_tp.ops.capability import card_name
from nsa_tp.token_parallel.costs import load_costs

__all__ = ["HOOKS", "make_backend_class", "register_backend", "hook_targets", "why_not_here",
           "register_in_model_process"]

HOOKS = {_compat.INDEXER_TARGET: "AROUND"}


def make_backend_class() -> type:
    """``DeepseekSparseAttnBackend`` that plans every batch (imports SGLang; model processes only)."""
    upstream_cls = _compat.resolve(_compat.ATTENTION_CLASS)

    class NsaTpTokenParallelBackend(upstream_cls):  # type: ignore[misc, valid-type]
        """Upstream's DSA backend; the batch's token-parallel plan is built once and handed to the FlashMLA
        hooks while ``forward_extend`` runs."""

        def _nsa_tp_plan_for(self, forward_batch: Any) -> _plan.ExtendPlan:
            return _plan.plan_for(forward_batch, _plan.attn_tp_group(), self.num_q_heads,
                                  core_is_ours=_plan.tokens_blocked(self))

        def init_forward_metadata(self, forward_batch: Any) -> None:
            super().init_forward_metadata(forward_batch)  # decides dsa_prefill_impl / use_mha for this batch
            self._nsa_tp_plan_for(forward_batch)  # once per batch, before any layer's indexer

        def forward_extend(self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, *args: Any,
                           **kwargs: Any) -> Any:
            # every layer: the plan init_forward_metadata cached on the batch (planned here only if it was not)
            setattr(self, PLAN_ON_BACKEND, _plan.current_plan(forward_batch) or self._nsa_tp_plan_for(forward_batch))
            try:
                return super().forward_extend(q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                setattr(self, PLAN_ON_BACKEND, None)

    return NsaTpTokenParallelBackend


def register_backend() -> str:
    """Point SGLang's ``"dsa"`` attention-backend factory at :func:`make_backend_class`'s subclass, for attention
    TP groups of two ranks or more (upstream's class otherwise). Returns the name registered."""
    registry = _compat.resolve(_compat.ATTENTION_REGISTRY)  # its decorators run first, then ours wins
    cls = make_backend_class()
    upstream_cls = _compat.resolve(_compat.ATTENTION_CLASS)

    @registry.register_attention_backend(_compat.BACKEND_NAME)
    def create_nsa_tp_dsa_backend(runner: Any) -> Any:
        world = _plan.rank_world(_plan.attn_tp_group())[1]
        if world < 2:
            log_once("tp-backend-attn-tp-1", "token-parallel extend not used: the attention TP group has one rank; "
                     "upstream's DSA backend")
            return upstream_cls(runner)
        return cls(runner)

    return _compat.BACKEND_NAME


def hook_targets() -> dict[str, Callable[..., Any]]:
    """The HookRegistry hooks of token-parallel: ``{target: AROUND function}`` (see :data:`HOOKS`)."""
    return {_compat.INDEXER_TARGET: around_get_topk_ragged}


def why_not_here() -> str | None:
    """Why no batch of this process can leave ``heads`` (nothing to register), or None."""
    mode = token_parallel_mode()
    if mode == "off":
        return f"switched off ({ENV_MODE}=off)"
    if mode == "auto":
        costs, why = load_costs(card_name(), serving=True)  # what each batch's plan reads too
        if costs is None:
            return f"auto: {why}"
    return None


def register_in_model_process() -> list[tuple[str, Callable[..., Any], str]]:
    """What :mod:`..plugin` calls in a process that runs the model: the backend, and the hook specs to place.

    Returns ``[(target, hook, "AROUND")]``, or ``[]`` where token-parallel cannot run (logged once, with the
    reason) or the backend could not be registered (upstream's backend stays).
    """
    why = why_not_here()
    if why is not None:
        logger.info("token-parallel extend not registered (%s): upstream's DSA backend", why)
        return []
    try:
        register_backend()
    except Exception as e:  # noqa: BLE001 - any import failure means "leave upstream's backend"; say why
        logger.warning("token-parallel backend not registered: %s: %s", type(e).__name__, e)
        return []
    logger.info("token-parallel extend: mode=%s; DSA backend 'dsa' -> NsaTpTokenParallelBackend where the "
                "attention TP group has 2 ranks or more", token_parallel_mode())
    return [(t, h, HOOKS[t]) for t, h in hook_targets().items()]
