"""The sparse-core executor of a ``tokens`` batch: FlashMLA's two entries (reached through the one AROUND hook
on each, :mod:`..attention_hooks`) run :func:`nsa_tp.token_parallel.tokens_sparse_mla` instead — q heads ->
tokens, all heads of this rank's rows, no padding, tokens -> heads.

The plan reaches these calls on the backend object (:data:`PLAN_ON_BACKEND`, set by the backend subclass's
``forward_extend`` for the duration of one layer's extend). Inputs outside the tokens core's contract regather
the whole top-k table (each rank computed only its own rows) and take the usual kernel path: always correct,
logged once per reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nsa_tp.integrations.sglang import verify
from nsa_tp.integrations.sglang._log import log_once
from nsa_tp.integrations.sglang._switch import ops_backend
from nsa_tp.integrations.sglang.token_parallel import plan as _plan
from nsa_tp.ops.kv_format import D_LATENT, D_QK
from nsa_tp.token_parallel import gather_topk_rows, tokens_sparse_mla

__all__ = ["PLAN_ON_BACKEND", "tokens_plan", "run_tokens", "whole_table", "tokens_unsupported"]

PLAN_ON_BACKEND = "_nsa_tp_plan"  # attribute of the backend object while forward_extend runs a tokens batch


def tokens_plan(backend: Any) -> _plan.ExtendPlan | None:
    """The ``tokens`` plan of the extend this backend is running, else None (every other call)."""
    plan = getattr(backend, PLAN_ON_BACKEND, None)
    return plan if plan is not None and plan.strategy == "tokens" else None


def run_tokens(entry: str, plan: _plan.ExtendPlan, q: torch.Tensor, kv_flat: torch.Tensor, v_head_dim: int,
               page_table_1: torch.Tensor, sm_scale: float, unsupported: str | None,
               kernel_path: Callable[[torch.Tensor], torch.Tensor],
               upstream: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One FlashMLA entry (``entry``: its name, for the log) of a ``tokens`` batch.

    ``q [T, h, 576]``, ``kv_flat [N, 1, D]`` (slots global), ``page_table_1 [T, K]`` (this rank's rows filled).
    ``unsupported``: why the call's other arguments rule the core out, or None. ``kernel_path(table)``: the
    hook's usual route on a whole table (the fallback); ``upstream(table)``: SGLang's own function (verify).
    Returns ``o [T, h, d_v]`` (DP padding rows 0).
    """
    why = unsupported or tokens_unsupported(plan, q, v_head_dim, page_table_1)
    if why is not None:  # the indexer filled only this rank's rows: rebuild the whole table first
        log_once(f"tp-{entry}-fallback-{why}", "token-parallel sparse core not used in %s (%s): the usual path on "
                 "the gathered top-k", entry, why)
        return kernel_path(whole_table(page_table_1, plan))
    log_once(f"tp-{entry}", "token-parallel sparse core active: %s -> nsa_tp.token_parallel.tokens_sparse_mla "
             "(%d heads per rank -> all heads of 1/%d of the rows)", entry, q.shape[1], len(plan.splits))
    rows = plan.rows
    own = page_table_1[rows.start : rows.stop].to(torch.int32)  # this rank's rows only
    out = tokens_sparse_mla(q, kv_flat, own, sm_scale, _plan.attn_tp_group(), plan.split(q.shape[0]), d_v=v_head_dim,
                            backend=ops_backend())
    if verify.verify_enabled() and not (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        ref = upstream(whole_table(page_table_1, plan))
        ref = ref.reshape(out.shape) if ref.numel() == out.numel() else ref
        verify.record(f"token-parallel {entry}", f"T={q.shape[0]} h={q.shape[1]}",
                      verify.relative_error(out[: plan.num_real], ref[: plan.num_real]))
    return out


def whole_table(page_table_1: torch.Tensor, plan: _plan.ExtendPlan) -> torch.Tensor:
    """A ``tokens`` batch's ``[rows, K]`` table with every rank's rows (each rank computed only its own):
    one all-gather of the row blocks, for a core that needs them all (fallback, verify)."""
    rows = plan.rows
    own = page_table_1[rows.start : rows.stop].to(torch.int32)
    full = page_table_1.clone()
    full[: plan.num_real] = gather_topk_rows(own, _plan.attn_tp_group(), plan.split(plan.num_real)).to(full.dtype)
    return full


def tokens_unsupported(plan: _plan.ExtendPlan, q: torch.Tensor, v_head_dim: int,
                       page_table_1: torch.Tensor) -> str | None:
    """None when the ``tokens`` core may run on these inputs; the checks depend only on what every rank of
    the group shares (shapes, dtypes, the plan), so all ranks decide alike."""
    if q.dim() != 3 or q.shape[-1] != D_QK or v_head_dim != D_LATENT:
        return f"q {tuple(q.shape)} / v_head_dim {v_head_dim} outside [T, h, {D_QK}] / {D_LATENT}"
    if q.shape[0] < plan.num_real or page_table_1.dim() != 2 or page_table_1.shape[0] < plan.num_real:
        return f"q rows {q.shape[0]} / page_table_1 {tuple(page_table_1.shape)} fewer than the plan's {plan.num_real}"
    if page_table_1.shape[0] != q.shape[0]:
        return "page_table_1 rows differ from q rows"
    return None
