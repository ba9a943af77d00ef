"""Summarize benchmark/sglang_multi_gpu.sh's output: per model and layout, TTFT of upstream pure TP (``off``),
upstream prefill CP (``cp``) and the plugin (``auto``, ``tokens``), the ratios issue 14 asks for, whether the
32 greedy tokens at 32K match upstream's, the 16-request concurrency run, which token-parallel strategy ran
(from the server log) and verify mode's worst error.

    python benchmark/sglang_multi_gpu_summary.py OUT [OUT ...] --gpus 4 \
        --out benchmark/results/sglang_multi_gpu_4xh200.json
        --out benchmark/results/sglang_multi_gpu_4xh200.json

Reads ``OUT/<model>/<state>/e2e_<layout>.json`` and ``server_<layout>.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

STRATEGY = re.compile(r"token-parallel extend: strategy=(\w+)")
ACTIVE = re.compile(r"token-parallel (sparse core|indexer) active")
# verify mode's lines (nsa_tp.integrations.sglang.verify.record): "verify <path>: call N rel err E (...), worst so
# far W"; the worst of a server is the largest W (or E) over its lines; "inf" is a NaN or a shape mismatch
NUM = r"(inf|[0-9.]+(?:e[-+]?\d+)?)"
VERIFY = re.compile(r"verify .*?(?:worst so far|rel err) " + NUM, re.I)
VERIFY_WORST = re.compile(r"worst so far " + NUM, re.I)


def read_log(path: Path) -> dict:
    """What a server log proves: strategies chosen, token-parallel paths that ran, worst verify error."""
    out = {"strategies": {}, "paths_active": [], "verify_worst": None, "verify_lines": 0, "cp_active": False,
           "tracebacks": 0}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if m := STRATEGY.search(line):
            out["strategies"][m.group(1)] = out["strategies"].get(m.group(1), 0) + 1
        if (m := ACTIVE.search(line)) and m.group(1) not in out["paths_active"]:
            out["paths_active"].append(m.group(1))
        if "[nsa-tp" in line and (m := VERIFY_WORST.search(line) or VERIFY.search(line)):
            err = float(m.group(1))
            out["verify_lines"] += 1
            out["verify_worst"] = err if out["verify_worst"] is None else max(out["verify_worst"], err)
        if "Enabled DSA context parallel" in line:
            out["cp_active"] = True
        if "Traceback" in line:
            out["tracebacks"] += 1
    return out


def collect(roots: list[Path]) -> list[dict]:
    rows = []
    for root in roots:
        for f in sorted(root.glob("*/*/e2e_*.json")):
            state, model = f.parent.name, f.parent.parent.name
            layout = f.stem.removeprefix("e2e_")
            res = json.loads(f.read_text())
            ttft = {r["prompt"]: r.get("ttft_s_median") for r in res.get("ttft", [])}
            conc = res.get("concurrent") or {}
            rows.append({
                "model": model, "state": state, "layout": layout, "up": res.get("up"),
                "ttft_s": ttft, "greedy": res.get("greedy"),
                "concurrent_wall_s": conc.get("wall_s"), "concurrent_errors": conc.get("errors"),
                "concurrent_out_ids": [r.get("out_ids") for r in conc.get("requests", [])],
                "log": read_log(f.parent / f"server_{layout}.log"),
            })
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per model, layout and prompt length: TTFT of each server over upstream pure TP and over upstream CP."""
    by = {(r["model"], r["layout"], r["state"]): r for r in rows}
    out = []
    for (model, layout, state), r in sorted(by.items()):
        if state in ("off", "cp"):
            continue
        off = by.get((model, layout, "off"))
        cp = by.get((model, layout.split("dp")[0], "cp"))  # CP runs without DP attention: the pure-TP layout
        for n, t in r["ttft_s"].items():
            base = off and off["ttft_s"].get(n)
            cpt = cp and cp["ttft_s"].get(n)
            g, g_off = r.get("greedy") or {}, (off or {}).get("greedy") or {}
            out.append({
                "model": model, "layout": layout, "state": state, "prompt": n, "ttft_s": t,
                "vs_upstream_tp": round(t / base, 3) if t and base else None,
                "vs_upstream_cp": round(t / cpt, 3) if t and cpt else None,
                "greedy_matches_upstream": (g.get("out_ids") == g_off.get("out_ids")) if g and g_off else None,
            })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--card", default=None, help="GPU name (default: read from plugin_install.txt)")
    a = p.parse_args(argv)
    rows = collect(a.roots)
    card = a.card
    for root in a.roots:
        for f in root.glob("*/plugin_install.txt"):
            m = re.search(r"gpu (.+)$", f.read_text().strip().splitlines()[-1] if f.read_text().strip() else "")
            card = card or (m.group(1) if m else None)
    summary = {"date": datetime.date.today().isoformat(), "gpus": a.gpus, "card": card,
               "command": "bash benchmark/sglang_multi_gpu.sh", "runs": rows, "ratios": ratios(rows)}
    a.out.write_text(json.dumps(summary, indent=1))
    for r in summary["ratios"]:
        print(f"{r['model']:7s} {r['layout']:7s} {r['state']:7s} {r['prompt']:>6} TTFT {r['ttft_s']} s "
              f"x{r['vs_upstream_tp']} of upstream TP, x{r['vs_upstream_cp']} of upstream CP, "
              f"greedy = upstream: {r['greedy_matches_upstream']}")
    for r in rows:
        lg = r["log"]
        print(f"{r['model']:7s} {r['layout']:7s} {r['state']:7s} up={r['up']} strategies={lg['strategies']} "
              f"paths={lg['paths_active']} verify_worst={lg['verify_worst']} cp={lg['cp_active']} "
              f"concurrent {r['concurrent_wall_s']} s, {r['concurrent_errors']} errors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
