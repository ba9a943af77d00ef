"""The plugin's hooks: nsa-tp runs only where a tier measured faster than upstream on this card; verify mode.

Plain CPU tests (SGLang not needed): the hooks are called directly with a recording stand-in for SGLang's
function ("upstream"), which returns the reference result plus a known perturbation, so every assertion
can tell which implementation produced the output.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from nsa_tp.integrations.sglang import _log, attention_hooks, routing, verify
from nsa_tp.ops import reference, registry, tuning
from nsa_tp.ops.kv_format import pack_fp8_kv


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg, *args):
        self.lines.append(msg % args if args else msg)


@pytest.fixture
def logs(monkeypatch):
    """Every plugin log line of one test, once-per-process keys reset."""
    monkeypatch.setattr(_log, "_once_keys", set())
    lines = Lines()
    monkeypatch.setattr(_log.logger, "log", lambda level, msg, *args: lines(msg, *args))
    monkeypatch.setattr(_log.logger, "info", lambda msg, *args: lines(msg, *args))
    monkeypatch.setattr(verify, "_stats", {})
    routing.clear_cache()
    yield lines.lines
    routing.clear_cache()


@pytest.fixture
def fake_card(monkeypatch, tmp_path):
    """Pretend CPU tensors live on a measured CUDA card "Fake GPU" whose table is ``times``."""

    class Cap:
        name = "Fake GPU"

    monkeypatch.setattr(tuning, "_device_of", lambda op, args, kwargs: torch.device("cuda", 0))
    monkeypatch.setattr(tuning, "get_capability", lambda device: Cap())
    monkeypatch.delenv("NSA_TP_SGLANG_BACKEND", raising=False)

    def use(times: dict) -> None:
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"card": "Fake GPU", "times": times}))
        monkeypatch.setenv(tuning.ENV_TUNING_FILE, str(path))
        tuning.clear_cache()
        routing.clear_cache()

    yield use
    tuning.clear_cache()


def _sparse_inputs(T=6, H=16, N=50, K=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 576, generator=g).bfloat16()
    kv = torch.randn(N, 1, 576, generator=g).bfloat16()
    idx = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    return q, kv, idx


class Upstream:
    """SGLang's function stand-in: the reference result scaled by ``1 + eps`` (so it is recognizable)."""

    def __init__(self, eps: float):
        self.eps, self.calls = eps, 0

    def sparse(self, backend, q, kv, v_head_dim, idx, sm_scale, topk_length=None, **extra):
        self.calls += 1
        out, _, _ = reference.sparse_mla_fwd(q, kv, idx.unsqueeze(1), sm_scale, v_head_dim)
        return (out.float() * (1 + self.eps)).bfloat16()

    def kv(self, backend, q_all, kv_cache, v_head_dim, sm_scale, layer, metadata, page_table_1, **extra):
        self.calls += 1
        H = layer.tp_q_head_num
        pages = kv_cache.view(-1, 64, 1, kv_cache.shape[-1])
        out, _ = reference.sparse_mla_decode(q_all.reshape(-1, H, 576), pages, page_table_1.unsqueeze(1), sm_scale)
        return (out.float() * (1 + self.eps)).bfloat16().unsqueeze(1)


def _call_sparse(up: Upstream, q, kv, idx):
    return attention_hooks.around_flashmla_sparse(up.sparse, types.SimpleNamespace(), q, kv, 512, idx, 0.05)


def test_unmeasured_card_keeps_upstream(logs, fake_card):
    fake_card({})
    up = Upstream(eps=0.0)
    q, kv, idx = _sparse_inputs()
    out = _call_sparse(up, q, kv, idx)
    assert up.calls == 1 and out.shape == (6, 16, 512)
    (line,) = [ln for ln in logs if "_forward_flashmla_sparse h16/bf16 runs" in ln]
    assert "upstream's FlashMLA path (pads 16 heads" in line and "no tuning table entry" in line


def test_upstream_kept_within_the_margin(logs, fake_card):
    fake_card({"sparse_mla_fwd": {"h16/bf16": {"flashmla": 1.0, "reference": 0.99}}})
    up = Upstream(eps=0.0)
    _call_sparse(up, *_sparse_inputs())
    assert up.calls == 1
    assert any("nothing beat flashmla by 2%" in ln for ln in logs), logs


