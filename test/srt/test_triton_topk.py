"""The Triton top-k transforms against the reference tier: the same kept set (order and tie choice are free).

Every output is checked with :func:`nsa_tp.ops.topk.topk_mismatch` (same count of kept ids in the first
columns, -1 after, no id twice, every id a selectable candidate of its row, the multiset of kept values equal
to the reference's).

GPU tests (``@pytest.mark.gpu``), for every configuration in ``VARIANTS``: fresh logits over a grid of K in
{1, 300, 2048}, W in {1, 100, 8192, 32768}, R in {1, 7, 4096}: continuous values, and heavy ties (a few values
incl. +-0.0) with -inf and NaN entries; random row starts (not 0), rows shorter than K and empty rows; ragged
with and without ``offset_override``, paged with ``row_to_req``; 128K-wide rows; magnitudes outside the
coarse histogram's window (clamped bins) and all-negative rows. Every output and workspace is poisoned first
(``_common.alloc`` fills int32 with 0x7F7F7F7F), so an element the kernel forgot to write is caught.
CPU tests: the same kernel under ``TRITON_INTERPRET=1`` on small shapes (a subprocess: the interpreter is
chosen at import), the tier's ``supports`` reasons and ranking, the configuration table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import triton as triton_tier
from nsa_tp.ops.topk import topk_mismatch

I32 = torch.int32
VARIANT_NAMES = ["stream1k_w4", "stream1k_w4_r64", "stream1k_w4_b256", "stream2k_w8", "hybrid4k_w16_r64",
                 "hybrid4k_w32", "res8k_w32"]


@pytest.fixture
def poisoned(monkeypatch):
    from nsa_tp.ops.triton import _common

    def alloc(shape, dtype, device):
        return torch.full(shape, 0x7F7F7F7F, dtype=dtype, device=device)

    monkeypatch.setattr(_common, "alloc", alloc)


@pytest.fixture(params=VARIANT_NAMES)
def variant(request, monkeypatch):
    """Every configuration, through the tier's own dispatch (the width table forced to one variant)."""
    from nsa_tp.ops.triton import topk as triton_topk

    monkeypatch.setattr(triton_topk, "DEFAULT_BY_WIDTH", ((1 << 62, request.param),))
    return request.param


def _logits(R: int, W: int, dist: str, gen: torch.Generator, device: str = "cuda") -> torch.Tensor:
    if dist == "ties":
        pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 3.0, float("-inf"), float("nan")], device=device)
        return pool[torch.randint(0, len(pool), (R, W), device=device, generator=gen)]
    x = torch.randn(R, W, device=device, generator=gen)
    if dist == "wide":  # magnitudes 1e-12..1e12: most keys in the clamped end bins of the coarse histogram
        return x * 10.0 ** (torch.rand(R, W, device=device, generator=gen) * 24 - 12)
    if dist == "negative":
        return -x.abs() - 100.0
    return x


