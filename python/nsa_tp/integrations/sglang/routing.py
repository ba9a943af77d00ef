"""Which implementation a hooked SGLang call runs: nsa-tp's tier only where it measured faster here.

Each hooked function of SGLang's DSA backend runs FlashMLA (padding heads to 64 on SM90); nsa-tp's FlashMLA
tier runs the same kernels with the same padding, so the card's tuning table (:mod:`nsa_tp.ops.tuning`)
already holds "upstream's path" next to every other tier for each shape class. :func:`route` takes over a
call only where another tier measured at least the tuning margin faster than FlashMLA for that class on
this card; everywhere else (an unmeasured card, a class where FlashMLA was fastest or nothing beat it by
the margin, a class with no FlashMLA measurement) SGLang's own function runs, untouched.

``NSA_TP_SGLANG_BACKEND=<tier>`` forces a tier for every call it supports (for experiments and tests);
``auto`` (the default) is the rule above. Decisions are host arithmetic on shapes (no device query, no
sync: safe under CUDA graph capture) and are cached per (op, class, device).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

from nsa_tp.integrations.sglang._log import logger
from nsa_tp.integrations.sglang._switch import ops_backend
from nsa_tp.ops import registry, tuning

__all__ = ["Route", "route", "runnable", "alternative_tier", "clear_cache"]


@dataclasses.dataclass(frozen=True)
class Route:
    """``tier``: the nsa-tp tier to run, or None for SGLang's own function; ``why``: one line for the log."""

    tier: str | None
    cls: str
    why: str


_cache: dict[tuple[str, str, str, str], Route] = {}
_lock = threading.Lock()


def _fmt_times(times: dict[str, float]) -> str:
    return ", ".join(f"{t} {ms:.3f} ms" for t, ms in sorted(times.items(), key=lambda kv: kv[1]))


def _decide(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], forced: str) -> Route:
    card, cls, times = tuning.measured_choice(op, *args, **kwargs)
    up = tuning.UPSTREAM[op]
    if forced != "auto":
        return Route(forced, cls, f"NSA_TP_SGLANG_BACKEND={forced} forces this tier")
    if not times:
        return Route(None, cls, f"no tuning table entry for {op} {cls} on {card}: upstream's {up} path kept")
    if up not in times:
        return Route(None, cls, f"{up} was not measured for {op} {cls} on {card}: upstream's path kept")
    best = tuning.order_from_times(op, times)[0]
    if best == up:
        return Route(None, cls, f"measured on {card} ({_fmt_times(times)}): nothing beat {up} by "
                                f"{tuning.MARGIN:.0%}, upstream's path kept")
    return Route(best, cls, f"measured on {card}: {_fmt_times(times)}")


def route(op: str, *args: Any, **kwargs: Any) -> Route:
    """The route for a call of ``op`` (an :mod:`nsa_tp.ops` op) from the inputs its shape class needs (``q`` and
    the cache are enough): a dictionary lookup after the first call of a class. Check the chosen tier against
    the call's full inputs with :func:`runnable` before running it."""
    forced = ops_backend()
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    key = (op, tuning.shape_class(op, *args, **kwargs), str(device), forced)
    decided = _cache.get(key)
    if decided is None:
        decided = _decide(op, args, kwargs, forced)
        with _lock:
            decided = _cache.setdefault(key, decided)
    return decided


def runnable(decided: Route, op: str, *args: Any, **kwargs: Any) -> Route:
    """``decided``, or upstream's path if its tier cannot run these exact inputs (the reason is in ``why``)."""
    if decided.tier is None:
        return decided
    try:
        reason = registry.get_tier(decided.tier).ops[op].supports(*args, **kwargs)
    except (registry.BackendUnavailableError, KeyError) as e:
        reason = str(e)
    if reason:
        return Route(None, decided.cls, f"tier {decided.tier} cannot run these inputs ({reason}): upstream kept")
    return decided


def alternative_tier(op: str, *args: Any, **kwargs: Any) -> str | None:
    """The fastest non-upstream tier that can run these inputs (what verify mode checks against upstream when
    the route keeps upstream's path), or None."""
    try:
        return registry.auto_tier(op, *args, skip=tuning.UPSTREAM[op], **kwargs)
    except registry.BackendUnavailableError:
        return None


def clear_cache() -> None:
    """Forget every decision (tests; serving never needs it)."""
    with _lock:
        _cache.clear()
    logger.debug("routing cache cleared")
