"""Registers :mod:`nsa_tp.ops.reference` as the always-available ``"reference"`` tier."""

from nsa_tp.ops import reference
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = ["TIER"]

# Slowest tier: ranked last under "auto" so any faster tier that supports the inputs wins.
_LAST = 1e9

TIER = Tier(
    name="reference",
    available=lambda: None,
    ops={
        "sparse_mla_fwd": OpImpl(reference.sparse_mla_fwd, rank=lambda *a, **k: _LAST),
        "fp8_mqa_logits": OpImpl(reference.fp8_mqa_logits, rank=lambda *a, **k: _LAST),
    },
)
