"""Per-batch plans that tiers build once and every layer reuses (FlashInfer's plan/run split).

:class:`DecodePlan` is what ``nsa_tp.ops.plan_sparse_mla_decode`` returns: the tier that built it (and so
the tier that must run it), the shapes it was built for, and the tier's private ``data`` (FlashMLA's tile
scheduler metadata; ``None`` for the reference tier).
"""

from __future__ import annotations

import dataclasses

import torch

from nsa_tp.ops.kv_format import D_QK, FP8_BYTES_PER_TOKEN

__all__ = ["DecodePlan", "KV_DTYPES", "normalize_kv_dtype", "kv_cache_dtype_of"]

# The latent cache formats, named as ``nsa_tp.parallel`` names them (``--kv-cache-dtype``).
KV_DTYPES = ("bfloat16", "fp8_e4m3")
_KV_ALIASES: dict[object, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    torch.bfloat16: "bfloat16",
    "fp8_e4m3": "fp8_e4m3",
    "fp8": "fp8_e4m3",
    torch.uint8: "fp8_e4m3",  # the packed 656-byte format is stored as bytes
    torch.float8_e4m3fn: "fp8_e4m3",
}


def normalize_kv_dtype(kv_dtype: object) -> str:
    """``"bfloat16"`` or ``"fp8_e4m3"`` from a name or a torch dtype; anything else is a ValueError."""
    try:
        return _KV_ALIASES[kv_dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"kv_dtype: expected one of {KV_DTYPES} (or torch.bfloat16 / torch.uint8), got {kv_dtype!r}"
        ) from None


def kv_cache_dtype_of(kv_cache: torch.Tensor) -> str:
    """The format of a paged latent cache ``[pages, 64, 1, 576]`` bf16 or ``[pages, 64, 1, 656]`` bytes."""
    if kv_cache.shape[-1] == D_QK and kv_cache.dtype == torch.bfloat16:
        return "bfloat16"
    if kv_cache.shape[-1] == FP8_BYTES_PER_TOKEN and kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        return "fp8_e4m3"
    raise ValueError(
        f"kv_cache: expected [..., {D_QK}] bfloat16 or the fp8 format [..., {FP8_BYTES_PER_TOKEN}] uint8, "
        f"got [..., {kv_cache.shape[-1]}] {str(kv_cache.dtype).replace('torch.', '')}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DecodePlan:
    """A sparse-MLA decode plan, built once per batch by ``plan_sparse_mla_decode``.

    ``tier``: the tier that built it; ``sparse_mla_decode(..., plan=plan)`` runs exactly that tier.
    ``data``: the tier's own per-batch state (opaque to everyone else). Compared by identity.
    """

    tier: str
    batch_size: int
    num_heads: int
    topk: int
    kv_dtype: str
    device: torch.device
    data: object = None
    # Built by backend="auto": a call whose inputs this tier declines (only the call sees the cache, e.g. a
    # strided fp8 cache FlashMLA cannot read) runs on the next tier auto would pick, with a plan of its own.
    by_auto: bool = False

    def check(self, q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor) -> None:
        """Raise ValueError if these inputs are not the batch this plan was built for."""
        want = (self.batch_size, self.num_heads)
        if tuple(q.shape[:2]) != want:
            raise ValueError(f"q: the plan was built for [batch, heads] = {list(want)}, got {list(q.shape[:2])}")
        if indices.shape[-1] != self.topk:
            raise ValueError(f"indices: the plan was built for topk {self.topk}, got {indices.shape[-1]}")
        kind = kv_cache_dtype_of(kv_cache)
        if kind != self.kv_dtype:
            raise ValueError(f"kv_cache: the plan was built for a {self.kv_dtype} cache, got {kind}")
        if q.device.type != self.device.type or (self.device.index is not None and q.device.index != self.device.index):
            raise ValueError(f"q: the plan was built for device {self.device}, got {q.device}")
