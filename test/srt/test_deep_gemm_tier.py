"""The ``"deep_gemm"`` tier (``nsa_tp.ops.deepgemm``) against the reference tier.

- CPU: ``available()`` / ``supports()`` reasons, forced and ``auto`` dispatch, and the adapters' argument
  mapping around a *fake* ``deep_gemm`` module injected into ``sys.modules``. The fake mirrors the real Python
  API of ``sgl-deep-gemm==0.1.5.post1`` as read from the wheel (``deep_gemm/__init__.py``: names, argument
  order, defaults; the compiled host asserts and the shipped kernel headers for dtypes, shapes, strides and
  semantics) with SM90's constraints: 32 or 64 heads, contiguous operands, 16-byte aligned TMA bases,
  ``ks <= ke`` read as unsigned, whole-block writes past the ranges with uninitialized memory elsewhere (NaN
  here), ``clean_logits`` writing ``-inf`` outside ``[ks, ke)``, paged: 2-D context lengths only with
  ``clean_logits=False``, 64-token blocks, 256-token splits, block 0 read for padding blocks, a schedule of
  ``num_sms + 1`` rows, the scale applied after the relu-weighted head sum.
- GPU (``@pytest.mark.gpu``; skipped without CUDA or without the wheel): the real kernels on fresh random data
  over T in {1, 37, 512} x N in {64, 1000, 8192} with random ``[ks, ke)`` (full, empty, inverted, causal),
  and paged B in {1, 5, 33} with lengths 1, 64, 65 and random, shuffled pages, ``max_seq_len`` the table
  width or the longest request; heads 64 (the model), 32 and 16 / 1 (padded). Relative error < 1e-2 over
  finite logits, ``-inf`` at exactly the reference's positions, no NaN.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import nsa_tp.ops as ops
from nsa_tp.ops import capability, deepgemm, reference, registry
from nsa_tp.ops.index_cache import new_index_k_cache, store_index_k
from nsa_tp.ops.registry import BackendUnavailableError

E4M3 = torch.float8_e4m3fn
I32 = torch.int32
NEG_INF = float("-inf")


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


# ----------------------------------------------------------------------------------------------------------
# The fake wheel (CPU, plain torch)


class FakeDeepGEMM(types.ModuleType):
    """``deep_gemm`` 0.1.5.post1's logits API on CPU, with the SM90 host asserts (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("deep_gemm")
        self.__version__ = "0.1.5.post1"
        self.num_sms = 7
        self.schedules: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get_num_sms(self) -> int:
        return self.num_sms

    def get_paged_mqa_logits_metadata(self, context_lens, block_kv, num_sms, indices=None):
        assert context_lens.dim() == 2 and context_lens.dtype == I32 and context_lens.is_contiguous()
        assert block_kv == 64 and indices is None  # SM90: block 64, no varlen
        meta = torch.zeros(num_sms + 1, 2, dtype=I32, device=context_lens.device)
        self.schedules.append((meta, context_lens.clone()))
        return meta

    def fp8_mqa_logits(self, q, kv, weights, ks, ke, clean_logits=False, max_seqlen_k=0):
        k, sf = kv
        T, H, D = q.shape
        N = k.shape[0]
        assert H in (32, 64), "SM90 fp8_mqa_logits takes 32 or 64 heads"
        assert D in (32, 64, 128) and q.dtype == E4M3 and q.is_contiguous()
        assert k.shape == (N, D) and k.dtype == E4M3 and k.is_contiguous()
        assert sf.shape == (N,) and sf.dtype == torch.float32 and sf.is_contiguous()
        assert weights.shape == (T, H) and weights.dtype == torch.float32 and weights.stride(1) == 1
        for t in (ks, ke):
            assert t.shape == (T,) and t.dtype == I32 and t.is_contiguous()
        assert max_seqlen_k == 0
        for t in (q, k, sf, weights):
            assert t.data_ptr() % 16 == 0, "TMA base address must be 16-byte aligned"
        # Read as unsigned, and the block schedule needs ks <= ke: the adapter must have clamped.
        assert bool((ks >= 0).all() and (ke >= ks).all() and (ke <= N).all()), "ks/ke not in 0 <= ks <= ke <= N"
        block_q = 128 // H
        stride = _align(N + 256, 64)
        buf = torch.full((_align(T, block_q), stride), float("nan"))  # uninitialized memory
        s = torch.relu(torch.einsum("thd,nd->thn", q.float(), k.float()))
        vals = torch.einsum("thn,th->tn", s, weights) * sf[None, :]  # the scale after the head sum
        for b0 in range(0, T, block_q):  # each q block writes whole 256-key blocks from min ks (rounded to 4)
            rows = slice(b0, min(b0 + block_q, T))
            start = int(ks[rows].min()) // 4 * 4
            end = start + _align(int(ke[rows].max()) - start, 256)
            buf[rows, start:min(end, N)] = vals[rows, start:min(end, N)]
        logits = buf[:T, :N]
        if clean_logits:
            cols = torch.arange(N)
            logits.masked_fill_((cols[None, :] < ks[:, None]) | (cols[None, :] >= ke[:, None]), NEG_INF)
        return logits

    def fp8_paged_mqa_logits(self, q, kv_cache, weights, context_lens, block_table, schedule_meta,
                             max_context_len, clean_logits=False, indices=None):
        B, next_n, H, D = q.shape
        assert next_n in (1, 2) and H in (32, 64) and D == 128
        assert q.dtype == E4M3 and q.is_contiguous()
        nb, bkv, hkv, dws = kv_cache.shape
        assert kv_cache.dtype == torch.uint8 and (bkv, hkv, dws) == (64, 1, D + 4)
        assert kv_cache.stride(1) == dws and kv_cache.stride(3) == 1 and kv_cache.stride(0) % 4 == 0
        assert weights.shape == (B * next_n, H) and weights.is_contiguous() and weights.dtype == torch.float32
        assert context_lens.shape == (B, next_n) and context_lens.dtype == I32 and context_lens.is_contiguous()
        assert block_table.dtype == I32 and block_table.shape[0] == B and block_table.stride(1) == 1
        assert schedule_meta.shape == (self.num_sms + 1, 2) and schedule_meta.dtype == I32
        meta, lens = self.schedules[-1]
        assert schedule_meta is meta and torch.equal(lens, context_lens), "schedule built for other lengths"
        assert not clean_logits, "0.1.5: clean_logits asserts `not is_context_lens_2d`"
        assert indices is None
        stride = _align(max_context_len, 256)
        out = torch.full((B * next_n, stride), float("nan"))
        # The fused bytes, as the wheel's from_blob views: values [nb, 64, 128], scales [nb, 64] at +64 * 128.
        s0 = kv_cache.stride(0)
        values = torch.as_strided(kv_cache, (nb, 64, D), (s0, D, 1)).view(E4M3).float()
        scales = torch.as_strided(kv_cache, (nb, 64 * 4), (s0, 1), kv_cache.storage_offset() + 64 * D)
        scales = scales.contiguous().view(torch.float32)
        for b in range(B):
            ctx = int(context_lens[b, -1])
            num_kv = -(-ctx // 64)
            written = min(_align(ctx, 256), stride)
            j = torch.arange(written)
            blk = j // 64
            page = torch.where(blk < num_kv, block_table[b, blk.clamp_max(block_table.shape[1] - 1)].long(), 0)
            kj, sj = values[page, j % 64], scales[page, j % 64]
            s = torch.relu(q[b, 0].float() @ kj.T)  # [H, written]
            out[b, :written] = (s * weights[b][:, None]).sum(0) * sj
        return out[:, :max_context_len]


@pytest.fixture
def fresh_caches():
    """Forget every cached probe before and after (tests inject and remove the wheel)."""

    def clear():
        registry._load.cache_clear()
        deepgemm._available.cache_clear()
        capability.clear_cache()

    clear()
    yield
    clear()


@pytest.fixture
def fake(monkeypatch, fresh_caches):
    module = FakeDeepGEMM()
    monkeypatch.setitem(sys.modules, "deep_gemm", module)
    return module


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _ragged_inputs(T, N, H, D, gen, device="cpu"):
    q = (torch.randn(T, H, D, generator=gen) * 0.5).to(E4M3).to(device)
    k = torch.randn(N, D, generator=gen).to(E4M3).to(device)
    k_scale = (torch.rand(N, generator=gen) + 0.05).to(device)
    weights = (torch.randn(T, H, generator=gen) * 0.1).to(device)
    ks = torch.randint(0, N + 1, (T,), generator=gen)
    ke = ks + (torch.rand(T, generator=gen) * (N - ks + 1)).long()
    # row 0 full, row 1 empty (ks == ke), row 2 inverted (ke < ks: empty), row 3 out of range both ways
    fixed = [(0, N), (N // 2, N // 2), (N - 1, N // 3), (-5, N + 9)]
    for r, (s, e) in enumerate(fixed[:T]):
        ks[r], ke[r] = s, e
    return q, (k, k_scale), weights, ks.to(I32).to(device), ke.to(I32).to(device)


def _paged_inputs(lens, H, gen, *, width_pages=None, device="cpu"):
    """Requests with ``lens`` tokens over shuffled pages of a fresh cache; unused table entries are garbage ids."""
    B = len(lens)
    pages_per = [-(-n // 64) for n in lens]
    max_pages = width_pages or max(1, max(pages_per))
    P = sum(pages_per) + 3
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, max_pages), P + 1000, dtype=I32)  # never read: past each request's length
    cache = new_index_k_cache(P)
    off = 0
    for b, n in enumerate(lens):
        table[b, : pages_per[b]] = perm[off : off + pages_per[b]].to(I32)
        off += pages_per[b]
        j = torch.arange(n)
        slots = table[b, j // 64].long() * 64 + j % 64
        store_index_k(cache, slots, torch.randn(n, 128, generator=gen).to(E4M3), torch.rand(n, generator=gen) + 0.05)
    # the bytes of the pages nobody uses: random, so a read of them cannot hide
    unused = perm[off:]
    cache[unused] = torch.randint(0, 120, (len(unused), cache.shape[1]), generator=gen, dtype=torch.uint8)
    q = (torch.randn(B, H, 128, generator=gen) * 0.5).to(E4M3)
    weights = torch.randn(B, H, generator=gen) * 0.1
    seq_lens = torch.tensor(lens, dtype=I32)
    return tuple(t.to(device) for t in (q, cache, weights, seq_lens, table))


def _check_logits(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert not bool(got.isnan().any()), f"NaN at {got.isnan().nonzero()[:3].tolist()}"
    ninf_got, ninf_ref = got == NEG_INF, ref == NEG_INF
    if not torch.equal(ninf_got, ninf_ref):
        where = (ninf_got != ninf_ref).nonzero()[0].tolist()
        at = tuple(where)
        raise AssertionError(f"-inf positions differ first at {where}: got {got[at]}, reference {ref[at]}")
    assert bool(torch.isfinite(got[~ninf_got]).all()), "non-finite value inside the ranges"
    fin = ~ninf_ref
    if bool(fin.any()):
        g, r = got[fin].double(), ref[fin].double()
        err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
        worst = int((g - r).abs().argmax())
        assert err < tol, f"relative error {err:.3g} >= {tol}; worst at {fin.nonzero()[worst].tolist()}"


# ----------------------------------------------------------------------------------------------------------
# CPU: availability, supports, dispatch


def test_available_says_why_without_the_wheel(fresh_caches):
    # (never drop an imported wheel from sys.modules: a second import re-registers its native ops)
    if capability.import_error("deep_gemm") is None:
        pytest.skip("deep_gemm is installed here")
    capability.clear_cache()
    reason = deepgemm._available()
    assert reason.startswith("cannot import deep_gemm:") and "sgl-deep-gemm==0.1.5.post1" in reason
    q, kv, w, ks, ke = _ragged_inputs(3, 64, 64, 128, torch.Generator().manual_seed(0))
    with pytest.raises(BackendUnavailableError, match="cannot import deep_gemm"):
        ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="deep_gemm")
    assert ops.explain("fp8_mqa_logits", q, kv, w, ks, ke)["deep_gemm"].startswith("cannot import deep_gemm")
    assert "deep_gemm" in ops.tier_names() and "sgl_kernel" in ops.tier_names()


def test_available_with_the_wheel(fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in deepgemm._available()
    deepgemm._available.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepgemm._available() is None
    deepgemm._available.cache_clear()
    monkeypatch.delattr(FakeDeepGEMM, "get_paged_mqa_logits_metadata")
    assert "lacks ['get_paged_mqa_logits_metadata']" in deepgemm._available()


def test_supports_reasons_are_precise():
    sup = deepgemm.TIER.ops["fp8_mqa_logits"].supports
    q, kv, w, ks, ke = _ragged_inputs(4, 64, 64, 128, torch.Generator().manual_seed(1))
    k, s = kv
    assert "inputs are on cpu" in sup(q, kv, w, ks, ke)
    assert "float8_e4m3fn" in sup(q.float(), kv, w, ks, ke)
    assert "65 index heads" in sup(torch.zeros(4, 65, 128, dtype=E4M3), kv, w, ks, ke)
    assert "head dim 96" in sup(torch.zeros(4, 64, 96, dtype=E4M3), kv, w, ks, ke)
    assert "contiguous" in sup(q, (k.t().contiguous().t(), s), w, ks, ke)
    assert "k_scale" in sup(q, (k, s[::2]), w, ks, ke)
    assert "k_scale" in sup(q, (k, s.double()), w, ks, ke)
    assert "kv: expected a tuple" in sup(q, k, w, ks, ke)
    assert sup() is not None  # explain(op) without inputs gets a reason, not a TypeError

    psup = deepgemm.TIER.ops["fp8_paged_mqa_logits"].supports
    q, cache, w, lens, table = _paged_inputs([5, 70], 64, torch.Generator().manual_seed(2))
    assert "inputs are on cpu" in psup(q, cache, w, lens, table, 128)
    assert "head dim 64; DeepGEMM takes 128" in psup(torch.zeros(2, 64, 64, dtype=E4M3), cache, w, lens, table, 128)
    assert "[P, 8448] uint8" in psup(q, cache[:, :100], w, lens, table, 128)
    assert "[P, 8448] uint8" in psup(q, cache.view(torch.int8), w, lens, table, 128)
    padded = torch.zeros(cache.shape[0], 8448 + 8, dtype=torch.uint8)[:, :8448]
    assert "aligned stride" in psup(q, padded, w, lens, table, 128)
    assert "at least one page" in psup(q, cache[:0], w, lens, table, 128)


def test_forced_tier_raises_and_auto_skips_it(fake, monkeypatch):
    with monkeypatch.context() as m:  # the tier loads as available (cached), then the CUDA probe is real again
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert registry.get_tier("deep_gemm").name == "deep_gemm"
    q, kv, w, ks, ke = _ragged_inputs(3, 64, 64, 128, torch.Generator().manual_seed(3))
    with pytest.raises(BackendUnavailableError, match="cannot run fp8_mqa_logits on these inputs: inputs are on cpu"):
        ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="deep_gemm")
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="auto")  # deep_gemm says no; the reference runs
    assert torch.equal(got, reference.fp8_mqa_logits(q, kv, w, ks, ke))
    with pytest.raises(BackendUnavailableError, match="does not implement topk_transform_ragged"):
        ops.topk_transform_ragged(got, 4, row_starts=ks, lengths=ke - ks, backend="deep_gemm")


def test_kernel_heads():
    assert [deepgemm.kernel_heads(h) for h in (1, 16, 32, 33, 63, 64)] == [32, 32, 32, 64, 64, 64]
    with pytest.raises(ValueError, match="at most 64"):
        deepgemm.kernel_heads(65)


# ----------------------------------------------------------------------------------------------------------
# CPU: the adapters around the fake wheel


@pytest.mark.parametrize("H", [1, 16, 32, 33, 64])
@pytest.mark.parametrize("T,N,D", [(1, 64, 128), (5, 301, 32), (37, 1000, 128)])
def test_fake_ragged_glue_matches_reference(fake, T, N, H, D):
    gen = torch.Generator().manual_seed(T * 1000 + N + H)
    q, kv, w, ks, ke = _ragged_inputs(T, N, H, D, gen)
    _check_logits(deepgemm.fp8_mqa_logits(q, kv, w, ks, ke), reference.fp8_mqa_logits(q, kv, w, ks, ke), 1e-5)


def test_fake_ragged_misaligned_operands_and_empty_problems(fake):
    gen = torch.Generator().manual_seed(4)
    q, (k, s), w, ks, ke = _ragged_inputs(6, 101, 64, 128, gen)
    # a window starting at key 1: the k_scale slice's base is 4 bytes off a 16-byte boundary
    kv = (k[1:], s[1:])
    ks, ke = ks.clamp(0, 100), ke.clamp(0, 100)
    _check_logits(deepgemm.fp8_mqa_logits(q, kv, w, ks, ke), reference.fp8_mqa_logits(q, kv, w, ks, ke), 1e-5)
    assert deepgemm.fp8_mqa_logits(q[:0], kv, w[:0], ks[:0], ke[:0]).shape == (0, 100)
    empty = deepgemm.fp8_mqa_logits(q, (k[:0], s[:0]), w, ks * 0, ke * 0)
    assert empty.shape == (6, 0)
    with pytest.raises(ValueError, match="weights"):
        deepgemm.fp8_mqa_logits(q, kv, w[:, :3], ks, ke)


@pytest.mark.parametrize("H", [1, 16, 64])
@pytest.mark.parametrize("lens,width", [([1], None), ([64, 65, 0, 130, 7], None), ([300, 1, 64], 9)])
def test_fake_paged_glue_matches_reference(fake, lens, width, H):
    gen = torch.Generator().manual_seed(sum(lens) + H)
    q, cache, w, seq_lens, table = _paged_inputs(lens, H, gen, width_pages=width)
    for max_len in sorted({max(lens), table.shape[1] * 64}):
        got = deepgemm.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len)
        _check_logits(got, reference.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len), 1e-5)
    assert deepgemm.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 0).shape == (len(lens), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        deepgemm.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 1.5)


