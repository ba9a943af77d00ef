"""Token-parallel attention core and the key-sharded decode indexer, run across an attention TP group.

Both produce exactly what pure TP produces on each rank (bf16 tolerance; top-k equal up to ties):

- :func:`token_parallel_attention`: ``q [T, h, 576]`` (this rank's heads of every token) -> the latent
  output ``[T, h, 512]`` of the same heads. Inside: queries all-to-all'd to ``[t_r, H, 576]`` (all heads
  of this rank's tokens), the indexer runs on this rank's tokens only (overlapping the exchange), the
  sparse core runs all ``H`` heads without padding, and the output goes back ``[t_r, H, 512] -> [T, h, 512]``.
  The indexer and the sparse core come in as callables, so the same orchestration serves ragged prefill
  (``fp8_mqa_logits`` + ``sparse_mla_fwd``) and decode with ``batch >= W`` (paged logits +
  ``sparse_mla_decode``): every input they read — index queries, index-K cache, latent cache — is
  replicated in the group, so any rank can compute any token's rows.
- :func:`key_sharded_decode_topk`: decode with fewer rows than ranks: each rank scores its page-aligned
  slice of every row's context (:func:`shard_page_table`), keeps a local top-k, the candidates are
  all-gathered and merged (:func:`nsa_tp.token_parallel.merge.merge_topk`) into the global top-k as
  global cache slots — what ``topk_transform_paged(fp8_paged_mqa_logits(...))`` gives unsharded.

Host-engine entry points (tensors in, tensors out; the host computes its own top-k rows):

- :func:`tokens_sparse_mla` — the ``tokens`` strategy's exchange + sparse core for one layer.
- :func:`gather_topk_rows` — the ``indexer`` strategy's all-gather of every rank's top-k rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from nsa_tp import ops
from nsa_tp.ops.check import check_same_device, check_tensor
from nsa_tp.parallel.collectives import all_gather_stack, group_rank_world, heads_to_tokens, tokens_to_heads
from nsa_tp.token_parallel.merge import local_topk, merge_topk
from nsa_tp.token_parallel.plan import TokenSplit, plan_token_split

__all__ = [
    "tokens_sparse_mla", "gather_topk_rows", "token_parallel_attention", "Unabsorbed", "key_sharded_decode_topk",
    "shard_page_table", "KeyShardBatch",
    "SelectTopk", "Attend",
]

# select_topk(rows) -> [len(rows), K] int32 ids for the sparse core (-1 fill), rows = global token rows.
SelectTopk = Callable[[range], torch.Tensor]
# attend(q [t, H, 576], topk [t, K], rows) -> out [t, H, 512] bf16 for those token rows, all heads.
Attend = Callable[[torch.Tensor, torch.Tensor, range], torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class Unabsorbed:
    """Exchange queries *before* the W_UK absorption and outputs *after* W_UV: 3.4x less traffic.

    A head's absorbed query is 576 values and its latent output 512, but before absorption the query is
    ``q_nope | q_pe`` = 128 + 64 values and after W_UV the output is 128: ``(192 + 128) / (576 + 512)``.
    The price: every rank of the group needs W_UK and W_UV of *all* heads (``kv_b_proj``, 32 MiB a layer in
    bf16), and absorbs / projects all heads of its tokens (the same FLOPs per rank as pure TP).

    ``w_uk``: ``[H, 128, 512]``, ``w_uv_t``: ``[H, 512, 128]`` (the layer's layout, all heads, one float dtype).
    """

    w_uk: torch.Tensor
    w_uv_t: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor(self.w_uk, "w_uk", ndim=3, dtype=(torch.bfloat16, torch.float16, torch.float32))
        H, dn, dl = self.w_uk.shape
        check_tensor(self.w_uv_t, "w_uv_t", shape=(H, dl, None), dtype=self.w_uk.dtype)

    @property
    def nope_dim(self) -> int:
        return self.w_uk.shape[1]

    def heads(self, start: int, count: int) -> Unabsorbed:
        """The weights of heads ``[start, start + count)`` (a rank's own heads, for the local paths)."""
        return Unabsorbed(self.w_uk[start : start + count], self.w_uv_t[start : start + count])

    def absorb(self, q: torch.Tensor) -> torch.Tensor:
        """``[t, H, nope + rope]`` -> ``[t, H, 512 + rope]`` bfloat16 (``[q_nope @ W_UK | q_pe]``)."""
        q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]
        # [t, H, 128] -> [H, t, 128] @ [H, 128, 512] -> [H, t, 512] -> [t, H, 512]
        q_lat = torch.bmm(q_nope.to(self.w_uk.dtype).transpose(0, 1), self.w_uk).transpose(0, 1)
        return torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(torch.bfloat16)

    def project(self, o_lat: torch.Tensor) -> torch.Tensor:
        """``[t, H, 512]`` -> ``[t, H, 128]`` in the weights' dtype (``o_lat @ W_UV^T`` per head)."""
        return torch.bmm(o_lat.to(self.w_uv_t.dtype).transpose(0, 1), self.w_uv_t).transpose(0, 1).contiguous()


def token_parallel_attention(
    q: torch.Tensor,
    split: TokenSplit,
    group: dist.ProcessGroup | None,
    select_topk: SelectTopk,
    attend: Attend,
    *,
    d_v: int = 512,
    fp8_q: bool = False,
    out_chunks: int = 1,
    unabsorbed: Unabsorbed | None = None,
) -> torch.Tensor:
    """Token-parallel sparse attention for one batch; returns what pure TP returns on this rank.

    Args:
        q: ``[num_rows, h, 576]`` bfloat16 — absorbed queries of this rank's ``h`` heads (global heads
            ``[r*h, (r+1)*h)``) for every row, DP padding rows included. With ``unabsorbed``: the queries
            before absorption, ``[num_rows, h, 128 + 64]`` (``q_nope | q_pe``, rope applied), any float.
        split: :class:`TokenSplit` of the real rows over the group (``split.num_rows == num_rows``).
        group: the attention TP group (its size is ``split.world``; ``None`` = one rank).
        select_topk: the indexer for a range of rows (see :data:`SelectTopk`); called exactly once on
            every rank, for this rank's rows only (never DP padding rows), while the query exchange is in
            flight — also with an empty range, because the indexer stores the batch's new index keys
            into the (replicated) index-K cache on every rank.
        attend: the sparse core for this rank's rows with all ``H = W*h`` heads (see :data:`Attend`).
        d_v: the core's output dim (512).
        fp8_q: send q as e4m3 + per-64 scales (0.53x the bytes, lossy).
        out_chunks: run the sparse core over this many consecutive slices of this rank's tokens and send
            each slice's output back as soon as it is done, so the output exchange of slice ``c`` overlaps
            the core of slice ``c + 1``. ``attend`` is then called once per non-empty slice (so it must not
            hold a per-batch plan: prefill only). 1 = one call, one exchange.
        unabsorbed: absorb after the exchange and apply W_UV before the way back (:class:`Unabsorbed`).

    Returns:
        ``[num_rows, h, d_v]`` bfloat16: this rank's heads of every row; DP padding rows are 0. With
        ``unabsorbed``: ``[num_rows, h, 128]`` after W_UV, in the weights' dtype.
    """
    check_tensor(q, "q", ndim=3, dtype=(torch.bfloat16, torch.float16, torch.float32))
    rank, world = group_rank_world(group)
    if not isinstance(split, TokenSplit):
        raise ValueError(f"split: expected a TokenSplit from plan_token_split, got {type(split).__name__}")
    if split.world != world:
        raise ValueError(f"split: planned for {split.world} ranks, the group has {world}")
    if split.num_rows != q.shape[0]:
        raise ValueError(f"q: expected {split.num_rows} rows (split.num_rows), got shape {tuple(q.shape)}")
    if isinstance(out_chunks, bool) or not isinstance(out_chunks, int) or out_chunks < 1:
        raise ValueError(f"out_chunks: expected a positive int, got {out_chunks!r}")
    num_rows, h, _ = q.shape
    if unabsorbed is not None and unabsorbed.w_uk.shape[0] != world * h:
        raise ValueError(f"unabsorbed: W_UK holds {unabsorbed.w_uk.shape[0]} heads, the group has {world * h}")
    real = split.num_real
    rows = split.rows(rank)
    # [T, h, D] -> [t_r, W*h, D]; in flight while this rank's indexer rows run.
    pending = heads_to_tokens(q[:real], group, split.splits, fp8=fp8_q, async_op=True)
    topk = select_topk(rows)
    check_tensor(topk, "select_topk(rows)", ndim=2, dtype=torch.int32)
    if topk.shape[0] != len(rows):
        raise ValueError(f"select_topk(rows): expected {len(rows)} rows, got shape {tuple(topk.shape)}")
    q_tok = pending.wait()
    del pending  # its receive buffer: freed once regrouped (transient_buffers counts on it)
    if unabsorbed is not None:
        q_tok = unabsorbed.absorb(q_tok)  # [t_r, H, 192] -> [t_r, H, 576]
    core = _Core(attend, world * h, d_v, unabsorbed)
    dim, dtype = core.out_shape()
    out = q.new_empty((num_rows, h, dim), dtype=dtype)  # the result; the exchange writes its real rows
    out[real:] = 0  # DP padding rows: 0, as pure TP's all -1 top-k rows give
    if out_chunks == 1:
        o_tok = core(q_tok, topk, rows)
        del q_tok
        # [t_r, W*h, 512 (or 128)] -> [T, h, 512 (or 128)], received in place
        tokens_to_heads(o_tok, group, split.splits, out=out[:real])
    else:
        _attend_pipelined(core, q_tok, topk, split, rank, group, out[:real], out_chunks)
    return out


def tokens_sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    topk: torch.Tensor,
    sm_scale: float,
    group: dist.ProcessGroup | None,
    split: TokenSplit,
    *,
    d_v: int = 512,
    backend: str = "auto",
    fp8_q: bool = False,
    out_chunks: int = 1,
) -> torch.Tensor:
    """The ``tokens`` strategy for one layer, as a host engine calls it: heads -> tokens, sparse MLA, back.

    Queries go ``[T, h, 576] -> [t_r, H, 576]`` (all ``H = W*h`` heads of this rank's rows), the sparse core
    runs all heads with no padding (:func:`nsa_tp.ops.sparse_mla_fwd`), the output goes back
    ``[t_r, H, 512] -> [T, h, 512]``. Every rank of ``group`` must call it with the same ``split``.

    Args:
        q: ``[split.num_rows, h, 576]`` bfloat16 — absorbed queries (rope applied) of this rank's ``h``
            heads, global heads ``[r*h, (r+1)*h)``, for every row of the batch (DP padding rows included).
        kv: ``[N, 1, 576]`` bfloat16 or ``[N, 1, 656]`` uint8 (fp8 format) — the flat latent KV cache,
            replicated in the group (``[pages, 64, 1, D]`` viewed as ``[N, 1, D]``).
        topk: ``[t_r, K]`` or ``[t_r, 1, K]`` int32 — top-k slots into ``kv`` for this rank's rows only,
            ``split.rows(rank)``; ``-1`` (or ``>= N``) = no token.
        sm_scale: softmax scale of ``q . k``.
        group: the attention TP group (``None`` = one rank); its size is ``split.world``.
        split: :func:`nsa_tp.token_parallel.plan.plan_token_split` of the batch's real rows.
        d_v, backend: as :func:`nsa_tp.ops.sparse_mla_fwd`.
        fp8_q, out_chunks: as :func:`token_parallel_attention`.

    Returns:
        ``[split.num_rows, h, d_v]`` bfloat16 — this rank's heads of every row (DP padding rows 0), the same
        as ``sparse_mla_fwd(q, kv, full_topk)`` with the full ``[T, 1, K]`` top-k on this rank (bf16 tolerance).
    """
    if topk.ndim == 3:
        check_tensor(topk, "topk", shape=(None, 1, None), dtype=torch.int32)
        topk = topk[:, 0]
    check_tensor(topk, "topk", ndim=2, dtype=torch.int32)
    check_tensor(kv, "kv", ndim=3)
    check_same_device(q=q, kv=kv, topk=topk)
    if not isinstance(split, TokenSplit):
        raise ValueError(f"split: expected a TokenSplit from plan_token_split, got {type(split).__name__}")
    rank, world = group_rank_world(group)
    if split.world != world:
        raise ValueError(f"split: planned for {split.world} ranks, the group has {world}")
    rows = split.rows(rank)
    if topk.shape[0] != len(rows):
        raise ValueError(f"topk: expected {len(rows)} rows (this rank's split), got shape {tuple(topk.shape)}")

    def select(_rows: range) -> torch.Tensor:
        return topk

    def attend(q_tok: torch.Tensor, ids: torch.Tensor, _rows: range) -> torch.Tensor:
        return ops.sparse_mla_fwd(q_tok, kv, ids.unsqueeze(1), sm_scale, d_v, backend=backend)[0]

    return token_parallel_attention(q, split, group, select, attend, d_v=d_v, fp8_q=fp8_q, out_chunks=out_chunks)


