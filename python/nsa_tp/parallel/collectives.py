"""All-to-all between "heads split over ranks" and "tokens split over ranks", for token-parallel attention.

Inside an attention TP group of ``W`` ranks, rank ``r`` owns the heads ``[r*h, (r+1)*h)`` (``h = H / W``,
the same order as :func:`nsa_tp.model.sharding.head_range`). Token-parallel attention regroups a per-token
tensor so that rank ``r`` instead owns *all* ``H`` heads of a contiguous slice of the tokens
``[offsets[r], offsets[r] + splits[r])``, runs the indexer and the sparse core there, and regroups back:

    heads_to_tokens: [T, h, D] on every rank  ->  [splits[r], H, D] on rank r
    tokens_to_heads: [splits[r], H, D]         ->  [T, h, D] on every rank

``splits`` may be uneven and may contain zeros (fewer tokens than ranks). Each rank sends ``T * h * D``
elements in total and receives the same amount: ``(W-1)/W`` of it crosses the wire.

Backends: ``torch.distributed.all_to_all_single`` with uneven split sizes is native on NCCL and also
implemented by gloo in torch 2.13 (checked: uneven, zero-sized and async splits, bf16 and uint8), so one
code path serves the GPU run and CPU CI. fp8 tensors travel as ``uint8`` bytes (gloo has no fp8 type).

``fp8=True`` quantizes the payload to float8_e4m3fn with one float32 scale per 64 values of each
(token, head) row before sending, and dequantizes on arrival: 576 bf16 values (1152 bytes) become
576 + 9*4 = 612 bytes, 0.53x the traffic, at e4m3's precision (relative error about 2^-4 per element).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from nsa_tp.ops.check import check_tensor

__all__ = [
    "PendingAllToAll",
    "heads_to_tokens",
    "tokens_to_heads",
    "check_splits",
    "group_rank_world",
    "split_offsets",
    "all_gather_stack",
    "fp8_pack_rows",
    "fp8_unpack_rows",
    "fp8_row_bytes",
    "a2a_bytes_per_rank",
    "FP8_BLOCK",
]

FP8_BLOCK = 64  # values per fp8 scale: 576 = 9 x 64 (512 latent + 64 rope), 512 = 8 x 64
_E4M3_MAX = 448.0
_WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank in group, group size)``; ``None`` is a group of one rank (the ``ParallelGroups`` convention).

    ``None`` never means "the default group": a one-rank attention TP group has no group object, and
    reading it as the world would silently exchange with unrelated ranks.
    """
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def check_splits(splits: Sequence[int], num_tokens: int | None, world: int) -> tuple[int, ...]:
    """``splits``: one non-negative int per rank summing to ``num_tokens`` (unchecked if None); as a tuple."""
    s = tuple(splits)
    if len(s) != world:
        raise ValueError(f"splits: expected one token count per rank ({world}), got {len(s)}: {s}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in s):
        raise ValueError(f"splits: expected non-negative ints, got {s}")
    if num_tokens is not None and sum(s) != num_tokens:
        raise ValueError(f"splits: expected counts summing to the {num_tokens} tokens, got {s} (sum {sum(s)})")
    return s


def split_offsets(splits: Sequence[int]) -> tuple[int, ...]:
    """``[0, s0, s0+s1, ...]``: rank r's tokens are ``[offsets[r], offsets[r+1])``."""
    out = [0]
    for s in splits:
        out.append(out[-1] + s)
    return tuple(out)


def fp8_row_bytes(d: int, block: int = FP8_BLOCK) -> int:
    """Bytes of one packed row of ``d`` values: ``d`` e4m3 bytes + one float32 scale per ``block`` values."""
    return d + 4 * (d // block)


def fp8_pack_rows(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """``[..., D]`` float -> ``[..., D + 4*D/block]`` uint8: e4m3 values then float32 scales (absmax / 448).

    An all-zero block gets scale 1 so that unpacking never produces NaN.
    """
    check_tensor(x, "x", dtype=_WIRE_DTYPES)
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"x: expected a last dim divisible by the fp8 block {block}, got {d}")
    lead = x.shape[:-1]
    v = x.reshape(-1, d // block, block).float()
    amax = v.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))  # [M, D/block]
    q = (v / scale[..., None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch.empty(v.shape[0], fp8_row_bytes(d, block), dtype=torch.uint8, device=x.device)
    out[:, :d] = q.reshape(-1, d).view(torch.uint8)
    out[:, d:] = scale.contiguous().view(torch.uint8)
    return out.reshape(*lead, -1)


def fp8_unpack_rows(packed: torch.Tensor, d: int, dtype: torch.dtype, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of :func:`fp8_pack_rows`: ``[..., D + 4*D/block]`` uint8 -> ``[..., D]`` ``dtype``."""
    check_tensor(packed, "packed", dtype=torch.uint8)
    if packed.shape[-1] != fp8_row_bytes(d, block):
        raise ValueError(f"packed: expected last dim {fp8_row_bytes(d, block)} for D={d}, got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, packed.shape[-1])
    vals = flat[:, :d].contiguous().view(torch.float8_e4m3fn).float().reshape(-1, d // block, block)
    scale = flat[:, d:].contiguous().view(torch.float32)  # [M, D/block]
    return (vals * scale[..., None]).reshape(*lead, d).to(dtype)


def a2a_bytes_per_rank(num_tokens: int, heads_per_rank: int, d: int, world: int, *, fp8: bool = False,
                       elem_bytes: int = 2) -> int:
    """Bytes one rank sends to the *other* ranks in one regrouping of ``[T, h, d]`` (even split)."""
    row = fp8_row_bytes(d) if fp8 else d * elem_bytes
    return num_tokens * heads_per_rank * row * (world - 1) // world


@dataclasses.dataclass
class PendingAllToAll:
    """An all-to-all in flight (``async_op=True``): call :meth:`wait` before using the result.

    Lets the caller overlap the query exchange with the indexer, which needs only replicated inputs.
    """

    _work: dist.Work | None
    _finish: Callable[[], torch.Tensor]
    _result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._finish()
        return self._result


def _exchange(send: torch.Tensor, recv: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup | None, async_op: bool) -> dist.Work | None:
    # gloo and NCCL both split along dim 0; split sizes are in rows of `send` / `recv`.
    return dist.all_to_all_single(recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=async_op)


def heads_to_tokens(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    splits: Sequence[int],
    *,
    fp8: bool = False,
    async_op: bool = False,
) -> torch.Tensor | PendingAllToAll:
    """Regroup ``x [T, h, D]`` (this rank's ``h`` heads, every token) into ``[splits[r], W*h, D]``.

    Args:
        x: ``[T, h, D]`` bfloat16 / float16 / float32, identical ``T``, ``h``, ``D`` and dtype on every
            rank of ``group``; rank ``j`` holds global heads ``[j*h, (j+1)*h)``.
        group: the attention TP group (``None``: a group of one rank, no communication).
        splits: tokens per rank (sum ``T``, zeros allowed); rank ``r`` receives tokens
            ``[offsets[r], offsets[r] + splits[r])`` (:func:`split_offsets`).
        fp8: send e4m3 values with one float32 scale per 64 (0.53x the bytes, lossy; see module doc).
        async_op: return a :class:`PendingAllToAll` instead of waiting.

    Returns:
        ``[splits[r], W*h, D]`` in ``x.dtype``, heads in global order.
    """
    check_tensor(x, "x", ndim=3, dtype=_WIRE_DTYPES)
    rank, world = group_rank_world(group)
    T, h, d = x.shape
    s = check_splits(splits, T, world)
    if world == 1:
        return PendingAllToAll(None, lambda: x) if async_op else x
    send = fp8_pack_rows(x) if fp8 else x.contiguous()  # rows [offsets[j], offsets[j+1]) go to rank j
    recv = send.new_empty((world * s[rank], h, send.shape[-1]))  # block j = rank j's heads of my tokens
    work = _exchange(send, recv, [s[rank]] * world, list(s), group, async_op)

    def finish() -> torch.Tensor:
        y = fp8_unpack_rows(recv, d, x.dtype) if fp8 else recv
        # [W*t, h, D] -> [W, t, h, D] -> [t, W, h, D] -> [t, W*h, D]: head j*h + i came from rank j.
        return y.view(world, s[rank], h, d).transpose(0, 1).reshape(s[rank], world * h, d)

    if async_op:
        return PendingAllToAll(work, finish)
    return finish()


def tokens_to_heads(
    y: torch.Tensor,
    group: dist.ProcessGroup | None,
    splits: Sequence[int],
    *,
    fp8: bool = False,
    async_op: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | PendingAllToAll:
    """Inverse of :func:`heads_to_tokens`: ``y [splits[r], H, D]`` -> ``[T, H/W, D]`` (this rank's heads).

    Args:
        y: ``[splits[r], H, D]`` bfloat16 / float16 / float32, all heads of this rank's tokens; ``H``
            divisible by the group size, the same ``H``, ``D`` and dtype on every rank.
        group, splits, fp8, async_op: as in :func:`heads_to_tokens` (``T = sum(splits)``).
        out: optional contiguous ``[T, H/W, D]`` buffer of ``y.dtype`` to receive into (no receive buffer is
            allocated unless ``fp8``, whose bytes are unpacked into it).

    Returns:
        ``[T, H/W, D]`` in ``y.dtype`` (``out`` when given): every token, heads ``[r*H/W, (r+1)*H/W)``.
    """
    check_tensor(y, "y", ndim=3, dtype=_WIRE_DTYPES)
    rank, world = group_rank_world(group)
    t, H, d = y.shape
    if H % world:
        raise ValueError(f"y: expected a head count divisible by the group size {world}, got {H}")
    s = check_splits(splits, None, world)
    if t != s[rank]:
        raise ValueError(f"y: expected {s[rank]} rows (splits[{rank}]), got shape {tuple(y.shape)}")
    h, T = H // world, sum(s)
    if out is not None:
        check_tensor(out, "out", shape=(T, h, d), dtype=y.dtype, device=y.device)
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous buffer (the exchange writes its rows in place)")
    if world == 1:
        res = y if out is None else out.copy_(y)
        return PendingAllToAll(None, lambda: res) if async_op else res
    # [t, W*h, D] -> [t, W, h, D] -> [W, t, h, D]: block j (rank j's heads) goes to rank j.
    blocks = y.view(t, world, h, d).transpose(0, 1)
    send = fp8_pack_rows(blocks) if fp8 else blocks.contiguous()
    send = send.reshape(world * t, h, send.shape[-1])
    # rows arrive in token order: rank j's tokens at offsets[j]
    recv = out if out is not None and not fp8 else send.new_empty((T, h, send.shape[-1]))
    work = _exchange(send, recv, list(s), [t] * world, group, async_op)

    def finish() -> torch.Tensor:
        if not fp8:
            return recv
        got = fp8_unpack_rows(recv, d, y.dtype)
        return got if out is None else out.copy_(got)

    if async_op:
        return PendingAllToAll(work, finish)
    return finish()


def all_gather_stack(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x [...]`` (same shape and dtype on every rank) -> ``[W, ...]``, row ``j`` from rank ``j``."""
    check_tensor(x, "x")
    _, world = group_rank_world(group)
    if world == 1:
        return x.unsqueeze(0)
    out = x.new_empty((world, *x.shape))
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; the GPU hosts run 2.11.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), x.contiguous().view(-1), group=group)
    return out
