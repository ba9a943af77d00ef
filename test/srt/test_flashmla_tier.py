"""The FlashMLA tier (``nsa_tp.ops.flashmla``) against the reference tier.

Two halves:

- CPU: the tier's glue (head padding, top-k padding, head splitting, invalid-id mapping, the empty-row
  convention, plan reuse) around a *fake* kernel that enforces FlashMLA's documented constraints (64/128
  heads, top-k blocks, only exactly -1 skipped by the fp8 decode kernel, lse = +inf for empty rows) and
  computes with the reference. This runs everywhere and pins down what the wrapper does.
- GPU (``@pytest.mark.gpu``, skipped without CUDA or without the ``sgl-flash-mla`` wheel): the real kernels
  over a grid of head counts (TP1..TP8 per-rank heads and below), top-k sizes, invalid and all-invalid
  rows, bf16 prefill, bf16 and fp8 decode, DP-padded batches.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from nsa_tp.ops import flashmla, reference
from nsa_tp.ops.capability import Capability
from nsa_tp.ops.heads import pad_heads, pad_topk, trim_heads
from nsa_tp.ops.kv_format import pack_fp8_kv
from nsa_tp.ops.registry import BackendUnavailableError

D_QK, D_V, PAGE = 576, 512, 64


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _make_indices(T: int, K: int, N: int, *, gen: torch.Generator, empty_rows=(), device="cpu") -> torch.Tensor:
    """``[T, 1, K]`` int32 ids in [0, N) with ~15% -1, ~5% >= N (both "no token"), and the listed rows all -1."""
    idx = torch.randint(0, N, (T, 1, K), generator=gen, dtype=torch.int32)
    r = torch.rand(T, 1, K, generator=gen)
    idx[r < 0.15] = -1
    idx[(r >= 0.15) & (r < 0.20)] = N + 7
    for t in empty_rows:
        if t < T:
            idx[t] = -1
    return idx.to(device)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check_stat(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert not got.isnan().any(), f"{name}: NaN at {got.isnan().nonzero()[:3].tolist()}"
    inf_got, inf_ref = got.isinf(), ref.isinf()
    assert torch.equal(inf_got, inf_ref), f"{name}: inf positions differ ({int(inf_got.sum())} vs {int(inf_ref.sum())})"
    assert torch.equal(got[inf_got], ref[inf_ref]), f"{name}: inf signs differ"
    fin = ~inf_ref
    if fin.any():
        err = (got[fin].double() - ref[fin].double()).abs()
        worst = int(err.argmax())
        pos = fin.nonzero()[worst].tolist()
        assert err.max().item() <= atol, f"{name}: max abs err {err.max().item():.3g} > {atol} at {pos}"


def _check_out(got: torch.Tensor, ref: torch.Tensor, empty: torch.Tensor, tol: float = 1e-2) -> float:
    """out: no NaN/inf, exact zeros on empty rows, ||got - ref|| / ||ref|| < tol. Returns the error."""
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert torch.isfinite(got).all(), "out: non-finite values"
    assert (got[empty] == 0).all(), "out: rows with no valid id must be exactly 0"
    err = _rel_err(got.float(), ref.float())
    assert err < tol, f"out: relative error {err:.3g} >= {tol}"
    return err


# ----------------------------------------------------------------------------------------------------------
# CPU half: the glue, around a fake kernel that enforces FlashMLA's constraints


class _FakeFlashMLA:
    """Stands in for the ``flash_mla`` module: FlashMLA's checks and conventions, the reference's arithmetic."""

    def __init__(self, sm_major: int):
        self.sm_major = sm_major
        self.heads_seen: list[int] = []
        self.plans_built = 0

    def _check_heads(self, h_q: int) -> None:
        allowed = (64, 128) if self.sm_major == 9 else (128,)
        if h_q not in allowed:
            raise RuntimeError(f"Unsupported h_q: {h_q}")
        self.heads_seen.append(h_q)

    @staticmethod
    def _check_topk(topk: int, h_q: int) -> None:
        block = 64 if h_q == 64 else 128
        if topk % block:
            raise RuntimeError(f"topk ({topk}) mod B_TOPK ({block}) must be 0")

    def flash_mla_sparse_fwd(self, q, kv, indices, sm_scale, d_v=512, *, use_legacy=False):
        assert use_legacy, "the 576-dim V3.2 format is only in the legacy kernels"
        assert q.stride(-1) == 1 and q.dtype == torch.bfloat16 and q.shape[-1] == D_QK
        self._check_heads(q.shape[1])
        self._check_topk(indices.shape[-1], q.shape[1])
        out, max_logits, lse = reference.sparse_mla_fwd(q, kv, indices, sm_scale, d_v)
        return out, max_logits, lse.masked_fill(torch.isneginf(lse), float("inf"))  # FlashMLA: empty -> +inf

    def get_mla_metadata(self):
        return SimpleNamespace(tile_scheduler_metadata=None, num_splits=None, planned=None), None

    def get_mla_decoding_metadata(self, seqlens_k, num_q_tokens_per_head_k, h_k, h_q, is_fp8_kvcache, topk,
                                  use_legacy):
        assert use_legacy and is_fp8_kvcache and h_k == 1 and num_q_tokens_per_head_k == h_q
        self.plans_built += 1
        return torch.zeros(8, 8, dtype=torch.int32), torch.zeros(seqlens_k.shape[0] + 1, dtype=torch.int32)

    def flash_mla_with_kvcache(self, q, k_cache, block_table, cache_seqlens, head_dim_v, sched, num_splits=None, *,
                               softmax_scale, is_fp8_kvcache, indices, use_legacy, kv_format):
        assert use_legacy and is_fp8_kvcache and kv_format == "V32" and sched.tile_scheduler_metadata is not None
        B, s_q, h_q, d = q.shape
        assert s_q == 1 and d == D_QK and k_cache.shape[1:] == (PAGE, 1, 656)
        self._check_heads(h_q)
        self._check_topk(indices.shape[-1], h_q)
        slots = k_cache.shape[0] * PAGE
        bad = (indices != -1) & ((indices < 0) | (indices >= slots))
        if bad.any():
            raise RuntimeError("illegal memory access: the fp8 decode kernel only skips ids equal to -1")
        out, _, lse = reference.sparse_mla_fwd(q[:, 0], k_cache.flatten(0, 1), indices, softmax_scale, head_dim_v)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        return out[:, None], lse[:, :, None]  # [B, 1, h, 512], [B, h, s_q = 1]


@pytest.fixture(params=[9, 10], ids=["sm90", "sm100"])
def fake_kernel(request, monkeypatch):
    """The flashmla module wired to a fake kernel and a fake SM90 / SM100 capability (no GPU needed)."""
    sm = request.param
    fake = _FakeFlashMLA(sm)
    cap = Capability(device=torch.device("cpu"), name=f"fake SM{sm}0", sm=(sm, 0), num_sms=132)
    monkeypatch.setattr(flashmla, "_flash_mla", lambda: fake)
    monkeypatch.setattr(flashmla, "get_capability", lambda device=None: cap)
    return fake


@pytest.mark.parametrize(
    ("heads", "multiple", "padded"),
    [(1, 64, 64), (16, 64, 64), (16, 128, 128), (64, 64, 64), (96, 64, 128), (128, 64, 128), (192, 64, 192),
     (16, None, 16)],
)
def test_pad_heads_zero_pads_and_trims(heads, multiple, padded):
    q = torch.randn(5, heads, 8)
    q_p, real_h = pad_heads(q, multiple)
    assert real_h == heads and q_p.shape == (5, padded, 8) and q_p.is_contiguous()
    assert torch.equal(q_p[:, :heads], q) and (q_p[:, heads:] == 0).all()
    assert torch.equal(trim_heads(q_p, real_h), q)
    assert torch.equal(trim_heads(q_p[..., 0], real_h), q[..., 0])


@pytest.mark.parametrize(("k", "kp"), [(1, 128), (300, 384), (512, 512), (2048, 2048), (2049, 2176)])
def test_pad_topk_fills_with_minus_one(k, kp):
    idx = torch.arange(k, dtype=torch.int32).view(1, 1, k)
    out = pad_topk(idx, 128)
    assert out.shape == (1, 1, kp) and out.dtype == torch.int32
    assert torch.equal(out[..., :k], idx) and (out[..., k:] == -1).all()


def test_head_chunks_are_kernel_sized():
    assert flashmla._head_chunks(64) == [(0, 64)]
    assert flashmla._head_chunks(128) == [(0, 128)]
    assert flashmla._head_chunks(192) == [(0, 128), (128, 64)]
    assert flashmla._head_chunks(256) == [(0, 128), (128, 128)]


@pytest.mark.parametrize("heads", [1, 16, 64, 96, 192])
@pytest.mark.parametrize("topk", [300, 128])
def test_fake_prefill_glue_matches_reference(fake_kernel, heads, topk):
    gen = torch.Generator().manual_seed(heads * 1000 + topk)
    T, N = 6, 200
    q = torch.randn(T, heads, D_QK, generator=gen).bfloat16()
    kv = torch.randn(N, 1, D_QK, generator=gen).bfloat16()
    idx = _make_indices(T, topk, N, gen=gen, empty_rows=(0, 4))
    out, max_logits, lse = flashmla.sparse_mla_fwd(q, kv, idx, 0.05)
    r_out, r_max, r_lse = reference.sparse_mla_fwd(q, kv, idx, 0.05)
    _check_out(out, r_out, r_lse.isneginf(), tol=1e-3)
    _check_stat("lse", lse, r_lse, 1e-4)
    _check_stat("max_logits", max_logits, r_max, 1e-4)
    assert lse[0].isneginf().all() and max_logits[4].isneginf().all()
    assert set(fake_kernel.heads_seen) <= {64, 128}


def test_fake_prefill_empty_inputs(fake_kernel):
    q = torch.randn(3, 16, D_QK).bfloat16()
    out, m, lse = flashmla.sparse_mla_fwd(q, torch.zeros(0, 1, D_QK, dtype=torch.bfloat16),
                                          torch.zeros(3, 1, 4, dtype=torch.int32), 0.1)
    assert (out == 0).all() and m.isneginf().all() and lse.isneginf().all() and out.shape == (3, 16, D_V)
    assert fake_kernel.heads_seen == []  # no kernel call on an empty cache


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "bfloat16"])
@pytest.mark.parametrize("heads", [1, 16, 128, 192])
def test_fake_decode_glue_plan_once_dp_padding(fake_kernel, kv_dtype, heads):
    gen = torch.Generator().manual_seed(heads + 7)
    B_real, B_pad, pages, K = 5, 8, 4, 300  # DP padding: 3 extra rows, all -1
    slots = pages * PAGE
    cache = torch.randn(pages, PAGE, 1, D_QK, generator=gen).bfloat16()
    kv_cache = pack_fp8_kv(cache) if kv_dtype == "fp8_e4m3" else cache
    plan = flashmla.plan_sparse_mla_decode(B_pad, heads, K, kv_dtype=kv_dtype, device="cpu")
    assert plan.tier == "flashmla" and plan.data.padded_topk == 384
    idx = _make_indices(B_pad, K, slots, gen=gen, empty_rows=range(B_real, B_pad))
    idx[1, 0, 3] = -5  # an invalid id other than -1: the wrapper must map it to -1 for the fp8 kernel
    for layer in range(2):  # one plan, reused by every layer
        q = torch.randn(B_pad, heads, D_QK, generator=gen).bfloat16()
        out, lse = flashmla.sparse_mla_decode(q, kv_cache, idx, 0.04, plan=plan)
        r_out, r_lse = reference.sparse_mla_decode(q, kv_cache, idx, 0.04)
        _check_out(out, r_out, r_lse.isneginf(), tol=1e-3)
        _check_stat("lse", lse, r_lse, 1e-4)
        assert lse[B_real:].isneginf().all(), f"layer {layer}: DP padding rows must be empty"
    expected_plans = len({n for _, n in flashmla._head_chunks(plan.data.padded_heads)}) if kv_dtype == "fp8_e4m3" else 0
    assert fake_kernel.plans_built == expected_plans


def test_supports_reasons_are_precise(fake_kernel, monkeypatch):
    q = torch.randn(4, 16, D_QK).bfloat16()
    kv = torch.randn(50, 1, D_QK).bfloat16()
    idx = torch.zeros(4, 1, 8, dtype=torch.int32)
    # The fake capability says "cpu" device type, so first: the device reason.
    assert "CUDA" in flashmla._fwd_supports(q, kv, idx, 0.1)
    cuda_cap = Capability(device=torch.device("cuda", 0), name="fake", sm=(fake_kernel.sm_major, 0), num_sms=132)
    monkeypatch.setattr(flashmla, "get_capability", lambda device=None: cuda_cap)
    assert flashmla._fwd_supports(q, kv, idx, 0.1) is None
    assert "d_qk is 512" in flashmla._fwd_supports(q[..., :512], kv, idx, 0.1)
    assert "bfloat16" in flashmla._fwd_supports(q.float(), kv, idx, 0.1)
    assert "fp8" in flashmla._fwd_supports(q, pack_fp8_kv(kv), idx, 0.1)
    assert "d_v" in flashmla._fwd_supports(q, kv, idx, 0.1, 256)
    assert "int32" in flashmla._fwd_supports(q, kv, idx.long(), 0.1)
    assert "[4, 1, K]" in flashmla._fwd_supports(q, kv, idx[:3], 0.1)
    old = Capability(device=torch.device("cuda", 0), name="fake A100", sm=(8, 0), num_sms=108)
    monkeypatch.setattr(flashmla, "get_capability", lambda device=None: old)
    assert "SM80" in flashmla._fwd_supports(q, kv, idx, 0.1)
    assert "SM80" in flashmla._plan_supports(4, 16, 2048, kv_dtype="fp8_e4m3", device="cuda:0")
    assert "kv_dtype" in flashmla._plan_supports(4, 16, 2048, kv_dtype="int4", device="cuda:0")
    assert "num_heads" in flashmla._plan_supports(4, 0, 2048, kv_dtype="fp8_e4m3", device="cuda:0")


def test_decode_supports_rejects_foreign_or_mismatched_plans(fake_kernel, monkeypatch):
    cuda_cap = Capability(device=torch.device("cuda", 0), name="fake", sm=(9, 0), num_sms=132)
    ref_plan = reference.plan_sparse_mla_decode(2, 16, 64, kv_dtype="fp8_e4m3", device="cpu")
    plan = flashmla.plan_sparse_mla_decode(2, 16, 64, kv_dtype="fp8_e4m3", device="cpu")
    monkeypatch.setattr(flashmla, "get_capability", lambda device=None: cuda_cap)
    q = torch.randn(2, 16, D_QK).bfloat16()
    kv_cache = torch.zeros(3, PAGE, 1, 656, dtype=torch.uint8)
    idx = torch.zeros(2, 1, 64, dtype=torch.int32)
    assert "plan" in flashmla._decode_supports(q, kv_cache, idx, 0.1, plan=ref_plan)
    assert "plan" in flashmla._decode_supports(q, kv_cache, idx, 0.1, plan=None)
    assert "topk 64" in flashmla._decode_supports(q, kv_cache, idx[..., :32], 0.1, plan=plan)
    assert flashmla._decode_supports(q, kv_cache, idx, 0.1, plan=plan) is None
    bf16_cache = torch.zeros(3, PAGE, 1, D_QK, dtype=torch.bfloat16)
    assert "fp8_e4m3 cache" in flashmla._decode_supports(q, bf16_cache, idx, 0.1, plan=plan)
    assert "page" in flashmla._decode_supports(q, kv_cache[:, :32], idx, 0.1, plan=plan)


def test_forced_flashmla_without_it_raises_with_the_reason():
    reason = flashmla._available()
    if reason is None:
        pytest.skip("FlashMLA is available here; the forced-tier error path needs a machine without it")
    from nsa_tp.ops import sparse_mla_fwd

    q, kv = torch.randn(2, 4, D_QK).bfloat16(), torch.randn(8, 1, D_QK).bfloat16()
    idx = torch.zeros(2, 1, 4, dtype=torch.int32)
    with pytest.raises(BackendUnavailableError, match="flashmla"):
        sparse_mla_fwd(q, kv, idx, 0.1, backend="flashmla")
    out, _, _ = sparse_mla_fwd(q, kv, idx, 0.1)  # auto falls through to a tier that can run
    assert out.shape == (2, 4, D_V)


# ----------------------------------------------------------------------------------------------------------
# GPU half: the real kernels


def _require_flashmla():
    reason = flashmla._available()
    if reason:
        pytest.skip(f"FlashMLA tier unavailable: {reason}")
    from nsa_tp.ops.capability import get_capability

    cap = get_capability(torch.cuda.current_device())
    if cap.sm_major not in (9, 10):
        pytest.skip(f"{cap.name} is {cap.sm_label}; FlashMLA's sparse kernels need SM90 or SM100")
    return cap


def _poison_allocator(device: str = "cuda") -> None:
    """Fill the caching allocator's free blocks with NaN so that a kernel output it never writes shows up."""
    junk = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=device)
    del junk


