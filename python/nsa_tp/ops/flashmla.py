"""The ``"flashmla"`` tier: DeepSeek's FlashMLA sparse kernels from the optional ``sgl-flash-mla==1.0.0`` wheel.

Ops (contracts and semantics as :mod:`nsa_tp.ops.reference`):

- ``sparse_mla_fwd`` — FlashMLA's sparse prefill kernel, bf16 ``kv [N, 1, 576]``.
- ``plan_sparse_mla_decode`` / ``sparse_mla_decode`` — the paged decode. The fp8 656-byte cache runs
  FlashMLA's sparse fp8 decode kernel, with its tile-scheduler metadata built once per batch in the plan;
  a bf16 cache runs the sparse prefill kernel over the flattened pages (FlashMLA's sparse decode reads
  fp8 only), one query row per request.

What the kernels need, and what this module does about it:

- **Heads**: exactly 64 or 128 per call (64-head tiles on SM90, 128 on SM100+). Any ``H >= 1`` is served:
  q is zero-padded to ``padded_heads(H, multiple)`` by :func:`nsa_tp.ops.heads.pad_heads` (the one padding
  helper, which states the cost), run in calls of at most 128 heads (``H > 128`` pads to the multiple and
  splits), then out / lse / max_logits are trimmed back.
- **Top-k**: read in blocks (64 on SM90, 128 on SM100's 128-head kernel); indices are padded with -1 to a
  multiple of :data:`TOPK_MULTIPLE` = 128, which satisfies both.
- **Invalid ids** (any id ``< 0`` or ``>= N``): the prefill kernel never reads them; the fp8 decode kernel
  skips only exactly ``-1`` and does no bounds check, so decode maps every id outside ``[0, num_slots)`` to
  -1 first. Either way a NaN in a slot no valid id names never reaches the outputs.
- **Strides**: the last dim contiguous and rows 16-byte aligned; otherwise (a padded row stride, q sliced
  from a wider buffer, strided indices) passed as given, no copy. Copies: q when its heads are padded, the
  indices when K is padded, and a bf16 paged cache whose pages are not evenly spaced (flattened to slots).
- **Empty rows**: FlashMLA reports ``lse = +inf`` for a query with no valid key (so that merging partial
  results ignores it); our contract is ``-inf`` (and ``max_logits = -inf``, ``out = 0``), converted here.
- **The 576-dim V3.2 format** lives in the wheel's legacy kernel set (``use_legacy=True``) on both SM90 and
  SM100; the current set is DeepSeek-V4's 512-dim formats only.
- The fp8 cache cannot be prefilled here: the sparse prefill kernel reads bf16 only, and the fp8 decode
  kernel returns no ``max_logits``. ``supports()`` says so and ``auto`` moves on to the next tier.

Every device fact comes from :func:`nsa_tp.ops.capability.get_capability` (cached), never from a query
in the forward path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from nsa_tp.ops._contracts import positive_ints_error
from nsa_tp.ops.capability import Capability, get_capability, import_error
from nsa_tp.ops.heads import pad_heads, pad_topk, padded_heads, trim_heads
from nsa_tp.ops.kv_format import D_LATENT, D_QK, FP8_BYTES_PER_TOKEN, LATENT_PAGE_SIZE, is_fp8_kv
from nsa_tp.ops.plan import DecodePlan, kv_cache_dtype_of, normalize_kv_dtype
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = [
    "TIER",
    "TOPK_MULTIPLE",
    "MAX_HEADS_PER_CALL",
    "FlashMLADecodeData",
    "sparse_mla_fwd",
    "plan_sparse_mla_decode",
    "sparse_mla_decode",
]

_PACKAGE = "flash_mla"
# Top-k block the kernels read: 64 (SM90 kernels, SM100 64-head kernel) or 128 (SM100 128-head kernel).
TOPK_MULTIPLE = 128
# The largest h_q any FlashMLA sparse kernel takes in one call.
MAX_HEADS_PER_CALL = 128
_D_V = D_LATENT  # 512: the only value dim the kernels are built for
_SUPPORTED_SM_MAJORS = (9, 10)  # SM90 (Hopper: sm_90a) and the SM100 family (sm_100 / sm_103)
_KV_FORMAT = "V32"  # the wheel's name for DeepSeek-V3.2's 656-byte fp8 cache format


# ----------------------------------------------------------------------------------------------------------
# Availability (probed once per process) and the kernels' module


@functools.cache
def _available() -> str | None:
    """Why this tier cannot run in this process (None if it can). Cached; the registry asks once too."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible (FlashMLA runs on CUDA only)"
    err = import_error(_PACKAGE)
    if err:
        return f"{err} (install the optional extra: pip install 'nsa-tp[flashmla]', i.e. sgl-flash-mla==1.0.0)"
    module = importlib.import_module(_PACKAGE)
    has_legacy = getattr(module, "has_legacy", None)
    if has_legacy is None:
        version = getattr(module, "__version__", "?")
        return f"flash_mla {version} lacks the use_legacy interface this tier is written for; pin sgl-flash-mla==1.0.0"
    if not has_legacy():
        return "this flash_mla build has no legacy kernels (SM90 and the 576-dim V3.2 format live there)"
    return None


