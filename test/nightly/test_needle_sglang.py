"""Nightly: the needle accuracy gate (benchmark/needle_sglang.py) in real SGLang on every GPU of this machine, in
each layout the GPU count allows — fp8 and bf16 KV caches, plugin off (upstream alone), on and verify, prompts of
8K-128K and 16 concurrent requests — gating every row at 99% and plugin-on equal to plugin-off.

Needs CUDA GPUs and SGLang (0.5.17-0.5.23) importable with nsa-tp's plugin; skips saying which is missing.
``NSA_TP_NEEDLE_SERVERS`` / ``NSA_TP_NEEDLE_LENS`` narrow the run (the script's --servers / --lens); results
land in ``$OUT/needle_sglang_<layout>.json`` (``OUT`` defaults to /tmp/out). On the lent machines (NVLS off)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m pytest -s -q test/nightly/test_needle_sglang.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nightly

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "needle_sglang.py"


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def layouts(gpus: int) -> dict[str, list[str]]:
    """Script flags per layout for ``gpus`` GPUs: one GPU; pure TP; partial DP attention; token-parallel on."""
    if gpus < 1:
        return {}
    if gpus == 1:
        return {"tp1": ["--tp", "1"]}
    n = 8 if gpus >= 8 else 4 if gpus >= 4 else 2
    dp = max(n // 2, 2)  # partial DP attention (2 GPUs an attention group); on 2 GPUs full DP attention
    return {f"tp{n}": ["--tp", str(n)],
            f"tp{n}_dp{dp}": ["--tp", str(n), "--dp", str(dp), "--enable-dp-attention"],
            f"tp{n}_token_parallel": ["--tp", str(n), "--nsa-token-parallel", "on"]}


def _why_skip() -> str | None:
    if _gpus() < 1:
        return "needs CUDA GPUs (0 visible)"
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        return f"sglang is not importable ({e}); lent machines: ../shared/sglang-on-device, PYTHONPATH=/tmp/site"
    return None


def test_layouts_per_gpu_count():
    assert layouts(0) == {} and list(layouts(1)) == ["tp1"]
    assert layouts(2) == {"tp2": ["--tp", "2"], "tp2_dp2": ["--tp", "2", "--dp", "2", "--enable-dp-attention"],
                          "tp2_token_parallel": ["--tp", "2", "--nsa-token-parallel", "on"]}
    assert layouts(4)["tp4_dp2"] == ["--tp", "4", "--dp", "2", "--enable-dp-attention"]
    assert layouts(8)["tp8_dp4"] == ["--tp", "8", "--dp", "4", "--enable-dp-attention"]
    assert layouts(8)["tp8_token_parallel"][-2:] == ["--nsa-token-parallel", "on"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tp1", "tp2", "tp2_dp2", "tp2_token_parallel", "tp4", "tp4_dp2",
                                  "tp4_token_parallel", "tp8", "tp8_dp4", "tp8_token_parallel"])
def test_needle_sglang(name):
    why = _why_skip()
    if why:
        pytest.skip(why)
    lay = layouts(_gpus())
    if name not in lay:
        pytest.skip(f"{name} is not a layout for {_gpus()} GPUs here ({sorted(lay)})")
    servers = os.environ.get("NSA_TP_NEEDLE_SERVERS", "fp8-off,fp8-on,fp8-verify,bf16-off,bf16-on,bf16-verify")
    cmd = [sys.executable, str(SCRIPT), *lay[name], "--name", name, "--servers", servers,
           "--lens", os.environ.get("NSA_TP_NEEDLE_LENS", "8192,32768,65536,131072")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=SCRIPT.parents[1])
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    print(tail)
    assert proc.returncode == 0, f"needle gate failed for {name} (rc {proc.returncode}):\n{tail}\n{proc.stderr[-2000:]}"
