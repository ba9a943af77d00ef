"""Every layout equals the single-GPU layer with NCCL at DeepSeek-V3.2's real dims (2 or 4 GPUs).

Real dims: hidden 7168, q_lora 1536, 128 heads (192 / 576 / 512), 64 index heads x 128, top-k 2048. The
batch is ragged with a cached prefix, and the longest context (3000 + decode) exceeds the top-k, so the
indexer's selection matters. Ranks start through ``nsa_tp.parallel.launch`` (NCCL, one GPU a rank); the
reference runs in this process on GPU 0. Run on the device (NVLS must stay off)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m pytest -s -q test/nightly/test_sharded_layer_nccl.py
"""

from __future__ import annotations

import os

import pytest
import torch

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, compare_results, run_case, run_layouts
from nsa_tp.parallel.launch import NCCL_ENV

for _k, _v in NCCL_ENV.items():
    os.environ.setdefault(_k, _v)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

CFG = NSAConfig()  # the released model's attention dims
REQS = (Request(0, 3000), Request(1024, 700), Request(0, 300))
TOL = 1e-2

LAYOUTS = {
    2: [(2, 1, False), (2, 2, True)],
    4: [(4, 1, False), (4, 2, True), (4, 4, True)],
}


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _case(tp: int, dp: int, dpa: bool, kv: str) -> RunCase:
    return RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, cfg=CFG, requests=REQS, decode_steps=3,
                   kv_cache_dtype=kv, seed=1)


@pytest.mark.parametrize("kv", ["bfloat16", "fp8_e4m3"])
@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_gpu_nccl(world: int, kv: str):
    if _gpus() < world:
        pytest.skip(f"needs {world} GPUs, {_gpus()} visible")
    ref = run_case(None, _case(1, 1, False, kv))
    cases = [_case(*lo, kv) for lo in LAYOUTS[world]]
    results = run_layouts(cases, world, backend="nccl", timeout_s=900)
    for case, ranks in zip(cases, results, strict=True):
        err = compare_results(ref, ranks[0])
        lay = case.layout()
        print(f"{case.label():8s} {kv:9s} heads/rank {lay.heads_per_rank:3d} pad rows "
              f"{sum(r.pad_rows for r in ranks):4d} rel err prefill {err['prefill']:.2e} decode {err['decode']:.2e} "
              f"prefill {max(r.prefill_ms for r in ranks):8.2f} ms decode {max(r.decode_ms for r in ranks):7.2f} "
              f"ms/step peak {max(r.peak_mem_mb for r in ranks):7.0f} MiB on {ranks[0].device}")
        assert ranks[0].heads_per_rank == lay.heads_per_rank
        assert err["max"] < TOL, (case.label(), kv, err)
        assert all(r.device.startswith("cuda") for r in ranks)
