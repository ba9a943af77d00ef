"""AROUND hooks on the two functions of SGLang's DSA backend that call FlashMLA's sparse kernels.

Each call takes nsa-tp's path only where :mod:`~nsa_tp.integrations.sglang.routing` says a tier measured
faster than upstream's FlashMLA path for that shape class on this card; otherwise SGLang's own function runs.
With ``NSA_TP_SGLANG_VERIFY=1`` both run and the error is logged (:mod:`~nsa_tp.integrations.sglang.verify`).

Both exist under the same names in SGLang 0.5.17 and 0.5.23
(``sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnBackend``):

- ``_forward_flashmla_sparse(q_all [T,H,576], kv_cache [N,1,576|656], v_head_dim, page_table_1 [T,K] int32,
  sm_scale, topk_length=None[, attn_sink=None])`` -> ``o [T,H,512]``: the prefill backend
  ``flashmla_sparse`` (and the decode backend of that name), on a flat KV (gathered, or the whole pool
  with global slots). Upstream zero-pads H to 64 (SM90) / 128 (SM100), runs, and trims.
  -> :func:`nsa_tp.ops.sparse_mla_fwd`, any H, no padding.
- ``_forward_flashmla_kv(q_all, kv_cache, v_head_dim, sm_scale, layer, metadata, page_table_1 [B,K])``
  -> ``o [B,1,H,512]``: the ``flashmla_kv`` backend (SGLang's default for prefill and decode with an fp8
  cache on Hopper), FlashMLA's paged decode kernel over 64-token pages; upstream pads H to 64 and, with a
  bf16 cache, quantizes the whole cache to fp8 on every call.
  -> :func:`nsa_tp.ops.sparse_mla_decode`, any H, bf16 or fp8 cache as stored.

Inputs outside our contract (another head dim, an attention sink, another cache format) go to upstream's
own function unchanged, with one log line saying why. The first call of each path and shape class logs
which implementation runs and why (measured times, or why upstream was kept), so a server log proves it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.integrations.sglang import routing, verify
from nsa_tp.integrations.sglang._log import log_once
from nsa_tp.integrations.sglang._switch import plugin_enabled
from nsa_tp.integrations.sglang.token_parallel import sparse as tp_sparse
from nsa_tp.ops import registry
from nsa_tp.ops.kv_format import D_LATENT, D_QK, FP8_BYTES_PER_TOKEN

__all__ = [
    "around_flashmla_sparse",
    "around_flashmla_kv",
    "sparse_fwd_unsupported",
    "paged_decode_unsupported",
    "PAGE_SIZE",
]

PAGE_SIZE = 64  # FlashMLA's paged decode and SGLang's DSA pool both use 64-token pages
_FP8_DTYPES = (torch.uint8, torch.float8_e4m3fn)

# Column ids 0..K-1 per (K, device), to cut a row's indices at its topk_length without a per-call arange.
_columns: dict[tuple[int, torch.device], torch.Tensor] = {}
_columns_lock = threading.Lock()


def _kv_format_reason(kv_cache: torch.Tensor) -> str | None:
    d = kv_cache.shape[-1]
    if d == D_QK and kv_cache.dtype == torch.bfloat16:
        return None
    if d == FP8_BYTES_PER_TOKEN and kv_cache.dtype in _FP8_DTYPES:
        return None
    return f"kv_cache last dim {d} dtype {kv_cache.dtype} is neither bf16 576 nor the fp8 656-byte format"


def sparse_fwd_unsupported(
    q_all: torch.Tensor, kv_cache: torch.Tensor, v_head_dim: int, page_table_1: torch.Tensor, attn_sink: Any
) -> str | None:
    """Why ``_forward_flashmla_sparse``'s inputs are outside ``nsa_tp.ops.sparse_mla_fwd``'s contract, or None."""
    if attn_sink is not None:
        return "attention sinks are not part of nsa-tp's sparse MLA contract"
    if q_all.dim() != 3 or q_all.shape[-1] != D_QK:
        return f"q_all shape {tuple(q_all.shape)} is not [T, H, {D_QK}]"
    if v_head_dim != D_LATENT:
        return f"v_head_dim {v_head_dim} is not {D_LATENT}"
    if kv_cache.dim() != 3 or kv_cache.shape[1] != 1:
        return f"kv_cache shape {tuple(kv_cache.shape)} is not [N, 1, D]"
    if page_table_1.dim() != 2 or page_table_1.shape[0] != q_all.shape[0]:
        return f"page_table_1 shape {tuple(page_table_1.shape)} is not [{q_all.shape[0]}, K]"
    return _kv_format_reason(kv_cache)


def paged_decode_unsupported(
    backend: Any, q_all: torch.Tensor, kv_cache: torch.Tensor, v_head_dim: int, layer: Any, page_table_1: torch.Tensor
) -> str | None:
    """Why ``_forward_flashmla_kv``'s inputs are outside ``nsa_tp.ops.sparse_mla_decode``'s contract, or None."""
    kv_format = getattr(backend, "flashmla_kv_format", "V32")  # 0.5.23 names the cache format; 0.5.17 has only V32
    if kv_format != "V32":
        return f"FlashMLA cache format {kv_format!r} is not DeepSeek-V3.2's"
    if getattr(layer, "head_dim", D_QK) != D_QK or v_head_dim != D_LATENT:
        return f"head dims {getattr(layer, 'head_dim', '?')}/{v_head_dim} are not {D_QK}/{D_LATENT}"
    if q_all.numel() % (layer.tp_q_head_num * D_QK):
        return f"q_all shape {tuple(q_all.shape)} does not hold [B, {layer.tp_q_head_num}, {D_QK}]"
    if kv_cache.numel() % (PAGE_SIZE * kv_cache.shape[-1]):
        return f"kv_cache shape {tuple(kv_cache.shape)} is not a whole number of {PAGE_SIZE}-token pages"
    if page_table_1.dim() != 2:
        return f"page_table_1 shape {tuple(page_table_1.shape)} is not [B, K]"
    return _kv_format_reason(kv_cache)


def _cut_at_topk_length(indices: torch.Tensor, topk_length: torch.Tensor | None) -> torch.Tensor:
    """``[T, K]`` ids with column ``j >= topk_length[t]`` set to -1 (FlashMLA's ``topk_length`` meaning).

    Upstream passes ``topk_length`` only as a speed hint (those columns are -1 already); applying it keeps
    the result exact even if they were not. A length whose rows do not match q is ignored, as upstream does.
    """
    if topk_length is None or topk_length.shape[0] != indices.shape[0] or indices.shape[0] == 0:
        return indices
    key = (indices.shape[1], indices.device)
    cols = _columns.get(key)
    if cols is None:
        cols = torch.arange(indices.shape[1], device=indices.device, dtype=torch.int32)
        # Never cache a tensor made during CUDA graph capture: it lives in the graph's private pool,
        # which later replays may reuse. A captured arange simply runs again at each replay.
        if not _capturing(indices.device):
            with _columns_lock:
                cols = _columns.setdefault(key, cols)
    return torch.where(cols[None, :] < topk_length[:, None], indices, indices.new_full((), -1))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fallback(name: str, reason: str) -> None:
    log_once(f"fallback-{name}-{reason}", "%s: upstream FlashMLA path kept for these inputs: %s", name, reason)


def around_flashmla_sparse(
    original: Callable[..., torch.Tensor],
    backend: Any,
    q_all: torch.Tensor,
    kv_cache: torch.Tensor,
    v_head_dim: int,
    page_table_1: torch.Tensor,
    sm_scale: float,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    **extra: Any,
) -> torch.Tensor:
    """``DeepseekSparseAttnBackend._forward_flashmla_sparse`` through :func:`nsa_tp.ops.sparse_mla_fwd`, or, on a
    token-parallel ``tokens`` extend, through :func:`.token_parallel.sparse.run_tokens`.

    Returns ``o [T, H, v_head_dim]`` bfloat16, upstream's contract; rows whose indices are all -1 give 0.
    """
    head = (backend, q_all, kv_cache, v_head_dim)  # upstream's positional arguments before page_table_1
    plan = tp_sparse.tokens_plan(backend)
    if plan is None:
        return _sparse_kernels(original, head, page_table_1, sm_scale, topk_length, attn_sink, extra)
    sink = {} if attn_sink is None else {"attn_sink": attn_sink}
    why = "an attention sink" if attn_sink is not None else ("extra arguments " + ", ".join(extra) if extra else None)
    return tp_sparse.run_tokens(
        "_forward_flashmla_sparse", plan, q_all, kv_cache, v_head_dim, page_table_1, sm_scale, why,
        kernel_path=lambda table: _sparse_kernels(original, head, table, sm_scale, topk_length, attn_sink, extra),
        upstream=lambda table: original(*head, table, sm_scale, topk_length=topk_length, **extra, **sink),
    )


def _sparse_kernels(
    original: Callable[..., torch.Tensor],
    head: tuple[Any, ...],
    page_table_1: torch.Tensor,
    sm_scale: float,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    extra: dict[str, Any],
) -> torch.Tensor:
    """The routed kernel path of :func:`around_flashmla_sparse` (module docstring).

    ``head`` is upstream's positional arguments before ``page_table_1``: ``(backend, q_all, kv_cache, v_head_dim)``.
    """
    _backend, q_all, kv_cache, v_head_dim = head
    reason = None if plugin_enabled() else "plugin switched off"
    reason = reason or ("extra arguments " + ", ".join(extra) if extra else None)
    reason = reason or sparse_fwd_unsupported(q_all, kv_cache, v_head_dim, page_table_1, attn_sink)
    if reason is not None:
        _fallback("_forward_flashmla_sparse", reason)
        if attn_sink is not None:
            extra = {**extra, "attn_sink": attn_sink}  # 0.5.17's signature has no attn_sink: pass it only when given
        return original(*head, page_table_1, sm_scale, topk_length=topk_length, **extra)

    T, H, _ = q_all.shape
    if T == 0:  # an idle DP-attention rank: nothing to attend
        return q_all.new_zeros(0, H, v_head_dim)

    def upstream() -> torch.Tensor:
        return original(*head, page_table_1, sm_scale, topk_length=topk_length, **extra)

    def full_args() -> tuple[Any, ...]:  # built only when nsa-tp runs: upstream's path pays nothing for it
        indices = _cut_at_topk_length(page_table_1.to(torch.int32), topk_length).unsqueeze(1)  # [T,K] -> [T,1,K]
        return (q_all, kv_cache, indices, sm_scale, v_head_dim)

    def ours(tier: str, args: tuple[Any, ...]) -> torch.Tensor:  # the router already checked supports()
        return registry.run_supported(tier, "sparse_mla_fwd", *args)[0]

    return _run("_forward_flashmla_sparse", "sparse_mla_fwd", (q_all, kv_cache), full_args, H, upstream, ours)


def around_flashmla_kv(
    original: Callable[..., torch.Tensor],
    backend: Any,
    q_all: torch.Tensor,
    kv_cache: torch.Tensor,
    v_head_dim: int,
    sm_scale: float,
    layer: Any,
    metadata: Any,
    page_table_1: torch.Tensor,
    **extra: Any,
) -> torch.Tensor:
    """``DeepseekSparseAttnBackend._forward_flashmla_kv`` through :func:`nsa_tp.ops.sparse_mla_decode`.

    ``q_all`` holds ``B`` tokens (one per row; MTP's extra tokens are rows too, as upstream views them),
    ``kv_cache`` the layer's whole pool ``[pages*64, 1, D]``, ``page_table_1 [B, K]`` global slots (-1 = none).
    Returns ``o [B, 1, H, v_head_dim]`` bfloat16, upstream's contract. A bf16 pool is read as stored
    (upstream re-quantizes it to fp8 on every call), so results are slightly closer to exact than upstream's.
    On a token-parallel ``tokens`` extend, :func:`.token_parallel.sparse.run_tokens` runs instead.
    """
    head = (backend, q_all, kv_cache, v_head_dim, sm_scale, layer, metadata)  # upstream's arguments before page_table_1
    plan = tp_sparse.tokens_plan(backend)
    if plan is None:
        return _kv_kernels(original, head, page_table_1, extra)
    q = q_all.reshape(-1, layer.tp_q_head_num, q_all.shape[-1])  # [T, h*576] or [T, 1, h, 576] -> [T, h, 576]
    flat = kv_cache.view(-1, 1, kv_cache.shape[-1])  # the pool [pages*64, 1, D]: slots are global
    out = tp_sparse.run_tokens(
        "_forward_flashmla_kv", plan, q, flat, v_head_dim, page_table_1, sm_scale,
        "extra arguments " + ", ".join(extra) if extra else None,
        kernel_path=lambda table: _kv_kernels(original, head, table, extra).reshape(q.shape[0], q.shape[1], -1),
        upstream=lambda table: original(*head, table, **extra),
    )
    return out.reshape(q.shape[0], 1, q.shape[1], -1)  # [T, h, 512] -> [T, 1, h, 512]


def _kv_kernels(
    original: Callable[..., torch.Tensor], head: tuple[Any, ...], page_table_1: torch.Tensor, extra: dict[str, Any]
) -> torch.Tensor:
    """The routed kernel path of :func:`around_flashmla_kv` (module docstring).

    ``head`` is upstream's positional arguments before ``page_table_1``:
    ``(backend, q_all, kv_cache, v_head_dim, sm_scale, layer, metadata)``.
    """
    backend, q_all, kv_cache, v_head_dim, sm_scale, layer, _metadata = head
    reason = None if plugin_enabled() else "plugin switched off"
    reason = reason or ("extra arguments " + ", ".join(extra) if extra else None)
    reason = reason or paged_decode_unsupported(backend, q_all, kv_cache, v_head_dim, layer, page_table_1)
    if reason is not None:
        _fallback("_forward_flashmla_kv", reason)
        return original(*head, page_table_1, **extra)

    H = layer.tp_q_head_num
    q = q_all.reshape(-1, H, D_QK)  # [B*s_q, H*576] or [B, 1, H, 576] -> [B, H, 576]: a view
    B = q.shape[0]
    if B == 0:
        return q.new_zeros(0, 1, H, v_head_dim)
    pages = kv_cache.view(-1, PAGE_SIZE, 1, kv_cache.shape[-1])  # [pages*64, 1, D] -> [pages, 64, 1, D]: a view

    def upstream() -> torch.Tensor:
        return original(*head, page_table_1, **extra)

    def full_args() -> tuple[Any, ...]:
        indices = page_table_1.to(torch.int32).unsqueeze(1)  # [B, K] -> [B, 1, K]
        return (q, pages, indices, sm_scale, v_head_dim)

    def ours(tier: str, args: tuple[Any, ...]) -> torch.Tensor:  # the router already checked supports()
        out, _lse = registry.run_supported(tier, "sparse_mla_decode", *args, plan=None)
        return out.unsqueeze(1)  # [B, H, 512] -> [B, 1, H, 512]

    return _run("_forward_flashmla_kv", "sparse_mla_decode", (q, pages), full_args, H, upstream, ours)


def _run(
    method: str,
    op: str,
    shape_args: tuple[Any, ...],
    full_args: Callable[[], tuple[Any, ...]],
    heads: int,
    upstream: Callable[[], torch.Tensor],
    ours: Callable[[str, tuple[Any, ...]], torch.Tensor],
) -> torch.Tensor:
    """Route one hooked call (see module docstring); in verify mode run both and log the error.

    Where the route keeps upstream's path and verify is off, upstream's function runs with nothing of ours
    in front of it but a cached dictionary lookup (measured: bf16 decode under CUDA graphs was 5% slower on
    H200 while the hook still built nsa-tp's index tensor before deciding, 2026-11-29).
    """
    chosen = routing.route(op, *shape_args)
    verifying = verify.verify_enabled()
    if chosen.tier is None and not verifying:
        _log_route(method, chosen, heads)
        return upstream()
    args = full_args()
    chosen = routing.runnable(chosen, op, *args)
    _log_route(method, chosen, heads)
    path = f"{method} {chosen.cls}"
    if verifying:
        if _capturing(args[0].device):
            verify.skipped_under_capture(path)
        else:
            other = chosen.tier or routing.alternative_tier(op, *args)
            if other is not None:
                return verify.compare(path, f"{other} vs upstream", lambda: ours(other, args), upstream,
                                      returned="ours" if chosen.tier else "upstream")
            log_once(f"verify-none-{path}", "verify %s: no nsa-tp tier can run these inputs here", path)
    return upstream() if chosen.tier is None else ours(chosen.tier, args)


def _log_route(method: str, chosen: routing.Route, heads: int) -> None:
    path = f"{method} {chosen.cls}"
    if chosen.tier is None:
        what = f"upstream's FlashMLA path (pads {heads} heads to a multiple of 64)"
    elif chosen.tier == "flashmla":
        what = f"nsa-tp tier flashmla (pads {heads} heads to a multiple of 64)"
    else:
        what = f"nsa-tp tier {chosen.tier} ({heads} heads, no padding)"
    log_once(f"route-{path}-{chosen.tier}", "%s runs %s: %s", path, what, chosen.why)
