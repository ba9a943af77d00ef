"""How ``backend="auto"`` chooses: measured per card and shape class, upstream's kernel first unless beaten.

CPU tests: the pure pieces (shape classes, the margin rule, tables from bench rows), the order for a fake
CUDA card read from ``NSA_TP_TUNING_FILE``, and every committed table's consistency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nsa_tp.ops import registry, tuning

MEASURED = Path(tuning.__file__).with_name("measured")


def test_shape_classes():
    q16 = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    q48 = torch.zeros(4, 48, 576, dtype=torch.bfloat16)
    bf16 = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    fp8 = torch.zeros(10, 1, 656, dtype=torch.uint8)
    assert tuning.shape_class("sparse_mla_fwd", q16, bf16) == "h16/bf16"
    assert tuning.shape_class("sparse_mla_fwd", q48, fp8) == "h64/fp8"
    assert tuning.shape_class("sparse_mla_fwd", torch.zeros(1, 200, 576), bf16) == "h>128/bf16"
    pages = torch.zeros(2, 64, 1, 656, dtype=torch.uint8)
    assert tuning.shape_class("sparse_mla_decode", q16, pages) == "h16/fp8/b<=4"
    assert [tuning.shape_class("sparse_mla_decode", torch.zeros(b, 16, 576), pages)[-4:] for b in (1, 2, 3, 8)] == [
        "b<=1", "b<=2", "b<=4", "b<=8"]  # 2-8 row decode batches have classes of their own
    assert tuning.shape_class("sparse_mla_decode", torch.zeros(9, 16, 576), pages) == "h16/fp8/b<=64"
    assert tuning.shape_class("sparse_mla_decode", torch.zeros(65, 16, 576), pages) == "h16/fp8/b>64"
    # A plan and the decode it plans land in the same class.
    assert tuning.shape_class("plan_sparse_mla_decode", 4, 16, 2048, kv_dtype="fp8_e4m3", device="cpu") == (
        "h16/fp8/b<=4"
    )
    assert tuning.shape_class("plan_sparse_mla_decode", 4096, 128, 2048, kv_dtype=torch.bfloat16) == (
        "h128/bf16/b>64"
    )
    k = torch.zeros(40000, 128)
    assert tuning.shape_class("fp8_mqa_logits", None, (k, None)) == "n131072"
    assert tuning.shape_class("topk_transform_ragged", torch.zeros(3, 8192), 2048) == "w8192"
    assert tuning.shape_class("topk_transform_paged", torch.zeros(3, 300000), 2048) == "w>131072"


@pytest.mark.parametrize(
    "op, times, order",
    [
        # Ours 10% faster than FlashMLA: ours first.
        ("sparse_mla_fwd", {"flashmla": 1.0, "triton": 0.9, "reference": 50.0}, ["triton", "flashmla", "reference"]),
        # Ours faster by less than the margin: upstream keeps first place.
        ("sparse_mla_fwd", {"flashmla": 1.0, "triton": 0.985}, ["flashmla", "triton"]),
        # Ours faster by exactly the margin: ours first.
        ("sparse_mla_fwd", {"flashmla": 1.0, "triton": 0.98}, ["triton", "flashmla"]),
        # Upstream fastest.
        ("topk_transform_ragged", {"sgl_kernel": 0.2, "triton": 0.5}, ["sgl_kernel", "triton"]),
        # No upstream kernel measured: plain fastest-first.
        ("fp8_mqa_logits", {"triton": 2.0, "reference": 90.0}, ["triton", "reference"]),
    ],
)
def test_order_from_times_keeps_upstream_unless_beaten_by_the_margin(op, times, order):
    assert tuning.order_from_times(op, times) == order


def test_table_from_rows_sums_comparable_cases_only():
    rows = [
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "deep_gemm", "shape": {"N": 8192}, "ms": 1.0},
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "triton", "shape": {"N": 8192}, "ms": 1.5},
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "auto", "shape": {"N": 8192}, "ms": 1.0},
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "deep_gemm", "shape": {"N": 6000}, "ms": 2.0},
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "triton", "shape": {"N": 6000}, "ms": 1.0},
        # Triton could not run this case: not comparable, left out.
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "deep_gemm", "shape": {"N": 7000}, "ms": 9.0},
        {"op": "fp8_mqa_logits", "class": "n8192", "tier": "triton", "shape": {"N": 7000}, "ms": None},
    ]
    assert tuning.table_from_rows(rows) == {"fp8_mqa_logits": {"n8192": {"deep_gemm": 3.0, "triton": 2.5}}}


@pytest.fixture
def fake_card(monkeypatch, tmp_path):
    """A CUDA card named "Fake GPU 1" for CPU tensors, with a tuning table from ``NSA_TP_TUNING_FILE``."""

    class Cap:
        name = "Fake GPU 1"

    monkeypatch.setattr(tuning, "_device_of", lambda op, args, kwargs: torch.device("cuda", 0))
    monkeypatch.setattr(tuning, "get_capability", lambda device: Cap())
    tuning.clear_cache()

    def write(times: dict) -> None:
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"card": "Fake GPU 1", "times": times}))
        monkeypatch.setenv(tuning.ENV_TUNING_FILE, str(path))
        tuning.clear_cache()

    yield write
    tuning.clear_cache()


def test_tier_order_reads_the_cards_table(fake_card):
    q = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    # Never measured: upstream first.
    fake_card({})
    assert tuning.tier_order("sparse_mla_fwd", q, kv)[:3] == ["flashmla", "deep_gemm", "sgl_kernel"]
    fake_card({"sparse_mla_fwd": {"h16/bf16": {"flashmla": 2.0, "triton": 1.0}}})
    order = tuning.tier_order("sparse_mla_fwd", q, kv)
    assert order[:2] == ["triton", "flashmla"] and order[-1] == "reference"
    # Another class of the same op is not affected.
    assert tuning.tier_order("sparse_mla_fwd", torch.zeros(4, 128, 576), kv)[0] == "flashmla"
    # Measured without upstream's kernel: it cannot have been beaten, so it goes first.
    fake_card({"topk_transform_ragged": {"w8192": {"triton": 1.0, "reference": 5.0}}})
    assert tuning.tier_order("topk_transform_ragged", torch.zeros(2, 8192), 2048)[:3] == [
        "sgl_kernel", "triton", "reference"
    ]
    # The decode plan follows the decode's timings.
    fake_card({"sparse_mla_decode": {"h16/fp8/b<=1": {"flashmla": 0.5, "triton": 0.3}}})
    assert tuning.tier_order("plan_sparse_mla_decode", 1, 16, 2048, kv_dtype="fp8_e4m3", device="cuda")[0] == (
        "triton"
    )


def test_a_table_for_another_card_is_ignored(fake_card, tmp_path, monkeypatch):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"card": "Other GPU", "times": {"sparse_mla_fwd": {"h16/bf16": {"triton": 0.1}}}}))
    monkeypatch.setenv(tuning.ENV_TUNING_FILE, str(path))
    tuning.clear_cache()
    q = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    assert tuning.tier_order("sparse_mla_fwd", q, torch.zeros(10, 1, 576))[0] == "flashmla"


def test_auto_on_cpu_runs_the_reference():
    q = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    idx = torch.zeros(4, 1, 8, dtype=torch.int32)
    assert registry.auto_tier("sparse_mla_fwd", q, kv, idx, 0.1) == "reference"


def test_auto_checks_the_chosen_tier_once(monkeypatch):
    """``backend="auto"`` runs ``supports()`` once for the tier it picks (the per-call path does no work twice);
    ``skip`` names the tier to leave out (verify mode's "best other tier")."""
    q = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    idx = torch.zeros(4, 1, 8, dtype=torch.int32)
    tier = registry.get_tier("reference")
    impl = tier.ops["sparse_mla_fwd"]
    checks = []

    def counting(*args, **kwargs):
        checks.append(1)
        return impl.supports(*args, **kwargs)

    monkeypatch.setitem(tier.ops, "sparse_mla_fwd", registry.OpImpl(impl.fn, supports=counting))
    out, _, _ = registry.dispatch("sparse_mla_fwd", "auto", q, kv, idx, 0.1)
    assert len(checks) == 1 and out.shape == (4, 16, 512)
    registry.dispatch("sparse_mla_fwd", "reference", q, kv, idx, 0.1)  # a forced tier is checked once too
    assert len(checks) == 2
    with pytest.raises(registry.BackendUnavailableError, match="no tier supports"):
        registry.auto_tier("sparse_mla_fwd", q, kv, idx, 0.1, skip="reference")  # nothing else runs on CPU


@pytest.mark.parametrize("path", sorted(p for p in MEASURED.glob("*.json") if not p.name.startswith("costs_")),
                         ids=lambda p: p.name)
def test_committed_tables_are_consistent(path):
    data = json.loads(path.read_text())
    assert tuning.card_slug(data["card"]) == path.stem, "a table's file name is its card's slug"
    assert data.get("sources"), "a table names the results and command that made it"
    known = set(registry.tier_names())
    for op, classes in data["times"].items():
        assert op in tuning.UPSTREAM, op
        for cls, times in classes.items():
            assert set(times) <= known, (op, cls, times)
            assert all(ms > 0 for ms in times.values()), (op, cls)
            order = tuning.order_from_times(op, times)
            up = tuning.UPSTREAM[op]
            if up in times and order[0] != up:  # something beat upstream: by the margin, as measured
                assert times[order[0]] <= times[up] * (1 - tuning.MARGIN), (op, cls, times)


@pytest.mark.parametrize("path", sorted(MEASURED.glob("costs_*.json")), ids=lambda p: p.name)
def test_committed_costs_records_are_the_commands(path):
    """A committed Costs record is nsa-tp bench --costs's output for the card its name says."""
    from nsa_tp.token_parallel.costs import Costs

    data = json.loads(path.read_text())
    costs = Costs.from_dict(data["costs"])
    assert path.name == f"costs_{tuning.card_slug(costs.card)}.json"
    assert "--costs" in costs.command and costs.collectives_source and dict(costs.kernels).keys() >= {
        "indexer_ns_per_row_key", "sparse_ns_per_token", "decode_indexer_ns_per_key", "merge_us"}


def _reference_only_inputs():
    q = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16)
    idx = torch.zeros(4, 1, 8, dtype=torch.int32)
    return q, kv, idx


