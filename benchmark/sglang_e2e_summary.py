"""Merge the outputs of benchmark/sglang_e2e.sh (one or more device calls) into one results JSON and a table:
per mode and prompt length, TTFT and 8-token greedy latency with the plugin off and on, whether the greedy
tokens match, and the log proof (plugin loaded per scheduler, nsa-tp's sparse-MLA path active).

    python benchmark/sglang_e2e_summary.py RUN_DIR [RUN_DIR ...] --out benchmark/results/sglang_e2e_2xh100.json

Each RUN_DIR is an ``$OUT`` of sglang_e2e.sh (``on/`` and/or ``off/`` with ``e2e_<mode>.json`` and
``proof_<mode>.txt``); a later directory's run replaces an earlier one of the same state and mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

STATES = ("off", "on")


def _proof(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    return {
        "schedulers_loaded": sum("plugin loaded: sglang" in ln and "role=scheduler" in ln for ln in lines),
        "switched_off_lines": sum("switched off by NSA_TP_SGLANG_PLUGIN" in ln for ln in lines),
        "path_active_lines": [ln for ln in lines if "sparse-MLA path active" in ln],
        "layout_lines": [ln for ln in lines if "[nsa-tp pid=" in ln and ("layout:" in ln or "TP mode" in ln)],
        "upstream_tp_line": next((ln for ln in lines if "DSA with TP mode is active" in ln), None),
        "errors": [ln for ln in lines if "Traceback" in ln or "Error" in ln][:5],
    }


def collect(run_dirs: list[Path]) -> tuple[dict, dict]:
    """``({(state, mode): {"e2e": ..., "proof": ...}}, {"device": ..., "install": ...})``."""
    runs: dict = {}
    meta: dict = {}
    for d in run_dirs:
        install = d / "plugin_install.txt"
        if install.exists():
            meta["install"] = install.read_text().strip()
            m = re.search(r"\| gpu (.+)$", meta["install"], re.M)
            if m:
                meta["device"] = m.group(1).strip()
        for state in STATES:
            for f in sorted((d / state).glob("e2e_*.json")):
                mode = f.stem[len("e2e_") :]
                runs[(state, mode)] = {
                    "e2e": json.loads(f.read_text()),
                    "proof": _proof(d / state / f"proof_{mode}.txt"),
                }
    return runs, meta


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def summarize(runs: dict, meta: dict) -> dict:
    modes: dict = {}
    for mode in sorted({m for _, m in runs}):
        entry: dict = {"lengths": []}
        by_len: dict[str, dict[int, dict]] = {}
        for state in STATES:
            run = runs.get((state, mode))
            if run is None:
                continue
            e2e = run["e2e"]
            entry[f"plugin_{state}"] = {"up": e2e.get("up"), "startup_s": e2e.get("startup_s"), **run["proof"]}
            by_len[state] = {r["prompt"]: r for r in e2e.get("runs", [])}
        for n in sorted(set().union(*[set(v) for v in by_len.values()]) if by_len else []):
            off, on = by_len.get("off", {}).get(n, {}), by_len.get("on", {}).get(n, {})
            row = {"prompt": n}
            for state, r in (("off", off), ("on", on)):
                row[f"ttft_ms_{state}"] = _ms(r.get("ttft_s_median"))
                row[f"greedy8_ms_{state}"] = _ms(r.get("greedy_s_median"))
                row[f"out_ids_{state}"] = r.get("out_ids")
                row[f"errors_{state}"] = r.get("errors", [])
            if row["ttft_ms_off"] and row["ttft_ms_on"]:
                row["ttft_speedup_on_vs_off"] = round(row["ttft_ms_off"] / row["ttft_ms_on"], 3)
            if off.get("out_ids") is not None and on.get("out_ids") is not None:
                row["tokens_match"] = off["out_ids"] == on["out_ids"]
            entry["lengths"].append(row)
        modes[mode] = entry
    return {
        "what": "SGLang 0.5.17, one-layer DeepSeek-V3.2 (dummy weights), nsa-tp plugin off vs on; "
        "TTFT = wall time of /generate with max_new_tokens=1, median of the measured reps after a warm-up",
        "date": datetime.date.today().isoformat(),
        "device": meta.get("device"),
        "install": meta.get("install"),
        "modes": modes,
    }


def table(summary: dict) -> str:
    out = [f"{'mode':6} {'prompt':>7} {'TTFT off':>9} {'TTFT on':>9} {'x':>6} {'8tok off':>9} {'8tok on':>9}  tokens"]
    for mode, entry in summary["modes"].items():
        for r in entry["lengths"]:
            out.append(
                f"{mode:6} {r['prompt']:>7} {r['ttft_ms_off'] or '-':>9} {r['ttft_ms_on'] or '-':>9} "
                f"{r.get('ttft_speedup_on_vs_off', '-'):>6} {r['greedy8_ms_off'] or '-':>9} "
                f"{r['greedy8_ms_on'] or '-':>9}  {'match' if r.get('tokens_match') else r.get('tokens_match', '-')}"
            )
        on = entry.get("plugin_on", {})
        out.append(
            f"{mode:6} plugin on: {on.get('schedulers_loaded', 0)} scheduler(s) loaded it, "
            f"{len(on.get('path_active_lines', []))} path-active line(s)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="results JSON to write")
    a = p.parse_args(argv)
    runs, meta = collect(a.run_dirs)
    if not runs:
        print("no e2e_<mode>.json under on/ or off/ of the given directories", file=sys.stderr)
        return 1
    summary = summarize(runs, meta)
    print(table(summary))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
