"""Forward metadata of the NSA backend: everything a batch's layers share, built ONCE per batch.

:class:`ForwardMetadataBuilder` turns host data (per-request sequence and cached-prefix lengths, the
request -> page table) into a frozen :class:`ForwardMetadata`: ragged offsets, the indexer's key ranges and
logits chunk plan, each new token's global cache slot, the (DP-padded) cache seqlens and the sparse-MLA
decode plan. The device's free memory (for the logits budget) is read here, at most once per batch;
every layer then reuses the metadata with no device query and no host sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nsa_tp import ops
from nsa_tp.attention.chunking import DEFAULT_FREE_FRACTION, resolve_logits_budget
from nsa_tp.attention.indexer import (
    DecodeIndexBatch,
    PrefillIndexBatch,
    build_decode_index_batch,
    build_prefill_index_batch,
)
from nsa_tp.attention.padding import pad_cache_seqlens
from nsa_tp.ops.capability import get_capability
from nsa_tp.ops.check import host_ints
from nsa_tp.ops.plan import DecodePlan, normalize_kv_dtype

__all__ = ["ForwardMetadata", "ForwardMetadataBuilder"]

_I32 = torch.int32


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardMetadata:
    """One batch's metadata. Rows ``[0, num_tokens)`` of q are the new tokens in request order, rows
    ``[num_tokens, num_padded)`` DP padding."""

    mode: str  # "prefill" or "decode"
    num_reqs: int
    num_tokens: int  # real q rows: the batch's new tokens
    num_padded: int  # q rows, DP padding included (>= num_tokens)
    num_heads: int
    topk: int
    kv_dtype: str  # "bfloat16" or "fp8_e4m3"
    device: torch.device
    # host data, as given
    seq_lens_host: tuple[int, ...]  # tokens per request after this batch
    prefix_lens_host: tuple[int, ...]  # tokens already cached before it
    # device tensors
    seq_lens: torch.Tensor  # [B] int32
    extend_lens: torch.Tensor  # [B] int32, new tokens per request
    cu_extend: torch.Tensor  # [B + 1] int32, ragged offsets of each request's new tokens in q's rows
    kv_starts: torch.Tensor  # [B] int32, ragged offsets of each request's keys in the indexer's key buffer
    page_table: torch.Tensor  # [B, max_pages] int32
    token_to_req: torch.Tensor  # [num_tokens] int32
    positions: torch.Tensor  # [num_tokens] int64, each new token's position in its request
    token_slots: torch.Tensor  # [num_tokens] int64, each new token's global cache slot
    cache_seqlens: torch.Tensor  # decode: [num_padded] int32 padded with 0; prefill: [B] int32
    index: PrefillIndexBatch | DecodeIndexBatch
    decode_plan: DecodePlan | None  # decode only; built by ops.plan_sparse_mla_decode
    logits_budget_bytes: int

    @property
    def is_decode(self) -> bool:
        return self.mode == "decode"

    @property
    def logits_chunks(self) -> tuple[slice, ...]:
        """The indexer's planned row chunks."""
        return tuple(c.rows for c in self.index.chunks)