# ----------------------------------------------------------------------------------------------------------
# GPU: the real wheel against the reference


def _need_wheel():
    registry._load.cache_clear()
    reason = deepgemm._available()
    if reason:
        pytest.skip(f"deep_gemm tier unavailable: {reason}")


def _dirty_allocator(numel: int) -> None:
    """Hand the next allocation of this size NaN-filled memory, so that unwritten output cannot pass."""
    torch.full((numel,), float("nan"), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 32, 16])
@pytest.mark.parametrize("N", [64, 1000, 8192])
@pytest.mark.parametrize("T", [1, 37, 512])
def test_gpu_ragged_matches_reference(T, N, H):
    _need_wheel()
    gen = torch.Generator().manual_seed(7 * T + N + H)
    q, kv, w, ks, ke = _ragged_inputs(T, N, H, 128, gen, device="cuda")
    want = reference.fp8_mqa_logits(q, kv, w, ks, ke)
    _dirty_allocator(_align(T, 4) * _align(N + 256, 64))
    got = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="deep_gemm")
    _check_logits(got, want, 1e-2)
    if H in (32, 64):
        assert ops.explain("fp8_mqa_logits", q, kv, w, ks, ke)["deep_gemm"] == "ok"
        _check_logits(ops.fp8_mqa_logits(q, kv, w, ks, ke), want, 1e-2)  # auto: deep_gemm ranks first