def test_auto_says_once_why_it_passed_over_upstream(caplog, monkeypatch):
    """Not installed / declined (with supports()' reason) / measured slower: one log line per (op, card, class)."""
    import _fake_tiers

    q, kv, idx = _reference_only_inputs()
    monkeypatch.setattr(registry, "_PASSED_OVER", set())
    with caplog.at_level("INFO", logger="nsa_tp.ops"):
        registry.dispatch("sparse_mla_fwd", "auto", q, kv, idx, 0.1)
        registry.dispatch("sparse_mla_fwd", "auto", q, kv, idx, 0.1)  # the same class: no second line
    lines = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage() or "not upstream" in
             r.getMessage()]
    assert len(lines) == 1 and "not installed" in lines[0] and "flashmla" in lines[0], lines
    caplog.clear()
    _fake_tiers.install(monkeypatch)
    flashmla = registry._load("flashmla")
    monkeypatch.setitem(flashmla.ops, "sparse_mla_fwd", registry.OpImpl(
        flashmla.ops["sparse_mla_fwd"].fn, supports=lambda *a, **k: "h_q 16 is not a multiple of 64"))
    monkeypatch.setattr(registry, "_PASSED_OVER", set())
    with caplog.at_level("INFO", logger="nsa_tp.ops"):
        assert registry.auto_tier("sparse_mla_fwd", q, kv, idx, 0.1) == "reference"
    assert any("declined: h_q 16 is not a multiple of 64" in r.getMessage() for r in caplog.records)