class ForwardMetadataBuilder:
    """Builds :class:`ForwardMetadata` once per batch.

    Args:
        num_heads: q heads on this rank (the layout's ``heads_per_rank``).
        topk: indexer top-k (2048).
        kv_dtype: latent cache format, ``"bfloat16"`` / ``"fp8_e4m3"`` (or the cache's torch dtype).
        device: where the metadata's tensors live.
        backend: tier for the decode plan (and, through the backend, every op); ``"auto"`` or a tier name.
        logits_budget_mb: the indexer's logits budget; default ``$NSA_TP_INDEXER_LOGITS_BUDGET_MB``, else
            ``free_fraction`` of the device's free memory, read once per :meth:`prefill` / :meth:`decode`.
        num_pages: the caches' page count, to range-check page tables (recommended).
    """

    def __init__(
        self,
        *,
        num_heads: int,
        topk: int,
        kv_dtype: object,
        device: torch.device | str,
        backend: str = "auto",
        logits_budget_mb: float | None = None,
        free_fraction: float = DEFAULT_FREE_FRACTION,
        num_pages: int | None = None,
    ):
        for name, v in (("num_heads", num_heads), ("topk", topk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.num_heads = num_heads
        self.topk = topk
        self.kv_dtype = normalize_kv_dtype(kv_dtype)
        self.device = torch.device(device)
        # Device facts (SM version, FlashMLA's head multiple) are read once, here; every op reuses the cache.
        self.capability = get_capability(self.device)
        self.backend = backend
        self.logits_budget_mb = logits_budget_mb
        self.free_fraction = free_fraction
        self.num_pages = num_pages

    def _num_padded(self, num_padded: int | None, rows: int) -> int:
        if num_padded is None:
            return rows
        if isinstance(num_padded, bool) or not isinstance(num_padded, int) or num_padded < rows:
            raise ValueError(f"num_padded: expected an int >= the batch's {rows} new tokens, got {num_padded!r}")
        return num_padded

    def _common(self, mode, seq, pre, page_table, padded, index, plan, budget) -> ForwardMetadata:
        ext = [s - p for s, p in zip(seq, pre, strict=True)]
        cu = [0]
        for e in ext:
            cu.append(cu[-1] + e)
        kv_starts = [0]
        for s in seq[:-1]:
            kv_starts.append(kv_starts[-1] + s)
        token_to_req = [b for b, e in enumerate(ext) for _ in range(e)]
        positions = [j for p, s in zip(pre, seq, strict=True) for j in range(p, s)]
        dev = self.device
        seq_t = torch.tensor(seq, dtype=_I32, device=dev)
        return ForwardMetadata(
            mode=mode, num_reqs=len(seq), num_tokens=cu[-1], num_padded=padded, num_heads=self.num_heads,
            topk=self.topk, kv_dtype=self.kv_dtype, device=dev,
            seq_lens_host=tuple(seq), prefix_lens_host=tuple(pre),
            seq_lens=seq_t,
            extend_lens=torch.tensor(ext, dtype=_I32, device=dev),
            cu_extend=torch.tensor(cu, dtype=_I32, device=dev),
            kv_starts=torch.tensor(kv_starts[: len(seq)], dtype=_I32, device=dev),
            page_table=page_table.to(dev),
            token_to_req=torch.tensor(token_to_req, dtype=_I32, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            token_slots=index.store_slots,
            # The decode kernel takes one cache length per q row: DP-padded rows get 0 (padding.py says why).
            cache_seqlens=pad_cache_seqlens(seq_t, padded) if mode == "decode" else seq_t,
            index=index, decode_plan=plan, logits_budget_bytes=budget,
        )

    def prefill(
        self,
        seq_lens: Sequence[int] | torch.Tensor,
        prefix_lens: Sequence[int] | torch.Tensor,
        page_table: torch.Tensor,
        *,
        num_padded: int | None = None,
        index_rows: slice | None = None,
    ) -> ForwardMetadata:
        """A ragged prefill (extend) batch: request ``b`` has ``prefix_lens[b]`` cached tokens and
        ``seq_lens[b] - prefix_lens[b]`` new ones; q has ``num_padded`` rows (default: the new tokens).
        ``index_rows``: the token-parallel hook (rows this rank's indexer scores; see the indexer)."""
        seq, pre = host_ints(seq_lens, "seq_lens"), host_ints(prefix_lens, "prefix_lens")
        if not seq:
            raise ValueError("seq_lens: a batch needs at least one request")
        budget = resolve_logits_budget(self.logits_budget_mb, self.device, free_fraction=self.free_fraction)
        index = build_prefill_index_batch(seq, pre, page_table, budget_bytes=budget, device=self.device,
                                          num_pages=self.num_pages, q_rows=index_rows)
        padded = self._num_padded(num_padded, index.store_slots.shape[0])
        return self._common("prefill", seq, pre, page_table, padded, index, None, budget)

    def decode(
        self, seq_lens: Sequence[int] | torch.Tensor, page_table: torch.Tensor, *, num_padded: int | None = None
    ) -> ForwardMetadata:
        """A decode batch: one new token per request, ``seq_lens`` include it; q has ``num_padded`` rows."""
        seq = host_ints(seq_lens, "seq_lens")
        if not seq:
            raise ValueError("seq_lens: a batch needs at least one request")
        budget = resolve_logits_budget(self.logits_budget_mb, self.device, free_fraction=self.free_fraction)
        index = build_decode_index_batch(seq, page_table, budget_bytes=budget, device=self.device,
                                         num_pages=self.num_pages)
        padded = self._num_padded(num_padded, len(seq))
        plan = ops.plan_sparse_mla_decode(padded, self.num_heads, self.topk, kv_dtype=self.kv_dtype,
                                          device=self.device, backend=self.backend)
        return self._common("decode", seq, [s - 1 for s in seq], page_table, padded, index, plan, budget)
