"""Verify mode (``NSA_TP_SGLANG_VERIFY=1``): every hooked call also runs the other implementation on the
same inputs and logs the relative error, so a real serving run proves nsa-tp and SGLang agree.

Greedy tokens from a dummy-weight model are a weak check (they fall into 2-token loops whatever attention
returns); this compares each layer's attention output directly. Per path (hooked function and shape class):
the first :data:`FIRST_CALLS` comparisons are logged, then any above :data:`TOLERANCE`, and the running worst
at every power-of-two call count. A NaN anywhere counts as an infinite error.

It needs host syncs (the error is a number), so it is skipped while SGLang captures a CUDA graph (logged
once): verify decode with ``--disable-cuda-graph``; prefill runs eagerly unless piecewise graphs capture it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable

import torch

from nsa_tp.integrations.sglang._log import log_once, logger

__all__ = ["ENV_VERIFY", "TOLERANCE", "FIRST_CALLS", "verify_enabled", "relative_error", "record", "worst"]

ENV_VERIFY = "NSA_TP_SGLANG_VERIFY"
TOLERANCE = 1e-2  # bf16 outputs of two sparse-MLA kernels over the same inputs (DESIGN.md's bound)
FIRST_CALLS = 3

_lock = threading.Lock()
_stats: dict[str, tuple[int, float]] = {}  # path -> (calls, worst error)


def verify_enabled() -> bool:
    """True when ``NSA_TP_SGLANG_VERIFY`` is 1/on/true/yes (read per call: tests and servers set it late)."""
    return os.environ.get(ENV_VERIFY, "0").strip().lower() in ("1", "on", "true", "yes")


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64 (0 when both are all zero; inf on NaN or a shape mismatch)."""
    if got.shape != ref.shape:
        return math.inf
    a, b = got.double(), ref.double()
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return math.inf
    num, den = float((a - b).norm()), float(b.norm())
    return 0.0 if num == 0.0 else (num / den if den > 0 else math.inf)


def record(path: str, detail: str, error: float) -> None:
    """Count one comparison for ``path`` and log it when it is news (see module docstring)."""
    with _lock:
        calls, worst_so_far = _stats.get(path, (0, 0.0))
        calls += 1
        worst_now = max(worst_so_far, error)
        _stats[path] = (calls, worst_now)
    bad = error > TOLERANCE
    if calls <= FIRST_CALLS or bad or calls & (calls - 1) == 0:
        logger.log(
            logging.WARNING if bad else logging.INFO,
            "verify %s: call %d rel err %.2e (%s), worst so far %.2e%s",
            path, calls, error, detail, worst_now, f" ABOVE TOLERANCE {TOLERANCE:.0e}" if bad else "",
        )


def worst() -> dict[str, tuple[int, float]]:
    """``{path: (comparisons, worst error)}`` in this process."""
    with _lock:
        return dict(_stats)


def skipped_under_capture(path: str) -> None:
    log_once(f"verify-capture-{path}", "verify %s: skipped during CUDA graph capture (run with --disable-cuda-graph "
             "to verify these calls)", path)


def compare(path: str, detail: str, ours: Callable[[], torch.Tensor], upstream: Callable[[], torch.Tensor],
            returned: str) -> torch.Tensor:
    """Run both, record the error of ours against upstream's, return the one named by ``returned``
    (``"ours"`` or ``"upstream"``)."""
    out_up = upstream()
    out_ours = ours()
    record(path, detail, relative_error(out_ours, out_up))
    return out_ours if returned == "ours" else out_up
