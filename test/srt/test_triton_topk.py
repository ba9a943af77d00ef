"""The Triton top-k transforms against the reference tier's stable sort: identical ids, exactly.

GPU tests (``@pytest.mark.gpu``) draw fresh logits over a grid of K in {1, 300, 2048}, W in {1, 100, 8192,
32768}, R in {1, 7, 4096}: continuous values, and heavy ties (a few values incl. +-0.0) with -inf and NaN
entries; random row starts (not 0), rows shorter than K and empty rows; ragged with and without
``offset_override``, and paged with ``row_to_req``. Every output is poisoned first (``_common.alloc`` fills
int32 with 0x7F7F7F7F), so an element the kernel forgot to write cannot equal the reference's id.
CPU tests: the tier's ``supports`` reasons and ranking.
"""

from __future__ import annotations

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import triton as triton_tier

I32 = torch.int32


@pytest.fixture
def poisoned(monkeypatch):
    from nsa_tp.ops.triton import _common

    def alloc(shape, dtype, device):
        return torch.full(shape, 0x7F7F7F7F, dtype=dtype, device=device)

    monkeypatch.setattr(_common, "alloc", alloc)


def _logits(R: int, W: int, ties: bool, gen: torch.Generator) -> torch.Tensor:
    if not ties:
        return torch.randn(R, W, device="cuda", generator=gen)
    pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 3.0, float("-inf"), float("nan")], device="cuda")
    return pool[torch.randint(0, len(pool), (R, W), device="cuda", generator=gen)]


def _rows(R: int, W: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random starts in [0, W] and lengths in [0, W - start]; row 0 spans the whole width, row 1 is empty."""
    starts = torch.randint(0, W + 1, (R,), device="cuda", generator=gen)
    lengths = (torch.rand(R, device="cuda", generator=gen) * (W - starts + 1)).floor().long().clamp_max(W - starts)
    starts[0], lengths[0] = 0, W
    if R > 1:
        lengths[1] = 0
    return starts.int(), lengths.int()


@pytest.mark.gpu
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("R", [1, 7, 4096])
@pytest.mark.parametrize("W", [1, 100, 8192, 32768])
@pytest.mark.parametrize("K", [1, 300, 2048])
def test_ragged_ids_identical_to_reference(K, W, R, ties, poisoned):
    gen = torch.Generator(device="cuda").manual_seed(1000 * K + 10 * W + R + ties)
    logits = _logits(R, W, ties, gen)
    starts, lengths = _rows(R, W, gen)
    override = (starts + torch.randint(0, 1 << 20, (R,), device="cuda", generator=gen).int()) if R % 2 else None
    kw = dict(row_starts=starts, lengths=lengths, offset_override=override)
    want = ops.topk_transform_ragged(logits, K, backend="reference", **kw)
    got = ops.topk_transform_ragged(logits, K, backend="triton", **kw)
    assert got.dtype == I32 and got.shape == (R, K)
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].tolist()}"
    # check_values=False runs the same kernel without the host-side range checks
    assert torch.equal(ops.topk_transform_ragged(logits, K, backend="triton", check_values=False, **kw), want)


@pytest.mark.gpu
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("K,W", [(1, 100), (300, 8192), (2048, 32768), (2048, 1000)])
def test_paged_ids_identical_to_reference(K, W, ties, poisoned):
    gen = torch.Generator(device="cuda").manual_seed(7 * K + W + ties)
    B, R, page = 5, 13, 64
    pages = -(-W // page)
    page_table = torch.randperm(B * pages, device="cuda", generator=gen).int().view(B, pages)
    logits = _logits(R, W, ties, gen)
    starts, lengths = _rows(R, W, gen)
    row_to_req = torch.randint(0, B, (R,), device="cuda", generator=gen).int()
    kw = dict(lengths=lengths, page_table=page_table, row_to_req=row_to_req, row_starts=starts)
    want = ops.topk_transform_paged(logits, K, backend="reference", **kw)
    got = ops.topk_transform_paged(logits, K, backend="triton", **kw)
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].tolist()}"
    # the decode form: row r is request r, no row starts
    kw = dict(lengths=lengths[:B], page_table=page_table)
    want = ops.topk_transform_paged(logits[:B], K, backend="reference", **kw)
    assert torch.equal(ops.topk_transform_paged(logits[:B], K, backend="triton", **kw), want)


@pytest.mark.gpu
def test_all_equal_row_keeps_the_lowest_positions(poisoned):
    # A full tie over 10000 candidates: the kept set is exactly positions 0..K-1, in order.
    logits = torch.full((3, 10000), 0.5, device="cuda")
    lengths = torch.tensor([10000, 2047, 0], device="cuda", dtype=I32)
    starts = torch.tensor([0, 5, 10000], device="cuda", dtype=I32)
    got = ops.topk_transform_ragged(logits, 2048, row_starts=starts, lengths=lengths, backend="triton")
    ar = torch.arange(2048, device="cuda", dtype=I32)
    assert torch.equal(got[0], ar)
    assert torch.equal(got[1], torch.where(ar < 2047, ar + 5, -1))
    assert bool((got[2] == -1).all())


@pytest.mark.gpu
def test_bad_input_is_a_clear_error():
    logits = torch.zeros(2, 8, device="cuda")
    lengths = torch.tensor([8, 9], device="cuda", dtype=I32)
    starts = torch.zeros(2, device="cuda", dtype=I32)
    with pytest.raises(ValueError, match="row_starts/lengths"):
        ops.topk_transform_ragged(logits, 4, row_starts=starts, lengths=lengths, backend="triton")


def test_supports_reasons_on_cpu():
    supports = triton_tier.TIER.ops["topk_transform_ragged"].supports
    assert "not on CUDA" in supports(torch.zeros(2, 8), 4)
    assert "not on CUDA" in triton_tier.TIER.ops["topk_transform_paged"].supports(torch.zeros(2, 8), 4)
