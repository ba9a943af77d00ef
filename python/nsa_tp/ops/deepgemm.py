"""The ``"deep_gemm"`` tier: upstream's production indexer-logits kernels from the optional ``sgl-deep-gemm`` wheel.

Written against ``sgl-deep-gemm==0.1.5.post1`` (with ``apache-tvm-ffi==0.1.11``), the build SGLang 0.5.17 runs.
Ops (contracts and semantics as :mod:`nsa_tp.ops.reference`):

- ``fp8_mqa_logits`` — DeepGEMM's ``fp8_mqa_logits`` (ragged ``[ks, ke)`` key ranges, prefill).
- ``fp8_paged_mqa_logits`` — DeepGEMM's ``fp8_paged_mqa_logits`` over the index-K cache (decode), with the
  kernel's SM schedule from ``get_paged_mqa_logits_metadata``.

What the kernels need, and what this module does about it (read from the wheel's headers and host asserts):

- **Heads**: on SM90 both kernels take 32 or 64 index heads (``128 % H == 0``; SM100 also 8 and 16). q and
  weights are zero-padded to 32 (``H <= 32``) or 64 (``H <= 64``) heads, as SGLang does; a zero head adds
  ``relu(0) * 0 = 0``, so the result is unchanged. The cost is compute only: the ragged kernel is
  tensor-core bound, so H=16 costs what H=32 does (2x); the paged kernel is bound by reading the cache and
  barely notices. V3.2's indexer has 64 heads on every rank, so the model never pads. ``H > 64`` is rejected.
- **Head dim**: ragged 32, 64 or 128; paged 128 (what the index-K cache holds).
- **Cache layout**: our index-K page ``[8448]`` bytes (64 tokens x 128 e4m3, then 64 float32 scales) *is*
  DeepGEMM's fused paged layout; it is passed as the view ``[P, 64, 1, 132]``. No conversion, no copy.
- **Scale order**: the kernels apply ``k_scale`` after the relu and the weighted head sum
  (``scale * sum_h relu(q.k) w_h``); that equals the contract's ``sum_h relu(q.k * scale) w_h`` because
  dequantization scales are ``>= 0`` (amax / 448). A negative ``k_scale`` is outside this tier's domain.
- **-inf outside the ranges (ragged)**: ``clean_logits=True``: DeepGEMM's clean kernel writes ``-inf`` at every
  column ``< N`` outside ``[ks, ke)`` (without it the row holds whole-block products and uninitialized
  memory). ks / ke are first clamped to ``0 <= ks <= ke <= N``: the kernel reads them as unsigned and its
  block schedule assumes ``ks <= ke`` (a block of rows with ``ke < ks`` underflows the range). The clamp is
  the contract's own meaning of out-of-range bounds, so results are unchanged.
- **-inf past seq_len (paged)**: the 0.1.5 wheel takes only 2-D context lengths ``[B, next_n]`` and then
  asserts ``clean_logits=False``; the kernel writes whole 256-token splits (columns past ``seq_lens[b]``
  hold products with whatever the pages contain) and leaves the rest of the padded row uninitialized. One
  in-place ``masked_fill_`` over ``[B, max_seq_len]`` makes it exact (a few us at decode sizes).
  ``seq_lens`` is clamped to ``[0, max_seq_len]`` first: the kernel writes up to the next multiple of 256
  of each length, so a length above ``max_seq_len`` would write past the buffer (valid input is unchanged).
- **Output layout**: both kernels return a view into a padded buffer (row stride aligned to 64 / 256
  columns; unit column stride), handed on as is: every top-k tier reads rows through their stride.
- **Alignment**: TMA descriptors need 16-byte aligned base addresses; an operand that is not (a ``k_scale``
  slice starting at a row that is not a multiple of 4, as the chunked indexer's windows can be) is copied.
- **Schedule**: ``get_paged_mqa_logits_metadata(context_lens, 64, deep_gemm.get_num_sms())`` per call (one tiny
  launch; the SM count must be the one the kernel reads, so it is asked from DeepGEMM, not the device).
- Empty problems (``T``, ``N``, ``B`` or ``max_seq_len`` 0) return without a launch: TMA descriptors reject
  0-sized dims.

The wheel is imported on first use (lazily), never at tier import time; ``available()`` gives the reason
it cannot run here.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch

from nsa_tp.ops._contracts import check_mqa_logits_args, check_paged_logits_args
from nsa_tp.ops.capability import get_capability, import_error
from nsa_tp.ops.index_cache import INDEX_HEAD_DIM, INDEX_PAGE_BYTES, INDEX_PAGE_SIZE
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = ["TIER", "MAX_HEADS", "fp8_mqa_logits", "fp8_paged_mqa_logits", "kernel_heads"]

_PACKAGE = "deep_gemm"
_API = ("fp8_mqa_logits", "fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "get_num_sms")
# Head counts both kernels take on SM90 (SM100 takes 8 and 16 too; padding to these is right on both).
_KERNEL_HEADS = (32, 64)
MAX_HEADS = _KERNEL_HEADS[-1]
_RAGGED_HEAD_DIMS = (32, 64, 128)
_SUPPORTED_SM_MAJORS = (9, 10)  # the wheel's logits kernels: SM90 (Hopper) and SM100 (Blackwell)
_BLOCK_KV = INDEX_PAGE_SIZE  # the paged kernel's block size on SM90; our cache pages are 64 tokens
_TMA_ALIGN = 16  # bytes: TMA global base addresses and strides
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Availability (probed once per process) and the wheel's module


@functools.cache
def _available() -> str | None:
    """Why this tier cannot run in this process (None if it can). Cached; the registry asks once too."""
    err = import_error(_PACKAGE)
    if err:
        return f"{err} (install sgl-deep-gemm==0.1.5.post1 with apache-tvm-ffi==0.1.11)"
    module = importlib.import_module(_PACKAGE)
    missing = [name for name in _API if not hasattr(module, name)]
    if missing:
        version = getattr(module, "__version__", "?")
        return f"deep_gemm {version} lacks {missing}; this tier is written for sgl-deep-gemm==0.1.5.post1"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (DeepGEMM runs on CUDA only)"
    return None


def _dg() -> ModuleType:
    return importlib.import_module(_PACKAGE)  # already imported by _available(); a dict lookup


def _as_torch(x: Any) -> torch.Tensor:
    """The wheel's tvm-ffi functions return torch tensors for torch inputs; convert through DLPack otherwise."""
    return x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)


