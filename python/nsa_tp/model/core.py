"""The seam between the layer's per-head projections and how its attention core runs across the group.

An *attention core* owns two steps of the layer:

- ``build_metadata(...)`` — once per batch, from host data (the runner calls it and puts the result in
  :class:`LayerBatch`);
- ``forward(CoreInputs)`` — once per layer: indexer -> top-k -> sparse MLA, returning this rank's heads'
  latent output ``[T_pad, h, 512]`` bfloat16 (rows past the real tokens: 0).

``"heads"`` is SGLang's way (:class:`HeadsCore`): every rank of the attention TP group runs the indexer for
all rows and the sparse MLA for its own heads, through :class:`nsa_tp.attention.backend.NSABackend`.
``"token_parallel"`` / ``"token_parallel_on"`` (:class:`TokenParallelCore`) run the per-batch choice of
:mod:`nsa_tp.token_parallel` (heads, indexer rows, tokens or key shards) through its backend. Another
strategy is a subclass of :class:`AttentionCore` registered under its name with
:func:`register_attention_core`; ``NSAAttention(core=name)``, ``RunCase(core=name)`` and ``nsa-tp run
--core name`` then use it with no other change.

This module imports nothing from :mod:`nsa_tp.model.attention` (which imports it): a core sees the layer
through the :class:`CoreLayer` protocol, and :class:`LayerBatch` is defined here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nsa_tp.attention.backend import NSABackend
from nsa_tp.attention.metadata import ForwardMetadataBuilder
from nsa_tp.token_parallel.backend import TokenParallelBackend, TokenParallelMetadata, build_token_parallel_metadata

if TYPE_CHECKING:
    from nsa_tp.attention.indexer import Indexer
    from nsa_tp.attention.kv_cache import NSACaches
    from nsa_tp.config import NSAConfig
    from nsa_tp.parallel.groups import ParallelGroups

__all__ = [
    "LayerBatch", "CoreLayer", "CoreInputs", "AttentionCore", "HeadsCore", "TokenParallelCore",
    "ForcedTokenParallelCore", "IndexerSplitCore", "CORE_MODES", "ATTENTION_CORES", "register_attention_core",
    "make_core",
]


@dataclasses.dataclass(frozen=True)
class LayerBatch:
    """What every layer of one forward pass shares; built once per batch (see ``nsa_tp.model.runner``).

    ``num_tokens`` real rows first, then ``num_padded - num_tokens`` DP-padding rows.
    """

    num_tokens: int
    num_padded: int
    positions: torch.Tensor  # [num_padded] int64, token positions in their requests (0 on padding rows)
    out_slots: torch.Tensor  # [num_tokens] int64, global cache slots of the real rows
    cos: torch.Tensor  # [num_padded, 32] float32, MLA rope
    sin: torch.Tensor  # [num_padded, 32] float32
    is_decode: bool
    metadata: Any  # the core's per-batch metadata (its build_metadata); None for an idle batch


class CoreLayer(Protocol):
    """What a core reads of its layer (:class:`nsa_tp.model.attention.NSAAttention` provides it)."""

    cfg: NSAConfig
    groups: ParallelGroups
    indexer: Indexer
    heads: int  # this rank's attention heads
    backend: str
    device: torch.device

    @property
    def sm_scale(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class CoreInputs:
    """Everything a core may need for one layer; ``forward`` returns ``o_lat [T_pad, h, 512]`` bfloat16."""

    q: torch.Tensor  # [T_pad, h, 576] bfloat16, absorbed queries with rope applied (this rank's heads)
    q_lora: torch.Tensor  # [T_pad, q_lora_rank], replicated over the attention TP group (indexer input)
    x: torch.Tensor  # [T_pad, hidden], replicated over the attention TP group (indexer input)
    batch: LayerBatch  # batch.metadata is what this core's build_metadata returned
    caches: NSACaches  # the real rows' latent KV is already stored; index keys are the core's to store
    layer: CoreLayer  # config, groups, indexer, sm_scale


class AttentionCore:
    """Base of every strategy; one instance per layer (made by :func:`make_core`)."""

    name = "base"

    def __init__(self, layer: CoreLayer):
        self.layer = layer

    def build_metadata(
        self, caches: NSACaches, seq_lens: Sequence[int], prefix_lens: Sequence[int], page_table: torch.Tensor,
        num_padded: int, is_decode: bool,
    ) -> Any:
        """Once per batch. ``seq_lens``/``prefix_lens`` per request (decode: ``prefix = seq - 1``),
        ``page_table [B, max_pages]`` int32, ``num_padded`` q rows (DP padding included)."""
        raise NotImplementedError

    def forward(self, inp: CoreInputs) -> torch.Tensor:
        raise NotImplementedError


class HeadsCore(AttentionCore):
    """Pure TP / DP attention as upstream runs it: all rows, this rank's heads (``NSABackend``)."""

    name = "heads"

    def __init__(self, layer: CoreLayer):
        super().__init__(layer)
        self.backend = NSABackend(sm_scale=layer.sm_scale, d_v=layer.cfg.kv_lora_rank, backend=layer.backend)
        self._builders: dict[tuple[int, str], ForwardMetadataBuilder] = {}

    def builder(self, caches: NSACaches) -> ForwardMetadataBuilder:
        """One metadata builder per cache geometry (it range-checks page tables against the page count)."""
        key = (caches.allocator.num_pages, caches.latent.kv_cache_dtype)
        if key not in self._builders:
            lay = self.layer
            self._builders[key] = ForwardMetadataBuilder(
                num_heads=lay.heads, topk=lay.cfg.index_topk, kv_dtype=caches.latent.kv_cache_dtype,
                device=lay.device, backend=lay.backend, num_pages=caches.allocator.num_pages,
            )
        return self._builders[key]

    def build_metadata(self, caches, seq_lens, prefix_lens, page_table, num_padded, is_decode):  # noqa: ANN001
        b = self.builder(caches)
        if is_decode:
            return b.decode(list(seq_lens), page_table, num_padded=num_padded)
        return b.prefill(list(seq_lens), list(prefix_lens), page_table, num_padded=num_padded)

    def forward(self, inp: CoreInputs) -> torch.Tensor:
        b, lay = inp.batch, inp.layer
        return self.backend.forward(
            inp.q, inp.x, inp.q_lora, b.cos, b.sin, lay.indexer, inp.caches.latent.buffer, inp.caches.index_k,
            b.metadata,
        )


