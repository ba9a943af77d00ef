"""Top-k transform: hand-computed ragged and paged cases, ties, -inf, chunk offsets, and a brute-force check."""

from __future__ import annotations

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops.topk import topk_positions

NEG_INF = float("-inf")
I32 = torch.int32


def t(x):
    return torch.tensor(x, dtype=I32)


def test_ragged_hand_case():
    logits = torch.tensor(
        [
            [9.0, 1.0, 5.0, 3.0, 7.0, 0.0],  # candidates cols [1, 5): 1, 5, 3, 7 -> best 3: cols 4, 2, 3
            [2.0, 8.0, NEG_INF, 4.0, 6.0, 1.0],  # cols [0, 3): 2, 8, -inf -> 2 candidates only
            [0.0] * 6,  # length 0: nothing
        ]
    )
    out = ops.topk_transform_ragged(logits, 3, row_starts=t([1, 0, 2]), lengths=t([4, 3, 0]))
    assert out.dtype == I32
    # position relative to the row start + offset (default offset = row start) = the logits column
    assert out.tolist() == [[4, 2, 3], [1, 0, -1], [-1, -1, -1]]


def test_ragged_offset_override_maps_a_column_window_to_global_ids():
    # A chunk computed over the key window [100, 106): columns are global key 100 + c.
    logits = torch.tensor([[NEG_INF, 3.0, 9.0, 1.0, NEG_INF, NEG_INF]])
    ks_global, lo = 101, 100
    out = ops.topk_transform_ragged(
        logits, 2, row_starts=t([ks_global - lo]), lengths=t([3]), offset_override=t([ks_global])
    )
    # positions in the row: col 2 -> p=1, col 1 -> p=0; global ids = 101 + p
    assert out.tolist() == [[102, 101]]


def test_ties_go_to_the_lower_position_and_topk_caps_at_len():
    logits = torch.tensor([[1.0, 5.0, 5.0, 5.0, 2.0]])
    assert topk_positions(logits, 2, t([5])).tolist() == [[1, 2]]
    # K = min(topk, len): a short row keeps all of its candidates, -1 fills the rest
    assert topk_positions(logits, 8, t([5])).tolist() == [[1, 2, 3, 4, 0, -1, -1, -1]]


def test_nan_is_not_a_candidate():
    logits = torch.tensor([[float("nan"), 1.0, 2.0]])
    assert topk_positions(logits, 3, t([3])).tolist() == [[2, 1, -1]]


def test_paged_hand_case():
    # request 0 uses pages [3, 1], request 1 uses page [0]; page size 64
    page_table = t([[3, 1], [0, 2]])
    logits = torch.full((2, 128), NEG_INF)
    logits[0, :70] = torch.arange(70, dtype=torch.float32)  # best tokens: 69, 68, 67 -> page 1
    logits[0, 5] = 1000.0  # token 5 -> page 3
    logits[1, :3] = torch.tensor([1.0, 3.0, 2.0])
    out = ops.topk_transform_paged(logits, 4, lengths=t([70, 3]), page_table=page_table)
    assert out.tolist() == [
        [3 * 64 + 5, 1 * 64 + 5, 1 * 64 + 4, 1 * 64 + 3],
        [0 * 64 + 1, 0 * 64 + 2, 0 * 64 + 0, -1],
    ]


def test_paged_prefill_rows_with_row_to_req_and_starts():
    # ragged logits of two requests' keys concatenated: req 0 keys at cols [0, 3), req 1 at [3, 5)
    page_table = t([[2], [5]])
    logits = torch.tensor([[1.0, 2.0, NEG_INF, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, NEG_INF, 7.0, 8.0]])
    out = ops.topk_transform_paged(
        logits, 2, lengths=t([2, 2]), page_table=page_table, row_to_req=t([0, 1]), row_starts=t([0, 3])
    )
    assert out.tolist() == [[2 * 64 + 1, 2 * 64 + 0], [5 * 64 + 1, 5 * 64 + 0]]


@pytest.mark.parametrize("seed", range(5))
def test_ragged_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    R, W, K = 17, 300, 37
    logits = torch.randn(R, W, generator=g)  # distinct values: no ties
    starts = torch.randint(0, W, (R,), generator=g, dtype=I32)
    lengths = torch.minimum(torch.randint(0, 120, (R,), generator=g, dtype=I32), W - starts)
    out = ops.topk_transform_ragged(logits, K, row_starts=starts, lengths=lengths)
    for r in range(R):
        s, n = int(starts[r]), int(lengths[r])
        vals = logits[r, s : s + n].tolist()
        order = sorted(range(n), key=lambda i: -vals[i])[:K]
        want = [s + i for i in order] + [-1] * (K - min(K, n))
        assert out[r].tolist() == want


