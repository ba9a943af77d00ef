"""The NSA backend in token-parallel form: per batch, pick how the attention core is split over the
attention TP group (:func:`~nsa_tp.token_parallel.policy.choose`), build that strategy's
metadata once, and execute it per layer with the same inputs and output as
:class:`~nsa_tp.attention.backend.NSABackend` (this rank's heads ``[T_pad, h, 512]``).

- ``"heads"``: exactly :class:`NSABackend` (pure TP).
- ``"indexer"``, prefill: the batch metadata's indexer covers only this rank's rows (as for ``"tokens"``, but
  split by the indexer's work alone, :func:`~nsa_tp.token_parallel.plan.plan_index_split`); the top-k rows
  are all-gathered (:func:`~nsa_tp.token_parallel.core.gather_topk_rows`) and the sparse core runs this
  rank's heads over every row, as pure TP.
- ``"tokens"``, prefill: the batch metadata's indexer covers only this rank's rows (the ``index_rows`` hook
  of :meth:`ForwardMetadataBuilder.prefill`, so its logits chunk plan — and its logits memory — is per
  rank); queries go heads -> tokens, the sparse core runs all heads on the flattened latent cache, the
  output comes back tokens -> heads (:func:`~nsa_tp.token_parallel.core.token_parallel_attention`).
- ``"tokens"``, decode (batch >= attn_tp): the same with requests as tokens; the indexer scores this rank's
  requests through their own decode index batch and the sparse decode runs a plan for (those requests,
  all heads).
- ``"keys"``, decode (batch < attn_tp): the key-sharded indexer with the exact top-k merge, then the sparse
  decode on this rank's heads with the batch's plan (as pure TP).

Every strategy stores the batch's new index keys on every rank (the index-K cache stays replicated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from nsa_tp import ops
from nsa_tp.attention.backend import NSABackend
from nsa_tp.attention.indexer import DecodeIndexBatch, Indexer, build_decode_index_batch
from nsa_tp.attention.metadata import ForwardMetadata, ForwardMetadataBuilder
from nsa_tp.attention.padding import pad_topk_indices
from nsa_tp.ops.capability import card_name
from nsa_tp.ops.check import check_tensor
from nsa_tp.ops.index_cache import store_index_k_unchecked
from nsa_tp.ops.plan import DecodePlan
from nsa_tp.parallel.collectives import group_rank_world
from nsa_tp.parallel.layout import ParallelLayout
from nsa_tp.token_parallel.core import (
    KeyShardBatch,
    Unabsorbed,
    gather_topk_rows,
    key_sharded_decode_topk,
    shard_page_table,
    token_parallel_attention,
)
from nsa_tp.token_parallel.costs import Costs, load_costs
from nsa_tp.token_parallel.plan import TokenSplit, plan_index_split, plan_token_split
from nsa_tp.token_parallel.policy import BatchShape, choose, token_costs

__all__ = ["TokenParallelMetadata", "build_token_parallel_metadata", "TokenParallelBackend"]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenParallelMetadata:
    """One batch's metadata for one rank of an attention TP group (built once per batch)."""

    strategy: str  # "heads" | "indexer" | "tokens" | "keys"
    meta: ForwardMetadata  # the batch metadata; prefill "tokens": its index covers this rank's rows only
    split: TokenSplit | None  # "tokens": which rows (tokens or requests) each rank owns; "indexer": index rows
    local_index: DecodeIndexBatch | None  # decode "tokens": the index batch of this rank's requests
    local_plan: DecodePlan | None  # decode "tokens": sparse decode plan for (this rank's requests, all heads)
    num_heads_total: int  # H of the layer (heads_per_rank * attn_tp_size)
    key_shard: KeyShardBatch | None = None  # decode "keys": this rank's slice of every request's context


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def build_token_parallel_metadata(
    builder: ForwardMetadataBuilder,
    layout: ParallelLayout,
    attn_tp_rank: int,
    *,
    seq_lens: Sequence[int],
    page_table: torch.Tensor,
    prefix_lens: Sequence[int] | None = None,
    num_padded: int | None = None,
    mode: str | None = None,
    costs: Costs | None = None,
) -> TokenParallelMetadata:
    """Decide the strategy for this batch and build its metadata (host data in, once per batch).

    Args:
        builder: this rank's :class:`ForwardMetadataBuilder` (``num_heads`` = ``layout.heads_per_rank``).
        layout: the layout (its ``attn_tp_size``, heads and ``token_parallel`` flag).
        attn_tp_rank: this rank's index in its attention TP group.
        seq_lens: ``[B]`` tokens per request after this batch (decode: the new token included).
        page_table: ``[B, max_pages]`` int32.
        prefix_lens: ``[B]`` cached tokens per request for a prefill; ``None`` for a decode step.
        num_padded: q rows including DP padding (default: the real rows).
        mode: ``"auto" | "on" | "off"`` or a strategy name to force (``"heads" | "indexer" | "tokens"``),
            default the layout's ``--nsa-token-parallel``.
        costs: the card's measured :class:`Costs` the ``auto`` policy compares (default: :func:`load_costs` for
            the builder's device; none measured: ``auto`` keeps ``heads``).

    Every rank of the group gets the same strategy and split (same host data, a pure policy).
    """
    if builder.num_heads != layout.heads_per_rank:
        raise ValueError(f"builder: built for {builder.num_heads} heads, the layout gives {layout.heads_per_rank}")
    W, H = layout.attn_tp_size, layout.num_attention_heads
    if not 0 <= attn_tp_rank < W:
        raise ValueError(f"attn_tp_rank: expected 0 <= rank < {W}, got {attn_tp_rank}")
    seq = [int(s) for s in seq_lens]
    is_decode = prefix_lens is None
    if is_decode:
        keys = seq
    else:
        pre = [int(p) for p in prefix_lens]
        keys = [p + i + 1 for p, s in zip(pre, seq, strict=True) for i in range(s - p)]
    if costs is None:
        costs = load_costs(card_name(builder.device))[0]
    shape = BatchShape.of(layout, len(keys), _mean(keys), max(keys, default=0), is_decode=is_decode)
    strategy = choose(shape, costs, layout.token_parallel if mode is None else mode).strategy
    if strategy == "heads":
        meta = (builder.decode(seq, page_table, num_padded=num_padded) if is_decode
                else builder.prefill(seq, pre, page_table, num_padded=num_padded))
        return TokenParallelMetadata(strategy, meta, None, None, None, H)
    if strategy == "keys":
        meta = builder.decode(seq, page_table, num_padded=num_padded)
        shard = shard_page_table(meta.index.page_table, meta.index.seq_lens, attn_tp_rank, W)
        return TokenParallelMetadata(strategy, meta, None, None, None, H, shard)
    rows_total = len(keys) if num_padded is None else num_padded
    if strategy == "indexer":  # prefill only (choose never picks it for decode)
        split = plan_index_split(keys, W, num_rows=rows_total)
        rows = split.rows(attn_tp_rank)
        meta = builder.prefill(seq, pre, page_table, num_padded=num_padded, index_rows=slice(rows.start, rows.stop))
        return TokenParallelMetadata(strategy, meta, split, None, None, H)
    split = plan_token_split(len(keys), W, num_rows=rows_total, costs=token_costs(keys, costs, H))
    rows = split.rows(attn_tp_rank)
    if not is_decode:
        meta = builder.prefill(seq, pre, page_table, num_padded=num_padded, index_rows=slice(rows.start, rows.stop))
        return TokenParallelMetadata(strategy, meta, split, None, None, H)
    meta = builder.decode(seq, page_table, num_padded=num_padded)
    local_index = build_decode_index_batch(
        seq[rows.start : rows.stop], page_table[rows.start : rows.stop], budget_bytes=meta.logits_budget_bytes,
        device=builder.device, num_pages=builder.num_pages,
    ) if len(rows) else None
    local_plan = ops.plan_sparse_mla_decode(
        len(rows), H, builder.topk, kv_dtype=builder.kv_dtype, device=builder.device, backend=builder.backend,
    ) if len(rows) else None
    return TokenParallelMetadata(strategy, meta, split, local_index, local_plan, H)