def gather_topk_rows(local: torch.Tensor, group: dist.ProcessGroup | None, split: TokenSplit) -> torch.Tensor:
    """The ``indexer`` strategy's exchange: every rank's top-k rows -> the whole batch's top-k on every rank.

    Args:
        local: ``[len(split.rows(rank)), K]`` int32 — the top-k of this rank's query rows (its indexer share).
        group: the attention TP group (``None`` = one rank).
        split: :func:`nsa_tp.token_parallel.plan.plan_index_split` of the real rows, the same on every rank.

    Returns:
        ``[split.num_rows, K]`` int32, rank ``j``'s rows at ``split.rows(j)``; DP padding rows all ``-1``.
        Transient: a ``[max_split, K]`` send block and the ``[W, max_split, K]`` int32 gather buffer (uneven
        splits travel padded to the largest, because all-gather takes equal blocks); see
        :func:`nsa_tp.token_parallel.plan.transient_buffers`.
    """
    check_tensor(local, "local", ndim=2, dtype=torch.int32)
    if not isinstance(split, TokenSplit):
        raise ValueError(f"split: expected a TokenSplit from plan_index_split, got {type(split).__name__}")
    rank, world = group_rank_world(group)
    if split.world != world:
        raise ValueError(f"split: planned for {split.world} ranks, the group has {world}")
    if local.shape[0] != split.splits[rank]:
        raise ValueError(f"local: expected {split.splits[rank]} rows (this rank's split), got {tuple(local.shape)}")
    K = local.shape[1]
    out = local.new_full((split.num_rows, K), -1)
    if world == 1:  # nothing to gather: the rows and the padding
        out[: local.shape[0]] = local
        return out
    block = local.new_full((split.max_split, K), -1)
    block[: local.shape[0]] = local
    gathered = all_gather_stack(block, group)  # [W, max_split, K]: rank j's rows first in block j
    for j, n in enumerate(split.splits):
        start = split.offsets[j]
        out[start : start + n] = gathered[j, :n]
    return out


