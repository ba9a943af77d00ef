"""Process groups for one NSA layout: TP, attention TP and attention DP, built from a layout and a rank.

Rank numbering follows SGLang: ``rank = replica * tp_size + tp_rank`` (replicas exist only for ``--dp``
without DP attention), and inside a replica ``attn_dp_rank = tp_rank // attn_tp_size``,
``attn_tp_rank = tp_rank % attn_tp_size``. So an attention TP group is ``attn_tp_size`` consecutive ranks
(NVLink neighbours on one host), and the attention DP group links the ranks that hold the same heads in
every attention group (the all-gather of token counts and of hidden states for the MLP runs over it).

:func:`group_ranks` is the pure rank arithmetic (testable without processes); :func:`build_groups` makes
the ``torch.distributed`` groups. A group of one rank is ``None``: its collectives are no-ops.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from nsa_tp.parallel.layout import ParallelLayout

__all__ = ["ParallelGroups", "group_ranks", "build_groups", "single_rank_groups", "rank_coords"]


def rank_coords(layout: ParallelLayout, rank: int) -> dict[str, int]:
    """``{replica, tp_rank, attn_dp_rank, attn_tp_rank}`` of a global ``rank``."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size {layout.world_size}, got {rank}")
    replica, tp_rank = divmod(rank, layout.tp_size)
    attn_dp_rank, attn_tp_rank = divmod(tp_rank, layout.attn_tp_size)
    return {"replica": replica, "tp_rank": tp_rank, "attn_dp_rank": attn_dp_rank, "attn_tp_rank": attn_tp_rank}


def group_ranks(layout: ParallelLayout) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks: ``{"tp": ..., "attn_tp": ..., "attn_dp": ...}``."""
    tp, atp, adp = layout.tp_size, layout.attn_tp_size, layout.attn_dp_size
    groups: dict[str, list[list[int]]] = {"tp": [], "attn_tp": [], "attn_dp": []}
    for rep in range(layout.num_replicas):
        base = rep * tp
        groups["tp"].append(list(range(base, base + tp)))
        for d in range(adp):
            groups["attn_tp"].append(list(range(base + d * atp, base + (d + 1) * atp)))
        for t in range(atp):
            groups["attn_dp"].append([base + d * atp + t for d in range(adp)])
    return groups


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the layout and its groups (``None`` = a group of one rank)."""

    layout: ParallelLayout
    rank: int
    replica: int
    tp_rank: int
    attn_tp_rank: int
    attn_dp_rank: int
    tp_group: object | None
    attn_tp_group: object | None
    attn_dp_group: object | None

    # Collectives over the groups. All are no-ops (or trivial) on a group of one rank, so the layer code
    # has no "if distributed" branches.
    def all_reduce_attn_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the attention TP group, in place; returns ``x``."""
        if self.attn_tp_group is not None:
            _all_reduce(x, self.attn_tp_group)
        return x

    def all_gather_attn_dp_counts(self, count: int, device: torch.device) -> list[int]:
        """Every attention DP group's token count (index = attn_dp_rank)."""
        if self.attn_dp_group is None:
            return [count]
        t = torch.tensor([count], dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(self.layout.attn_dp_size)]
        dist.all_gather(out, t, group=self.attn_dp_group)
        return [int(o.item()) for o in out]

    def all_gather_attn_dp(self, x: torch.Tensor) -> torch.Tensor:
        """``[T_pad, ...]`` on each attention DP group -> ``[attn_dp_size * T_pad, ...]`` in attn_dp_rank order."""
        if self.attn_dp_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.layout.attn_dp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.attn_dp_group)
        return torch.cat(parts, dim=0)


def _all_reduce(x: torch.Tensor, group: object) -> None:
    # gloo's CPU all-reduce may not take bf16 on every torch build: reduce in fp32 there (same sum, one
    # rounding at the end, like NCCL's bf16 reduce up to its own accumulation order).
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        tmp = x.float()
        dist.all_reduce(tmp, group=group)
        x.copy_(tmp)
    else:
        dist.all_reduce(x, group=group)


def single_rank_groups(layout: ParallelLayout) -> ParallelGroups:
    """Groups for a one-process run (``layout.world_size`` must be 1): every collective is a no-op."""
    if layout.world_size != 1:
        raise ValueError(f"layout: single_rank_groups needs world_size 1, got {layout.world_size}")
    return ParallelGroups(layout, 0, 0, 0, 0, 0, None, None, None)


def build_groups(layout: ParallelLayout, rank: int | None = None) -> ParallelGroups:
    """Create this rank's groups; every rank of the job must call it (``new_group`` is collective).

    ``torch.distributed`` must be initialized with ``world_size == layout.world_size``; ``rank`` defaults
    to ``dist.get_rank()``.
    """
    if layout.world_size == 1 and not dist.is_initialized():
        return single_rank_groups(layout)
    if not dist.is_initialized():
        raise RuntimeError("build_groups: torch.distributed is not initialized (use nsa_tp.parallel.launch)")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"layout: needs {layout.world_size} ranks (--tp {layout.tp_size} x {layout.num_replicas} replicas), "
            f"but the job has {world}"
        )
    rank = dist.get_rank() if rank is None else rank
    coords = rank_coords(layout, rank)
    mine: dict[str, object | None] = {}
    # Same creation order on every rank: kind by kind, group by group.
    for kind, lists in group_ranks(layout).items():
        mine[kind] = None
        for ranks in lists:
            if len(ranks) == 1:
                continue  # no group object for a single rank: all ranks skip the same ones
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = g
    return ParallelGroups(
        layout=layout,
        rank=rank,
        replica=coords["replica"],
        tp_rank=coords["tp_rank"],
        attn_tp_rank=coords["attn_tp_rank"],
        attn_dp_rank=coords["attn_dp_rank"],
        tp_group=mine["tp"],
        attn_tp_group=mine["attn_tp"],
        attn_dp_group=mine["attn_dp"],
    )