def _flash_mla() -> ModuleType:
    return importlib.import_module(_PACKAGE)  # already imported by _available(); a dict lookup


# ----------------------------------------------------------------------------------------------------------
# supports(): precise reasons, computed from shapes, dtypes and the cached capability only


def _device_reason(cap: Capability) -> str | None:
    if not cap.is_cuda:
        return f"inputs are on {cap.device}; FlashMLA runs on CUDA only"
    if cap.sm_major not in _SUPPORTED_SM_MAJORS:
        return f"{cap.name} is {cap.sm_label}; FlashMLA's sparse kernels need SM90 or SM100"
    return None


def _fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _q_reason(q: Any, name: str) -> str | None:
    if not isinstance(q, torch.Tensor):
        return f"{name}: expected a torch.Tensor, got {type(q).__name__}"
    if q.dim() != 3:
        return f"{name}: expected [T, H, {D_QK}], got shape {tuple(q.shape)}"
    if q.shape[-1] != D_QK:
        return f"{name}: d_qk is {q.shape[-1]}; FlashMLA's V3.2 kernels take d_qk = {D_QK} (512 latent + 64 rope)"
    if q.shape[1] < 1:
        return f"{name}: expected at least one head, got shape {tuple(q.shape)}"
    if q.dtype != torch.bfloat16:
        return f"{name}: dtype {_fmt_dtype(q.dtype)}; FlashMLA takes bfloat16 queries"
    return None


def _indices_reason(indices: Any, rows: int) -> str | None:
    if not isinstance(indices, torch.Tensor):
        return f"indices: expected a torch.Tensor, got {type(indices).__name__}"
    if indices.dim() != 3 or indices.shape[0] != rows or indices.shape[1] != 1 or indices.shape[2] < 1:
        return f"indices: expected [{rows}, 1, K] with K >= 1, got {tuple(indices.shape)}"
    if indices.dtype != torch.int32:
        return f"indices: dtype {_fmt_dtype(indices.dtype)}; FlashMLA takes int32 ids"
    return None