@dataclasses.dataclass(frozen=True)
class _Core:
    """``attend`` for a range of rows, output checked, W_UV applied when exchanging unabsorbed."""

    attend: Attend
    heads: int
    d_v: int
    unabsorbed: Unabsorbed | None

    def out_shape(self) -> tuple[int, torch.dtype]:
        if self.unabsorbed is None:
            return self.d_v, torch.bfloat16
        return self.unabsorbed.w_uv_t.shape[-1], self.unabsorbed.w_uv_t.dtype

    def __call__(self, q_tok: torch.Tensor, topk: torch.Tensor, rows: range) -> torch.Tensor:
        dim, dtype = self.out_shape()
        if not len(rows):  # every rank joins the exchange, with an empty block of the same dtype
            return q_tok.new_zeros((0, self.heads, dim), dtype=dtype)
        out = self.attend(q_tok, topk, rows)
        check_tensor(out, "attend(...)", shape=(len(rows), self.heads, self.d_v), dtype=torch.bfloat16)
        return out if self.unabsorbed is None else self.unabsorbed.project(out)


def _attend_pipelined(core: _Core, q_tok: torch.Tensor, topk: torch.Tensor, split: TokenSplit, rank: int,
                      group: dist.ProcessGroup | None, out: torch.Tensor, n: int) -> None:
    """Core + output exchange in ``n`` slices per rank; slice ``c`` of every rank travels in exchange ``c``;
    the slices land in ``out [split.num_real, h, dim]``."""
    world = split.world
    # slices[j][c]: token count of rank j's slice c (every rank knows every rank's cut: same arithmetic)
    slices = [plan_token_split(split.splits[j], n).splits for j in range(world)]
    first = split.rows(rank).start
    pending = []
    lo = 0
    for c in range(n):
        hi = lo + slices[rank][c]
        part = core(q_tok[lo:hi], topk[lo:hi], range(first + lo, first + hi))
        pending.append(tokens_to_heads(part, group, [slices[j][c] for j in range(world)], async_op=True))
        lo = hi
    offsets = split.offsets
    for c, p in enumerate(pending):
        got = p.wait()  # [sum_j slices[j][c], h, dim]: rank j's slice c, in rank order
        src = 0
        for j in range(world):
            k = slices[j][c]
            dst = offsets[j] + sum(slices[j][:c])
            out[dst : dst + k] = got[src : src + k]
            src += k


