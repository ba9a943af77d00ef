"""The ``"triton"`` tier: our own GPU kernels (padding-free sparse MLA, fp8 MQA logits), one file a kernel.

- :mod:`.sparse_mla` — sparse MLA forward, any head count, bf16 or fp8 KV, optional top-k split.
- :mod:`.sparse_mla_decode` — decode over the paged latent cache with a per-batch plan.
- :mod:`.mqa_logits` — fp8 MQA logits over ragged ``[ks, ke)`` key ranges.
- :mod:`.paged_mqa_logits` — fp8 MQA logits over the paged index-K cache.
- :mod:`.topk` — the indexer's top-k transforms (ragged and paged): coarse histogram + radix select, no sort.

``available()`` gives the reason when Triton does not import or no CUDA device is visible (so CPU CI only
sees the reason). The kernel modules are imported on first use, never at tier import time.

Where ``auto`` runs this tier is measured per card and shape class (:mod:`nsa_tp.ops.tuning`, tables in
``nsa_tp/ops/measured/``): only where it beat upstream's kernel (FlashMLA, DeepGEMM, sgl-kernel) by the
tuning margin on that card, or where no upstream kernel can run the inputs (fp8-cache sparse prefill).
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
    if kv.stride(-1) != 1:
        return f"{name}: the last dim must be contiguous (any row stride is fine)"
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
    if q.stride(-1) != 1 or indices.stride(-1) != 1:
        return "q / indices: the last dim must be contiguous (any other stride is fine)"
    return _kv_reason(kv, "kv_cache" if paged else "kv", paged)


def _fwd_supports(q: Any, kv: Any, indices: Any, sm_scale: Any = None, d_v: int = D_LATENT) -> str | None:
    return _mla_reason(q, kv, indices, d_v, paged=False)


def _plan_supports(batch_size: Any, num_heads: Any, topk: Any, *, kv_dtype: Any, device: Any) -> str | None:
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"device: not CUDA ({dev})"
    return None


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


def _topk_supports(logits: Any, topk: Any, *args: Any, **kwargs: Any) -> str | None:
    reason = _device_reason(logits, "logits")
    if reason:
        return reason
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        return "logits: must be [R, W] float32 with unit column stride"
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        return "topk: not a positive int (the reference tier reports it)"
    return None  # no size limit: nothing is sorted or held per K


TIER = Tier(
    name="triton",
    available=available,
    ops={
        "sparse_mla_fwd": OpImpl(_lazy("sparse_mla", "sparse_mla_fwd"), supports=_fwd_supports),
        "plan_sparse_mla_decode": OpImpl(
            _lazy("sparse_mla_decode", "plan_sparse_mla_decode"), supports=_plan_supports
        ),
        "sparse_mla_decode": OpImpl(
            _lazy("sparse_mla_decode", "sparse_mla_decode"), supports=_decode_supports
        ),
        "fp8_mqa_logits": OpImpl(_lazy("mqa_logits", "fp8_mqa_logits"), supports=_logits_supports),
        "fp8_paged_mqa_logits": OpImpl(
            _lazy("paged_mqa_logits", "fp8_paged_mqa_logits"), supports=_paged_logits_supports
        ),
        "topk_transform_ragged": OpImpl(
            _lazy("topk", "topk_transform_ragged"), supports=_topk_supports
        ),
        "topk_transform_paged": OpImpl(_lazy("topk", "topk_transform_paged"), supports=_topk_supports),
    },
)
