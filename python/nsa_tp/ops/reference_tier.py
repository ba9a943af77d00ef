"""Registers :mod:`nsa_tp.ops.reference` (and the plain-torch top-k) as the always-available ``"reference"`` tier."""

from nsa_tp.ops import reference, topk
from nsa_tp.ops.registry import OpImpl, Tier

__all__ = ["TIER"]

def _own_plan_only(*_args: object, plan: object = None, **_kwargs: object) -> str | None:
    # A plan from another tier must run on that tier; the public op routes it there, this is the backstop.
    tier = getattr(plan, "tier", "reference")
    return None if tier == "reference" else f"the plan was built by tier {tier!r}"


TIER = Tier(
    name="reference",
    available=lambda: None,
    ops={
        "sparse_mla_fwd": OpImpl(reference.sparse_mla_fwd),
        "fp8_mqa_logits": OpImpl(reference.fp8_mqa_logits),
        "fp8_paged_mqa_logits": OpImpl(reference.fp8_paged_mqa_logits),
        "plan_sparse_mla_decode": OpImpl(reference.plan_sparse_mla_decode),
        "sparse_mla_decode": OpImpl(reference.sparse_mla_decode, supports=_own_plan_only),
        "topk_transform_ragged": OpImpl(topk.topk_transform_ragged),
        "topk_transform_paged": OpImpl(topk.topk_transform_paged),
    },
)
