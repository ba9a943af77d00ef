"""Token-parallel sparse attention inside an attention TP group: one implementation, used by nsa-tp's own
layer (:class:`nsa_tp.model.core.TokenParallelCore`) and by a host engine (the SGLang plugin).

Every rank of an attention TP group holds the whole latent KV cache and the whole index-K cache (MLA's KV
projection and the indexer are replicated), so how the group splits the indexer and the sparse core is a
free choice, made per batch:

- ``heads``   — upstream pure TP: every rank runs the indexer for all rows, the sparse core for its heads
  (FlashMLA pads them to 64 on Hopper).
- ``indexer`` — each rank's indexer scores only its share of the query rows, the top-k ids are all-gathered,
  the sparse core stays split by heads.
- ``tokens``  — queries all-to-all heads -> tokens, each rank runs the indexer and the sparse core with all
  heads (no padding) for its own rows, the output all-to-all tokens -> heads. Nothing is all-gathered.
- ``keys``    — decode with fewer requests than ranks: the indexer's keys are sharded, the per-rank top-k
  candidates merged exactly.

Modules:

- :mod:`~nsa_tp.token_parallel.plan` — split plans (pure): :func:`plan_token_split` (``tokens``),
  :func:`plan_index_split` (``indexer``), :func:`plan_key_shards` (``keys``).
- :mod:`~nsa_tp.token_parallel.costs` — the one :class:`Costs` record per card (:func:`load_costs`) and the
  collective model.
- :mod:`~nsa_tp.token_parallel.policy` — the one decider :func:`choose` (``BatchShape``, ``Costs`` -> ``Plan``
  with the predicted ms inside), a pure function.
- :mod:`~nsa_tp.token_parallel.core` — the collectives + sparse core run on a rank's rows.
- :mod:`~nsa_tp.token_parallel.merge` — the exact top-k merge of key-sharded candidates.
- :mod:`~nsa_tp.token_parallel.backend` — per-batch metadata and per-layer execution for nsa-tp's own layer.

What a host engine (SGLang) calls, once per batch then once per layer:

1. :func:`choose` (a pure function of :class:`BatchShape` and the card's :class:`Costs`, from
   :func:`load_costs`; its :class:`Plan` carries the strategy, the reason and the predicted ms), then
   :func:`plan_token_split` / :func:`plan_index_split` (which rows
   this rank's indexer scores: ``split.rows(rank)``);
2. its own indexer on those rows -> ``topk [t_r, K]`` int32;
3. ``tokens``: :func:`tokens_sparse_mla` ``(q [T, H_local, 576], kv [N, 1, 576|656], topk, sm_scale, group,
   split) -> o [T, H_local, 512]``; ``indexer``: :func:`gather_topk_rows` ``(topk, group, split) -> [T, K]``
   and its own sparse core by heads.

This package imports only the names below; the modules behind them import ``torch.distributed`` and
:mod:`nsa_tp.attention` (never :mod:`nsa_tp.model`: the data flows model -> token_parallel -> attention -> ops).
"""

from nsa_tp.token_parallel.core import gather_topk_rows, tokens_sparse_mla
from nsa_tp.token_parallel.costs import Costs, load_costs
from nsa_tp.token_parallel.plan import (
    TokenSplit,
    causal_key_counts,
    plan_index_split,
    plan_key_shards,
    plan_token_split,
)
from nsa_tp.token_parallel.policy import STRATEGIES, BatchShape, Plan, choose

__all__ = [
    "tokens_sparse_mla",
    "gather_topk_rows",
    "TokenSplit",
    "plan_token_split",
    "plan_index_split",
    "plan_key_shards",
    "causal_key_counts",
    "BatchShape",
    "choose",
    "Plan",
    "Costs",
    "load_costs",
    "STRATEGIES",
]
