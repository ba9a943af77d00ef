"""The ``"triton"`` tier: our own GPU kernels (padding-free sparse MLA, fp8 MQA logits), one file a kernel.

- :mod:`.sparse_mla` — sparse MLA forward, any head count, bf16 or fp8 KV, optional top-k split.
- :mod:`.sparse_mla_decode` — decode over the paged latent cache with a per-batch plan.
- :mod:`.mqa_logits` — fp8 MQA logits over ragged ``[ks, ke)`` key ranges.
- :mod:`.paged_mqa_logits` — fp8 MQA logits over the paged index-K cache.
- :mod:`.topk` — the indexer's top-k transforms (ragged and paged): coarse histogram + radix select, no sort.

``available()`` gives the reason when Triton does not import or no CUDA device is visible (so CPU CI only
sees the reason). The kernel modules are imported on first use, never at tier import time.

``auto`` ranking (lower runs first; FlashMLA ranks 0, the reference 1e9): sparse MLA prefill and decode
prefer this tier where it measured faster than FlashMLA on the same card in the same run (the tables
below), FlashMLA elsewhere; the logits ops have no other GPU tier. fp8-cache prefill has no FlashMLA kernel,
so it runs here whatever the rank. The top-k transforms are preferred over the widths where they measured
faster than the reference's stable sort (table at ``_TOPK_FASTER_WIDTHS``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.ops.kv_format import D_LATENT, D_QK, FP8_BYTES_PER_TOKEN
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = ["TIER", "available"]

# Measured crossovers vs FlashMLA (rank 0), H100 80GB HBM3, 2026-11-27, Triton 3.6.0 vs sgl-flash-mla 1.0.0
# (legacy SM90 kernels through our FlashMLA tier, which pads heads to 64), same run, median of CUDA events;
# benchmark/results/kernels_nvidia-h100-80gb-hbm3_20261127.json, table in docs/kernels.md.
# Prefill, bf16 KV, T=4096, N=32768, K=2048, heads per rank -> Triton faster?
#   16: 2.137 ms vs 2.166 ms (tier) -> yes, by 1.3% (a tie within run-to-run noise; the kernel alone, q
#       pre-padded, took 2.087 ms). 32: 4.12 vs 2.30 -> no. 64: 4.68 vs 2.16 -> no. 128: 9.16 vs 4.91 -> no.
_MEASURED_FASTER: dict[int, bool] = {16: True, 32: False, 64: False, 128: False}
# Decode, fp8 cache, 32K context, K=2048, 16 heads: batch 1 0.201 vs 0.298 ms, batch 64 0.165 vs 0.231 ms ->
# yes. Other head counts were not measured: FlashMLA keeps them.
_MEASURED_DECODE_FASTER: dict[int, bool] = {16: True}
_PREFER, _DEFER = -1.0, 1.0  # FlashMLA ranks 0


@functools.cache
def available() -> str | None:
    """Why this tier cannot run here (None if it can). Probed once per process."""
    try:
        importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"cannot import triton: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """The kernel module is imported on the first call (it needs Triton, which CPU machines may lack)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"nsa_tp.ops.triton.{module}"), name)(*args, **kwargs)

    call.__name__ = name
    call.__qualname__ = f"{module}.{name}"
    return call