def _strides_reason(**tensors: torch.Tensor) -> str | None:
    """FlashMLA takes strided tensors (a padded row stride, q sliced from a wider buffer) as long as the last
    dim is contiguous and every other stride keeps rows 16-byte aligned (its TMA and cp.async copies)."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            return f"{name}: the last dim must be contiguous, got strides {tuple(t.stride())}"
        align = 16 // t.element_size()
        if any(st % align for st, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1):
            return f"{name}: strides {tuple(t.stride())} leave rows not 16-byte aligned (FlashMLA's copies need it)"
    return None


def _same_device_reason(q: torch.Tensor, **others: torch.Tensor) -> str | None:
    for name, t in others.items():
        if t.device != q.device:
            return f"{name} is on {t.device} but q is on {q.device}"
    return None


def _fwd_supports(q: Any, kv: Any, indices: Any, sm_scale: Any = None, d_v: int = _D_V) -> str | None:
    reason = _q_reason(q, "q")
    if reason:
        return reason
    reason = _device_reason(get_capability(q.device))
    if reason:
        return reason
    if not isinstance(kv, torch.Tensor):
        return f"kv: expected a torch.Tensor, got {type(kv).__name__}"
    if is_fp8_kv(kv):
        return (
            f"kv is the fp8 {FP8_BYTES_PER_TOKEN}-byte format; FlashMLA's sparse prefill reads bfloat16 only and "
            "its fp8 decode kernel returns no max_logits (use sparse_mla_decode, or another tier)"
        )
    if kv.dim() != 3 or kv.shape[1] != 1 or kv.shape[2] != D_QK:
        return f"kv: expected [N, 1, {D_QK}], got {tuple(kv.shape)}"
    if kv.dtype != torch.bfloat16:
        return f"kv: dtype {_fmt_dtype(kv.dtype)}; FlashMLA's sparse prefill reads bfloat16"
    reason = _strides_reason(q=q, kv=kv)
    if reason:
        return reason
    reason = _indices_reason(indices, q.shape[0]) or _same_device_reason(q, kv=kv, indices=indices)
    if reason:
        return reason
    if d_v != _D_V:
        return f"d_v is {d_v}; FlashMLA's sparse kernels are built for d_v = {_D_V}"
    return None


def _plan_supports(
    batch_size: Any, num_heads: Any, topk: Any, *, kv_dtype: Any = None, device: Any = None
) -> str | None:
    error = positive_ints_error(batch_size=batch_size, num_heads=num_heads, topk=topk)
    if error:
        return error
    try:
        normalize_kv_dtype(kv_dtype)
        dev = torch.device(device) if device is not None else None
    except (ValueError, RuntimeError, TypeError) as e:
        return str(e)
    if dev is None:
        return "device: a decode plan needs the device the batch runs on"
    return _device_reason(get_capability(dev))


def _decode_supports(
    q: Any, kv_cache: Any, indices: Any, sm_scale: Any = None, d_v: int = _D_V, *, plan: Any = None
) -> str | None:
    if not isinstance(plan, DecodePlan) or plan.tier != "flashmla":
        got = plan.tier if isinstance(plan, DecodePlan) else type(plan).__name__
        return f"plan: FlashMLA decode runs a plan from plan_sparse_mla_decode(backend='flashmla'), got {got}"
    reason = _q_reason(q, "q")
    if reason:
        return reason
    reason = _device_reason(get_capability(q.device))
    if reason:
        return reason
    if not isinstance(kv_cache, torch.Tensor):
        return f"kv_cache: expected a torch.Tensor, got {type(kv_cache).__name__}"
    if kv_cache.dim() != 4 or kv_cache.shape[1] != LATENT_PAGE_SIZE or kv_cache.shape[2] != 1:
        want = f"[num_pages, {LATENT_PAGE_SIZE}, 1, {D_QK} | {FP8_BYTES_PER_TOKEN}]"
        return f"kv_cache: expected {want}, got {tuple(kv_cache.shape)}"
    try:
        kv_cache_dtype_of(kv_cache)
    except ValueError as e:
        return str(e)
    reason = _strides_reason(q=q, kv_cache=kv_cache)
    if reason:
        return reason
    if is_fp8_kv(kv_cache) and not kv_cache.is_contiguous():
        # Measured on an H100 (sgl-flash-mla 1.0.0, 2026-12-06): its fp8 decode raises "The whole block must be
        # contiguous when is_fp8_cache is True for kv cache" on a padded page stride; decline, don't crash.
        return f"kv_cache: FlashMLA's fp8 decode needs a contiguous cache, got strides {tuple(kv_cache.stride())}"
    reason = _indices_reason(indices, q.shape[0]) or _same_device_reason(q, kv_cache=kv_cache, indices=indices)
    if reason:
        return reason
    if d_v != _D_V:
        return f"d_v is {d_v}; FlashMLA's sparse kernels are built for d_v = {_D_V}"
    try:
        plan.check(q, kv_cache, indices)
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------
# Shared glue: head chunks and the stats convention


def _head_chunks(total: int) -> list[tuple[int, int]]:
    """``(start, count)`` calls covering ``total`` padded heads, at most 128 heads each.

    ``total`` is a multiple of the kernel's head multiple (64 or 128), so every chunk is 64 or 128 heads.
    """
    return [(h0, min(MAX_HEADS_PER_CALL, total - h0)) for h0 in range(0, total, MAX_HEADS_PER_CALL)]


def _empty_rows_to_contract(lse: torch.Tensor, max_logits: torch.Tensor | None = None):
    """FlashMLA marks a query with no valid key by ``lse = +inf``; our contract says ``-inf`` (both stats).

    A finite score can never give ``lse = +inf``, so ``+inf`` identifies exactly the empty rows.
    """
    empty = torch.isposinf(lse)
    lse = lse.masked_fill(empty, float("-inf"))
    if max_logits is None:
        return lse
    return lse, max_logits.masked_fill(empty, float("-inf"))


def _prefill_kernel(
    q_p: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill over padded heads ``q_p [T, Hp, 576]`` -> ``(out, max_logits, lse)``, Hp heads."""
    fwd = _flash_mla().flash_mla_sparse_fwd
    parts = []
    for h0, n in _head_chunks(q_p.shape[1]):
        q_c = q_p if n == q_p.shape[1] else q_p.narrow(1, h0, n).contiguous()
        # use_legacy: the 576-dim V3.2 kernels; return_log2_lse=None asks for natural-log stats.
        parts.append(fwd(q_c, kv, indices, sm_scale, _D_V, use_legacy=True))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# sparse_mla_fwd


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = _D_V,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill on FlashMLA for any head count; semantics: :func:`nsa_tp.ops.reference.sparse_mla_fwd`.

    Args:
        q: ``[T, H, 576]`` bfloat16 on an SM90 / SM100 GPU, any ``H >= 1``.
        kv: ``[N, 1, 576]`` bfloat16, last dim contiguous, rows 16-byte aligned (a padded row stride is
            read in place).
        indices: ``[T, 1, K]`` int32; any id ``< 0`` or ``>= N`` means "no token" (FlashMLA's prefill kernel
            never reads such a slot). Copied once, padded with -1, when K is not a multiple of 128.
        sm_scale: softmax scale of ``q . k``.
        d_v: 512.

    Returns:
        ``out [T, H, 512]`` bfloat16, ``max_logits [T, H]`` float32, ``lse [T, H]`` float32 (natural log);
        a row with no valid id gives out = 0 and lse = max_logits = -inf.
    """
    T, H, _ = q.shape
    N = kv.shape[0]
    if T == 0 or N == 0:
        # Nothing to attend (or no query): every row is empty. The kernel's TMA descriptors reject 0-sized dims.
        out = q.new_zeros(T, H, _D_V)
        empty = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
        return out, empty, empty.clone()
    multiple = get_capability(q.device).flashmla_head_multiple
    q_p, real_h = pad_heads(q, multiple)
    out, max_logits, lse = _prefill_kernel(q_p, kv, pad_topk(indices, TOPK_MULTIPLE), sm_scale)
    lse, max_logits = _empty_rows_to_contract(trim_heads(lse, real_h), trim_heads(max_logits, real_h))
    return trim_heads(out, real_h), max_logits, lse


# ----------------------------------------------------------------------------------------------------------
# Decode: plan once per batch, run once per layer


@dataclasses.dataclass(frozen=True, eq=False)
class FlashMLADecodeData:
    """FlashMLA's per-batch decode state (``DecodePlan.data``).

    ``kernel``: ``"sparse_decode"`` (fp8 cache) or ``"sparse_prefill"`` (bf16 cache, flattened pages).
    ``sched``: for the fp8 kernel, heads-per-call -> the wheel's ``FlashMLASchedMeta`` holding the tile
    scheduler metadata and split counts, computed here once and reused by every layer of the batch.
    """

    kernel: str
    padded_heads: int
    padded_topk: int
    sched: Mapping[int, Any]


def plan_sparse_mla_decode(
    batch_size: int,
    num_heads: int,
    topk: int,
    *,
    kv_dtype: object,
    device: torch.device | str,
) -> DecodePlan:
    """Build FlashMLA's decode plan for one batch: padded head / top-k counts and, for the fp8 cache, the
    kernel's tile-scheduler metadata (one device call per distinct heads-per-call, here, not per layer).

    The scheduler balances the batch's work over the SMs; with sparse attention every request attends to
    exactly ``padded_topk`` slots, so that is the per-request length it is given.
    """
    kind = normalize_kv_dtype(kv_dtype)
    cap = get_capability(device)
    dev = cap.device
    hp = padded_heads(num_heads, cap.flashmla_head_multiple)
    kp = -(-topk // TOPK_MULTIPLE) * TOPK_MULTIPLE
    sched: dict[int, Any] = {}
    if kind == "fp8_e4m3":
        fm = _flash_mla()
        seqlens = torch.full((batch_size,), kp, dtype=torch.int32, device=dev)
        for _, n in _head_chunks(hp):
            if n in sched:
                continue
            # num_q_tokens_per_head_k = s_q * h_q / h_kv = n: one query token per request, one latent head.
            tile_meta, num_splits = fm.get_mla_decoding_metadata(
                seqlens, n, 1, n, is_fp8_kvcache=True, topk=kp, use_legacy=True
            )
            meta, _ = fm.get_mla_metadata()
            meta.tile_scheduler_metadata = tile_meta
            meta.num_splits = num_splits
            sched[n] = meta
    data = FlashMLADecodeData(
        kernel="sparse_decode" if kind == "fp8_e4m3" else "sparse_prefill",
        padded_heads=hp,
        padded_topk=kp,
        sched=sched,
    )
    return DecodePlan(
        tier="flashmla", batch_size=batch_size, num_heads=num_heads, topk=topk, kv_dtype=kind, device=dev, data=data
    )


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = _D_V,
    *,
    plan: DecodePlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode on FlashMLA; semantics: :func:`nsa_tp.ops.reference.sparse_mla_decode`.

    Args:
        q: ``[B, H, 576]`` bfloat16, one query token per request (B and H as planned).
        kv_cache: ``[num_pages, 64, 1, 576]`` bfloat16 or ``[num_pages, 64, 1, 656]`` uint8 (fp8 format).
        indices: ``[B, 1, K]`` int32 global slots ``page * 64 + offset``; any id ``< 0`` or
            ``>= num_pages * 64`` means "no token" (DP padding rows are all -1). The fp8 kernel skips only
            exactly -1, so the ids are mapped (a copy of ``[B, K]`` ids, per call) before it runs.
        plan: from :func:`plan_sparse_mla_decode` for this batch.

    Returns:
        ``out [B, H, 512]`` bfloat16, ``lse [B, H]`` float32 (natural log); empty rows: out = 0, lse = -inf.
    """
    data: FlashMLADecodeData = plan.data  # type: ignore[assignment]
    B, H, _ = q.shape
    q_p, real_h = pad_heads(q, get_capability(q.device).flashmla_head_multiple)
    idx = pad_topk(indices, TOPK_MULTIPLE)
    if data.kernel == "sparse_prefill":
        # [pages, 64, 1, 576] -> [pages * 64, 1, 576]: global slot ids index this flat view directly.
        out, _, lse = _prefill_kernel(q_p, kv_cache.flatten(0, 1), idx, sm_scale)
        return trim_heads(out, real_h), _empty_rows_to_contract(trim_heads(lse, real_h))

    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    # The fp8 decode kernel skips only exactly -1 and does no bounds check: map every other invalid id to -1.
    idx = torch.where((idx >= 0) & (idx < num_slots), idx, -1)
    fm = _flash_mla()
    outs, lses = [], []
    for h0, n in _head_chunks(q_p.shape[1]):
        q_c = q_p if n == q_p.shape[1] else q_p.narrow(1, h0, n).contiguous()
        # [B, n, 576] -> [B, s_q = 1, n, 576]: the kernel's batched layout.
        out_c, lse_c = fm.flash_mla_with_kvcache(
            q_c.unsqueeze(1), kv_cache, None, None, _D_V, data.sched[n],
            softmax_scale=sm_scale, is_fp8_kvcache=True, indices=idx, use_legacy=True, kv_format=_KV_FORMAT,
        )
        outs.append(out_c.reshape(B, n, _D_V))  # [B, 1, n, 512] -> [B, n, 512]
        lses.append(lse_c.reshape(B, n))  # [B, n, s_q = 1] -> [B, n]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    return trim_heads(out, real_h), _empty_rows_to_contract(trim_heads(lse, real_h))


# Where it runs under "auto": nsa_tp.ops.tuning (first, unless another tier measured faster on this card).
TIER = Tier(
    name="flashmla",
    available=_available,
    ops={
        "sparse_mla_fwd": OpImpl(sparse_mla_fwd, supports=_fwd_supports),
        "plan_sparse_mla_decode": OpImpl(plan_sparse_mla_decode, supports=_plan_supports),
        "sparse_mla_decode": OpImpl(sparse_mla_decode, supports=_decode_supports),
    },
)
