"""The indexer executor: ``Indexer._get_topk_ragged`` (AROUND, :data:`.._compat.INDEXER_TARGET`) with the query
rows split over the attention TP group, for an ``indexer`` or ``tokens`` batch.

Upstream's own function runs on this rank's rows only, given SGLang's own indexer metadata restricted to those
rows (:func:`row_window`: a subclass instance of the metadata's class whose row-indexed reads are cut, built
from its fields; the index-K cache store happened before this call, on every rank). ``indexer``: the
``[rows, K]`` results are all-gathered (:func:`nsa_tp.token_parallel.gather_topk_rows`), so every rank holds
the whole ``[T, K]`` top-k, as upstream. ``tokens``: nothing is gathered — the rank's own rows are filled and
the others left -1, because the sparse core reads only its own rows (SGLang's transforms between here and the
core work row by row).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.integrations.sglang import verify
from nsa_tp.integrations.sglang._log import log_once
from nsa_tp.integrations.sglang._switch import plugin_enabled
from nsa_tp.integrations.sglang.token_parallel import plan as _plan
from nsa_tp.token_parallel import gather_topk_rows

__all__ = ["around_get_topk_ragged", "row_window"]


def around_get_topk_ragged(original: Callable[..., torch.Tensor], indexer: Any, enable_dual_stream: bool,
                           forward_batch: Any, layer_id: int, q_fp8: torch.Tensor, weights: torch.Tensor,
                           metadata: Any, topk_result: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
    """``Indexer._get_topk_ragged`` split over the group (module docstring). Returns ``[rows of q, K]`` int32
    (into ``topk_result`` when given: the piecewise-graph split op's static buffer)."""
    plan = _plan.current_plan(forward_batch)

    def upstream() -> torch.Tensor:
        return original(indexer, enable_dual_stream, forward_batch, layer_id, q_fp8, weights, metadata,
                        topk_result, **extra)

    if plan is None or plan.strategy == "heads" or extra or not plugin_enabled():
        return upstream()
    rows = plan.rows
    if len(rows):
        try:
            window = row_window(metadata, rows)
        except TypeError as e:  # not SGLang's dataclass metadata: all rows, as upstream (correct for both plans)
            log_once(f"tp-indexer-fallback-{type(metadata).__name__}", "token-parallel indexer not split (%s): "
                     "upstream's Indexer._get_topk_ragged on every row", e)
            return upstream()
        own = original(indexer, False, forward_batch, layer_id, q_fp8[rows.start : rows.stop],
                       weights[rows.start : rows.stop], window)[: len(rows)]
    else:  # upstream's function asserts at least one row; this rank only joins the collectives
        own = torch.full((0, indexer.index_topk), -1, dtype=torch.int32, device=q_fp8.device)
    log_once(f"tp-indexer-{plan.strategy}", "token-parallel indexer active (%s): Indexer._get_topk_ragged scores "
             "%d of %d rows on this rank%s", plan.strategy, len(rows), plan.num_real,
             ", then all-gathers the top-k ids" if plan.strategy == "indexer" else "")
    if topk_result is None:
        topk_result = own.new_full((q_fp8.shape[0], own.shape[1]), -1)
    if plan.strategy == "indexer":
        topk_result[: plan.num_real] = gather_topk_rows(own, _plan.attn_tp_group(), plan.split(plan.num_real))
    else:
        topk_result[: plan.num_real] = -1
        topk_result[rows.start : rows.stop] = own
    if verify.verify_enabled() and not _capturing(q_fp8):
        _verify(original, indexer, forward_batch, layer_id, q_fp8, weights, metadata, plan, own, topk_result)
    return topk_result


def _verify(original: Callable[..., torch.Tensor], indexer: Any, forward_batch: Any, layer_id: int,
            q_fp8: torch.Tensor, weights: torch.Tensor, metadata: Any, plan: _plan.ExtendPlan, own: torch.Tensor,
            topk_result: torch.Tensor) -> None:
    """Upstream's all-rows top-k beside the split one: the fraction of rows whose top-k *set* differs."""
    full = topk_result[: plan.num_real]
    if plan.strategy == "tokens":
        full = gather_topk_rows(own, _plan.attn_tp_group(), plan.split(plan.num_real))
    ref = original(indexer, False, forward_batch, layer_id, q_fp8, weights, metadata)[: plan.num_real]
    differ = (full.sort(dim=1).values != ref.sort(dim=1).values).any(dim=1).float().mean().item()
    verify.record("token-parallel Indexer._get_topk_ragged", f"{plan.strategy}, rows with another top-k set", differ)


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def row_window(metadata: Any, rows: range) -> Any:
    """SGLang's indexer metadata restricted to the query rows ``rows``: an instance of a subclass of the
    metadata's own (dataclass) type, with the same fields, whose row-indexed reads (key ranges, causal lengths,
    row -> request, ``attn_metadata.topk_indices_offset``) return the rows' slice; everything keyed by key or
    request is the batch's. ``topk_transform`` is called the way upstream's own chunked path calls it for a
    row chunk. Raises ``TypeError`` for a metadata object that is not a dataclass."""
    if not dataclasses.is_dataclass(metadata) or not dataclasses.is_dataclass(metadata.attn_metadata):
        raise TypeError(f"{type(metadata).__name__} is not the dataclass metadata this window was written for")
    a, b = rows.start, rows.stop
    attn = metadata.attn_metadata
    offset = getattr(attn, "topk_indices_offset", None)
    cut_attn = dataclasses.replace(attn, topk_indices_offset=None if offset is None else offset[a:b])
    fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata) if f.init}
    window = _window_class(type(metadata))(**{**fields, "attn_metadata": cut_attn})
    ks, ke = metadata.get_indexer_kvcache_range()
    cut = {
        "kvcache_range": (_cut(ks, a, b), _cut(ke, a, b)),
        "seqlens_expanded": _cut(metadata.get_seqlens_expanded(), a, b),
        "token_to_batch_idx": _cut(metadata.get_token_to_batch_idx(), a, b),
    }
    object.__setattr__(window, "_nsa_tp_rows", cut)  # frozen dataclass: set once, here
    return window


