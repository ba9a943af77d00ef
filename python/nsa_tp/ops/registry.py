"""Tier registry and dispatcher: ``backend="auto"`` or a tier's name.

A *tier* is a module that defines ``TIER = Tier(...)``: a name, a cached ``available()`` probe (returns the
reason it cannot run here, or None) and, per op, an implementation plus a ``supports(*args, **kwargs)``
check returning a reason string or None. Adding a tier is adding a file and one line to ``_TIER_MODULES``.

``auto`` tries tiers in the order :func:`nsa_tp.ops.tuning.tier_order` gives for the call (measured on this
card for the call's shape class; upstream's kernel first where the card was never measured) and runs the
first that is available and supports the inputs. Where that is not upstream's kernel for the op
(:data:`nsa_tp.ops.tuning.UPSTREAM`), it logs once per (op, card, shape class) why upstream's was passed over:
not installed, declined (its ``supports()`` reason) or measured slower on this card. A forced tier that
cannot run raises :class:`BackendUnavailableError` with the reason; nothing falls back silently.

:func:`record_tiers` lists every tier that ran inside a block (the benchmarks check with it that a piece
labelled upstream ran upstream's kernel and nothing else).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "Tier", "OpImpl", "BackendUnavailableError", "dispatch", "get_tier", "tier_names", "explain", "auto_tier",
    "run_supported", "record_tiers",
]

logger = logging.getLogger("nsa_tp.ops")
# Every (op, tier) run inside record_tiers(); None outside one (a lookup, no list, on the serving path).
_RECORD: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("nsa_tp_tiers", default=None)
_PASSED_OVER: set[tuple[str, str, str]] = set()  # (op, card, class) whose pass-over of upstream was logged

# Import paths of every tier (the order ``auto`` uses is nsa_tp.ops.tuning's, not this one).
_TIER_MODULES: dict[str, str] = {
    "deep_gemm": "nsa_tp.ops.deepgemm",
    "sgl_kernel": "nsa_tp.ops.sglkernel",
    "flashmla": "nsa_tp.ops.flashmla",
    "triton": "nsa_tp.ops.triton",
    "reference": "nsa_tp.ops.reference_tier",
}


class BackendUnavailableError(ValueError):
    """A forced backend cannot run these inputs on this machine (the message says why)."""


def _no_reason(*_args: Any, **_kwargs: Any) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class OpImpl:
    fn: Callable[..., Any]
    supports: Callable[..., str | None] = _no_reason


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    available: Callable[[], str | None]
    ops: Mapping[str, OpImpl]


@functools.cache
def _load(name: str) -> Tier | str:
    """The tier, or why it cannot be imported here. Cached: probed once per process."""
    module = _TIER_MODULES[name]
    try:
        tier = importlib.import_module(module).TIER
    except ImportError as e:
        return f"cannot import {module}: {e}"
    reason = tier.available()
    return reason if reason else tier


def tier_names() -> tuple[str, ...]:
    return tuple(_TIER_MODULES)


def get_tier(name: str) -> Tier:
    """The named tier; raises :class:`BackendUnavailableError` if it is unknown or cannot run here."""
    if name not in _TIER_MODULES:
        raise BackendUnavailableError(f"backend: unknown tier {name!r}; use 'auto' or one of {tier_names()}")
    tier = _load(name)
    if isinstance(tier, str):
        raise BackendUnavailableError(f"backend={name!r} is not available here: {tier}")
    return tier


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, str]:
    """Per tier: 'ok' or the reason it would not run ``op`` on these inputs (for logs and `nsa-tp bench`)."""
    result: dict[str, str] = {}
    for name in _TIER_MODULES:
        tier = _load(name)
        if isinstance(tier, str):
            result[name] = tier
        elif op not in tier.ops:
            result[name] = f"tier {name!r} has no {op}"
        else:
            result[name] = tier.ops[op].supports(*args, **kwargs) or "ok"
    return result


def _auto_impl(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], skip: str | None = None) -> tuple[str, OpImpl]:
    """The first tier in :func:`nsa_tp.ops.tuning.tier_order` (other than ``skip``) that is available and
    supports the inputs; logs once per class when that is not upstream's kernel (:func:`_log_pass_over`)."""
    from nsa_tp.ops.tuning import route

    card, cls, order = route(op, *args, **kwargs)
    for name in order:
        if name == skip:
            continue
        tier = _load(name) if name in _TIER_MODULES else f"unknown tier {name!r}"
        if isinstance(tier, str) or op not in tier.ops:
            continue
        impl = tier.ops[op]
        if impl.supports(*args, **kwargs) is None:
            if skip is None and (op, card, cls) not in _PASSED_OVER:
                _log_pass_over(op, card, cls, name, order, args, kwargs)
            return name, impl
    raise BackendUnavailableError(f"{op}: no tier supports these inputs: {explain(op, *args, **kwargs)}")


