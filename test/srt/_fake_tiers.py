"""Stand-in tiers under upstream's names (``deep_gemm``, ``sgl_kernel``, ``flashmla``) for CPU tests of the
benchmarks' "upstream means upstream" checks: an *honest* stand-in computes with the reference functions itself
(the dispatcher records the stand-in's name), a *falling-back* one hands the call to another tier through the
dispatcher (what a silent fallback inside a tier looks like), which the checks must catch."""

from __future__ import annotations

from nsa_tp.ops import registry

_OPS = {"deep_gemm": ("fp8_mqa_logits", "fp8_paged_mqa_logits"),
        "sgl_kernel": ("topk_transform_ragged", "topk_transform_paged"),
        "flashmla": ("sparse_mla_fwd",)}


def install(monkeypatch, *, honest: bool = True, fallback_to: str = "reference") -> None:
    real_load = registry._load
    ref = registry.get_tier("reference")

    def impl(op: str) -> registry.OpImpl:
        base = ref.ops[op]
        if honest:
            return registry.OpImpl(base.fn, base.supports)
        return registry.OpImpl(lambda *a, **k: registry.dispatch(op, fallback_to, *a, **k), base.supports)

    fakes = {name: registry.Tier(name, lambda: None, {op: impl(op) for op in ops}) for name, ops in _OPS.items()}
    monkeypatch.setattr(registry, "_load", lambda name: fakes.get(name) or real_load(name))
