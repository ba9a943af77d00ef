"""The lightning indexer: which 2048 earlier tokens each query attends to.

From one layer's indexer weights (DeepSeek-V3.2 / SGLang ``nsa_indexer``), float32 math::

    q = wq_b(q_lora)                     [T, 64, 128]   index heads
    q[..., :64] = rope(q[..., :64])      NON-interleaved (NeoX) rope on the first 64 dims, YaRN cos/sin
    q = hadamard(q) -> fp8 1x128         q_fp8 [T, 64, 128], q_scale [T, 64]
    k = layer_norm(wk(x))                [T, 128]       LayerNorm with weight and bias, eps 1e-6
    k[..., :64] = rope(k[..., :64]); k = hadamard(k) -> fp8 1x128 -> stored in the index-K cache
    weights = weights_proj(x) * 64^-0.5 * q_scale * 128^-0.5          [T, 64] float32
    logits[t, j] = sum_h relu(q_fp8[t,h] . k_fp8[j] * k_scale[j]) * weights[t, h]

(q_scale folds into the weights because ``relu(a * s) = s * relu(a)`` for ``s > 0``.) Each row keeps the
top-``min(topk, len)`` keys of its causal range.

**Prefill** (:class:`PrefillIndexBatch`): the batch's requests' keys — cached prefix and new tokens — are
gathered into one *ragged key buffer* (request ``b`` at ``[kv_start_b, kv_start_b + seq_len_b)``); token
``i`` of request ``b`` scores ``[ks, ke) = [kv_start_b, kv_start_b + prefix_b + i + 1)``. Logits are
computed in row chunks planned under the memory budget (:mod:`nsa_tp.attention.chunking`), each over its
column window only, top-k'd with the rows' **global** offsets (``offset_override``) into ONE preallocated
``(rows, topk)`` int32 buffer filled with -1.
**Decode** (:class:`DecodeIndexBatch`): paged logits over the index-K cache, paged top-k.

Index spaces: :meth:`Indexer.forward`, :meth:`Indexer.topk_decode` and ``topk_prefill(index_space="slots")``
return **global KV-cache slots** (``page * 64 + offset``, what sparse MLA reads on the flattened cache);
``topk_prefill(index_space="ragged")`` returns positions in the ragged key buffer. ``-1`` = no token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nsa_tp import ops
from nsa_tp.attention.chunking import chunk_window, plan_logits_chunks
from nsa_tp.ops.check import check_tensor, host_ints
from nsa_tp.ops.hadamard import hadamard_transform
from nsa_tp.ops.index_cache import (
    INDEX_HEAD_DIM,
    INDEX_PAGE_BYTES,
    INDEX_PAGE_SIZE,
    gather_index_k_unchecked,
    store_index_k_unchecked,
)
from nsa_tp.ops.quant import quantize_fp8_blocks
from nsa_tp.ops.rope import apply_rope

__all__ = [
    "IndexerWeights",
    "Indexer",
    "LogitsChunk",
    "PrefillIndexBatch",
    "DecodeIndexBatch",
    "build_prefill_index_batch",
    "build_decode_index_batch",
]

INDEX_ROPE_DIM = 64
_I32 = torch.int32


@dataclasses.dataclass(frozen=True, eq=False)
class IndexerWeights:
    """One layer's indexer weights (HF names ``indexer.{wq_b, wk, k_norm, weights_proj}``), any float dtype."""

    wq_b: torch.Tensor  # [H_idx * 128, q_lora_rank]
    wk: torch.Tensor  # [128, hidden]
    k_norm_weight: torch.Tensor  # [128]
    k_norm_bias: torch.Tensor  # [128]
    weights_proj: torch.Tensor  # [H_idx, hidden]

    def __post_init__(self) -> None:
        floats = (torch.bfloat16, torch.float16, torch.float32)
        check_tensor(self.weights_proj, "weights_proj", ndim=2, dtype=floats)
        h, hidden = self.weights_proj.shape
        check_tensor(self.wq_b, "wq_b", ndim=2, dtype=floats)
        if self.wq_b.shape[0] != h * INDEX_HEAD_DIM:
            raise ValueError(
                f"wq_b: expected [{h} heads x {INDEX_HEAD_DIM}, q_lora_rank] like weights_proj's {h} heads, "
                f"got {tuple(self.wq_b.shape)}"
            )
        check_tensor(self.wk, "wk", shape=(INDEX_HEAD_DIM, hidden), dtype=floats)
        check_tensor(self.k_norm_weight, "k_norm_weight", shape=(INDEX_HEAD_DIM,), dtype=floats)
        check_tensor(self.k_norm_bias, "k_norm_bias", shape=(INDEX_HEAD_DIM,), dtype=floats)

    @property
    def n_heads(self) -> int:
        return self.weights_proj.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weights_proj.shape[1]

    @property
    def q_lora_rank(self) -> int:
        return self.wq_b.shape[1]


