"""DP-padding helpers: extra rows are -1 (top-k) or 0 (cache seqlens); too few rows is an error."""

from __future__ import annotations

import pytest
import torch

from nsa_tp.attention.padding import CACHE_SEQLEN_PAD, pad_cache_seqlens, pad_topk_indices


@pytest.mark.parametrize("shape", [(3, 5), (3, 1, 5)])
def test_pad_topk_indices_adds_minus_one_rows(shape):
    idx = torch.randint(0, 100, shape, dtype=torch.int32)
    out = pad_topk_indices(idx, 8)
    assert out.shape == (8, *shape[1:]) and out.dtype == torch.int32
    assert torch.equal(out[:3], idx)
    assert (out[3:] == -1).all()


def test_pad_topk_indices_same_rows_is_identity():
    idx = torch.zeros(4, 1, 7, dtype=torch.int32)
    assert pad_topk_indices(idx, 4) is idx
    assert pad_topk_indices(torch.zeros(0, 7, dtype=torch.int32), 2).tolist() == [[-1] * 7] * 2


def test_pad_topk_indices_more_rows_than_q_is_an_error():
    with pytest.raises(ValueError, match="indexer returned 5 rows but q has 4"):
        pad_topk_indices(torch.zeros(5, 8, dtype=torch.int32), 4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, 8, dtype=torch.int64), "indices: expected dtype int32"),
        (torch.zeros(3, 2, 8, dtype=torch.int32), "indices: expected \\[T, K\\] or \\[T, 1, K\\]"),
        (torch.zeros(8, dtype=torch.int32), "indices: expected \\[T, K\\]"),
    ],
)
def test_pad_topk_indices_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pad_topk_indices(bad, 4)
    with pytest.raises(ValueError, match="num_rows"):
        pad_topk_indices(torch.zeros(3, 8, dtype=torch.int32), -1)


def test_pad_cache_seqlens():
    s = torch.tensor([5, 70, 1], dtype=torch.int32)
    out = pad_cache_seqlens(s, 5)
    assert out.tolist() == [5, 70, 1, CACHE_SEQLEN_PAD, CACHE_SEQLEN_PAD] and CACHE_SEQLEN_PAD == 0
    assert pad_cache_seqlens(s, 3) is s
    with pytest.raises(ValueError, match="seqlens: 3 requests but q has only 2 rows"):
        pad_cache_seqlens(s, 2)
    with pytest.raises(ValueError, match="seqlens: expected dtype int32"):
        pad_cache_seqlens(s.long(), 4)
