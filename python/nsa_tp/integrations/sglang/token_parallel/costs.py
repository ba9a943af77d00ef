"""Where ``auto`` gets its measured costs: the one function :func:`load_costs` (the only place the SGLang
plugin reads a cost file; the cost model itself is :mod:`nsa_tp.token_parallel.policy`'s)."""

from __future__ import annotations

import functools
import json
import os

from nsa_tp.token_parallel import TokenParallelCosts

__all__ = ["ENV_COSTS", "load_costs"]

# JSON with a "costs" block (benchmark/bench_token_parallel.py's output) measured on this card with the fastest
# upstream kernels; without it ``auto`` keeps upstream's ``heads`` path.
ENV_COSTS = "NSA_TP_TOKEN_PARALLEL_COSTS"


def load_costs(card: str | None) -> tuple[TokenParallelCosts | None, str]:
    """The measured costs for ``card`` from ``NSA_TP_TOKEN_PARALLEL_COSTS``, or None and why not (the file is
    read once per path, modification time and size, not once per batch). ``card=None``: any card."""
    path = os.environ.get(ENV_COSTS, "").strip()
    if not path:
        return None, f"no measured costs ({ENV_COSTS} unset)"
    try:
        st = os.stat(path)
        costs = _read_costs(path, st.st_mtime_ns, st.st_size)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return None, f"{ENV_COSTS}={path} unreadable: {type(e).__name__}: {e}"
    if card is not None and costs.card != card:
        return None, f"{ENV_COSTS}={path} was measured on {costs.card!r}, this card is {card!r}"
    return costs, f"costs measured on {costs.card} ({costs.date})"


@functools.lru_cache(maxsize=8)
def _read_costs(path: str, mtime_ns: int, size: int) -> TokenParallelCosts:
    with open(path) as f:
        data = json.load(f)
    return TokenParallelCosts.from_dict(data.get("costs", data))