@dataclasses.dataclass(frozen=True, eq=False)
class LogitsChunk:
    """One planned chunk of index rows and the key window its logits cover (built once per batch)."""

    rows: slice  # rows of the index batch
    lo: int  # key window [lo, hi): ragged key buffer (prefill) or token positions (decode, lo = 0)
    hi: int
    row_starts: torch.Tensor  # [r] int32, ks - lo (0 for empty rows)
    row_ends: torch.Tensor  # [r] int32, ke - lo (0 for empty rows)
    lengths: torch.Tensor  # [r] int32, ke - ks (decode: seq_lens)
    offsets: torch.Tensor  # [r] int32, the rows' global ragged offsets ks (prefill); unused in decode
    page_table: torch.Tensor | None = None  # [r, max_pages] int32 (decode)


@dataclasses.dataclass(frozen=True, eq=False)
class PrefillIndexBatch:
    """Per-batch prefill layout of the indexer (see module docstring). Rows = the tokens it scores."""

    q_rows: slice  # rows of the batch's tokens the indexer scores (all of them unless token-parallel)
    key_slots: torch.Tensor  # [N] int64, ragged key buffer position -> global cache slot
    ks: torch.Tensor  # [R] int32, global ragged key range of each scored row
    ke: torch.Tensor  # [R] int32
    store_slots: torch.Tensor  # [T] int64, cache slots of the batch's new tokens (all of them)
    chunks: tuple[LogitsChunk, ...]
    budget_bytes: int

    @property
    def num_rows(self) -> int:
        return self.ks.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeIndexBatch:
    """Per-batch decode layout: one row per request."""

    seq_lens: torch.Tensor  # [B] int32, tokens each request attends (its new token included)
    page_table: torch.Tensor  # [B, max_pages] int32
    store_slots: torch.Tensor  # [B] int64, slot of each request's new token
    chunks: tuple[LogitsChunk, ...]
    budget_bytes: int

    @property
    def q_rows(self) -> slice:
        return slice(0, self.seq_lens.shape[0])

    @property
    def num_rows(self) -> int:
        return self.seq_lens.shape[0]


