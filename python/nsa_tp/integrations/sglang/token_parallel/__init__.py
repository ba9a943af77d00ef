"""Token-parallel DSA prefill inside SGLang's attention TP group (``--tp N``, or ``--dp D --enable-dp-attention``
with ``attn_tp = N / D >= 2``); see docs/sglang_token_parallel.md.

One module per role (STYLE.md, "Living inside a host engine"):

- switch — ``--nsa-token-parallel auto|on|off|indexer`` (:mod:`..cli_flag`, sets ``NSA_TP_TOKEN_PARALLEL`` for
  every SGLang process) and :func:`~.._switch.token_parallel_mode`;
- costs — the card's one record, :func:`nsa_tp.token_parallel.costs.load_costs` with ``serving=True`` (no copy here);
- :mod:`.plan` — the adapter: SGLang's ``ForwardBatch`` -> one frozen :class:`ExtendPlan` per batch (strategy,
  which contiguous rows each rank owns), cached on the batch object and read by every layer;
- :mod:`.indexer` — :func:`around_get_topk_ragged` (the one HookRegistry hook token-parallel adds) runs upstream's
  own indexer top-k on this rank's query rows only, then :func:`nsa_tp.token_parallel.gather_topk_rows`;
- :mod:`.sparse` — a ``tokens`` batch's sparse core through :func:`nsa_tp.token_parallel.tokens_sparse_mla`
  (q heads -> tokens, all heads, no padding, tokens -> heads), reached through the FlashMLA hooks of
  :mod:`..attention_hooks` (one interception per upstream function);
- :mod:`.backend` — the backend subclass that plans each batch (registered under SGLang's own ``"dsa"`` name),
  the hook specs, and the gate: registered only where a plan other than ``heads`` is possible.

The algorithm (splits, cost model, collectives, sparse core) is :mod:`nsa_tp.token_parallel`'s, shared with
nsa-tp's own layer; this package only translates SGLang's batch and calls it.

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

from nsa_tp.integrations.sglang._compat import INDEXER_TARGET
from nsa_tp.integrations.sglang._switch import ENV_MODE, MODES, token_parallel_mode
from nsa_tp.integrations.sglang.cli_flag import TOKEN_PARALLEL_FLAG as FLAG
from nsa_tp.integrations.sglang.cli_flag import add_token_parallel_flag as add_cli_flag
from nsa_tp.integrations.sglang.token_parallel.backend import (
    HOOKS,
    hook_targets,
    make_backend_class,
    register_backend,
    register_in_model_process,
)
from nsa_tp.integrations.sglang.token_parallel.indexer import around_get_topk_ragged
from nsa_tp.integrations.sglang.token_parallel.plan import (
    PLAN_ATTR,
    ExtendPlan,
    batch_key,
    choose_extend_strategy,
    extend_rows,
    plan_extend,
    plan_for,
)
from nsa_tp.token_parallel.costs import ENV_COSTS, load_costs

__all__ = [
    "ENV_MODE", "ENV_COSTS", "MODES", "FLAG", "PLAN_ATTR", "HOOKS", "INDEXER_TARGET",
    "token_parallel_mode", "add_cli_flag", "load_costs", "choose_extend_strategy",
    "ExtendPlan", "plan_extend", "plan_for", "extend_rows", "batch_key",
    "around_get_topk_ragged", "make_backend_class", "register_backend", "hook_targets", "register_in_model_process",
]
