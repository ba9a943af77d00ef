"""The ``"sgl_kernel"`` tier (``nsa_tp.ops.sglkernel``) against the reference top-k.

Top-k outputs are compared with :func:`nsa_tp.ops.topk.topk_mismatch` (order and tie choice are free; each row
must keep the same multiset of values, first, with ``-1`` after).

- CPU: ``available()`` / ``supports()`` reasons, forced and ``auto`` dispatch, and the adapters around a *fake*
  ``sgl_kernel`` module injected into ``sys.modules``. The fake mirrors ``sgl_kernel.fast_topk_v2`` as read from
  the ``sglang-kernel==0.4.5`` wheel (``sgl_kernel/top_k.py``: ``fast_topk_v2(score, lengths, topk,
  row_starts=None)``, ``topk == 2048`` asserted, a ``new_empty`` int32 ``[R, 2048]`` output; the op's
  schema ``fast_topk(Tensor score, Tensor indices, Tensor lengths, Tensor? row_starts)``) and the kernel's
  documented behaviour (sgl-kernel's ``topk.cu`` / SGLang 0.5.17's callers): unit column stride, int32 lengths
  and row starts read by pointer, rows of at most 2048 candidates get ``0 .. len-1`` then ``-1`` without
  looking at the values, longer rows an unordered set of 2048 by the float's order-preserving bits (a positive
  NaN above everything, ``-inf`` below every finite value), ties broken arbitrarily.
- GPU (``@pytest.mark.gpu``; skipped without CUDA or without the wheel): the real kernel, K = 2048, W in
  {100, 2048, 8192, 40000}, rows shorter than K, empty rows, ``-inf`` entries, ``row_starts != 0``, ragged with
  and without ``offset_override``, paged with ``row_to_req``; heavy ties; NaN with ``check_values=True``.
- The fix-up after the wheel's kernel: the fused Triton kernel (``nsa_tp.ops.triton.topk_fixup``) equals the torch
  fallback (``sglkernel.fixup_positions_torch``) bit for bit, on CPU under ``TRITON_INTERPRET=1`` (a subprocess:
  the interpreter is chosen at import) on crafted inputs, and on random GPU data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import capability, registry, sglkernel
from nsa_tp.ops import topk as topk_ref
from nsa_tp.ops.registry import BackendUnavailableError
from nsa_tp.ops.topk import topk_mismatch

I32 = torch.int32
K = 2048


# ----------------------------------------------------------------------------------------------------------
# The fake wheel (CPU, plain torch)


class FakeSglKernel(types.ModuleType):
    """``sgl_kernel.fast_topk_v2`` of 0.4.5 on CPU (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("sgl_kernel")
        self.__version__ = "0.4.5"
        self.gen = torch.Generator().manual_seed(0)
        self.calls = 0

    def fast_topk_v2(self, score, lengths, topk, row_starts=None):
        assert topk == 2048, "fast_topk_v2 is only optimized for deepseek v3.2 model, where topk=2048"
        assert score.dim() == 2 and score.dtype == torch.float32 and score.stride(1) == 1
        R = score.shape[0]
        assert lengths.shape == (R,) and lengths.dtype == I32 and lengths.is_contiguous()
        if row_starts is not None:  # read by raw pointer in the kernel
            assert row_starts.shape == (R,) and row_starts.dtype == I32 and row_starts.is_contiguous()
        self.calls += 1
        out = torch.randint(-(2**31), 2**31 - 1, (R, topk), dtype=I32, generator=self.gen)  # new_empty
        ar = torch.arange(topk, dtype=I32)
        for r in range(R):
            n = int(lengths[r])
            s = int(row_starts[r]) if row_starts is not None else 0
            if n <= topk:
                out[r] = torch.where(ar < n, ar, -1)  # the values are never read
                continue
            bits = score[r, s : s + n].contiguous().view(I32).long() & 0xFFFFFFFF
            key = torch.where(bits >= 2**31, ~bits & 0xFFFFFFFF, bits | 2**31)  # order-preserving uint32
            tie = torch.randperm(n, generator=self.gen)  # thread order decides among equal keys
            sel = torch.topk(key * n + tie, topk).indices
            out[r] = sel[torch.randperm(topk, generator=self.gen)].to(I32)  # an unordered set
        return out


@pytest.fixture
def fresh_caches():
    def clear():
        registry._load.cache_clear()
        sglkernel._available.cache_clear()
        capability.clear_cache()

    clear()
    yield
    clear()


@pytest.fixture
def fake(monkeypatch, fresh_caches):
    module = FakeSglKernel()
    monkeypatch.setitem(sys.modules, "sgl_kernel", module)
    return module


# ----------------------------------------------------------------------------------------------------------
# Inputs and the value maps topk_mismatch needs


def _logits(R, W, gen, *, ninf=0.0, nan=0.0, ties=False, device="cpu"):
    if ties:
        pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 3.0])
        x = pool[torch.randint(0, len(pool), (R, W), generator=gen)]
    else:
        x = torch.randn(R, W, generator=gen)
    u = torch.rand(R, W, generator=gen)
    x[u < ninf] = float("-inf")
    x[(u >= ninf) & (u < ninf + nan)] = float("nan")
    return x.to(device)