def test_auto_says_when_upstream_measured_slower(caplog, monkeypatch, fake_card):
    import _fake_tiers

    _fake_tiers.install(monkeypatch)
    monkeypatch.setattr(registry, "_PASSED_OVER", set())
    fake_card({"sparse_mla_fwd": {"h16/bf16": {"flashmla": 2.0, "reference": 1.0}}})
    q, kv, idx = _reference_only_inputs()
    with caplog.at_level("INFO", logger="nsa_tp.ops"):
        assert registry.auto_tier("sparse_mla_fwd", q, kv, idx, 0.1) == "reference"
    (line,) = [r.getMessage() for r in caplog.records if "not upstream" in r.getMessage()]
    assert "measured slower on Fake GPU 1 (flashmla 2.0 ms, reference 1.0 ms)" in line


def test_record_tiers_sees_every_dispatch_and_nests():
    q, kv, idx = _reference_only_inputs()
    with registry.record_tiers() as outer:
        registry.dispatch("sparse_mla_fwd", "reference", q, kv, idx, 0.1)
        with registry.record_tiers() as inner:
            registry.dispatch("sparse_mla_fwd", "auto", q, kv, idx, 0.1)
    assert inner == [("sparse_mla_fwd", "reference")]
    assert outer == [("sparse_mla_fwd", "reference")] * 2
    registry.dispatch("sparse_mla_fwd", "reference", q, kv, idx, 0.1)  # outside a block: nothing recorded
    assert len(outer) == 2
