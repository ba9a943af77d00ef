"""Head padding for kernels that take a fixed head count, and top-k padding for kernels that read fixed blocks.

The constraint: FlashMLA's sparse kernels (prefill and fp8 decode) run exactly 64 or 128 query heads per call
(64-head tiles on SM90, 128 on SM100+), but pure TP leaves 128 / tp heads on a rank (16 at TP8). So q is
zero-padded up to the kernel multiple, the kernel runs, and out / lse / max_logits are trimmed back.

The cost: the padded heads are computed in full. The kernel's work grows with the padded count, so at TP8
on Hopper (16 -> 64 heads) a rank spends 4x the sparse-attention FLOPs it needs, 8x on Blackwell
(16 -> 128); ``benchmark/bench_flashmla_padding.py`` measures it. The head math itself
(``flashmla_head_multiple``, ``padded_heads``) is a kernel fact, so it lives here and only here;
:mod:`nsa_tp.parallel.layout` reads it from this module (``ops`` imports nothing above it).

Zero heads are harmless: a zero query scores 0 against every key, so its softmax is uniform over the valid
keys and its output is finite; it is dropped before anyone reads it.
"""

from __future__ import annotations

import torch

__all__ = ["flashmla_head_multiple", "padded_heads", "pad_heads", "trim_heads", "pad_topk"]


def flashmla_head_multiple(sm_major: int) -> int | None:
    """Heads per FlashMLA sparse call: 64 on SM90 (Hopper), 128 on SM100+ (Blackwell), None below SM90."""
    if sm_major >= 10:
        return 128
    if sm_major == 9:
        return 64
    return None


def padded_heads(heads: int, multiple: int | None) -> int:
    """``heads`` rounded up to the kernel's multiple (``heads`` itself when there is no multiple)."""
    if multiple is None:
        return heads
    return -(-heads // multiple) * multiple


def pad_heads(q: torch.Tensor, multiple: int | None) -> tuple[torch.Tensor, int]:
    """``q [T, H, D]`` -> ``(q_padded [T, Hp, D], H)`` with ``Hp = padded_heads(H, multiple)``.

    The padded heads are zeros (a new, contiguous tensor). When no padding is needed ``q`` itself is returned
    with its strides (no copy) if its last dim is contiguous, else a contiguous copy. Undo with
    :func:`trim_heads`.
    """
    real_h = q.shape[1]
    target = padded_heads(real_h, multiple)
    if target == real_h:
        return (q if q.stride(-1) == 1 else q.contiguous()), real_h
    # [T, H, D] -> [T, Hp, D]; pad's spec runs from the last dim backwards: (D: 0, 0), (H: 0, Hp - H).
    return torch.nn.functional.pad(q, (0, 0, 0, target - real_h)), real_h


def trim_heads(x: torch.Tensor, real_h: int, dim: int = 1) -> torch.Tensor:
    """Drop the padded heads: ``x`` with ``dim`` narrowed to its first ``real_h`` entries (a view; no copy)."""
    if x.shape[dim] == real_h:
        return x
    return x.narrow(dim, 0, real_h)


def pad_topk(indices: torch.Tensor, multiple: int) -> torch.Tensor:
    """``indices [..., K]`` int32 -> ``[..., Kp]`` with ``Kp`` the next multiple of ``multiple``, filled with -1.

    Sparse kernels read top-k ids in fixed blocks; -1 is "no token", so the padded entries change nothing.
    """
    k = indices.shape[-1]
    kp = -(-k // multiple) * multiple
    if kp == k:
        return indices
    return torch.nn.functional.pad(indices, (0, kp - k), value=-1)