# ----------------------------------------------------------------------------------------------------------
# supports(): reasons from shapes, dtypes, strides and the cached capability only (no device sync)


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_reason(*tensors: torch.Tensor) -> str | None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            return f"inputs are on different devices ({dev} and {t.device})"
    cap = get_capability(dev)
    if not cap.is_cuda:
        return f"inputs are on {cap.device}; DeepGEMM runs on CUDA only"
    if cap.sm_major not in _SUPPORTED_SM_MAJORS:
        return f"{cap.name} is {cap.sm_label}; DeepGEMM's MQA-logits kernels run on SM90 and SM100"
    return None


def _q_reason(q: Any, head_dims: tuple[int, ...]) -> str | None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        return "q: expected a [T, H, D] tensor"
    if q.dtype != torch.float8_e4m3fn:
        return f"q: dtype {_fmt(q.dtype)}; DeepGEMM takes float8_e4m3fn"
    H, D = q.shape[1], q.shape[2]
    if not 1 <= H <= MAX_HEADS:
        return f"q: {H} index heads; DeepGEMM's kernels take at most {MAX_HEADS} (32 or 64, padded up to)"
    if D not in head_dims:
        return f"q: index head dim {D}; DeepGEMM takes {' or '.join(map(str, head_dims))} here"
    return None


