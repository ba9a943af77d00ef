"""Stateless kernels: one contract each, several tiers behind one dispatcher.

Public entry points (contracts in ``DESIGN.md``; semantics defined by :mod:`nsa_tp.ops.reference`):

- :func:`sparse_mla_fwd` — sparse MLA over top-k selected KV rows, any head count.
- :func:`fp8_mqa_logits` — the lightning indexer's fp8 MQA logits over ragged key ranges.

``backend="auto"`` takes the fastest tier that supports the inputs here; ``"reference"``, ``"triton"``
and ``"flashmla"`` force one and raise :class:`BackendUnavailableError` if it cannot run.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.registry import BackendUnavailableError, dispatch, explain, tier_names

__all__ = ["sparse_mla_fwd", "fp8_mqa_logits", "BackendUnavailableError", "explain", "tier_names"]


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [T,H,512] bf16, max_logits [T,H] f32, lse [T,H] f32)``.

    Semantics: :func:`nsa_tp.ops.reference.sparse_mla_fwd`.
    """
    return dispatch("sparse_mla_fwd", backend, q, kv, indices, sm_scale, d_v)


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``logits [T, N]`` float32; see :func:`nsa_tp.ops.reference.fp8_mqa_logits`."""
    return dispatch("fp8_mqa_logits", backend, q, kv, weights, ks, ke)
