"""The capability probe is read once per device, and dispatch / the FlashMLA forward never query the device.

Runs on CPU: ``torch.cuda``'s device queries are replaced by fakes (two GPUs, SM90 and SM100), the probe
is built ("construction"), then the fakes are made to raise. Everything after that — repeated lookups,
``supports()``, ``dispatch``, the FlashMLA tier's pad -> kernel -> trim forward on CUDA-device tensors
(``FakeTensorMode``: shapes and devices without a GPU) with a stand-in kernel — must not touch them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nsa_tp.ops import capability, flashmla, registry
from nsa_tp.ops.capability import get_capability, import_error

D_QK = 576
_FAKE_GPUS = {0: ((9, 0), "fake H100", 132), 1: ((10, 0), "fake B200", 148)}


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two fake GPUs; returns a counter of device queries and a switch that makes further queries raise."""
    calls = {"n": 0}
    state = {"frozen": False}

    def _index(device) -> int:
        return torch.device(device).index if not isinstance(device, int) else device

    def get_device_capability(device=None):
        if state["frozen"]:
            raise AssertionError("torch.cuda.get_device_capability called after construction")
        calls["n"] += 1
        return _FAKE_GPUS[_index(device)][0]

    def get_device_properties(device=None):
        if state["frozen"]:
            raise AssertionError("torch.cuda.get_device_properties called after construction")
        calls["n"] += 1
        _, name, sms = _FAKE_GPUS[_index(device)]
        return SimpleNamespace(name=name, multi_processor_count=sms)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
    capability.clear_cache()
    yield calls, lambda: state.update(frozen=True)
    capability.clear_cache()  # no fake capability may leak into other tests


def test_probe_reads_each_device_once(fake_gpus):
    calls, freeze = fake_gpus
    cap0 = get_capability("cuda:0")
    cap1 = get_capability(1)
    assert (cap0.sm, cap0.name, cap0.num_sms, cap0.flashmla_head_multiple) == ((9, 0), "fake H100", 132, 64)
    assert (cap1.sm, cap1.sm_label, cap1.flashmla_head_multiple) == ((10, 0), "SM100", 128)
    assert calls["n"] == 4  # capability + properties, per device
    freeze()
    for device in ("cuda:0", torch.device("cuda", 0), 0, "cuda", None):
        assert get_capability(device) is cap0
    assert get_capability(torch.device("cuda", 1)) is cap1
    assert get_capability("cpu").sm is None and get_capability("cpu").flashmla_head_multiple is None
    assert calls["n"] == 4


def test_import_probe_is_cached():
    import_error.cache_clear()
    reason = import_error("nsa_tp_no_such_module")
    assert reason and "nsa_tp_no_such_module" in reason
    assert import_error("nsa_tp_no_such_module") is reason
    assert import_error("torch") is None
    assert import_error.cache_info().hits >= 1


class _ShapeOnlyKernel:
    """A stand-in for ``flash_mla`` under FakeTensorMode: checks FlashMLA's head/top-k rules, returns shapes."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def flash_mla_sparse_fwd(self, q, kv, indices, sm_scale, d_v=512, *, use_legacy=False):
        assert use_legacy and q.shape[1] in (64, 128) and indices.shape[-1] % 128 == 0
        self.calls.append((q.shape[1], indices.shape[-1]))
        T, h = q.shape[:2]
        stats = q.new_empty(T, h, dtype=torch.float32)
        return q.new_empty(T, h, d_v), stats, stats.clone()


# Fake tensors live on cuda:0 only: on a machine with one real GPU, FakeTensorMode validates the ordinal.
# Head counts stay <= 128: the split path's .contiguous() on a fake CUDA tensor needs a real CUDA build (the
# split is covered by test_flashmla_tier.py, on the fake kernel and on the GPU).
@pytest.mark.parametrize(
    ("sm0", "cases"),
    [((9, 0), [(16, 64), (96, 128), (128, 128)]), ((10, 0), [(1, 128), (16, 128), (96, 128)])],
    ids=["sm90", "sm100"],
)
def test_dispatch_and_forward_never_query_the_device(fake_gpus, monkeypatch, sm0, cases):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls, freeze = fake_gpus
    monkeypatch.setitem(_FAKE_GPUS, 0, (sm0, f"fake SM{sm0[0]}0", 132))
    kernel = _ShapeOnlyKernel()
    monkeypatch.setattr(flashmla, "_flash_mla", lambda: kernel)
    # The registry caches each tier's availability once per process; here FlashMLA counts as available (its
    # probe ran at "construction"), exactly as on a machine with the wheel, and the other GPU tiers are out
    # of this test (they would try to launch real kernels on these shape-only tensors).
    def load(name: str):
        if name == "flashmla":
            return flashmla.TIER
        if name == "reference":
            return real_load(name)
        return "not under test"

    real_load = registry._load
    monkeypatch.setattr(registry, "_load", load)

    assert get_capability("cuda:0").sm == sm0  # construction: the backend builds the probe once
    freeze()
    n_before = calls["n"]

    with FakeTensorMode(allow_non_fake_inputs=True):
        for heads, padded in cases:
            q = torch.empty(32, heads, D_QK, dtype=torch.bfloat16, device="cuda:0")
            kv = torch.empty(4096, 1, D_QK, dtype=torch.bfloat16, device="cuda:0")
            idx = torch.empty(32, 1, 300, dtype=torch.int32, device="cuda:0")
            assert registry.explain("sparse_mla_fwd", q, kv, idx, 0.04)["flashmla"] == "ok"
            n0 = len(kernel.calls)
            out, max_logits, lse = registry.dispatch("sparse_mla_fwd", "auto", q, kv, idx, 0.04)
            assert out.shape == (32, heads, 512) and lse.shape == max_logits.shape == (32, heads)
            made = kernel.calls[n0:]  # auto ran FlashMLA: padded heads (in calls of <= 128), top-k 300 -> 384
            assert made and sum(h for h, _ in made) == padded and all(k == 384 for _, k in made), made
    assert calls["n"] == n_before, "a device query happened after construction"