def _logits_supports(q: Any = None, kv: Any = None, weights: Any = None, ks: Any = None, ke: Any = None) -> str | None:
    reason = _q_reason(q, _RAGGED_HEAD_DIMS)
    if reason:
        return reason
    if not (isinstance(kv, (tuple, list)) and len(kv) == 2 and all(isinstance(t, torch.Tensor) for t in kv)):
        return "kv: expected a tuple (k [N, D] float8_e4m3fn, k_scale [N] float32)"
    k, k_scale = kv
    if k.dim() != 2 or k.dtype != torch.float8_e4m3fn or not k.is_contiguous():
        return "kv[0] (k): DeepGEMM reads a contiguous [N, D] float8_e4m3fn key matrix (TMA)"
    if k_scale.dim() != 1 or k_scale.dtype != torch.float32 or not k_scale.is_contiguous():
        return "kv[1] (k_scale): DeepGEMM reads a contiguous [N] float32 scale vector (TMA)"
    others = [t for t in (weights, ks, ke) if isinstance(t, torch.Tensor)]
    return _device_reason(q, k, k_scale, *others)


def _paged_logits_supports(
    q: Any = None, index_k_cache: Any = None, weights: Any = None, seq_lens: Any = None, page_table: Any = None,
    max_seq_len: Any = None,
) -> str | None:
    reason = _q_reason(q, (INDEX_HEAD_DIM,))
    if reason:
        return reason
    if not isinstance(index_k_cache, torch.Tensor) or index_k_cache.dim() != 2:
        return f"index_k_cache: expected [P, {INDEX_PAGE_BYTES}] uint8"
    if index_k_cache.dtype != torch.uint8 or index_k_cache.shape[1] != INDEX_PAGE_BYTES:
        return f"index_k_cache: expected [P, {INDEX_PAGE_BYTES}] uint8, got {tuple(index_k_cache.shape)} " \
               f"{_fmt(index_k_cache.dtype)}"
    if index_k_cache.shape[0] < 1:
        return "index_k_cache: the kernel needs at least one page (it reads page 0 for padding blocks)"
    if index_k_cache.stride(1) != 1 or index_k_cache.stride(0) % _TMA_ALIGN:
        return f"index_k_cache: pages must be dense rows with a {_TMA_ALIGN}-byte aligned stride (TMA), " \
               f"got strides {index_k_cache.stride()}"
    if index_k_cache.data_ptr() % _TMA_ALIGN:
        return f"index_k_cache: base address not {_TMA_ALIGN}-byte aligned (TMA)"
    others = [t for t in (weights, seq_lens, page_table) if isinstance(t, torch.Tensor)]
    return _device_reason(q, index_k_cache, *others)


# ----------------------------------------------------------------------------------------------------------
# Glue


def kernel_heads(heads: int) -> int:
    """The head count the kernels run for ``heads`` real index heads: 32 up to 32, else 64."""
    for h in _KERNEL_HEADS:
        if heads <= h:
            return h
    raise ValueError(f"heads: DeepGEMM's MQA-logits kernels take at most {MAX_HEADS} index heads, got {heads}")