def test_bad_input_names_the_argument():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="row_starts/lengths: row 1"):
        ops.topk_transform_ragged(logits, 4, row_starts=t([0, 8]), lengths=t([3, 3]))
    with pytest.raises(ValueError, match="topk"):
        ops.topk_transform_ragged(logits, 0, row_starts=t([0, 0]), lengths=t([3, 3]))
    with pytest.raises(ValueError, match="lengths: expected dtype int32"):
        ops.topk_transform_ragged(logits, 4, row_starts=t([0, 0]), lengths=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="logits: expected dtype float32"):
        ops.topk_transform_ragged(logits.double(), 4, row_starts=t([0, 0]), lengths=t([3, 3]))
    with pytest.raises(ValueError, match="row_to_req"):
        ops.topk_transform_paged(logits, 4, lengths=t([3, 3]), page_table=t([[0]]))
    with pytest.raises(ValueError, match="lengths: a row is longer"):
        ops.topk_transform_paged(torch.zeros(1, 100), 4, lengths=t([100]), page_table=t([[0]]))
    with pytest.raises(ValueError, match="offset_override"):
        ops.topk_transform_ragged(logits, 4, row_starts=t([0, 0]), lengths=t([3, 3]), offset_override=t([1]))


def test_check_values_false_gives_the_same_result_without_the_range_check():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g)
    starts, lengths = t([0, 5, 10, 0, 49, 20]), t([50, 10, 3, 0, 1, 30])
    a = ops.topk_transform_ragged(logits, 7, row_starts=starts, lengths=lengths)
    b = ops.topk_transform_ragged(logits, 7, row_starts=starts, lengths=lengths, check_values=False)
    assert torch.equal(a, b)
    pt = t([[4], [1], [0], [2], [3], [5]])
    a = ops.topk_transform_paged(logits, 7, lengths=lengths, page_table=pt, row_to_req=t([5, 4, 3, 2, 1, 0]),
                                 row_starts=starts)
    b = ops.topk_transform_paged(logits, 7, lengths=lengths, page_table=pt, row_to_req=t([5, 4, 3, 2, 1, 0]),
                                 row_starts=starts, check_values=False)
    assert torch.equal(a, b)
    assert (a[0] // 64 == 5).all() and (a[1, :7] // 64 == 3).all()  # rows map through their request's page


# ---- topk_mismatch: the equivalence every tier is tested with (order and tie choice are free) ----


def _value_of(logits: torch.Tensor):
    def value_of(ids: torch.Tensor) -> torch.Tensor:
        inside = ids < logits.shape[1]
        return torch.where(inside, logits.gather(1, ids.clamp(max=logits.shape[1] - 1)), float("nan"))

    return value_of


def test_topk_mismatch_accepts_reordering_and_tie_choice():
    from nsa_tp.ops.topk import topk_mismatch

    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, float("-inf")], [0.5, float("nan"), -0.0, 0.0, 4.0]])
    ref = torch.tensor([[1, 2, -1], [4, 0, 2]], dtype=torch.int32)
    assert topk_mismatch(ref, ref, _value_of(logits)) is None
    got = torch.tensor([[2, 1, -1], [0, 4, 3]], dtype=torch.int32)  # reordered; +0.0 kept for -0.0
    assert topk_mismatch(got, ref, _value_of(logits)) is None


@pytest.mark.parametrize(
    "got, why",
    [
        ([[1, 3, -1]], "best kept value"),  # 2.0 instead of the tied 3.0
        ([[1, -1, 2]], "-1 comes before"),
        ([[1, 1, -1]], "kept twice"),
        ([[1, 4, -1]], "not a selectable"),  # -inf
        ([[1, 7, -1]], "not a selectable"),  # outside the row
        ([[1, 2, 3]], "count differs"),
    ],
)
def test_topk_mismatch_names_the_problem(got, why):
    from nsa_tp.ops.topk import topk_mismatch

    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, float("-inf")]])
    ref = torch.tensor([[1, 2, -1]], dtype=torch.int32)
    reason = topk_mismatch(torch.tensor(got, dtype=torch.int32), ref, _value_of(logits))
    assert reason is not None and why in reason, reason
