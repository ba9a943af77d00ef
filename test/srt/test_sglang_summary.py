"""benchmark/sglang_summary.py's ``e2e`` kind merges the fixed-prompt runs (sglang_launch.py --workload e2e):
hand-made run folders, known answers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmark" / "sglang_summary.py"
_spec = importlib.util.spec_from_file_location("nsa_tp_sglang_summary", _PATH)
summary_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = summary_mod
_spec.loader.exec_module(summary_mod)


def _run(d: Path, state: str, mode: str, rows: list[dict], proof: str = "") -> None:
    (d / state).mkdir(parents=True, exist_ok=True)
    (d / state / f"e2e_{mode}.json").write_text(
        json.dumps({"label": mode, "up": True, "startup_s": 60.0, "runs": rows})
    )
    (d / state / f"proof_{mode}.txt").write_text(proof)


def _row(n: int, ttft: float, greedy: float, ids: list[int]) -> dict:
    return {"prompt": n, "ttft_s_median": ttft, "greedy_s_median": greedy, "out_ids": ids, "errors": []}


def test_merge_two_calls(tmp_path):
    a, b = tmp_path / "call1", tmp_path / "call2"
    _run(a, "off", "tp2", [_row(8192, 0.200, 0.300, [5, 6]), _row(32768, 0.800, 0.900, [7, 8])])
    (a / "plugin_install.txt").write_text("entry point: x | sglang 0.5.17 | torch 2.11.0 | gpu NVIDIA H100 80GB HBM3")
    proof = (
        "[t] [nsa-tp pid=11] plugin loaded: sglang 0.5.17, role=scheduler, hooks: a\n"
        "[t] [nsa-tp pid=12] plugin loaded: sglang 0.5.17, role=scheduler, hooks: a\n"
        "[t] [nsa-tp pid=10] plugin loaded: sglang 0.5.17, role=launcher, hooks: a\n"
        "[t] [nsa-tp pid=11] sparse-MLA path active: ...\n"
        "[t] DSA with TP mode is active, dp_size=1, tp_size=2\n"
    )
    _run(b, "on", "tp2", [_row(8192, 0.100, 0.250, [5, 6]), _row(32768, 0.400, 0.500, [7, 9])], proof)
    runs, meta = summary_mod.collect_e2e([a, b])
    s = summary_mod.summarize(runs, meta)
    assert s["device"] == "NVIDIA H100 80GB HBM3"
    tp2 = s["modes"]["tp2"]
    assert tp2["plugin_on"]["schedulers_loaded"] == 2 and len(tp2["plugin_on"]["path_active_lines"]) == 1
    assert tp2["plugin_on"]["upstream_tp_line"].endswith("tp_size=2")
    assert tp2["plugin_off"]["schedulers_loaded"] == 0
    r8k, r32k = tp2["lengths"]
    assert (r8k["ttft_ms_off"], r8k["ttft_ms_on"], r8k["ttft_speedup_on_vs_off"]) == (200.0, 100.0, 2.0)
    assert r8k["tokens_match"] is True and r32k["tokens_match"] is False
    assert "match" in summary_mod.table(s) and "2 scheduler(s)" in summary_mod.table(s)


def test_missing_state_leaves_no_comparison(tmp_path):
    _run(tmp_path / "c", "on", "dp2", [_row(2048, 0.05, 0.06, [1])])
    s = summary_mod.summarize(*summary_mod.collect_e2e([tmp_path / "c"]))
    (row,) = s["modes"]["dp2"]["lengths"]
    assert row["ttft_ms_off"] is None and "tokens_match" not in row and "ttft_speedup_on_vs_off" not in row
    assert summary_mod.main(["e2e", str(tmp_path / "nothing")]) == 1
