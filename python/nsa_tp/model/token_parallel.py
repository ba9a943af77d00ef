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

from nsa_tp.attention.token_parallel_backend import TokenParallelBackend, build_token_parallel_metadata
from nsa_tp.model.core import CoreInputs, HeadsCore, register_attention_core

if TYPE_CHECKING:
    from nsa_tp.attention.kv_cache import NSACaches
    from nsa_tp.attention.token_parallel_backend import TokenParallelMetadata
    from nsa_tp.model.attention import NSAAttention

__all__ = ["TokenParallelCore", "ForcedTokenParallelCore"]


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