GPU_HEADS = [1, 2, 4, 8, 16, 32, 64, 128]
GPU_TOPK = [2048, 512, 300]


@pytest.mark.gpu
@pytest.mark.parametrize("topk", GPU_TOPK)
@pytest.mark.parametrize("heads", [*GPU_HEADS, 96, 192])
def test_gpu_prefill_matches_reference(heads, topk):
    _require_flashmla()
    gen = torch.Generator().manual_seed(heads * 7919 + topk)
    T, N = 67, 4099
    q = torch.randn(T, heads, D_QK, generator=gen).bfloat16().cuda()
    kv = torch.randn(N, 1, D_QK, generator=gen).bfloat16().cuda()
    idx = _make_indices(T, topk, N, gen=gen, empty_rows=(0, 33, 66), device="cuda")
    sm_scale = 1 / math.sqrt(D_QK)
    _poison_allocator()
    out, max_logits, lse = flashmla.sparse_mla_fwd(q, kv, idx, sm_scale)
    r_out, r_max, r_lse = reference.sparse_mla_fwd(q, kv, idx, sm_scale)
    err = _check_out(out, r_out, r_lse.isneginf())
    _check_stat("lse", lse, r_lse, 5e-3)
    _check_stat("max_logits", max_logits, r_max, 5e-3)
    print(f"prefill H={heads:3d} K={topk:4d}: out rel err {err:.2e}, "
          f"lse max err {(lse - r_lse)[r_lse.isfinite()].abs().max().item():.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "bfloat16"])
@pytest.mark.parametrize("topk", GPU_TOPK)
@pytest.mark.parametrize("heads", GPU_HEADS)
def test_gpu_decode_matches_reference(heads, topk, kv_dtype):
    _require_flashmla()
    gen = torch.Generator().manual_seed(heads * 31 + topk + (kv_dtype == "bfloat16"))
    B_real, B_pad, pages = 9, 12, 70  # DP padding: 3 extra rows, all -1
    slots = pages * PAGE
    cache = torch.randn(pages, PAGE, 1, D_QK, generator=gen).bfloat16().cuda()
    kv_cache = pack_fp8_kv(cache) if kv_dtype == "fp8_e4m3" else cache
    idx = _make_indices(B_pad, topk, slots, gen=gen, empty_rows=(2, *range(B_real, B_pad)), device="cuda")
    sm_scale = 1 / math.sqrt(D_QK)
    from nsa_tp.ops import plan_sparse_mla_decode, sparse_mla_decode

    plan = plan_sparse_mla_decode(B_pad, heads, topk, kv_dtype=kv_dtype, device="cuda", backend="flashmla")
    assert plan.tier == "flashmla"
    for layer in range(2):  # the plan is reused across layers
        q = torch.randn(B_pad, heads, D_QK, generator=gen).bfloat16().cuda()
        _poison_allocator()
        out, lse = sparse_mla_decode(q, kv_cache, idx, sm_scale, plan=plan)
        r_out, r_lse = reference.sparse_mla_decode(q, kv_cache, idx, sm_scale)
        err = _check_out(out, r_out, r_lse.isneginf())
        _check_stat("lse", lse, r_lse, 2e-2 if kv_dtype == "fp8_e4m3" else 5e-3)
        assert lse[B_real:].isneginf().all() and (out[B_real:] == 0).all(), f"layer {layer}: DP padding rows"
    print(f"decode {kv_dtype:9s} H={heads:3d} K={topk:4d}: out rel err {err:.2e}, "
          f"lse max err {(lse - r_lse)[r_lse.isfinite()].abs().max().item():.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [64, 128])
def test_gpu_auto_picks_flashmla_and_forced_fp8_prefill_raises(heads):
    """``auto`` runs FlashMLA (upstream's kernel) unless this card's tuning table shows another tier at least the
    margin faster for this shape class (``nsa_tp.ops.tuning``); either way auto's output is that tier's, bit for
    bit."""
    _require_flashmla()
    from nsa_tp.ops import explain, sparse_mla_fwd, tuning
    from nsa_tp.ops.registry import auto_tier

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(40, heads, D_QK, generator=gen).bfloat16().cuda()
    kv = torch.randn(1000, 1, D_QK, generator=gen).bfloat16().cuda()
    idx = _make_indices(40, 2048, 1000, gen=gen, device="cuda")
    assert explain("sparse_mla_fwd", q, kv, idx, 0.04)["flashmla"] == "ok"
    _card, _cls, times = tuning.measured_choice("sparse_mla_fwd", q, kv, idx, 0.04)
    chosen = auto_tier("sparse_mla_fwd", q, kv, idx, 0.04)
    if not times or tuning.order_from_times("sparse_mla_fwd", times)[0] == "flashmla":
        assert chosen == "flashmla", (times, chosen)
    auto = sparse_mla_fwd(q, kv, idx, 0.04)
    forced = sparse_mla_fwd(q, kv, idx, 0.04, backend=chosen)
    for a, f in zip(auto, forced, strict=True):
        assert torch.equal(a, f), f"auto must run {chosen}, the tier the tuning table puts first"
    kv8 = pack_fp8_kv(kv)
    with pytest.raises(BackendUnavailableError, match="fp8"):
        sparse_mla_fwd(q, kv8, idx, 0.04, backend="flashmla")
    out8, _, _ = sparse_mla_fwd(q, kv8, idx, 0.04)  # auto moves on to a tier that reads fp8
    assert torch.isfinite(out8).all()


@pytest.mark.gpu
def test_gpu_kernel_rejects_unpadded_heads():
    """The fact the padding exists for: the raw kernel refuses 16 heads."""
    _require_flashmla()
    fm = flashmla._flash_mla()
    q = torch.randn(8, 16, D_QK, device="cuda").bfloat16()
    kv = torch.randn(256, 1, D_QK, device="cuda").bfloat16()
    idx = torch.zeros(8, 1, 128, dtype=torch.int32, device="cuda")
    with pytest.raises(Exception, match="h_q"):
        fm.flash_mla_sparse_fwd(q, kv, idx, 0.04, 512, use_legacy=True)
        torch.cuda.synchronize()


def test_decode_data_is_frozen():
    data = flashmla.FlashMLADecodeData(kernel="sparse_prefill", padded_heads=64, padded_topk=128, sched={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.padded_heads = 128  # type: ignore[misc]
