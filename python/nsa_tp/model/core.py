"""The seam between the layer's per-head projections and how its attention core runs across the group.

An *attention core* owns two steps of the layer:

- ``build_metadata(...)`` — once per batch, from host data (the runner calls it and puts the result in
  :class:`~nsa_tp.model.attention.LayerBatch`);
- ``forward(CoreInputs)`` — once per layer: indexer -> top-k -> sparse MLA, returning this rank's heads'
  latent output ``[T_pad, h, 512]`` bfloat16 (rows past the real tokens: 0).

``"heads"`` is SGLang's way (:class:`HeadsCore`): every rank of the attention TP group runs the indexer for
all rows and the sparse MLA for its own heads, through :class:`nsa_tp.attention.backend.NSABackend`.
Another strategy — token-parallel — is a subclass of :class:`AttentionCore` registered under its name with
:func:`register_attention_core`; ``NSAAttention(core=name)``, ``RunCase(core=name)`` and ``nsa-tp run
--core name`` then use it with no other change.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from nsa_tp.attention.backend import NSABackend
from nsa_tp.attention.metadata import ForwardMetadataBuilder

if TYPE_CHECKING:
    from nsa_tp.attention.kv_cache import NSACaches
    from nsa_tp.model.attention import LayerBatch, NSAAttention

__all__ = ["CoreInputs", "AttentionCore", "HeadsCore", "ATTENTION_CORES", "register_attention_core", "make_core"]


@dataclasses.dataclass(frozen=True)
class CoreInputs:
    """Everything a core may need for one layer; ``forward`` returns ``o_lat [T_pad, h, 512]`` bfloat16."""

    q: torch.Tensor  # [T_pad, h, 576] bfloat16, absorbed queries with rope applied (this rank's heads)
    q_lora: torch.Tensor  # [T_pad, q_lora_rank], replicated over the attention TP group (indexer input)
    x: torch.Tensor  # [T_pad, hidden], replicated over the attention TP group (indexer input)
    batch: LayerBatch  # batch.metadata is what this core's build_metadata returned
    caches: NSACaches  # the real rows' latent KV is already stored; index keys are the core's to store
    layer: NSAAttention  # config, groups, indexer, sm_scale


class AttentionCore:
    """Base of every strategy; one instance per layer (made by :func:`make_core`)."""

    name = "base"

    def __init__(self, layer: NSAAttention):
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

    def __init__(self, layer: NSAAttention):
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


ATTENTION_CORES: dict[str, Callable[[NSAAttention], AttentionCore]] = {"heads": HeadsCore}


def register_attention_core(name: str, factory: Callable[[NSAAttention], AttentionCore]) -> None:
    """Add a strategy (a class or factory taking the layer). Registering an existing name replaces it."""
    if not isinstance(name, str) or not name or not callable(factory):
        raise ValueError(f"register_attention_core: expected a name and a callable, got {name!r}, {factory!r}")
    ATTENTION_CORES[name] = factory


# Cores defined in their own modules, imported on first use so that they register themselves (also in
# freshly spawned ranks, which import only what they unpickle).
_PLUGIN_CORES = {"token_parallel": "nsa_tp.model.token_parallel", "token_parallel_on": "nsa_tp.model.token_parallel"}


def make_core(name: str, layer: NSAAttention) -> AttentionCore:
    if name not in ATTENTION_CORES and name in _PLUGIN_CORES:
        importlib.import_module(_PLUGIN_CORES[name])
    if name not in ATTENTION_CORES:
        raise ValueError(f"core: unknown attention core {name!r}; registered: {sorted(ATTENTION_CORES)}")
    return ATTENTION_CORES[name](layer)
