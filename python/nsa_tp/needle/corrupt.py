"""The negative control: corrupt the indexer's top-k so the needle test must fail (test-only, never on by default).

:class:`ShiftTopk` is an :attr:`nsa_tp.attention.indexer.Indexer.topk_hook`: it moves every selected key of a
row by half the row's causal length (``j -> (j + len // 2) mod len``), so the row keeps ``min(K, len)`` valid,
distinct keys of its own request (nothing reads outside the request) but the wrong ones. A row whose length is
at most the top-k selects every key either way and stays right; every longer row keeps its fact only by chance
(about ``K / len``). Prefill top-k (ragged positions) and decode top-k (global slots via the page table) both.
"""

from __future__ import annotations

import dataclasses

import torch

from nsa_tp.attention.indexer import DecodeIndexBatch, PrefillIndexBatch
from nsa_tp.ops.index_cache import INDEX_PAGE_SIZE

__all__ = ["ShiftTopk"]


def _shift(rel: torch.Tensor, lengths: torch.Tensor, fraction: float) -> torch.Tensor:
    """``rel [R, K]`` positions in each row's key range (-1 = none), ``lengths [R]`` -> shifted, -1 kept."""
    n = lengths.to(torch.int64).clamp_min(1)[:, None]
    moved = (rel.to(torch.int64) + (n.float() * fraction).to(torch.int64)) % n
    return torch.where(rel >= 0, moved, -1).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class ShiftTopk:
    """Shift every selected key by ``fraction`` of its row's length (module docstring)."""

    fraction: float = 0.5

    def __call__(self, topk: torch.Tensor, batch: PrefillIndexBatch | DecodeIndexBatch) -> torch.Tensor:
        if isinstance(batch, PrefillIndexBatch):  # ragged key-buffer positions; row r's keys are [ks, ke)
            ks = batch.ks.to(torch.int64)[:, None]
            rel = torch.where(topk >= 0, topk.to(torch.int64) - ks, -1)
            moved = _shift(rel, batch.ke - batch.ks, self.fraction)
            return torch.where(moved >= 0, moved.to(torch.int64) + ks, -1).to(torch.int32)
        # decode: global slots -> token positions through each row's pages, shift, back to slots
        table = batch.page_table.to(torch.int64)  # [B, P]
        slot = topk.to(torch.int64)
        page, off = slot.div(INDEX_PAGE_SIZE, rounding_mode="floor"), slot % INDEX_PAGE_SIZE
        where = (table[:, None, :] == page[:, :, None]).to(torch.int64).argmax(-1)  # [B, K] page index in the row
        rel = torch.where(topk >= 0, where * INDEX_PAGE_SIZE + off, -1)
        moved = _shift(rel, batch.seq_lens, self.fraction).to(torch.int64)
        pos = moved.clamp_min(0)
        slots = table.gather(1, pos // INDEX_PAGE_SIZE) * INDEX_PAGE_SIZE + pos % INDEX_PAGE_SIZE
        return torch.where(moved >= 0, slots, -1).to(torch.int32)