def _rows(R, W, gen, device="cpu"):
    """Random starts and lengths inside [0, W); row 0 spans the width, row 1 is empty, row 2 is a short row."""
    starts = torch.randint(0, W + 1, (R,), generator=gen)
    lengths = (torch.rand(R, generator=gen) * (W - starts + 1)).floor().long().clamp_max(W - starts)
    fixed = [(0, W), (W // 3, 0), (min(5, W), max(0, min(W - 5, K // 3)))]
    for r, (s, n) in enumerate(fixed[:R]):
        starts[r], lengths[r] = s, n
    return starts.to(I32).to(device), lengths.to(I32).to(device)


def _ragged_value_of(logits, starts, lengths, offsets):
    def value_of(ids):
        p = ids - offsets[:, None].long()
        ok = (p >= 0) & (p < lengths[:, None].long())
        col = (starts[:, None].long() + p).clamp(0, max(logits.shape[1] - 1, 0))
        vals = logits.gather(1, col) if logits.shape[1] else torch.zeros_like(p, dtype=torch.float32)
        return torch.where(ok, vals, float("nan"))

    return value_of


def _paged_value_of(logits, starts, lengths, page_table, req):
    """Slots back to request positions (pages are distinct over requests), then to the row's logits."""
    B, pages = page_table.shape
    j = torch.arange(pages * 64, device=logits.device)
    slots = page_table[:, j // 64].long() * 64 + j % 64  # [B, pages * 64]
    pos_of = torch.full((int(slots.max()) + 1,), -1, dtype=torch.long, device=logits.device)
    pos_of[slots.reshape(-1)] = j.repeat(B)

    def value_of(ids):
        p = pos_of[ids.clamp(0, len(pos_of) - 1)]
        mine = page_table[req[:, None], (p.clamp_min(0) // 64)].long() * 64 + p.clamp_min(0) % 64 == ids
        ok = (p >= 0) & (p < lengths[:, None].long()) & mine
        col = (starts[:, None].long() + p).clamp(0, logits.shape[1] - 1)
        return torch.where(ok, logits.gather(1, col), float("nan"))

    return value_of


def _check_ragged(logits, starts, lengths, override=None, check_values=True, backend=None, fn=None):
    kw = dict(row_starts=starts, lengths=lengths, offset_override=override)
    want = topk_ref.topk_transform_ragged(logits, K, **kw)
    if fn is None:
        got = ops.topk_transform_ragged(logits, K, check_values=check_values, backend=backend, **kw)
    else:
        got = fn(logits, K, check_values=check_values, **kw)
    offsets = override if override is not None else starts
    problem = topk_mismatch(got, want, _ragged_value_of(logits, starts, lengths, offsets))
    assert problem is None, problem


def _check_paged(logits, starts, lengths, page_table, row_to_req, check_values=True, backend=None, fn=None):
    kw = dict(lengths=lengths, page_table=page_table, row_to_req=row_to_req, row_starts=starts)
    want = topk_ref.topk_transform_paged(logits, K, **kw)
    if fn is None:
        got = ops.topk_transform_paged(logits, K, check_values=check_values, backend=backend, **kw)
    else:
        got = fn(logits, K, check_values=check_values, **kw)
    req = row_to_req.long() if row_to_req is not None else torch.arange(logits.shape[0], device=logits.device)
    st = starts if starts is not None else torch.zeros_like(lengths)
    problem = topk_mismatch(got, want, _paged_value_of(logits, st, lengths, page_table, req))
    assert problem is None, problem


# ----------------------------------------------------------------------------------------------------------
# CPU: availability, supports, dispatch


def test_available_says_why_without_the_wheel(fresh_caches):
    # (never drop an imported wheel from sys.modules: a second import re-registers its native ops)
    if capability.import_error("sgl_kernel") is None:
        pytest.skip("sgl_kernel is installed here")
    reason = sglkernel._available()
    assert reason.startswith("cannot import sgl_kernel:") and "sglang-kernel==0.4.5" in reason
    logits = torch.randn(2, 3000)
    lengths = torch.tensor([3000, 10], dtype=I32)
    with pytest.raises(BackendUnavailableError, match="cannot import sgl_kernel"):
        ops.topk_transform_ragged(logits, K, row_starts=lengths * 0, lengths=lengths, backend="sgl_kernel")
    table = torch.zeros(2, 47, dtype=I32)
    explained = ops.explain("topk_transform_paged", logits, K, lengths=lengths, page_table=table)
    assert explained["sgl_kernel"].startswith("cannot import sgl_kernel")


def test_available_with_the_wheel(fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in sglkernel._available()
    sglkernel._available.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sglkernel._available() is None
    sglkernel._available.cache_clear()
    monkeypatch.delattr(FakeSglKernel, "fast_topk_v2")
    assert "has no fast_topk_v2" in sglkernel._available()


def test_supports_reasons_are_precise():
    for op in ("topk_transform_ragged", "topk_transform_paged"):
        sup = sglkernel.TIER.ops[op].supports
        x = torch.randn(4, 3000)
        assert "topk = 2048 only" in sup(x, 300)
        assert "topk = 2048 only" in sup(x, True)
        assert "float32" in sup(x.half(), K)
        assert "unit column stride" in sup(torch.randn(3000, 4).t(), K)
        assert "inputs are on cpu" in sup(x, K, lengths=torch.zeros(4, dtype=I32))
        assert "expected an [R, W] tensor" in sup(x[0], K)
        assert sup() is not None


def test_forced_tier_raises_and_auto_skips_it(fake, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert registry.get_tier("sgl_kernel").name == "sgl_kernel"
    gen = torch.Generator().manual_seed(1)
    logits = _logits(5, 3000, gen)
    starts, lengths = _rows(5, 3000, gen)
    with pytest.raises(BackendUnavailableError, match="cannot run topk_transform_ragged on these inputs: inputs are"):
        ops.topk_transform_ragged(logits, K, row_starts=starts, lengths=lengths, backend="sgl_kernel")
    with pytest.raises(BackendUnavailableError, match="topk = 2048 only"):
        ops.topk_transform_ragged(logits, 100, row_starts=starts, lengths=lengths, backend="sgl_kernel")
    _check_ragged(logits, starts, lengths, backend="auto")  # sgl_kernel says no; the reference runs
    assert fake.calls == 0


# ----------------------------------------------------------------------------------------------------------
# CPU: the adapters around the fake wheel


@pytest.mark.parametrize("check_values", [True, False])
@pytest.mark.parametrize("ninf", [0.0, 0.1, 0.9])
@pytest.mark.parametrize("W", [100, 2048, 5000])
def test_fake_ragged_glue_matches_reference(fake, W, ninf, check_values):
    gen = torch.Generator().manual_seed(W + int(100 * ninf) + check_values)
    R = 7
    logits = _logits(R, W, gen, ninf=ninf)
    starts, lengths = _rows(R, W, gen)
    override = starts + torch.randint(0, 1 << 20, (R,), generator=gen).to(I32)
    for ov in (None, override):
        _check_ragged(logits, starts, lengths, ov, check_values, fn=sglkernel.topk_transform_ragged)
    assert fake.calls == 2


def test_fake_nan_rows_are_repaired_when_values_are_checked(fake):
    gen = torch.Generator().manual_seed(5)
    logits = _logits(6, 5000, gen, ninf=0.05, nan=0.05)
    starts, lengths = _rows(6, 5000, gen)
    _check_ragged(logits, starts, lengths, check_values=True, fn=sglkernel.topk_transform_ragged)
    # short rows never need the repair: NaN there is dropped like -inf, without a host sync
    short = lengths.clamp_max(K)
    _check_ragged(logits, starts, short, check_values=False, fn=sglkernel.topk_transform_ragged)


def test_fake_heavy_ties(fake):
    gen = torch.Generator().manual_seed(6)
    logits = _logits(5, 9000, gen, ninf=0.02, ties=True)
    starts, lengths = _rows(5, 9000, gen)
    _check_ragged(logits, starts, lengths, fn=sglkernel.topk_transform_ragged)


@pytest.mark.parametrize("W", [100, 4000])
def test_fake_paged_glue_matches_reference(fake, W):
    gen = torch.Generator().manual_seed(W)
    B, R, pages = 5, 9, -(-W // 64)
    page_table = torch.randperm(B * pages + 7, generator=gen)[: B * pages].to(I32).view(B, pages)
    logits = _logits(R, W, gen, ninf=0.1)
    starts, lengths = _rows(R, W, gen)
    row_to_req = torch.randint(0, B, (R,), generator=gen).to(I32)
    _check_paged(logits, starts, lengths, page_table, row_to_req, fn=sglkernel.topk_transform_paged)
    # the decode form: row b is request b, no row starts
    _check_paged(logits[:B], None, lengths[:B], page_table, None, check_values=False,
                 fn=sglkernel.topk_transform_paged)


def test_fake_empty_shapes_and_bad_input(fake):
    lengths = torch.zeros(0, dtype=I32)
    out = sglkernel.topk_transform_ragged(torch.zeros(0, 10), K, row_starts=lengths, lengths=lengths)
    assert out.shape == (0, K)
    lengths = torch.zeros(3, dtype=I32)
    out = sglkernel.topk_transform_ragged(torch.zeros(3, 0), K, row_starts=lengths, lengths=lengths)
    assert out.shape == (3, K) and bool((out == -1).all())
    assert fake.calls == 0
    with pytest.raises(ValueError, match="row_starts/lengths"):
        sglkernel.topk_transform_ragged(torch.zeros(2, 8), K, row_starts=torch.zeros(2, dtype=I32),
                                        lengths=torch.tensor([8, 9], dtype=I32))


# ----------------------------------------------------------------------------------------------------------
# GPU: the real wheel against the reference


def _need_wheel():
    registry._load.cache_clear()
    reason = sglkernel._available()
    if reason:
        pytest.skip(f"sgl_kernel tier unavailable: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("ninf", [0.0, 0.2])
@pytest.mark.parametrize("R", [1, 37, 512])
@pytest.mark.parametrize("W", [100, 2048, 8192, 40000])
def test_gpu_ragged_matches_reference(W, R, ninf):
    _need_wheel()
    gen = torch.Generator().manual_seed(W + R + int(10 * ninf))
    logits = _logits(R, W, gen, ninf=ninf, device="cuda")
    starts, lengths = _rows(R, W, gen, device="cuda")
    override = starts + torch.randint(0, 1 << 20, (R,), generator=gen).to(I32).cuda()
    for ov in (None, override):
        _check_ragged(logits, starts, lengths, ov, backend="sgl_kernel")
        _check_ragged(logits, starts, lengths, ov, check_values=False, backend="sgl_kernel")
    assert ops.explain("topk_transform_ragged", logits, K, row_starts=starts, lengths=lengths)["sgl_kernel"] == "ok"
    _check_ragged(logits, starts, lengths, backend="auto")  # auto: sgl_kernel ranks first


@pytest.mark.gpu
@pytest.mark.parametrize("W", [100, 2048, 8192, 40000])
def test_gpu_paged_matches_reference(W):
    _need_wheel()
    gen = torch.Generator().manual_seed(3 * W)
    B, R, pages = 5, 37, -(-W // 64)
    page_table = torch.randperm(B * pages + 11, generator=gen)[: B * pages].to(I32).view(B, pages).cuda()
    logits = _logits(R, W, gen, ninf=0.1, device="cuda")
    starts, lengths = _rows(R, W, gen, device="cuda")
    row_to_req = torch.randint(0, B, (R,), generator=gen).to(I32).cuda()
    _check_paged(logits, starts, lengths, page_table, row_to_req, backend="sgl_kernel")
    _check_paged(logits[:B], None, lengths[:B], page_table, None, backend="sgl_kernel")
    _check_paged(logits[:B], None, lengths[:B], page_table, None, check_values=False, backend="sgl_kernel")


@pytest.mark.gpu
def test_gpu_padded_row_stride():
    """Logits as the DeepGEMM tier returns them: a view of a padded buffer (row stride > W)."""
    _need_wheel()
    gen = torch.Generator().manual_seed(8)
    logits = _logits(64, 8192 + 256, gen, device="cuda")[:, :8000]
    starts, lengths = _rows(64, 8000, gen, device="cuda")
    _check_ragged(logits, starts, lengths, backend="sgl_kernel")


@pytest.mark.gpu
def test_gpu_heavy_ties():
    """Few distinct values over long rows: the threshold bin holds thousands of equal logits."""
    _need_wheel()
    gen = torch.Generator().manual_seed(9)
    logits = _logits(64, 40000, gen, ninf=0.05, ties=True, device="cuda")
    starts, lengths = _rows(64, 40000, gen, device="cuda")
    _check_ragged(logits, starts, lengths, backend="sgl_kernel")


@pytest.mark.gpu
def test_gpu_nan_with_checked_values():
    _need_wheel()
    gen = torch.Generator().manual_seed(10)
    logits = _logits(37, 8192, gen, ninf=0.05, nan=0.05, device="cuda")
    starts, lengths = _rows(37, 8192, gen, device="cuda")
    _check_ragged(logits, starts, lengths, check_values=True, backend="sgl_kernel")


# ----------------------------------------------------------------------------------------------------------
# The fix-up after fast_topk_v2: the fused Triton kernel against the torch version, bit for bit


def _fixup_inputs(gen, device="cpu"):
    """Crafted ``fast_topk_v2`` outputs: -1, out-of-row and negative positions, -inf / NaN logits, row starts
    != 0, rows shorter and longer than K, an empty row, duplicates; logits a view with a padded row stride."""
    R, W = 9, 5000
    logits = _logits(R, W + 64, gen, ninf=0.1, nan=0.05)[:, :W].to(device)  # row stride W + 64
    logits[5, :] = float("nan")  # every candidate NaN
    logits[6, :] = float("-inf")
    starts = torch.tensor([0, 7, 100, 2500, 0, 1000, 3, 4999, 5000], dtype=I32)
    lengths = torch.tensor([5000, 2048, 1500, 2500, 2049, 3000, 4000, 1, 0], dtype=I32)
    pos = torch.randint(-3, 5100, (R, K), dtype=I32, generator=gen)  # inside, past the row, negative
    pos[:, ::7] = -1
    ar = torch.arange(K, dtype=I32)
    pos[1] = ar  # the wheel's short-row answer: 0 .. len-1
    pos[2] = torch.where(ar < 1500, ar, -1)
    pos[4] = torch.randperm(2049, generator=gen)[:K].to(I32)  # a long row: an unordered set, no -1
    pos[7, 0], pos[8, 0] = 0, 0
    return logits, starts.to(device), lengths.to(device), pos.to(device)


def run_fixup_interpreter_grid() -> list[str]:
    """The Triton fix-up on crafted inputs (see ``_fixup_inputs``), with and without row starts; problems."""
    from nsa_tp.ops.triton import topk_fixup

    problems = []
    for seed in range(3):
        logits, starts, lengths, pos = _fixup_inputs(torch.Generator().manual_seed(seed))
        for st in (starts, None):
            want = sglkernel.fixup_positions_torch(pos, logits, lengths, st)
            got = topk_fixup.fixup_positions(pos, logits, lengths, st)
            for name, g, w in zip(("out", "nan_rows"), got, want, strict=True):
                if g.dtype != w.dtype or not torch.equal(g, w):
                    bad = (g != w).nonzero()[:1].tolist() if g.shape == w.shape else g.shape
                    problems.append(f"seed {seed} starts={st is not None} {name}: first difference at {bad}")
            if seed == 0 and st is not None and want[1].tolist() != [1, 0, 0, 1, 1, 1, 0, 0, 0]:
                problems.append(f"crafted NaN rows not flagged as expected: {want[1].tolist()}")
    return problems


def test_fixup_kernel_under_interpreter():
    pytest.importorskip("triton")
    code = (
        "import sys, test_triton_topk as tt, test_sgl_kernel_tier as t; tt._patch_interpreter_index(); "
        "p = t.run_fixup_interpreter_grid(); print('\\n'.join(p) or 'ok'); sys.exit(1 if p else 0)"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_fixup_torch_fallback_is_used_without_triton(fake, monkeypatch):
    """Where Triton cannot import, select_positions runs the torch fix-up (and still repairs NaN rows)."""
    monkeypatch.setattr(sglkernel, "_triton_fixup", lambda: None)
    gen = torch.Generator().manual_seed(11)
    logits = _logits(6, 5000, gen, ninf=0.05, nan=0.05)
    starts, lengths = _rows(6, 5000, gen)
    _check_ragged(logits, starts, lengths, check_values=True, fn=sglkernel.topk_transform_ragged)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [100, 2048, 8192, 40000])
def test_gpu_fixup_triton_equals_torch(W):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    topk_fixup = pytest.importorskip("nsa_tp.ops.triton.topk_fixup")
    gen = torch.Generator().manual_seed(12 + W)
    R = 513
    logits = _logits(R, W, gen, ninf=0.2, nan=0.05, device="cuda")
    starts, lengths = _rows(R, W, gen, device="cuda")
    pos = torch.randint(-2, W + 10, (R, K), dtype=I32, generator=gen).cuda()
    pos[:, ::5] = -1
    logits_c, s_c, l_c, pos_c = _fixup_inputs(gen, "cuda")
    for args in ((pos, logits, lengths, starts), (pos, logits, lengths, None), (pos_c, logits_c, l_c, s_c)):
        want = sglkernel.fixup_positions_torch(*args)
        got = topk_fixup.fixup_positions(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
