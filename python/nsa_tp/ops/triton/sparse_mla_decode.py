"""Sparse MLA decode over the paged latent cache, on the Triton sparse-MLA kernel with a top-k split.

Semantics: :func:`nsa_tp.ops.reference.sparse_mla_decode` (sparse MLA on the cache flattened to
``[pages * 64, 1, D]``; indices are global slots ``page * 64 + offset``).

Decode has one query token per request, so ``B * ceil(H / 16)`` programs cannot fill the GPU at small
batch: the plan, built once per batch, splits each request's top-k across programs (flash-decoding) so
that about two waves run, and the split count is fixed for every layer that reuses the plan.
"""

from __future__ import annotations

import dataclasses

import torch

from nsa_tp.ops._contracts import check_decode_args, check_decode_plan_args
from nsa_tp.ops.plan import DecodePlan
from nsa_tp.ops.triton._common import num_sms
from nsa_tp.ops.triton.sparse_mla import SparseMLAConfig, choose_num_splits, default_config, sparse_mla_fwd_split

__all__ = ["TritonDecodeData", "plan_sparse_mla_decode", "sparse_mla_decode"]


@dataclasses.dataclass(frozen=True)
class TritonDecodeData:
    """The Triton tier's per-batch decode strategy: top-k splits and the launch config."""

    num_splits: int
    config: SparseMLAConfig


def plan_sparse_mla_decode(
    batch_size: int,
    num_heads: int,
    topk: int,
    *,
    kv_dtype: object,
    device: torch.device | str,
) -> DecodePlan:
    """A :class:`DecodePlan` with ``tier="triton"``; ``data`` is a :class:`TritonDecodeData`."""
    kind, dev = check_decode_plan_args(batch_size, num_heads, topk, kv_dtype, device)
    cfg = default_config(num_heads, kind == "fp8_e4m3")
    splits = choose_num_splits(batch_size, num_heads, topk, cfg, num_sms(dev))
    return DecodePlan(
        tier="triton",
        batch_size=batch_size,
        num_heads=num_heads,
        topk=topk,
        kv_dtype=kind,
        device=dev,
        data=TritonDecodeData(num_splits=splits, config=cfg),
    )


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    *,
    plan: DecodePlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, 512] bfloat16, lse [B, H] float32)``.

    Args:
        q: ``[B, H, 576]`` bfloat16, one query token per request.
        kv_cache: ``[pages, 64, 1, 576]`` bfloat16 or ``[pages, 64, 1, 656]`` uint8 (fp8 format), last dim
            contiguous; a padded token stride is read in place, pages not spaced 64 tokens apart are copied.
        indices: ``[B, 1, K]`` int32 global slots; any id ``< 0`` or ``>= pages * 64`` means "no token".
        sm_scale: softmax scale; d_v: must be 512.
        plan: from :func:`plan_sparse_mla_decode` (checked against the inputs); ``None`` plans here.

    An empty row gives out = 0, lse = -inf. Semantics: :func:`nsa_tp.ops.reference.sparse_mla_decode`.
    """
    kind = check_decode_args(q, kv_cache, indices)
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache: expected the last dim contiguous")
    if plan is None:
        plan = plan_sparse_mla_decode(q.shape[0], q.shape[1], indices.shape[-1], kv_dtype=kind, device=q.device)
    elif not isinstance(plan, DecodePlan) or plan.tier != "triton":
        raise ValueError(f"plan: expected a DecodePlan built by tier 'triton', got {getattr(plan, 'tier', plan)!r}")
    plan.check(q, kv_cache, indices)
    if d_v != 512:
        raise ValueError(f"d_v: the Triton kernel supports d_v=512, got {d_v}")
    data: TritonDecodeData = plan.data
    # [pages, 64, 1, D] -> [N, 1, D], slot = page * 64 + offset. A view for any token stride whose pages are
    # evenly spaced (page stride = 64 x token stride); pages spaced otherwise are copied into slots once.
    flat = kv_cache.flatten(0, 1)
    out, _max_logits, lse = sparse_mla_fwd_split(q, flat, indices, sm_scale, data.num_splits, data.config)
    return out, lse