def _check_page_table(page_table: torch.Tensor, seq_lens: list[int], num_pages: int | None) -> list[list[int]]:
    """Host copy of the used part of the table; every used page must be a real page id."""
    check_tensor(page_table, "page_table", ndim=2, dtype=_I32)
    if page_table.shape[0] != len(seq_lens):
        raise ValueError(f"page_table: expected {len(seq_lens)} rows (one per request), got {page_table.shape[0]}")
    host = page_table.cpu()
    rows = []
    for b, s in enumerate(seq_lens):
        need = -(-s // INDEX_PAGE_SIZE)
        if need > host.shape[1]:
            raise ValueError(f"page_table: request {b} has {s} tokens but its row holds {host.shape[1]} pages")
        used = host[b, :need].tolist()
        if any(p < 0 or (num_pages is not None and p >= num_pages) for p in used):
            raise ValueError(f"page_table: request {b} uses a page outside [0, {num_pages}): {used}")
        rows.append(used)
    return rows


def _slots(pages: list[int], start: int, end: int) -> list[int]:
    return [pages[j // INDEX_PAGE_SIZE] * INDEX_PAGE_SIZE + j % INDEX_PAGE_SIZE for j in range(start, end)]


def build_prefill_index_batch(
    seq_lens: Sequence[int] | torch.Tensor,
    prefix_lens: Sequence[int] | torch.Tensor,
    page_table: torch.Tensor,
    *,
    budget_bytes: int,
    device: torch.device | str,
    num_pages: int | None = None,
    q_rows: slice | None = None,
) -> PrefillIndexBatch:
    """Build the prefill layout once per batch from host data.

    Args:
        seq_lens: ``[B]`` tokens of each request after this batch (cached prefix + new).
        prefix_lens: ``[B]`` tokens already cached (their index keys are in the cache).
        page_table: ``[B, max_pages]`` int32 request -> pages (page size 64).
        budget_bytes: the logits budget (:func:`nsa_tp.attention.chunking.resolve_logits_budget`).
        device: where the per-batch tensors live.
        num_pages: the cache's page count, to range-check the table (recommended).
        q_rows: the new-token rows this rank's indexer scores (token-parallel hook; default all). The
            chunk plan covers only these rows, so the logits memory per rank shrinks with them.
    """
    seq, pre = host_ints(seq_lens, "seq_lens"), host_ints(prefix_lens, "prefix_lens")
    if len(seq) != len(pre):
        raise ValueError(f"prefix_lens: expected {len(seq)} entries like seq_lens, got {len(pre)}")
    for b, (s, p) in enumerate(zip(seq, pre, strict=True)):
        if not 0 <= p <= s:
            raise ValueError(
                f"prefix_lens: request {b} has prefix {p} and seq_len {s}; expected 0 <= prefix <= seq_len"
            )
    pages = _check_page_table(page_table, seq, num_pages)
    ks: list[int] = []
    ke: list[int] = []
    key_slots: list[int] = []
    store: list[int] = []
    for b, (s, p) in enumerate(zip(seq, pre, strict=True)):
        start = len(key_slots)
        key_slots += _slots(pages[b], 0, s)
        store += _slots(pages[b], p, s)
        for i in range(s - p):  # new token i of request b sees its prefix and new tokens 0..i (causal)
            ks.append(start)
            ke.append(start + p + i + 1)
    num_new = len(ks)
    rows = slice(0, num_new) if q_rows is None else q_rows
    if rows.step not in (None, 1) or not 0 <= rows.start <= rows.stop <= num_new:
        raise ValueError(f"q_rows: expected a contiguous slice within the batch's {num_new} new tokens, got {rows}")
    ks, ke = ks[rows], ke[rows]
    plan = plan_logits_chunks((ks, ke), budget_bytes)
    chunks = []
    for c in plan:
        lo, hi = chunk_window(ks, ke, c)
        empty = [s == e for s, e in zip(ks[c], ke[c], strict=True)]
        starts = [0 if z else s - lo for s, z in zip(ks[c], empty, strict=True)]
        ends = [0 if z else e - lo for e, z in zip(ke[c], empty, strict=True)]
        chunks.append(LogitsChunk(
            rows=c, lo=lo, hi=hi,
            row_starts=torch.tensor(starts, dtype=_I32, device=device),
            row_ends=torch.tensor(ends, dtype=_I32, device=device),
            lengths=torch.tensor([e - s for s, e in zip(ks[c], ke[c], strict=True)], dtype=_I32, device=device),
            offsets=torch.tensor(ks[c], dtype=_I32, device=device),
        ))
    return PrefillIndexBatch(
        q_rows=rows,
        key_slots=torch.tensor(key_slots, dtype=torch.int64, device=device),
        ks=torch.tensor(ks, dtype=_I32, device=device),
        ke=torch.tensor(ke, dtype=_I32, device=device),
        store_slots=torch.tensor(store, dtype=torch.int64, device=device),
        chunks=tuple(chunks),
        budget_bytes=budget_bytes,
    )


def build_decode_index_batch(
    seq_lens: Sequence[int] | torch.Tensor,
    page_table: torch.Tensor,
    *,
    budget_bytes: int,
    device: torch.device | str,
    num_pages: int | None = None,
) -> DecodeIndexBatch:
    """Build the decode layout once per batch: ``seq_lens [B]`` include each request's new token."""
    seq = host_ints(seq_lens, "seq_lens")
    if any(s < 1 for s in seq):
        raise ValueError(f"seq_lens: every decoding request has at least its new token, got {seq}")
    pages = _check_page_table(page_table, seq, num_pages)
    table = page_table.to(device)
    chunks = []
    for c in plan_logits_chunks(seq, budget_bytes):
        width = max(seq[c])
        lens = torch.tensor(seq[c], dtype=_I32, device=device)
        chunks.append(LogitsChunk(
            rows=c, lo=0, hi=width, row_starts=torch.zeros_like(lens), row_ends=lens, lengths=lens,
            offsets=torch.zeros_like(lens), page_table=table[c],
        ))
    store = [_slots(pages[b], s - 1, s)[0] for b, s in enumerate(seq)]
    return DecodeIndexBatch(
        seq_lens=torch.tensor(seq, dtype=_I32, device=device),
        page_table=table,
        store_slots=torch.tensor(store, dtype=torch.int64, device=device),
        chunks=tuple(chunks),
        budget_bytes=budget_bytes,
    )


class Indexer:
    """The indexer of one layer. Stateless apart from its weights (moved once to ``device`` as float32).

    Args:
        weights: :class:`IndexerWeights`.
        topk: keys kept per row (DeepSeek-V3.2: 2048).
        pow2_scale: power-of-two fp8 scales (the released model's ``scale_fmt = "ue8m0"``).
        norm_eps: k_norm's LayerNorm epsilon (1e-6).
        backend: tier for the logits and top-k ops (``"auto"``, ``"reference"``, ...).
    """

    def __init__(
        self,
        weights: IndexerWeights,
        *,
        topk: int,
        pow2_scale: bool = True,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ):
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected a positive int, got {topk!r}")
        dev = weights.weights_proj.device if device is None else torch.device(device)
        self.w = IndexerWeights(*(t.to(dev, torch.float32) for t in dataclasses.astuple(weights)))
        self.n_heads = weights.n_heads
        self.topk = topk
        self.pow2_scale = pow2_scale
        self.norm_eps = norm_eps
        self.backend = backend
        # weights_proj * H^-0.5 * softmax scale 128^-0.5 (q_scale multiplies in per token)
        self._weight_scale = self.n_heads**-0.5 * INDEX_HEAD_DIM**-0.5
        # TEST-ONLY: a callable (top-k [R, K] int32, the index batch) -> corrupted top-k, applied to every top-k
        # this indexer returns (ragged positions in prefill, global slots in decode). None (always, outside the
        # needle accuracy test's negative control: nsa_tp.needle.corrupt) leaves the selection alone.
        self.topk_hook = None

    # ------------------------------------------------------------------ projections

    def project_q(
        self, q_lora: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_fp8 [T, H, 128] e4m3, weights [T, H] float32)`` from ``q_lora [T, r]``, ``x [T, hidden]``."""
        T = q_lora.shape[0]
        q = (q_lora.float() @ self.w.wq_b.T).view(T, self.n_heads, INDEX_HEAD_DIM)
        q = apply_rope(q, cos, sin, interleaved=False)  # cos [T, 32] -> the first 64 dims
        q8, q_scale = quantize_fp8_blocks(hadamard_transform(q), pow2_scale=self.pow2_scale)
        weights = (x.float() @ self.w.weights_proj.T) * self._weight_scale * q_scale[..., 0]
        return q8, weights

    def project_k(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_fp8 [T, 128] e4m3, k_scale [T] float32)`` from ``x [T, hidden]``."""
        k = F.layer_norm(x.float() @ self.w.wk.T, (INDEX_HEAD_DIM,), self.w.k_norm_weight, self.w.k_norm_bias,
                         self.norm_eps)
        k = apply_rope(k, cos, sin, interleaved=False)
        k8, k_scale = quantize_fp8_blocks(hadamard_transform(k), pow2_scale=self.pow2_scale)
        return k8, k_scale[:, 0]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        q_lora: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index_k_cache: torch.Tensor,
        batch: PrefillIndexBatch | DecodeIndexBatch,
    ) -> torch.Tensor:
        """Store the batch's new index keys, then top-k: ``[batch.num_rows, topk]`` int32 global slots.

        ``x [T_pad, hidden]``, ``q_lora [T_pad, q_lora_rank]``, ``cos``/``sin [T_pad, 32]`` (the layer's
        YaRN table); rows ``[0, T)`` are the batch's new tokens in request order, rows past them DP
        padding (ignored). ``index_k_cache [P, 8448]`` uint8 is written in place.
        """
        n_new = batch.store_slots.shape[0]
        check_tensor(x, "x", ndim=2)
        if x.shape[1] != self.w.hidden_size or x.shape[0] < n_new:
            raise ValueError(f"x: expected [>= {n_new}, {self.w.hidden_size}], got {tuple(x.shape)}")
        check_tensor(q_lora, "q_lora", shape=(x.shape[0], self.w.q_lora_rank))
        check_tensor(cos, "cos", shape=(x.shape[0], INDEX_ROPE_DIM // 2), dtype=torch.float32)
        check_tensor(sin, "sin", shape=(x.shape[0], INDEX_ROPE_DIM // 2), dtype=torch.float32)
        check_tensor(index_k_cache, "index_k_cache", shape=(None, INDEX_PAGE_BYTES), dtype=torch.uint8)
        k8, k_scale = self.project_k(x[:n_new], cos[:n_new], sin[:n_new])
        store_index_k_unchecked(index_k_cache, batch.store_slots, k8, k_scale)
        r = batch.q_rows
        q8, weights = self.project_q(q_lora[r], x[r], cos[r], sin[r])
        if isinstance(batch, DecodeIndexBatch):
            return self.topk_decode(q8, weights, index_k_cache, batch)
        return self.topk_prefill(q8, weights, index_k_cache, batch)

    def topk_prefill(
        self,
        q8: torch.Tensor,
        weights: torch.Tensor,
        index_k_cache: torch.Tensor,
        batch: PrefillIndexBatch,
        *,
        index_space: str = "slots",
    ) -> torch.Tensor:
        """Chunked prefill top-k: ``[R, topk]`` int32 in ``index_space`` ``"slots"`` (global cache slots)
        or ``"ragged"`` (ragged key buffer positions); ``-1`` = no token."""
        if index_space not in ("slots", "ragged"):
            raise ValueError(f"index_space: expected 'slots' or 'ragged', got {index_space!r}")
        R = batch.num_rows
        check_tensor(q8, "q8", shape=(R, self.n_heads, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn)
        check_tensor(weights, "weights", shape=(R, self.n_heads), dtype=torch.float32)
        k_all, s_all = gather_index_k_unchecked(index_k_cache, batch.key_slots)  # [N, 128], [N]
        out = torch.full((R, self.topk), -1, dtype=_I32, device=q8.device)  # the one preallocated buffer
        for c in batch.chunks:
            # [rows, hi - lo] fp32: the chunk's column window only (what the planner budgeted)
            logits = ops.fp8_mqa_logits(
                q8[c.rows], (k_all[c.lo : c.hi], s_all[c.lo : c.hi]), weights[c.rows], c.row_starts, c.row_ends,
                backend=self.backend,
            )
            out[c.rows] = ops.topk_transform_ragged(
                logits, self.topk, row_starts=c.row_starts, lengths=c.lengths, offset_override=c.offsets,
                check_values=False, backend=self.backend,  # ranges validated once, when the batch was built
            )
        if self.topk_hook is not None:
            out = self.topk_hook(out, batch)
        if index_space == "ragged":
            return out
        slots = batch.key_slots[out.clamp_min(0).long()]
        return torch.where(out >= 0, slots.to(_I32), out)

    def topk_decode(
        self, q8: torch.Tensor, weights: torch.Tensor, index_k_cache: torch.Tensor, batch: DecodeIndexBatch
    ) -> torch.Tensor:
        """Paged decode top-k: ``[B, topk]`` int32 global cache slots, ``-1`` = no token."""
        B = batch.num_rows
        check_tensor(q8, "q8", shape=(B, self.n_heads, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn)
        check_tensor(weights, "weights", shape=(B, self.n_heads), dtype=torch.float32)
        out = torch.full((B, self.topk), -1, dtype=_I32, device=q8.device)
        for c in batch.chunks:
            logits = ops.fp8_paged_mqa_logits(
                q8[c.rows], index_k_cache, weights[c.rows], c.lengths, c.page_table, c.hi, backend=self.backend
            )
            out[c.rows] = ops.topk_transform_paged(
                logits, self.topk, lengths=c.lengths, page_table=c.page_table, check_values=False,
                backend=self.backend,
            )
        return out if self.topk_hook is None else self.topk_hook(out, batch)
