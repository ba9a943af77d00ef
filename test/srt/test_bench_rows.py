"""The bench's row plumbing on CPU: every case gets tier rows with a shape class, the tiers that ran and
upstream's time where it ran; the auto pass times ``auto`` itself next to the fastest tier; a row whose tier
ran another one fails ``nsa-tp bench`` before it writes anything.

The GPU numbers come from ``nsa-tp bench`` on a card; here the timer is replaced by a counter (the CPU has
no CUDA events) and only the reference tier loads, so this checks structure, not speed.
"""

from __future__ import annotations

import argparse
import itertools
import json

import _fake_tiers
import pytest
import torch

from nsa_tp.bench import kernels
from nsa_tp.bench.timing import Ceilings
from nsa_tp.bench_cmd import auto_check
from nsa_tp.ops import tuning

CEIL = Ceilings(100.0, 200.0, 1000.0)


@pytest.fixture
def cpu_timer(monkeypatch):
    """Each timed pass returns the next tick; calling the fixture's value restarts the count at 1."""
    ticks = [itertools.count(1)]

    def fake_median(fn, **_kw):
        fn()  # the op really runs: a broken call fails the test
        return float(next(ticks[0]))

    monkeypatch.setattr(kernels, "median_ms", fake_median)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return lambda: ticks.__setitem__(0, itertools.count(1))


def _check_case_rows(rows, op):
    tier_rows = [r for r in rows if r.tier not in ("auto", "flashmla-raw")]
    assert tier_rows and all(r.cls for r in tier_rows)
    assert all(r.ms is not None for r in tier_rows), [r.note for r in tier_rows]
    assert all(r.ran == [r.tier] for r in tier_rows), [(r.tier, r.ran) for r in tier_rows]
    assert not [r for r in rows if r.tier == "auto"]  # the first pass times tiers only
    return tier_rows


def _all_rows(dev):
    rows = []
    rows += kernels.sparse_mla_rows(8, 256, 32, [16, 48], ["bf16", "fp8"], CEIL, dev, with_reference=True)
    rows += kernels.decode_rows([2], [16], 128, 32, CEIL, dev, with_reference=True)
    rows += kernels.logits_rows(8, [64], 4, 32, CEIL, dev, with_reference=True)
    rows += kernels.paged_logits_rows([2], 4, 128, CEIL, dev, with_reference=True)
    rows += kernels.topk_rows([(8, 300)], 16, CEIL, dev, with_reference=True, paged_batch=2, paged_ctx=200)
    return rows


def test_every_section_builds_rows_and_a_table(cpu_timer):
    dev = torch.device("cpu")
    rows = _all_rows(dev)
    ops = {r.op for r in rows}
    assert ops == {"sparse_mla_fwd", "sparse_mla_decode", "fp8_mqa_logits", "fp8_paged_mqa_logits",
                   "topk_transform_ragged", "topk_transform_paged"}
    for op in ops:
        _check_case_rows([r for r in rows if r.op == op], op)
    dicts = [r.to_dict() for r in rows]
    assert all("class" in d for d in dicts)
    assert {d["class"] for d in dicts if d["op"] == "sparse_mla_fwd" and d["tier"] == "reference"} == {
        "h16/bf16", "h64/bf16", "h16/fp8", "h64/fp8"}
    table = tuning.table_from_rows(dicts)
    assert set(table) == ops and table["sparse_mla_decode"] == {"h16/fp8/b<=2": pytest.approx(
        {"reference": next(d["ms"] for d in dicts if d["op"] == "sparse_mla_decode" and d["tier"] == "reference")})}
    assert kernels.mislabelled(rows) == []
    # The auto pass: per case the fastest tier, then auto itself, both timed (the counter makes auto "slower":
    # by 1 tick, so by more than 3% in the first cases, with the count restarted)
    cpu_timer()
    with kernels.auto_pass({kernels.case_key(d["op"], d["shape"]): d["tier"] for d in dicts if d["class"]}):
        auto_rows = _all_rows(dev)
    assert [r.tier for r in auto_rows].count("auto") == len({kernels.case_key(d["op"], d["shape"]) for d in dicts
                                                              if d["class"]})
    assert all(r.note.startswith("auto runs reference") and r.ran == ["reference"] for r in auto_rows
               if r.tier == "auto")
    assert kernels.mislabelled(auto_rows) == []
    check = auto_check([r.to_dict() for r in auto_rows])
    assert len(check) == len({kernels.case_key(d["op"], d["shape"]) for d in dicts if d["class"]})
    # the counter timer makes every auto row 1 tick slower than its tier row: ok only where 1 tick <= 3%
    for c in check:
        assert c["auto_over_fastest"] == pytest.approx(c["auto_ms"] / c["fastest_ms"])
        assert c["ok"] == (c["auto_over_fastest"] <= 1.03)
    assert kernels.AUTO_CHECK_TOLERANCE == 0.03  # issue 20's bar
    assert not all(c["ok"] for c in check)  # the check can fail


def _bench_args(tmp_path, **kw):
    from nsa_tp.bench_cmd import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--quick", "--out", str(tmp_path / "out"), "--measured-dir", str(tmp_path / "measured"),
                         "--ops", "fp8_mqa_logits,topk"])


def _run_bench_on_cpu(monkeypatch, tmp_path):
    from nsa_tp import bench_cmd
    from nsa_tp.bench import timing

    monkeypatch.setattr(timing, "measure_ceilings", lambda device: CEIL)
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_kw: (fn(), 1.0)[1])  # every tier "1 ms": a tie
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return bench_cmd._kernels_main(_bench_args(tmp_path), torch.device("cpu"), "Test Card", _NOW, "nsa-tp bench")


class _Now:
    def date(self):
        import datetime

        return datetime.date(2026, 12, 6)

    def isoformat(self, timespec=""):
        return "2026-12-06T00:00:00"

    def __format__(self, spec):
        return "20261206"


_NOW = _Now()


def test_bench_writes_table_and_results_with_honest_tiers(monkeypatch, tmp_path):
    _fake_tiers.install(monkeypatch)  # upstream's names, reference arithmetic, honest
    assert _run_bench_on_cpu(monkeypatch, tmp_path) == 0
    table = json.loads((tmp_path / "measured" / "test-card.json").read_text())
    assert table["card"] == "Test Card" and table["command"] == "nsa-tp bench" and "never by hand" in table["note"]
    assert table["times"]["fp8_mqa_logits"]["n8192"].keys() >= {"deep_gemm", "reference"}
    (results,) = (tmp_path / "out").glob("kernels_*.json")
    data = json.loads(results.read_text())
    assert data["auto_check"] and all(c["ok"] for c in data["auto_check"])  # a tie: auto = upstream, timed
    assert all(r["ran"] == [r["tier"]] for r in data["rows"] if r["ms"] is not None)


def test_bench_refuses_a_row_that_ran_another_tier(monkeypatch, tmp_path, capsys):
    """A stand-in DeepGEMM tier that hands the call to the reference (a silent fallback): exit 1, nothing written."""
    _fake_tiers.install(monkeypatch, honest=False)
    assert _run_bench_on_cpu(monkeypatch, tmp_path) == 1
    assert "labelled deep_gemm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "measured").exists()