def test_a_tier_measured_faster_takes_over(logs, fake_card, monkeypatch):
    fake_card({"sparse_mla_fwd": {"h16/bf16": {"flashmla": 2.0, "reference": 1.0}}})
    tier = registry.get_tier("reference")
    impl = tier.ops["sparse_mla_fwd"]
    checks = []
    monkeypatch.setitem(tier.ops, "sparse_mla_fwd", registry.OpImpl(
        impl.fn, supports=lambda *a, **k: checks.append(1) or impl.supports(*a, **k)))
    up = Upstream(eps=0.5)  # a wrong upstream: the output must not be it
    q, kv, idx = _sparse_inputs()
    out = _call_sparse(up, q, kv, idx)
    assert up.calls == 0
    assert len(checks) == 1  # the router's check; the tier then runs without a second one
    want, _, _ = reference.sparse_mla_fwd(q, kv, idx.unsqueeze(1), 0.05)
    assert torch.equal(out, want)
    assert any("runs nsa-tp tier reference (16 heads, no padding): measured on Fake GPU" in ln for ln in logs), logs
    # Another class of the same function was not measured: upstream there.
    _call_sparse(up, *_sparse_inputs(H=128))
    assert up.calls == 1


def test_verify_mode_compares_and_returns_the_routed_output(logs, fake_card, monkeypatch):
    monkeypatch.setenv(verify.ENV_VERIFY, "1")
    q, kv, idx = _sparse_inputs()
    # Route = upstream: upstream's output is returned, the best other tier (reference) is checked against it.
    fake_card({})
    up = Upstream(eps=5e-3)
    out = _call_sparse(up, q, kv, idx)
    ref_out, _, _ = reference.sparse_mla_fwd(q, kv, idx.unsqueeze(1), 0.05)
    assert up.calls == 1 and not torch.equal(out, ref_out)
    (calls, worst), = verify.worst().values()
    assert calls == 1 and 2e-3 < worst < verify.TOLERANCE  # the 5e-3 perturbation, seen through bf16 rounding
    assert any("verify _forward_flashmla_sparse h16/bf16: call 1 rel err" in ln and "reference vs upstream" in ln
               for ln in logs), logs
    # Route = nsa-tp: ours is returned; a bad upstream shows as an error above tolerance.
    fake_card({"sparse_mla_fwd": {"h16/bf16": {"flashmla": 2.0, "reference": 1.0}}})
    up = Upstream(eps=0.2)
    out = _call_sparse(up, q, kv, idx)
    assert torch.equal(out, ref_out) and up.calls == 1
    assert any("ABOVE TOLERANCE" in ln for ln in logs), logs


def test_decode_hook_routes_by_batch_class(logs, fake_card):
    g = torch.Generator().manual_seed(3)
    H, pages, K = 16, 3, 40
    kv = pack_fp8_kv(torch.randn(pages * 64, 1, 576, generator=g).bfloat16())
    layer = types.SimpleNamespace(tp_q_head_num=H, head_dim=576)
    backend = types.SimpleNamespace(flashmla_kv_format="V32")
    fake_card({"sparse_mla_decode": {"h16/fp8/b<=4": {"flashmla": 0.5, "reference": 0.3}}})
    up = Upstream(eps=0.5)
    for B, upstream_calls in ((4, 0), (100, 1)):  # decode proper is measured faster; a 100-row prefill is not
        q = torch.randn(B, H, 576, generator=g).bfloat16()
        idx = torch.randint(0, pages * 64, (B, K), generator=g, dtype=torch.int32)
        out = attention_hooks.around_flashmla_kv(up.kv, backend, q, kv, 512, 0.05, layer, None, idx)
        assert out.shape == (B, 1, H, 512) and up.calls == upstream_calls
    assert any("_forward_flashmla_kv h16/fp8/b<=4 runs nsa-tp tier reference" in ln for ln in logs), logs
    assert any("_forward_flashmla_kv h16/fp8/b>64 runs upstream's FlashMLA path" in ln for ln in logs), logs


def test_relative_error_edge_cases():
    z = torch.zeros(3, 4)
    assert verify.relative_error(z, z) == 0.0
    assert verify.relative_error(torch.ones(3, 4), z) == float("inf")
    assert verify.relative_error(torch.full((3, 4), float("nan")), torch.ones(3, 4)) == float("inf")
    assert verify.relative_error(torch.ones(2), torch.ones(3)) == float("inf")


def test_upstream_route_builds_nothing_of_ours(logs, fake_card, monkeypatch):
    """Kept upstream, verify off: no nsa-tp tensor work in front of SGLang's function (the bf16 decode under CUDA
    graphs measured 5% slower on H200 while the hook still cut the indices before deciding)."""
    fake_card({})

    def boom(*_a, **_k):
        raise AssertionError("built nsa-tp's indices on upstream's path")

    monkeypatch.setattr(attention_hooks, "_cut_at_topk_length", boom)
    up = Upstream(eps=0.0)
    _call_sparse(up, *_sparse_inputs())
    assert up.calls == 1