def _rows(R: int, W: int, gen: torch.Generator, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Random starts in [0, W] and lengths in [0, W - start]; row 0 spans the whole width, row 1 is empty."""
    starts = torch.randint(0, W + 1, (R,), device=device, generator=gen)
    lengths = (torch.rand(R, device=device, generator=gen) * (W - starts + 1)).floor().long().clamp_max(W - starts)
    starts[0], lengths[0] = 0, W
    if R > 1:
        lengths[1] = 0
    return starts.int(), lengths.int()


def _ragged_values(logits, starts, lengths, offsets):
    """value_of for ragged ids: the logit of id ``offset + p`` for 0 <= p < length, NaN otherwise."""

    def value_of(ids):
        p = ids - offsets[:, None].long()
        ok = (p >= 0) & (p < lengths[:, None].long())
        col = (p + starts[:, None].long()).clamp(0, logits.shape[1] - 1)
        return torch.where(ok, logits.gather(1, col), float("nan"))

    return value_of


def _paged_values(logits, starts, lengths, page_table, req, page):
    """value_of for cache slots: slot -> (request, position) through the inverse of the page table."""
    B, pages = page_table.shape
    slots = page_table.long()[:, :, None] * page + torch.arange(page, device=logits.device)  # [B, pages, page]
    n = int(slots.max()) + 1
    inv_req = torch.full((n,), -1, dtype=torch.long, device=logits.device)
    inv_pos = torch.full((n,), -1, dtype=torch.long, device=logits.device)
    inv_req[slots.flatten()] = torch.arange(B, device=logits.device).repeat_interleave(pages * page)
    inv_pos[slots.flatten()] = torch.arange(pages * page, device=logits.device).repeat(B)

    def value_of(ids):
        s = ids.clamp(0, n - 1)
        p = inv_pos[s]
        ok = (ids < n) & (inv_req[s] == req[:, None].long()) & (p >= 0) & (p < lengths[:, None].long())
        col = (p + starts[:, None].long()).clamp(0, logits.shape[1] - 1)
        return torch.where(ok, logits.gather(1, col), float("nan"))

    return value_of


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["normal", "ties"])
@pytest.mark.parametrize("R", [1, 7, 4096])
@pytest.mark.parametrize("W", [1, 100, 8192, 32768])
@pytest.mark.parametrize("K", [1, 300, 2048])
def test_ragged_matches_reference(K, W, R, dist, variant, poisoned):
    gen = torch.Generator(device="cuda").manual_seed(1000 * K + 10 * W + R + (dist == "ties"))
    logits = _logits(R, W, dist, gen)
    starts, lengths = _rows(R, W, gen)
    override = (starts + torch.randint(0, 1 << 20, (R,), device="cuda", generator=gen).int()) if R % 2 else None
    kw = dict(row_starts=starts, lengths=lengths, offset_override=override)
    want = ops.topk_transform_ragged(logits, K, backend="reference", **kw)
    got = ops.topk_transform_ragged(logits, K, backend="triton", **kw)
    assert got.dtype == I32 and got.shape == (R, K)
    value_of = _ragged_values(logits, starts, lengths, override if override is not None else starts)
    assert (bad := topk_mismatch(got, want, value_of)) is None, bad
    # check_values=False runs the same kernel without the host-side range checks
    got = ops.topk_transform_ragged(logits, K, backend="triton", check_values=False, **kw)
    assert (bad := topk_mismatch(got, want, value_of)) is None, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["normal", "ties", "wide", "negative"])
@pytest.mark.parametrize("R,W", [(64, 131072), (300, 20000)])
def test_long_rows_and_clamped_bins(R, W, dist, variant, poisoned):
    # 128K rows stream in chunks; 'ties' overflows the candidate buffer (the select runs over the row);
    # 'wide' / 'negative' land the K-th value in the coarse histogram's clamped end bins.
    gen = torch.Generator(device="cuda").manual_seed(W + R + len(dist))
    logits = _logits(R, W, dist, gen)
    starts, lengths = _rows(R, W, gen)
    lengths[2:] = torch.maximum(lengths[2:], torch.full_like(lengths[2:], W // 2)).clamp_max(W - starts[2:])
    kw = dict(row_starts=starts, lengths=lengths)
    want = ops.topk_transform_ragged(logits, 2048, backend="reference", **kw)
    got = ops.topk_transform_ragged(logits, 2048, backend="triton", **kw)
    assert (bad := topk_mismatch(got, want, _ragged_values(logits, starts, lengths, starts))) is None, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["normal", "ties"])
@pytest.mark.parametrize("K,W", [(1, 100), (300, 8192), (2048, 32768), (2048, 1000)])
def test_paged_matches_reference(K, W, dist, variant, poisoned):
    gen = torch.Generator(device="cuda").manual_seed(7 * K + W + (dist == "ties"))
    B, R, page = 5, 13, 64
    pages = -(-W // page)
    page_table = torch.randperm(B * pages, device="cuda", generator=gen).int().view(B, pages)
    logits = _logits(R, W, dist, gen)
    starts, lengths = _rows(R, W, gen)
    row_to_req = torch.randint(0, B, (R,), device="cuda", generator=gen).int()
    kw = dict(lengths=lengths, page_table=page_table, row_to_req=row_to_req, row_starts=starts)
    want = ops.topk_transform_paged(logits, K, backend="reference", **kw)
    got = ops.topk_transform_paged(logits, K, backend="triton", **kw)
    value_of = _paged_values(logits, starts, lengths, page_table, row_to_req, page)
    assert (bad := topk_mismatch(got, want, value_of)) is None, bad
    # the decode form: row r is request r, no row starts
    kw = dict(lengths=lengths[:B], page_table=page_table)
    want = ops.topk_transform_paged(logits[:B], K, backend="reference", **kw)
    got = ops.topk_transform_paged(logits[:B], K, backend="triton", **kw)
    req = torch.arange(B, device="cuda", dtype=I32)
    value_of = _paged_values(logits[:B], torch.zeros_like(req), lengths[:B], page_table, req, page)
    assert (bad := topk_mismatch(got, want, value_of)) is None, bad


@pytest.mark.gpu
def test_all_equal_row_keeps_any_k_distinct_positions(variant, poisoned):
    # A full tie over 10000 candidates: any 2048 distinct positions are valid.
    logits = torch.full((3, 10000), 0.5, device="cuda")
    lengths = torch.tensor([10000, 2047, 0], device="cuda", dtype=I32)
    starts = torch.tensor([0, 5, 10000], device="cuda", dtype=I32)
    kw = dict(row_starts=starts, lengths=lengths)
    got = ops.topk_transform_ragged(logits, 2048, backend="triton", **kw)
    want = ops.topk_transform_ragged(logits, 2048, backend="reference", **kw)
    assert (bad := topk_mismatch(got, want, _ragged_values(logits, starts, lengths, starts))) is None, bad
    assert bool((got[2] == -1).all())


@pytest.mark.gpu
def test_bad_input_is_a_clear_error():
    logits = torch.zeros(2, 8, device="cuda")
    lengths = torch.tensor([8, 9], device="cuda", dtype=I32)
    starts = torch.zeros(2, device="cuda", dtype=I32)
    with pytest.raises(ValueError, match="row_starts/lengths"):
        ops.topk_transform_ragged(logits, 4, row_starts=starts, lengths=lengths, backend="triton")


# --- CPU: the kernel under Triton's interpreter -------------------------------------------------------------

# Small configurations that reach every path: streamed and register-resident rows (both sizes), the
# candidate buffer and its overflow (cap=4: the select runs over the row), 128 and 256 coarse bins.
_INTERPRETER_CONFIGS = [
    dict(block=64, resident=0, rblock=32, cap=4, bins=128),
    dict(block=64, resident=1, rblock=32, cap=4096, bins=256),
    dict(block=64, resident=2, rblock=32, cap=4, bins=256),
    dict(block=64, resident=2, rblock=32, cap=4096, bins=128),
]


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with ``int(array of shape (1,))``, which numpy
    2.4 rejects, so any ``range`` over a runtime bound fails; take the single element instead."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def run_interpreter_grid() -> list[str]:
    """Every interpreter configuration on one deliberate small grid; returns the problems found."""
    from nsa_tp.ops import topk as ref
    from nsa_tp.ops.triton import topk as triton_topk

    gen = torch.Generator().manual_seed(0)
    R, W, K = 12, 300, 20
    x = torch.randn(R, W, generator=gen) * 3
    x[1] = _logits(1, W, "ties", gen, "cpu")
    x[2] = _logits(1, W, "negative", gen, "cpu") * 1e4  # beyond the window: clamped bins
    x[3] = torch.rand(W, generator=gen) * 1e-6  # below the window
    x[4] = 0.5  # one value: every candidate ties
    x[5, ::2] = float("-inf")  # n > K but fewer than K selectable
    x[6] = float("nan")
    x[7, :] = -0.0
    x[7, 1::3] = 0.0
    lengths = torch.tensor([300, 250, 200, 150, 64, 33, 80, 100, 0, 299, 21, 40], dtype=I32)
    starts = torch.tensor([0, 5, 7, 100, 200, 250, 0, 0, 300, 1, 3, 260], dtype=I32)
    value_of = _ragged_values(x, starts, lengths, torch.zeros_like(starts))  # positions: no offset
    problems = []
    for k in (K, 1, 400):  # 400 > W: every row keeps all its selectable candidates
        want = ref.topk_positions(x, k, lengths, starts)
        for cfg in _INTERPRETER_CONFIGS:
            got = triton_topk.topk_positions(x, k, lengths, starts, config=triton_topk.TopkConfig(**cfg))
            if (bad := topk_mismatch(got, want, value_of)) is not None:
                problems.append(f"K={k} {cfg}: {bad}")
    return problems


def test_kernel_under_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (the dev extras install it on Linux)")
    code = (
        "import sys, test_triton_topk as t; t._patch_interpreter_index(); p = t.run_interpreter_grid(); "
        "print('\\n'.join(p) or 'ok'); sys.exit(1 if p else 0)"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_configs_and_width_table():
    pytest.importorskip("triton", reason="Triton is not installed (the dev extras install it on Linux)")
    from nsa_tp.ops.triton import topk as triton_topk

    for w, name in triton_topk.DEFAULT_BY_WIDTH:
        assert name in triton_topk.VARIANTS
        assert triton_topk.config_for(w) == triton_topk.VARIANTS[name]
    assert triton_topk.DEFAULT_BY_WIDTH[-1][0] >= 1 << 31  # every width has a default
    assert sorted(VARIANT_NAMES) == sorted(triton_topk.VARIANTS)  # the GPU tests cover every variant
    with pytest.raises(ValueError, match="block"):
        triton_topk.TopkConfig(block=3000, resident=1)
    with pytest.raises(ValueError, match="bins"):
        triton_topk.TopkConfig(block=4096, resident=1, bins=100)


def test_supports_reasons_on_cpu():
    supports = triton_tier.TIER.ops["topk_transform_ragged"].supports
    assert "not on CUDA" in supports(torch.zeros(2, 8), 4)
    assert "not on CUDA" in triton_tier.TIER.ops["topk_transform_paged"].supports(torch.zeros(2, 8), 4)
