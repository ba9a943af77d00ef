"""The token-parallel attention core, plugged into the layer's seam (:mod:`nsa_tp.model.core`).

Two registered names:

- ``"token_parallel"``: per batch, the layout's ``--nsa-token-parallel`` flag decides (``auto``: the cost
  model of :mod:`nsa_tp.attention.token_parallel`; small batches stay pure TP);
- ``"token_parallel_on"``: always leave pure TP when the attention TP group has more than one rank
  (tokens for prefill and decode with >= attn_tp requests, key-sharded indexer below) — for tests and
  ``nsa-tp run``, where CPU-sized batches would never pass ``auto``'s threshold.

Either gives the same layer output as ``"heads"`` (pure TP); see ``docs/token_parallel.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from nsa_tp.attention.token_parallel import choose_strategy
from nsa_tp.attention.token_parallel_backend import TokenParallelBackend, build_token_parallel_metadata
from nsa_tp.model.core import CoreInputs, HeadsCore, register_attention_core

if TYPE_CHECKING:
    from nsa_tp.attention.kv_cache import NSACaches
    from nsa_tp.attention.token_parallel_backend import TokenParallelMetadata
    from nsa_tp.model.attention import NSAAttention
    from nsa_tp.model.runner import RunCase

__all__ = ["TokenParallelCore", "ForcedTokenParallelCore", "CORE_MODES", "case_strategies"]

# Core name -> the --nsa-token-parallel mode it runs under (None: the layout's flag).
CORE_MODES: dict[str, str | None] = {"heads": "off", "token_parallel": None, "token_parallel_on": "on"}


class TokenParallelCore(HeadsCore):
    """All-to-all heads <-> tokens around the indexer and the sparse core (or key-sharded decode)."""

    name = "token_parallel"
    mode: str | None = None  # None: the layout's --nsa-token-parallel

    def __init__(self, layer: NSAAttention):
        super().__init__(layer)
        self.tp_backend = TokenParallelBackend(sm_scale=layer.sm_scale, d_v=layer.cfg.kv_lora_rank,
                                               backend=layer.backend)

    def build_metadata(
        self, caches: NSACaches, seq_lens: Sequence[int], prefix_lens: Sequence[int], page_table: torch.Tensor,
        num_padded: int, is_decode: bool,
    ) -> TokenParallelMetadata:
        groups = self.layer.groups
        return build_token_parallel_metadata(
            self.builder(caches), groups.layout, groups.attn_tp_rank, seq_lens=list(seq_lens),
            page_table=page_table, prefix_lens=None if is_decode else list(prefix_lens), num_padded=num_padded,
            mode=self.mode,
        )

    def forward(self, inp: CoreInputs) -> torch.Tensor:
        b, lay = inp.batch, inp.layer
        return self.tp_backend.forward(
            inp.q, inp.x, inp.q_lora, b.cos, b.sin, lay.indexer, inp.caches.latent.buffer, inp.caches.index_k,
            b.metadata, lay.groups.attn_tp_group,
        )


class ForcedTokenParallelCore(TokenParallelCore):
    """:class:`TokenParallelCore` with ``--nsa-token-parallel on`` whatever the layout says."""

    name = "token_parallel_on"
    mode = "on"


register_attention_core(TokenParallelCore.name, TokenParallelCore)
register_attention_core(ForcedTokenParallelCore.name, ForcedTokenParallelCore)


def case_strategies(case: RunCase) -> str:
    """What a :class:`~nsa_tp.model.runner.RunCase`'s core splits over the attention TP group, as
    ``"<prefill>/<decode>"`` per attention DP group (distinct values joined by ``,``): ``heads`` (pure TP),
    ``tokens`` or ``keys``; ``-`` for a core that is not token-parallel aware. The same pure policy the core
    runs (``choose_strategy``), for ``nsa-tp run``'s table."""
    if case.core not in CORE_MODES:
        return "-"
    lay = case.layout()
    mode = CORE_MODES[case.core]
    seen: list[str] = []
    for reqs in case.groups_of_requests(lay.attn_dp_size):
        if not reqs:
            continue  # an idle attention DP group runs no core
        rs = [case.requests[i] for i in reqs]
        keys = [r.prefix_len + i + 1 for r in rs for i in range(r.new_len)]
        pre = choose_strategy(lay, len(keys), sum(keys) / len(keys), mode)
        ctx = [r.prefix_len + r.new_len + 1 for r in rs]
        dec = choose_strategy(lay, len(rs), sum(ctx) / len(ctx), mode, is_decode=True)
        if f"{pre}/{dec}" not in seen:
            seen.append(f"{pre}/{dec}")
    return ",".join(seen) or "-"