def _pad_heads(q: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [R, H, D]``, ``weights [R, H]`` -> contiguous ``[R, Hp, D]``, ``[R, Hp]`` with zero padded heads.

    A zero head scores ``relu(0) * 0 = 0`` against every key, so the logits are unchanged.
    """
    R, H, D = q.shape
    hp = kernel_heads(H)
    if hp == H:
        return _aligned(q.contiguous()), _aligned(weights.contiguous())
    # Bytes, not fp8 arithmetic: a plain copy into zeros works on every device and torch build.
    q_p = torch.zeros((R, hp, D), dtype=torch.uint8, device=q.device)
    q_p[:, :H] = q.view(torch.uint8)
    w_p = weights.new_zeros((R, hp))
    w_p[:, :H] = weights
    return q_p.view(torch.float8_e4m3fn), w_p


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its base address suits TMA, else a (freshly allocated, aligned) copy."""
    return t if t.data_ptr() % _TMA_ALIGN == 0 else t.clone()


# ----------------------------------------------------------------------------------------------------------
# Ops


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
) -> torch.Tensor:
    """The indexer's ragged logits on DeepGEMM; semantics: :func:`nsa_tp.ops.reference.fp8_mqa_logits`.

    Args:
        q: ``[T, H, D]`` float8_e4m3fn on an SM90 / SM100 GPU, ``1 <= H <= 64``, ``D`` in {32, 64, 128}.
        kv: ``(k [N, D] float8_e4m3fn, k_scale [N] float32)``, both contiguous; ``k_scale >= 0``.
        weights: ``[T, H]`` float32.
        ks, ke: ``[T]`` int32; row t scores keys ``ks[t] <= j < ke[t]``.

    Returns:
        ``logits [T, N]`` float32 (a view with a padded row stride), ``-inf`` outside ``[ks, ke)``.
    """
    k, k_scale, device = check_mqa_logits_args(q, kv, weights, ks, ke)
    T, N = q.shape[0], k.shape[0]
    if T == 0 or N == 0:
        return torch.full((T, N), _NEG_INF, dtype=torch.float32, device=device)
    q_p, w_p = _pad_heads(q, weights)
    # 0 <= ks <= ke <= N (see the module docstring): the same ranges, in the form the kernel assumes.
    ks_c = ks.clamp(0, N)
    ke_c = torch.maximum(ke.clamp(max=N), ks_c)
    logits = _dg().fp8_mqa_logits(
        q_p, (_aligned(k), _aligned(k_scale)), w_p, ks_c, ke_c, clean_logits=True
    )
    return _as_torch(logits)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    index_k_cache: torch.Tensor,
    weights: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    max_seq_len: int,
) -> torch.Tensor:
    """The indexer's decode logits on DeepGEMM; semantics: :func:`nsa_tp.ops.reference.fp8_paged_mqa_logits`.

    Args:
        q: ``[B, H, 128]`` float8_e4m3fn on an SM90 / SM100 GPU, ``1 <= H <= 64``.
        index_k_cache: ``[P, 8448]`` uint8, ``P >= 1`` (layout: :mod:`nsa_tp.ops.index_cache`), dense rows.
        weights: ``[B, H]`` float32.
        seq_lens: ``[B]`` int32, ``0 <= seq_lens[b] <= max_seq_len``.
        page_table: ``[B, max_pages]`` int32; the pages a request uses must be valid ids.
        max_seq_len: output width, ``<= max_pages * 64``.

    Returns:
        ``logits [B, max_seq_len]`` float32 (a view with a padded row stride), ``-inf`` for ``j >= seq_lens[b]``.
    """
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 0:
        raise ValueError(f"max_seq_len: expected an int >= 0, got {max_seq_len!r}")
    device = check_paged_logits_args(q, index_k_cache, weights, seq_lens, page_table, max_seq_len)
    B = q.shape[0]
    if B == 0 or max_seq_len == 0:
        return torch.full((B, max_seq_len), _NEG_INF, dtype=torch.float32, device=device)
    dg = _dg()
    q_p, w_p = _pad_heads(q, weights)
    # [B, Hp, 128] -> [B, next_n = 1, Hp, 128]; context lengths [B] -> [B, next_n = 1] (the 2-D form).
    lens = seq_lens.clamp(0, max_seq_len).view(B, 1)
    schedule = dg.get_paged_mqa_logits_metadata(lens, _BLOCK_KV, dg.get_num_sms())
    # [P, 8448] -> [P, 64 tokens, 1 kv head, 128 + 4 bytes]: the kernel's fused view of the same bytes.
    cache = index_k_cache.view(index_k_cache.shape[0], INDEX_PAGE_SIZE, 1, INDEX_HEAD_DIM + 4)
    table = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    logits = _as_torch(dg.fp8_paged_mqa_logits(
        q_p.unsqueeze(1), cache, w_p, lens, table, schedule, max_seq_len, clean_logits=False
    ))
    cols = torch.arange(max_seq_len, device=device)
    return logits.masked_fill_(cols[None, :] >= lens, _NEG_INF)


# Where "auto" runs it: nsa_tp.ops.tuning (upstream's kernel first unless another tier measured faster here).
TIER = Tier(
    name="deep_gemm",
    available=_available,
    ops={
        "fp8_mqa_logits": OpImpl(fp8_mqa_logits, supports=_logits_supports),
        "fp8_paged_mqa_logits": OpImpl(fp8_paged_mqa_logits, supports=_paged_logits_supports),
    },
)
