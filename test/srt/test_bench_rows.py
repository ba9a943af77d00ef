"""The bench's row plumbing on CPU: every case gets tier rows with a shape class, upstream's time where it
ran, one ``auto`` row, and the run turns into a tuning table and an auto check.

The GPU numbers come from ``nsa-tp bench`` on a card; here the timer is replaced by a counter (the CPU has
no CUDA events) and only the reference tier loads, so this checks structure, not speed.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nsa_tp.bench import kernels
from nsa_tp.bench.timing import Ceilings
from nsa_tp.bench_cmd import auto_check
from nsa_tp.ops import tuning

CEIL = Ceilings(100.0, 200.0, 1000.0)


@pytest.fixture
def cpu_timer(monkeypatch):
    ticks = itertools.count(1)

    def fake_median(fn, **_kw):
        fn()  # the op really runs: a broken call fails the test
        return float(next(ticks))

    monkeypatch.setattr(kernels, "median_ms", fake_median)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def _check_case_rows(rows, op):
    tier_rows = [r for r in rows if r.tier not in ("auto", "flashmla-raw")]
    assert tier_rows and all(r.cls for r in tier_rows)
    assert all(r.ms is not None for r in tier_rows), [r.note for r in tier_rows]
    autos = [r for r in rows if r.tier == "auto"]
    assert len(autos) == len({str(r.shape) for r in tier_rows})
    assert all("auto runs reference" in r.note for r in autos)
    return tier_rows


def test_every_section_builds_rows_and_a_table(cpu_timer):
    dev = torch.device("cpu")
    rows = []
    rows += kernels.sparse_mla_rows(8, 256, 32, [16, 48], ["bf16", "fp8"], CEIL, dev, with_reference=True)
    rows += kernels.decode_rows([2], [16], 128, 32, CEIL, dev, with_reference=True)
    rows += kernels.logits_rows(8, [64], 4, 32, CEIL, dev, with_reference=True)
    rows += kernels.paged_logits_rows([2], 4, 128, CEIL, dev, with_reference=True)
    rows += kernels.topk_rows([(8, 300)], 16, CEIL, dev, with_reference=True, paged_batch=2, paged_ctx=200)
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
    assert set(table) == ops and table["sparse_mla_decode"] == {"h16/fp8/b<=64": pytest.approx(
        {"reference": next(d["ms"] for d in dicts if d["op"] == "sparse_mla_decode" and d["tier"] == "reference")})}
    check = auto_check(dicts, table)
    assert len(check) == len({(d["op"], str(d["shape"])) for d in dicts if d["class"]})
    assert all(c["auto"] == "reference" and c["auto_over_fastest"] == 1.0 for c in check)
