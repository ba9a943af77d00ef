"""The logits chunk planner: hand cases, property tests (hypothesis), the 128K-token bound, the budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_tp.attention import chunking
from nsa_tp.attention.chunking import (
    BUDGET_ENV,
    CPU_DEFAULT_BUDGET_BYTES,
    chunk_logits_bytes,
    chunk_window,
    plan_logits_chunks,
    resolve_logits_budget,
)


def causal_ragged(extend_lens, prefix_lens):
    """(ks, ke) of a ragged prefill batch with cached prefixes (the indexer's layout)."""
    ks, ke, start = [], [], 0
    for e, p in zip(extend_lens, prefix_lens, strict=True):
        for i in range(e):
            ks.append(start)
            ke.append(start + p + i + 1)
        start += p + e
    return ks, ke


def test_hand_case_counts():
    # 4 rows of 10 keys = 40 B each; budget 100 B -> 2 rows per chunk
    assert plan_logits_chunks([10, 10, 10, 10], 100) == [slice(0, 2), slice(2, 4)]
    # the chunk's width is its widest row: [1, 20] needs 2 * 20 * 4 = 160 > 100
    assert plan_logits_chunks([1, 20, 1], 100) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert plan_logits_chunks([], 100) == []
    assert plan_logits_chunks([0, 0, 0], 1) == [slice(0, 3)]  # empty rows cost nothing
    assert plan_logits_chunks([1] * 5, 1000, max_rows=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_hand_case_ranges_use_the_column_window():
    ks, ke = causal_ragged([3, 2], [0, 4])  # req0 keys [0,3), req1 keys [3, 9)
    assert (ks, ke) == ([0, 0, 0, 3, 3], [1, 2, 3, 8, 9])
    assert chunk_window(ks, ke, slice(3, 5)) == (3, 9)
    assert chunk_logits_bytes((ks, ke), slice(0, 5)) == 5 * 9 * 4
    # budget 60 B: rows 0..2 need 3 x 3 keys x 4 = 36; adding row 3 widens the window to [0, 8): 4*8*4=128;
    # rows 3..4 share the window [3, 9): 2 x 6 x 4 = 48
    assert plan_logits_chunks((ks, ke), 60) == [slice(0, 3), slice(3, 5)]


def test_single_row_over_budget_names_the_env_var():
    with pytest.raises(ValueError, match=f"row 1 alone needs 400 bytes.*{BUDGET_ENV}"):
        plan_logits_chunks([1, 100], 399)


@pytest.mark.parametrize(
    "rows, match",
    [
        (([0, 5], [3]), "ke: expected 2 rows"),
        (([4], [3]), "ks/ke: row 0"),
        ([-1], "row_key_counts: row 0"),
        ([1.5], "row_key_counts: expected integers"),
    ],
)
def test_bad_rows(rows, match):
    with pytest.raises(ValueError, match=match):
        plan_logits_chunks(rows, 100)
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_logits_chunks([1], 0)


ragged_batches = st.lists(
    st.tuples(st.integers(1, 40), st.integers(0, 60)), min_size=1, max_size=6
)  # (extend_len, prefix_len) per request


@settings(max_examples=150, deadline=None)
@given(ragged_batches, st.integers(4, 4000))
def test_every_chunk_fits_and_the_chunks_tile_the_rows(batch, budget):
    ks, ke = causal_ragged([e for e, _ in batch], [p for _, p in batch])
    widest = max(e - s for s, e in zip(ks, ke, strict=True)) * 4
    if widest > budget:
        with pytest.raises(ValueError, match="alone needs"):
            plan_logits_chunks((ks, ke), budget)
        return
    chunks = plan_logits_chunks((ks, ke), budget)
    assert chunks[0].start == 0 and chunks[-1].stop == len(ks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.stop == b.start and a.stop > a.start
    for c in chunks:
        assert chunk_logits_bytes((ks, ke), c) <= budget
        # greedy: one more row would not have fit (so chunks are not needlessly small)
        if c.stop < len(ks):
            assert chunk_logits_bytes((ks, ke), slice(c.start, c.stop + 1)) > budget


def test_128k_prefill_plan_stays_under_budget():
    """Pure: a 128K-token prefill (one request, 4K cached prefix) under a 2 GiB budget, no big allocation."""
    budget = 2 << 30
    ks, ke = causal_ragged([131072], [4096])
    chunks = plan_logits_chunks((ks, ke), budget)
    peak = max(chunk_logits_bytes((ks, ke), c) for c in chunks)
    unchunked = len(ks) * max(ke) * 4
    assert peak <= budget < unchunked  # the unchunked matrix would be ~68 GiB
    causal_bytes = sum(e - s for s, e in zip(ks, ke, strict=True)) * 4  # what the rows really score
    assert len(chunks) >= -(-causal_bytes // budget)
    assert chunks[-1].stop == 131072


def test_budget_resolution(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert resolve_logits_budget(64, "cpu") == 64 << 20
    monkeypatch.setenv(BUDGET_ENV, "1.5")
    assert resolve_logits_budget(None, "cpu") == int(1.5 * (1 << 20))
    assert resolve_logits_budget(2, "cpu") == 2 << 20  # the explicit argument wins
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        resolve_logits_budget(None, "cpu")
    monkeypatch.setenv(BUDGET_ENV, "")
    assert resolve_logits_budget(None, "cpu") == CPU_DEFAULT_BUDGET_BYTES
    with pytest.raises(ValueError, match="logits_budget_mb"):
        resolve_logits_budget(-3, "cpu")
    # On a GPU the fraction of free memory is used: fake the driver query.
    monkeypatch.setattr(chunking, "_free_device_memory", lambda device: 8 << 30)
    assert resolve_logits_budget(None, "cuda", free_fraction=0.25) == 2 << 30