def _cut(x: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if x is None else x[a:b]


@functools.cache
def _window_class(base: type) -> type:
    """The row-window subclass of SGLang's indexer metadata class ``base`` (one per class, cached)."""

    class RowWindow(base):  # type: ignore[misc, valid-type]
        _nsa_tp_rows: dict

        def get_indexer_kvcache_range(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self._nsa_tp_rows["kvcache_range"]

        def get_seqlens_expanded(self) -> torch.Tensor:
            return self._nsa_tp_rows["seqlens_expanded"]

        def get_token_to_batch_idx(self) -> torch.Tensor:
            return self._nsa_tp_rows["token_to_batch_idx"]

        def topk_transform(self, logits: torch.Tensor, topk: int, ks: torch.Tensor | None = None,
                           **kwargs: Any) -> torch.Tensor:
            kwargs.setdefault("ke_offset", self.get_seqlens_expanded())
            if kwargs.get("topk_indices_offset_override") is None and kwargs.get("cu_seqlens_q") is None:
                offset = self.attn_metadata.topk_indices_offset
                if offset is not None:  # RAGGED: each row's offset into the flattened KV
                    kwargs["topk_indices_offset_override"] = offset
                else:  # PAGED: each row is a length-1 query of its request (upstream's chunked path)
                    kwargs["cu_seqlens_q"] = torch.ones(logits.shape[0], dtype=torch.int32, device=logits.device)
                    kwargs["batch_idx_list"] = self.get_token_to_batch_idx()
            return super().topk_transform(logits, topk, ks=ks, **kwargs)

    RowWindow.__name__ = RowWindow.__qualname__ = f"RowWindow[{base.__name__}]"
    return RowWindow