@dataclasses.dataclass(frozen=True, eq=False)
class KeyShardBatch:
    """One rank's slice of every decode row's context (built once per batch by :func:`shard_page_table`)."""

    page_table: torch.Tensor  # [R, width_pages] int32: column j = page p0 + j of the row
    seq_lens: torch.Tensor  # [R] int32: keys of the row inside this rank's slice
    key_start: torch.Tensor  # [R] int32: global position of the slice's first key
    rank: int
    world: int

    @property
    def width(self) -> int:
        """Logits columns the slice needs: every row's slice fits ``width_pages * 64`` keys."""
        return self.page_table.shape[1] * 64


def shard_page_table(
    page_table: torch.Tensor, seq_lens: torch.Tensor, rank: int, world: int, page_size: int = 64
) -> KeyShardBatch:
    """Rank ``rank``'s slice of every row's context, as a page table the paged logits kernel can read.

    Row ``r`` with ``P = ceil(seq_lens[r] / page_size)`` pages gets pages ``[rank*P//W, (rank+1)*P//W)``
    (the same cut as :func:`nsa_tp.token_parallel.plan.plan_key_shards`). Computed on the device with
    no host sync; build it once per batch (the backend keeps it in the batch metadata).

    Returns:
        :class:`KeyShardBatch` with a ``[R, ceil(max_pages/W)]`` local page table (unused columns repeat a
        valid entry of the row and are never read: the local ``seq_lens`` stop before them).
    """
    check_tensor(page_table, "page_table", ndim=2, dtype=torch.int32)
    R, max_pages = page_table.shape
    check_tensor(seq_lens, "seq_lens", shape=(R,), dtype=torch.int32)
    check_same_device(page_table=page_table, seq_lens=seq_lens)
    if page_size != 64:
        raise ValueError(f"page_size: the index-K cache uses 64-token pages, got {page_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
    lens = seq_lens.long()
    pages = (lens + page_size - 1) // page_size
    p0 = rank * pages // world
    p1 = (rank + 1) * pages // world
    width = max(1, -(-max_pages // world))  # no row's slice has more pages than this
    cols = (p0[:, None] + torch.arange(width, device=page_table.device)[None, :]).clamp_max(max(max_pages - 1, 0))
    local_table = torch.gather(page_table, 1, cols) if max_pages else page_table.new_zeros(R, width)
    key_start = p0 * page_size
    local_lens = (torch.minimum(p1 * page_size, lens) - key_start).clamp_min(0)
    return KeyShardBatch(local_table.contiguous(), local_lens.to(torch.int32), key_start.to(torch.int32), rank,
                         world)


def key_sharded_decode_topk(
    q: torch.Tensor,
    index_k_cache: torch.Tensor,
    weights: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    topk: int,
    group: dist.ProcessGroup | None,
    *,
    shard: KeyShardBatch | None = None,
    page_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """The decode indexer's top-k with the context split over the group's ranks (exact, up to ties).

    Args (the contract of :func:`nsa_tp.ops.fp8_paged_mqa_logits`, identical on every rank):
        q: ``[R, H_idx, 128]`` float8_e4m3fn index queries, one row per decode token.
        index_k_cache: ``[P, 8448]`` uint8 paged index-K cache (replicated in the group).
        weights: ``[R, H_idx]`` float32.
        seq_lens: ``[R]`` int32, keys row ``r`` scores: its request's tokens ``[0, seq_lens[r])``.
        page_table: ``[R, max_pages]`` int32, the row's request pages.
        topk: K (2048).
        group: the attention TP group.
        shard: this rank's :class:`KeyShardBatch` for these rows, built once per batch (default: built here,
            with its range checks' host syncs skipped only when given).
        page_size: 64.
        backend: tier for the logits and the local top-k.

    Returns:
        ``[R, topk]`` int32 global cache slots (``page * 64 + offset``), ``-1`` fill — the same set as
        ``topk_transform_paged(fp8_paged_mqa_logits(...), topk, ...)`` on one rank (the same ids when the
        logits are bitwise equal: the merge breaks ties like the unsharded top-k).
    """
    rank, world = group_rank_world(group)
    check_tensor(q, "q", ndim=3, dtype=torch.float8_e4m3fn)
    R = q.shape[0]
    check_tensor(seq_lens, "seq_lens", shape=(R,), dtype=torch.int32)
    check_tensor(page_table, "page_table", shape=(R, None), dtype=torch.int32)
    prebuilt = shard is not None
    if shard is None:
        shard = shard_page_table(page_table, seq_lens, rank, world, page_size)
    elif (shard.rank, shard.world) != (rank, world) or shard.seq_lens.shape[0] != R:
        raise ValueError(f"shard: built for rank {shard.rank} of {shard.world} and {shard.seq_lens.shape[0]} rows, "
                         f"this is rank {rank} of {world} with {R} rows")
    logits = ops.fp8_paged_mqa_logits(q, index_k_cache, weights, shard.seq_lens, shard.page_table, shard.width,
                                      backend=backend)
    scores, positions = local_topk(logits, topk, shard.seq_lens, shard.key_start, check_values=not prebuilt,
                                   backend=backend)  # [R, K] each, global positions
    # One all-gather of both: [2, R, K] float32 with the int32 positions bit-cast (copied, never computed
    # on) -> [W, 2, R, K]; 8 bytes a candidate, 16 KB a row at K = 2048.
    both = all_gather_stack(torch.stack([scores, positions.view(torch.float32)]), group)
    pos, _ = merge_topk(both[:, 0], both[:, 1].contiguous().view(torch.int32), topk)
    safe = pos.long().clamp_min(0)
    slots = page_table.long().gather(1, safe // page_size) * page_size + safe % page_size
    return torch.where(pos >= 0, slots, -1).to(torch.int32)
