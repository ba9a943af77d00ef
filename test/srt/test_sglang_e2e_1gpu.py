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
    # Servers share the card: the KV pool is capped, so the fraction only has to cover the weights.
    assert cmd[cmd.index("--max-total-tokens") + 1] == str(e2e.MAX_TOTAL_TOKENS)
    assert cmd[cmd.index("--mem-fraction-static") + 1] == "0.200"
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


def test_measure_writes_a_named_round(tmp_path, monkeypatch):
    """`measure --name X` writes e2e_1gpu_X.json and its log archive, even when no server came up."""
    state = tmp_path / "state"
    state.mkdir()
    log = state / "server_16-bf16-off.log"
    log.write_text("no plugin line\n")
    servers = [{"name": "16-bf16-off", "heads": 16, "kv": "bf16", "mode": "off", "port": 1, "pid": 2**22 + 7,
                "log": str(log)}]
    (state / "servers.json").write_text(__import__("json").dumps(servers))
    monkeypatch.setattr(e2e, "STATE", state)
    monkeypatch.setattr(e2e, "_alive", lambda pid: False)
    monkeypatch.setattr(e2e.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "NVIDIA H200\n"})())
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert e2e.measure(timeout=0.1, name="bf16") == 1  # the server is not up: a failing exit code
    data = __import__("json").loads((tmp_path / "out" / "e2e_1gpu_bf16.json").read_text())
    assert data["command"].endswith("measure --name bf16") and data["logs"]["16-bf16-off"]["up"] is False
    assert (tmp_path / "out" / "e2e_1gpu_bf16_logs.tgz").is_file()


def _round(off_s: float, on_s: float, name: str) -> dict:
    raw = {n: {"ttft_s": {str(L): [[v] * 3, [v] * 3] for L in e2e.LENS}, "greedy32_s": [[v], [v]],
               "concurrent16_s": [[v], [v]], "greedy_ids": [[1, 2]]} for n, v in (("a-off", off_s), ("a-on", on_s))}
    return {"card": "NVIDIA H200", "date": name, "command": f"measure --name {name}", "servers": [],
            "pairs": {"a": {"servers": ["a-off", "a-on"], "raw": raw, "greedy_ids_match": True}}, "logs": {}}


def test_merge_pools_rounds_and_judges_each_row(tmp_path):
    """Pooled medians, round-to-round noise, and the issue's bar (<= 3% and within the noise)."""
    import json

    paths = []
    for i, (off, on) in enumerate([(1.00, 1.02), (1.10, 1.03), (1.00, 1.01)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(_round(off, on, f"r{i}")))
    merged = e2e.merge(paths, tmp_path / "m.json")
    row = merged["pairs"]["a"]["metrics"]["greedy32"]
    assert row["a-off"]["median_s"] == 1.00 and row["a-on"]["median_s"] == 1.02
    assert abs(row["noise"] - 0.10) < 1e-9 and abs(row["on_over_off"] - 1.02) < 1e-9 and row["ok"]
    assert row["a-off"]["samples"] == 6 and merged["pairs"]["a"]["greedy_ids_match"]
    # 5% slower with 2% noise fails the bar, and the command's exit code says so.
    for i, path in enumerate(paths):
        path.write_text(json.dumps(_round(1.00, 1.05 + 0.01 * (i == 1), f"r{i}")))
    assert not e2e.merge(paths, None)["pairs"]["a"]["metrics"]["ttft_8192"]["ok"]
    assert e2e.main(["merge", *map(str, paths)]) == 1
