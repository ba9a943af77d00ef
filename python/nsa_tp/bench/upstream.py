""""Upstream means upstream": what a benchmark piece ran, and the check that a piece labelled upstream ran
upstream's kernel and nothing else (:data:`nsa_tp.ops.tuning.UPSTREAM` per op, or a named upstream function called
directly, as SGLang calls it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nsa_tp.ops.tuning import UPSTREAM

__all__ = ["tiers_of", "upstream_violations"]


def tiers_of(calls: Sequence[tuple[str, str]], direct: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{op: tier(s) that ran}`` of one piece: the dispatcher's record (:func:`nsa_tp.ops.registry.record_tiers`;
    several tiers joined by ``+``) plus ``direct`` ``{op: function}`` for kernels called without the dispatcher."""
    ran: dict[str, set[str]] = {}
    for op, tier in calls:
        ran.setdefault(op, set()).add(tier)
    out = {op: "+".join(sorted(t)) for op, t in ran.items()}
    out.update({op: f"{fn} (direct call)" for op, fn in (direct or {}).items()})
    return out


def upstream_violations(label: str, tiers: Mapping[str, str], required_ops: Sequence[str],
                        direct_ok: Mapping[str, str] | None = None) -> list[str]:
    """Why the piece ``label`` (``tiers`` from :func:`tiers_of`) is not upstream's: an op in ``required_ops`` that did
    not run, or any op that ran something other than upstream's tier (or, for ``direct_ok[op]``, that function)."""
    bad = []
    allowed = dict(direct_ok or {})
    for op in sorted(set(required_ops) | set(tiers)):
        got = tiers.get(op)
        if got == UPSTREAM.get(op) or (op in allowed and got == f"{allowed[op]} (direct call)"):
            continue
        bad.append(f"{label}: {op} ran {got or 'nothing'!r}, upstream's is "
                   f"{allowed.get(op, UPSTREAM.get(op))!r}")
    return bad