@pytest.mark.gpu
def test_gpu_ragged_causal_chunk_window():
    """The chunked indexer's call: a column window whose k_scale slice is not 16-byte aligned, causal rows."""
    _need_wheel()
    gen = torch.Generator().manual_seed(11)
    q, (k, s), w, _, _ = _ragged_inputs(300, 4099, 64, 128, gen, device="cuda")
    lo = 3
    kv = (k[lo:], s[lo:])
    ke = torch.arange(300, device="cuda", dtype=I32) + (4096 - 300) + 1
    ks = torch.zeros_like(ke)
    _check_logits(ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="deep_gemm"),
                  reference.fp8_mqa_logits(q, kv, w, ks, ke), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 16])
@pytest.mark.parametrize("B", [1, 5, 33])
def test_gpu_paged_matches_reference(B, H):
    _need_wheel()
    gen = torch.Generator().manual_seed(100 * B + H)
    lens = torch.randint(1, 3000, (B,), generator=gen).tolist()
    for i, n in enumerate([1, 64, 65, 0, 257]):
        if i < B:
            lens[i] = n
    if B == 1:
        lens = [1000]
    q, cache, w, seq_lens, table = _paged_inputs(lens, H, gen, width_pages=-(-max(lens) // 64) + 2, device="cuda")
    for max_len in (table.shape[1] * 64, max(lens)):
        want = reference.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len)
        _dirty_allocator(B * _align(max_len, 256))
        got = ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len, backend="deep_gemm")
        _check_logits(got, want, 1e-2)
    assert ops.explain("fp8_paged_mqa_logits", q, cache, w, seq_lens, table, max_len)["deep_gemm"] == "ok"
    _check_logits(ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, max_len), want, 1e-2)


@pytest.mark.gpu
def test_gpu_paged_single_token_batch_one():
    """B = 1 at length 1: the one-row result whose row stride tvm-ffi's DLPack export rewrites."""
    _need_wheel()
    gen = torch.Generator().manual_seed(12)
    q, cache, w, seq_lens, table = _paged_inputs([1], 64, gen, width_pages=3, device="cuda")
    want = reference.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 131)
    _check_logits(ops.fp8_paged_mqa_logits(q, cache, w, seq_lens, table, 131, backend="deep_gemm"), want, 1e-2)