def _log_pass_over(op: str, card: str, cls: str, chosen: str, order: list[str] | tuple[str, ...],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Log once per (op, card, class) why ``auto`` runs ``chosen`` and not upstream's kernel for ``op``."""
    from nsa_tp.ops.tuning import UPSTREAM, measured_choice

    _PASSED_OVER.add((op, card, cls))
    up = UPSTREAM.get(op)
    if up is None or chosen == up:
        return
    tier = _load(up)
    if isinstance(tier, str):
        why = f"not installed: {tier}"
    elif op not in tier.ops:
        why = f"tier {up!r} has no {op}"
    elif (reason := tier.ops[op].supports(*args, **kwargs)) is not None:
        why = f"declined: {reason}"
    else:
        times = measured_choice(op, *args, **kwargs)[2] or {}
        why = (f"measured slower on {card} ({up} {times.get(up, '?')} ms, {chosen} {times.get(chosen, '?')} ms)"
               if order.index(chosen) < order.index(up) else f"ordered after {chosen}")
    # a GPU that skips upstream's kernel for want of it (or its refusal) is worth a warning; on a CPU (no upstream
    # kernel can run there) and where it measured slower, this is the expected route: info
    level = logging.INFO if card == "cpu" or why.startswith("measured") else logging.WARNING
    logger.log(level, "nsa_tp.ops auto: %s [%s, %s] runs %s, not upstream's %s: %s", op, card, cls, chosen, up, why)


def auto_tier(op: str, *args: Any, skip: str | None = None, **kwargs: Any) -> str:
    """The tier ``backend="auto"`` runs for these inputs (see module docstring); with ``skip``, the one it would
    run if that tier did not exist. Raises :class:`BackendUnavailableError` when no tier can."""
    return _auto_impl(op, args, kwargs, skip)[0]


def _note(op: str, tier: str) -> None:
    rec = _RECORD.get()
    if rec is not None:
        rec.append((op, tier))


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the chosen tier (see module docstring for the rules)."""
    if backend == "auto":  # the choice already checked supports(): run it, no second check
        name, impl = _auto_impl(op, args, kwargs)
        _note(op, name)
        return impl.fn(*args, **kwargs)
    tier = get_tier(backend)
    if op not in tier.ops:
        raise BackendUnavailableError(f"backend={backend!r} does not implement {op}")
    impl = tier.ops[op]
    reason = impl.supports(*args, **kwargs)
    if reason:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op} on these inputs: {reason}")
    _note(op, backend)
    return impl.fn(*args, **kwargs)


def run_supported(tier: str, op: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on ``tier`` for inputs its ``supports()`` already accepted (a caller that chose the tier
    itself, like the SGLang hooks' router): :func:`dispatch` minus the second check."""
    _note(op, tier)
    return get_tier(tier).ops[op].fn(*args, **kwargs)


@contextlib.contextmanager
def record_tiers() -> Iterator[list[tuple[str, str]]]:
    """Inside the block, every dispatched ``(op, tier)`` is appended to the yielded list, in call order (a tier
    that calls another through the dispatcher shows up as both). Nested blocks each see their own calls."""
    calls: list[tuple[str, str]] = []
    token = _RECORD.set(calls)
    try:
        yield calls
    finally:
        _RECORD.reset(token)
        outer = _RECORD.get()
        if outer is not None:
            outer.extend(calls)