class TokenParallelBackend:
    """Executes the strategy a :class:`TokenParallelMetadata` chose; one per rank, reused by every layer.

    Args:
        sm_scale, d_v, backend: as :class:`NSABackend`.
        fp8_q: send queries as e4m3 with per-64 scales in the all-to-all (0.53x the bytes; lossy, ~1-2%
            relative error on the output, see docs/token_parallel.md). Off by default.
        out_chunks: prefill only — the sparse core in this many slices per rank, each slice's output
            exchange overlapping the next slice's core (see ``token_parallel_attention``). 1 = no overlap.
    """

    def __init__(self, *, sm_scale: float, d_v: int = 512, backend: str = "auto", fp8_q: bool = False,
                 out_chunks: int = 1):
        if isinstance(out_chunks, bool) or not isinstance(out_chunks, int) or out_chunks < 1:
            raise ValueError(f"out_chunks: expected a positive int, got {out_chunks!r}")
        self.heads = NSABackend(sm_scale=sm_scale, d_v=d_v, backend=backend)
        self.sm_scale, self.d_v, self.backend, self.fp8_q = float(sm_scale), d_v, backend, fp8_q
        self.out_chunks = out_chunks

    def forward(
        self,
        q_latent: torch.Tensor,
        x: torch.Tensor,
        q_lora: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        indexer: Indexer,
        latent_cache: torch.Tensor,
        index_k_cache: torch.Tensor,
        tpm: TokenParallelMetadata,
        group: dist.ProcessGroup | None,
        *,
        unabsorbed: Unabsorbed | None = None,
    ) -> torch.Tensor:
        """``[T_pad, h, 512]`` bfloat16 for this rank's heads — what ``NSABackend.forward`` returns.

        Args as :meth:`NSABackend.forward`, plus ``tpm`` (this batch's :class:`TokenParallelMetadata`) and
        ``group`` (the attention TP group; ``None`` = one rank). With ``unabsorbed`` (W_UK / W_UV of *all*
        heads), ``q_latent`` is instead the unabsorbed ``[T_pad, h, 128 + 64]`` (``q_nope | q_pe``) and the
        result ``[T_pad, h, 128]`` is after W_UV: the "tokens" strategy then exchanges 3.4x fewer bytes;
        the others absorb and project this rank's heads locally.
        """
        meta = tpm.meta
        _, world = group_rank_world(group)
        if world * meta.num_heads != tpm.num_heads_total:
            raise ValueError(f"group: {world} ranks x {meta.num_heads} heads != the layer's {tpm.num_heads_total}")
        if unabsorbed is not None and tpm.strategy != "tokens":
            local = unabsorbed.heads(group_rank_world(group)[0] * meta.num_heads, meta.num_heads)
            out = self.forward(local.absorb(q_latent), x, q_lora, cos, sin, indexer, latent_cache, index_k_cache,
                               tpm, group)
            return local.project(out)
        if tpm.strategy == "heads":
            return self.heads.forward(q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache, meta)
        dtypes = (torch.bfloat16,) if unabsorbed is None else (torch.bfloat16, torch.float16, torch.float32)
        check_tensor(q_latent, "q_latent", shape=(meta.num_padded, meta.num_heads, None), dtype=dtypes)
        if indexer.topk != meta.topk:
            raise ValueError(f"indexer: top-k {indexer.topk} differs from the metadata's {meta.topk}")
        if tpm.strategy == "indexer":
            return self._indexer(q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache, tpm, group)
        if tpm.strategy == "keys":
            return self._keys(q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache, tpm, group)
        if meta.is_decode:
            return self._tokens_decode(q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache, tpm,
                                       group, unabsorbed)
        flat = latent_cache.view(-1, 1, latent_cache.shape[-1])  # [pages, 64, 1, D] -> [slots, 1, D]

        def select(rows: range) -> torch.Tensor:
            # meta.index covers exactly `rows`; forward also stores every new token's index key
            return indexer.forward(x, q_lora, cos, sin, index_k_cache, meta.index)

        def attend(q: torch.Tensor, topk: torch.Tensor, rows: range) -> torch.Tensor:
            return ops.sparse_mla_fwd(q, flat, topk.unsqueeze(1), self.sm_scale, self.d_v, backend=self.backend)[0]

        return token_parallel_attention(q_latent, tpm.split, group, select, attend, d_v=self.d_v, fp8_q=self.fp8_q,
                                        out_chunks=self.out_chunks, unabsorbed=unabsorbed)

    @staticmethod
    def _store_keys(x, cos, sin, indexer: Indexer, index_k_cache, meta: ForwardMetadata) -> None:
        n = meta.num_tokens
        k8, k_scale = indexer.project_k(x[:n], cos[:n], sin[:n])
        store_index_k_unchecked(index_k_cache, meta.index.store_slots, k8, k_scale)

    def _tokens_decode(self, q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache,
                       tpm: TokenParallelMetadata, group, unabsorbed: Unabsorbed | None) -> torch.Tensor:
        meta = tpm.meta

        def select(rows: range) -> torch.Tensor:
            self._store_keys(x, cos, sin, indexer, index_k_cache, meta)
            if not len(rows):
                return torch.empty(0, meta.topk, dtype=torch.int32, device=q_latent.device)
            r = slice(rows.start, rows.stop)
            q8, w = indexer.project_q(q_lora[r], x[r], cos[r], sin[r])
            return indexer.topk_decode(q8, w, index_k_cache, tpm.local_index)

        def attend(q: torch.Tensor, topk: torch.Tensor, rows: range) -> torch.Tensor:
            return ops.sparse_mla_decode(q, latent_cache, topk.unsqueeze(1), self.sm_scale, self.d_v,
                                         plan=tpm.local_plan, backend=self.backend)[0]

        return token_parallel_attention(q_latent, tpm.split, group, select, attend, d_v=self.d_v, fp8_q=self.fp8_q,
                                        unabsorbed=unabsorbed)

    def _indexer(self, q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache,
                 tpm: TokenParallelMetadata, group) -> torch.Tensor:
        # meta.index covers this rank's rows; forward also stores every new token's index key
        local = indexer.forward(x, q_lora, cos, sin, index_k_cache, tpm.meta.index)  # [t_r, K]
        topk = gather_topk_rows(local, group, tpm.split)  # [T_pad, K], -1 on DP padding rows
        flat = latent_cache.view(-1, 1, latent_cache.shape[-1])  # [pages, 64, 1, D] -> [slots, 1, D]
        return ops.sparse_mla_fwd(q_latent, flat, topk.unsqueeze(1), self.sm_scale, self.d_v, backend=self.backend)[0]

    def _keys(self, q_latent, x, q_lora, cos, sin, indexer, latent_cache, index_k_cache,
              tpm: TokenParallelMetadata, group) -> torch.Tensor:
        meta = tpm.meta
        self._store_keys(x, cos, sin, indexer, index_k_cache, meta)
        n = meta.num_tokens
        q8, w = indexer.project_q(q_lora[:n], x[:n], cos[:n], sin[:n])
        topk = key_sharded_decode_topk(q8, index_k_cache, w, meta.index.seq_lens, meta.index.page_table,
                                       meta.topk, group, shard=tpm.key_shard, backend=self.backend)
        if indexer.topk_hook is not None:  # test-only (the needle's negative control)
            topk = indexer.topk_hook(topk, meta.index)
        indices = pad_topk_indices(topk, meta.num_padded).unsqueeze(1)  # [T_pad, 1, K]
        out, _lse = ops.sparse_mla_decode(q_latent, latent_cache, indices, self.sm_scale, self.d_v,
                                          plan=meta.decode_plan, backend=self.backend)
        return out
