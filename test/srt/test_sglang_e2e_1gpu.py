"""The one-GPU SGLang benchmark's CPU-checkable parts: spec parsing, launch commands, log facts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmark" / "sglang_e2e_1gpu.py"
spec = importlib.util.spec_from_file_location("sglang_e2e_1gpu", _PATH)
e2e = importlib.util.module_from_spec(spec)
sys.modules["sglang_e2e_1gpu"] = e2e
spec.loader.exec_module(e2e)


def test_specs_and_commands():
    s = e2e.parse_spec("16-bf16-verify")
    assert s == {"name": "16-bf16-verify", "heads": 16, "kv": "bf16", "mode": "verify"}
    cmd, env = e2e.server_command(s, 31005, 0.2)
    assert "--kv-cache-dtype" in cmd and cmd[cmd.index("--kv-cache-dtype") + 1] == "bfloat16"
    assert "--disable-cuda-graph" in cmd and env == {"NSA_TP_SGLANG_PLUGIN": "1", "NSA_TP_SGLANG_VERIFY": "1"}
    cmd, env = e2e.server_command(e2e.parse_spec("128-fp8-off"), 31000, 0.2)
    # SGLang's defaults for fp8 except the cache dtype itself: no backend or graph flags.
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert not any(f.startswith("--dsa") or f == "--disable-cuda-graph" for f in cmd)
    assert env["NSA_TP_SGLANG_PLUGIN"] == "0"
    with pytest.raises(SystemExit, match="bad server spec"):
        e2e.parse_spec("16-fp16-on")


def test_dry_run_prints_every_default_server(capsys):
    assert e2e.main(["start", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in e2e.DEFAULT_SPECS:
        assert f"{name}: NSA_TP_SGLANG_PLUGIN=" in out


def test_log_facts(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "[2026-11-29 16:00:00] [nsa-tp pid=7] plugin loaded: sglang 0.5.17, role=scheduler, hooks: x\n"
        "[2026-11-29 16:00:01] [nsa-tp pid=7] _forward_flashmla_kv h16/fp8/b<=64 runs nsa-tp tier triton "
        "(16 heads, no padding): measured on NVIDIA H200: triton 0.3 ms, flashmla 0.5 ms\n"
        "[2026-11-29 16:00:02] [nsa-tp pid=7] verify _forward_flashmla_kv h16/fp8/b<=64: call 1 rel err 3.00e-03 "
        "(triton vs upstream), worst so far 3.00e-03\n"
        "[2026-11-29 16:00:03] [nsa-tp pid=7] verify _forward_flashmla_kv h16/fp8/b<=64: call 2 rel err 1.00e-03 "
        "(triton vs upstream), worst so far 3.00e-03\n"
        "[2026-11-29 16:00:04] [nsa-tp pid=7] verify _forward_flashmla_sparse h16/bf16: skipped during CUDA graph "
        "capture (run with --disable-cuda-graph to verify these calls)\n"
        "Traceback (most recent call last):\n"
    )
    facts = e2e.log_facts(str(log))
    assert facts["plugin_lines"] == 5 and facts["tracebacks"] == 1
    assert facts["routes"] == ["_forward_flashmla_kv h16/fp8/b<=64 runs nsa-tp tier triton (16 heads, no padding): "
                               "measured on NVIDIA H200: triton 0.3 ms, flashmla 0.5 ms"]
    assert facts["verify_worst"] == {"_forward_flashmla_kv h16/fp8/b<=64": 3e-3}
    assert facts["verify_calls_logged"] == {"_forward_flashmla_kv h16/fp8/b<=64": 2}
    assert facts["skipped_under_capture"] == ["_forward_flashmla_sparse h16/bf16"]
