"""Tier registry and dispatcher: ``backend="auto"`` or a tier's name.

A *tier* is a module that defines ``TIER = Tier(...)``: a name, a cached ``available()`` probe (returns the
reason it cannot run here, or None) and, per op, an implementation plus a ``supports(*args, **kwargs)``
check returning a reason string or None. Adding a tier is adding a file and one line to ``_TIER_MODULES``.

``auto`` tries tiers in the order :func:`nsa_tp.ops.tuning.tier_order` gives for the call (measured on this
card for the call's shape class; upstream's kernel first where the card was never measured) and runs the
first that is available and supports the inputs. A forced tier that cannot run raises
:class:`BackendUnavailableError` with the reason; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Tier", "OpImpl", "BackendUnavailableError", "dispatch", "get_tier", "tier_names", "explain", "auto_tier",
    "run_supported",
]

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
    supports the inputs."""
    from nsa_tp.ops.tuning import tier_order

    for name in tier_order(op, *args, **kwargs):
        if name == skip:
            continue
        tier = _load(name) if name in _TIER_MODULES else f"unknown tier {name!r}"
        if isinstance(tier, str) or op not in tier.ops:
            continue
        impl = tier.ops[op]
        if impl.supports(*args, **kwargs) is None:
            return name, impl
    raise BackendUnavailableError(f"{op}: no tier supports these inputs: {explain(op, *args, **kwargs)}")


def auto_tier(op: str, *args: Any, skip: str | None = None, **kwargs: Any) -> str:
    """The tier ``backend="auto"`` runs for these inputs (see module docstring); with ``skip``, the one it would
    run if that tier did not exist. Raises :class:`BackendUnavailableError` when no tier can."""
    return _auto_impl(op, args, kwargs, skip)[0]


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the chosen tier (see module docstring for the rules)."""
    if backend == "auto":  # the choice already checked supports(): run it, no second check
        return _auto_impl(op, args, kwargs)[1].fn(*args, **kwargs)
    tier = get_tier(backend)
    if op not in tier.ops:
        raise BackendUnavailableError(f"backend={backend!r} does not implement {op}")
    impl = tier.ops[op]
    reason = impl.supports(*args, **kwargs)
    if reason:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op} on these inputs: {reason}")
    return impl.fn(*args, **kwargs)


def run_supported(tier: str, op: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on ``tier`` for inputs its ``supports()`` already accepted (a caller that chose the tier
    itself, like the SGLang hooks' router): :func:`dispatch` minus the second check."""
    return get_tier(tier).ops[op].fn(*args, **kwargs)