@functools.cache
def _sm(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_reason(t: Any, name: str, min_sm: tuple[int, int] = (8, 0)) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name}: expected a tensor"
    if t.device.type != "cuda":
        return f"{name}: not on CUDA ({t.device})"
    sm = _sm(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if sm < min_sm:
        return f"needs SM{min_sm[0]}{min_sm[1]}+, this GPU is SM{sm[0]}{sm[1]}"
    return None


def _kv_reason(kv: Any, name: str, paged: bool) -> str | None:
    lead = 3 if paged else 2  # [pages, 64, 1, D] or [N, 1, D]
    if not isinstance(kv, torch.Tensor) or kv.dim() != lead + 1 or kv.shape[-2] != 1:
        return f"{name}: expected {'[pages, 64, 1, D]' if paged else '[N, 1, D]'}"
    if paged and kv.shape[1] != 64:
        return f"{name}: page size must be 64, got {kv.shape[1]}"
    fp8 = kv.shape[-1] == FP8_BYTES_PER_TOKEN and kv.dtype in (torch.uint8, torch.float8_e4m3fn)
    if not fp8 and not (kv.shape[-1] == D_QK and kv.dtype == torch.bfloat16):
        return f"{name}: expected bf16 [..., {D_QK}] or the fp8 format uint8 [..., {FP8_BYTES_PER_TOKEN}]"
    if not kv.is_contiguous():
        return f"{name}: must be contiguous"
    return _device_reason(kv, name, (8, 9) if fp8 else (8, 0))


def _mla_reason(q: Any, kv: Any, indices: Any, d_v: int, paged: bool) -> str | None:
    reason = _device_reason(q, "q")
    if reason:
        return reason
    if q.dtype != torch.bfloat16 or q.dim() != 3:
        return "q: must be [T, H, 576] bfloat16"
    if q.shape[-1] != D_QK:
        return f"d_qk must be {D_QK}, got {q.shape[-1]}"
    if d_v != D_LATENT:
        return f"d_v must be {D_LATENT}, got {d_v}"
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 3:
        return "indices: must be [T, 1, K] int32"
    return _kv_reason(kv, "kv_cache" if paged else "kv", paged)


def _fwd_supports(q: Any, kv: Any, indices: Any, sm_scale: Any = None, d_v: int = D_LATENT) -> str | None:
    return _mla_reason(q, kv, indices, d_v, paged=False)


def _faster_than_flashmla(heads: int, table: dict[int, bool] = _MEASURED_FASTER) -> bool:
    """The measured verdict for ``heads``, or for the nearest measured count above it that FlashMLA pads to
    the same multiple of 64 (Triton's time only grows with the heads, FlashMLA's is flat within a multiple).
    """
    padded = 64 * -(-heads // 64)
    above = [h for h in table if heads <= h <= padded]
    return table[min(above)] if above else False


def _fwd_rank(q: torch.Tensor, *_args: Any, **_kwargs: Any) -> float:
    return _PREFER if _faster_than_flashmla(q.shape[1]) else _DEFER


def _plan_supports(batch_size: Any, num_heads: Any, topk: Any, *, kv_dtype: Any, device: Any) -> str | None:
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"device: not CUDA ({dev})"
    return None


def _plan_rank(batch_size: int, num_heads: int, *_args: Any, **_kwargs: Any) -> float:
    return _PREFER if _faster_than_flashmla(num_heads, _MEASURED_DECODE_FASTER) else _DEFER


def _decode_rank(q: torch.Tensor, *_args: Any, **_kwargs: Any) -> float:
    return _PREFER if _faster_than_flashmla(q.shape[1], _MEASURED_DECODE_FASTER) else _DEFER


def _decode_supports(q: Any, kv_cache: Any, indices: Any, sm_scale: Any = None, d_v: int = D_LATENT, *,
                     plan: Any = None) -> str | None:
    tier = getattr(plan, "tier", "triton")
    if plan is not None and tier != "triton":
        return f"the plan was built by tier {tier!r}"
    return _mla_reason(q, kv_cache, indices, d_v, paged=True)


def _logits_supports(q: Any, kv: Any, weights: Any, ks: Any, ke: Any) -> str | None:
    reason = _device_reason(q, "q", (8, 9))  # fp8 tensor cores: Ada / Hopper and newer
    if reason:
        return reason
    if q.dtype != torch.float8_e4m3fn or q.dim() != 3:
        return "q: must be [T, H, D] float8_e4m3fn"
    H, D = q.shape[1], q.shape[2]
    if D not in (32, 64, 128, 256):
        return f"index head dim must be 32, 64, 128 or 256, got {D}"
    if H > 128:
        return f"at most 128 index heads, got {H}"
    return None


def _paged_logits_supports(q: Any, index_k_cache: Any, weights: Any, seq_lens: Any, page_table: Any,
                           max_seq_len: Any) -> str | None:
    reason = _device_reason(q, "q", (8, 9))
    if reason:
        return reason
    if q.dtype != torch.float8_e4m3fn or q.dim() != 3 or q.shape[2] != 128:
        return "q: must be [B, H, 128] float8_e4m3fn"
    if q.shape[1] > 128:
        return f"at most 128 index heads, got {q.shape[1]}"
    return None


# Top-k transforms vs the reference tier's stable sort (rank 1e9), H100 80GB HBM3, 2026-11-27, Triton 3.6.0,
# torch 2.11, K=2048, causal rows, same run, median of CUDA events; identical ids in every case;
# benchmark/results/topk_triton_NVIDIA_H100_80GB_HBM3_20261127.json. Sort ms vs Triton ms:
#   R=4096: W=2048 1.04 vs 1.27 (slower), W=8192 4.13 vs 1.46, W=32768 14.91 vs 2.71, W=131072 70.5 vs 9.21.
#   R=64:   W=2048 0.76 vs 0.11, W=8192 0.89 vs 0.12, W=32768 0.90 vs 0.23, W=131072 1.27 vs 0.78.
# Preferred over the widths where it was faster at both row counts; the reference keeps the rest. (Measured
# with the earlier radix-select + sort kernel; the sort-free rewrite needs `bench_topk.py --reference` to move
# the window.)
_TOPK_FASTER_WIDTHS = (8192, 131072)


def _topk_supports(logits: Any, topk: Any, *args: Any, **kwargs: Any) -> str | None:
    reason = _device_reason(logits, "logits")
    if reason:
        return reason
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        return "logits: must be [R, W] float32 with unit column stride"
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        return "topk: not a positive int (the reference tier reports it)"
    return None  # no size limit: nothing is sorted or held per K


def _topk_rank(logits: torch.Tensor, *_args: Any, **_kwargs: Any) -> float:
    lo, hi = _TOPK_FASTER_WIDTHS
    return 0.0 if lo <= logits.shape[1] <= hi else 2e9  # the reference ranks 1e9


def _first(*_args: Any, **_kwargs: Any) -> float:
    return 0.0  # no other GPU tier implements the indexer logits


TIER = Tier(
    name="triton",
    available=available,
    ops={
        "sparse_mla_fwd": OpImpl(_lazy("sparse_mla", "sparse_mla_fwd"), supports=_fwd_supports, rank=_fwd_rank),
        "plan_sparse_mla_decode": OpImpl(
            _lazy("sparse_mla_decode", "plan_sparse_mla_decode"), supports=_plan_supports, rank=_plan_rank
        ),
        "sparse_mla_decode": OpImpl(
            _lazy("sparse_mla_decode", "sparse_mla_decode"), supports=_decode_supports, rank=_decode_rank
        ),
        "fp8_mqa_logits": OpImpl(_lazy("mqa_logits", "fp8_mqa_logits"), supports=_logits_supports, rank=_first),
        "fp8_paged_mqa_logits": OpImpl(
            _lazy("paged_mqa_logits", "fp8_paged_mqa_logits"), supports=_paged_logits_supports, rank=_first
        ),
        "topk_transform_ragged": OpImpl(
            _lazy("topk", "topk_transform_ragged"), supports=_topk_supports, rank=_topk_rank
        ),
        "topk_transform_paged": OpImpl(_lazy("topk", "topk_transform_paged"), supports=_topk_supports, rank=_topk_rank),
    },
)