class TokenParallelCore(HeadsCore):
    """All-to-all heads <-> tokens around the indexer and the sparse core, or the indexer's rows split, or
    key-sharded decode — per batch, as :func:`nsa_tp.token_parallel.policy.choose` picks."""

    name = "token_parallel"
    mode: str | None = None  # None: the layout's --nsa-token-parallel

    def __init__(self, layer: CoreLayer):
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
    """:class:`TokenParallelCore` with ``--nsa-token-parallel on`` whatever the layout says (tests, ``nsa-tp
    run``: CPU-sized batches would never pass ``auto``'s threshold)."""

    name = "token_parallel_on"
    mode = "on"


class IndexerSplitCore(TokenParallelCore):
    """:class:`TokenParallelCore` forcing the ``indexer`` strategy on extend batches (decode: pure TP)."""

    name = "token_parallel_indexer"
    mode = "indexer"


# Core name -> the --nsa-token-parallel mode (or forced strategy) it runs under (None: the layout's flag).
CORE_MODES: dict[str, str | None] = {
    "heads": "off", "token_parallel": None, "token_parallel_on": "on", "token_parallel_indexer": "indexer",
}

ATTENTION_CORES: dict[str, Callable[[CoreLayer], AttentionCore]] = {
    HeadsCore.name: HeadsCore,
    TokenParallelCore.name: TokenParallelCore,
    ForcedTokenParallelCore.name: ForcedTokenParallelCore,
    IndexerSplitCore.name: IndexerSplitCore,
}


def register_attention_core(name: str, factory: Callable[[CoreLayer], AttentionCore]) -> None:
    """Add a strategy (a class or factory taking the layer). Registering an existing name replaces it."""
    if not isinstance(name, str) or not name or not callable(factory):
        raise ValueError(f"register_attention_core: expected a name and a callable, got {name!r}, {factory!r}")
    ATTENTION_CORES[name] = factory


def make_core(name: str, layer: CoreLayer) -> AttentionCore:
    if name not in ATTENTION_CORES:
        raise ValueError(f"core: unknown attention core {name!r}; registered: {sorted(ATTENTION_CORES)}")
    return ATTENTION_CORES[name](layer)
