"""The one summary of the SGLang benchmarks: what the server logs prove, and the results of
``benchmark/sglang_launch.py`` merged into one results JSON and a table.

    python benchmark/sglang_summary.py multi OUT [OUT ...] --gpus 4 --out benchmark/results/sglang_multi_4xh200.json
    python benchmark/sglang_summary.py e2e RUN_DIR [RUN_DIR ...] --out benchmark/results/sglang_e2e_2xh100.json
    python benchmark/sglang_summary.py merge R1.json R2.json ... --out M.json      # one-GPU rounds

- ``multi``: per model and layout, TTFT of upstream pure TP (``off``), upstream prefill CP (``cp``) and the
  plugin (``auto``, ``tokens``, ...), the ratios issue 14 asks for, whether the 32 greedy tokens at 32K match
  upstream's, the 16-request concurrency run, which token-parallel strategy ran and verify mode's worst error.
  Reads ``OUT/<model>/<state>/e2e_<layout>.json`` and ``server_<layout>.log`` (the ``multi`` workload).
- ``e2e``: per mode and prompt length, TTFT and 8-token greedy latency with the plugin off and on, whether the
  greedy tokens match, and the log proof. Each RUN_DIR holds ``on/`` and/or ``off/`` (a later directory's run
  replaces an earlier one of the same state and mode; the ``e2e`` workload).
- ``merge``: several one-GPU ``measure`` rounds pooled into one verdict per (pair, metric).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import tarfile
from pathlib import Path

# ----------------------------------------------------------------------------------------- server logs

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


def log_facts(path: str) -> dict:
    """What the server log proves: plugin loaded, each hooked path's route, verify's worst error per path."""
    text = Path(path).read_text(errors="replace")
    # Progress bars end in carriage returns, so a log line can sit behind one: split on both.
    lines = [ln for ln in re.split(r"[\r\n]", text) if "[nsa-tp pid=" in ln]
    routes = sorted({re.sub(r"^.*\] ", "", ln) for ln in lines if " runs " in ln and "_forward_flashmla" in ln})
    worst: dict[str, float] = {}
    calls: dict[str, int] = {}
    for ln in lines:
        m = re.search(r"verify (\S+ \S+): call (\d+) rel err (\S+) .*worst so far (\S+)", ln)
        if m:
            worst[m.group(1)] = max(worst.get(m.group(1), 0.0), float(m.group(4)))
            calls[m.group(1)] = max(calls.get(m.group(1), 0), int(m.group(2)))
    return {"plugin_lines": len(lines), "routes": routes, "verify_worst": worst, "verify_calls_logged": calls,
            "skipped_under_capture": sorted({ln.split("verify ")[1].split(":")[0] for ln in lines
                                             if "skipped during CUDA graph capture" in ln}),
            "tracebacks": text.count("Traceback"),
            # SGLang's "Prefill batch, ... #cached-token: N" lines: N > 0 means the radix cache served part of it.
            "prefill_batches": len(re.findall(r"Prefill batch", text)),
            "prefill_batches_with_cached_tokens": len(re.findall(r"#cached-token: [1-9]", text))}


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


# ------------------------------------------------------------------------------------------------ multi


def collect_multi(roots: list[Path]) -> list[dict]:
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


def _main_multi(p: argparse.ArgumentParser, argv: list[str]) -> int:
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--card", default=None, help="GPU name (default: read from plugin_install.txt)")
    a = p.parse_args(argv)
    rows = collect_multi(a.roots)
    card = a.card
    for root in a.roots:
        for f in root.glob("*/plugin_install.txt"):
            m = re.search(r"gpu (.+)$", f.read_text().strip().splitlines()[-1] if f.read_text().strip() else "")
            card = card or (m.group(1) if m else None)
    summary = {"date": datetime.date.today().isoformat(), "gpus": a.gpus, "card": card,
               "command": f"python benchmark/sglang_launch.py --gpus {a.gpus} run", "runs": rows,
               "ratios": ratios(rows)}
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



# -------------------------------------------------------------------------------------------------- e2e


STATES = ("off", "on")


def collect_e2e(run_dirs: list[Path]) -> tuple[dict, dict]:
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


def _main_e2e(p: argparse.ArgumentParser, argv: list[str]) -> int:
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="results JSON to write")
    a = p.parse_args(argv)
    runs, meta = collect_e2e(a.run_dirs)
    if not runs:
        print("no e2e_<mode>.json under on/ or off/ of the given directories", file=sys.stderr)
        return 1
    summary = summarize(runs, meta)
    print(table(summary))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0



# ------------------------------------------------------------------------------------ merge (one GPU)


PAIR_LENS = (8192, 32768)  # sglang_client.PAIR_LENS
METRICS = tuple(f"ttft_{L}" for L in PAIR_LENS) + ("greedy32", "concurrent16")


def _samples(raw: dict, metric: str) -> list[float]:
    """Every sample of one server's metric in one measured round (both passes)."""
    passes = raw["ttft_s"][metric[5:]] if metric.startswith("ttft_") else raw[f"{metric}_s"]
    return [v for p in passes for v in p]


def _facts_from_archive(archive: Path, logs: dict) -> dict:
    """``logs`` with :func:`log_facts` recomputed from the server logs in a ``measure`` archive."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        for path in sorted(Path(tmp).glob("server_*.log")):
            name = path.stem.removeprefix("server_")
            logs[name] = {**logs.get(name, {}), **log_facts(str(path))}
    return logs


def merge(paths: list[Path], out: Path | None) -> dict:
    """Pool several ``measure`` rounds of the same servers into one verdict per (pair, metric).

    Per server: the median of every sample of every round (``median_s``) and each round's median
    (``round_medians_s``); ``noise`` is the larger of the two servers' round-to-round spread (max / min - 1 of
    those medians). ``on_over_off`` compares the pooled medians; ``ok`` is the issue's bar: on/off at most
    1.03 and no further above 1 than the noise. The logs of the last round are kept (a server's log covers
    every round it served), re-read from its ``*_logs.tgz`` beside the JSON when that is there.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    archive = Path(paths[-1]).with_name(Path(paths[-1]).stem + "_logs.tgz")
    if archive.is_file():
        runs[-1]["logs"] = _facts_from_archive(archive, runs[-1]["logs"])
    first = runs[0]
    merged: dict = {"card": first["card"], "dates": [r["date"] for r in runs], "rounds": [Path(p).name for p in paths],
                    "commands": sorted({r["command"] for r in runs}), "tuning_file": first.get("tuning_file"),
                    "merge_command": "python benchmark/sglang_summary.py merge "
                    + " ".join(Path(p).name for p in paths) + (f" --out {out}" if out is not None else ""),
                    "launch": {s["name"]: s["cmd"] for s in first["servers"]}, "pairs": {}, "logs": runs[-1]["logs"]}
    for key in first["pairs"]:
        rounds = [r["pairs"][key] for r in runs if "error" not in r["pairs"].get(key, {"error": 1})]
        if len(rounds) != len(runs):
            merged["pairs"][key] = {"error": f"{len(runs) - len(rounds)} of {len(runs)} rounds failed for {key}"}
            continue
        off, on = rounds[0]["servers"]
        pair: dict = {"servers": [off, on], "rounds": len(rounds), "metrics": {},
                      "greedy_ids_match": all(r.get("greedy_ids_match") for r in rounds),
                      "raw_rounds": [{n: {k: v for k, v in r["raw"][n].items() if k != "greedy_ids"} for n in (off, on)}
                                     for r in rounds]}
        for m in METRICS:
            per = {}
            for n in (off, on):
                meds = [statistics.median(_samples(r["raw"][n], m)) for r in rounds]
                every = [v for r in rounds for v in _samples(r["raw"][n], m)]
                per[n] = {"median_s": statistics.median(every), "round_medians_s": meds, "samples": len(every),
                          "spread": max(meds) / min(meds) - 1}
            ratio = per[on]["median_s"] / per[off]["median_s"]
            noise = max(per[off]["spread"], per[on]["spread"])
            pair["metrics"][m] = {off: per[off], on: per[on], "on_over_off": ratio, "noise": noise,
                                  "ok": ratio <= 1.03 and ratio - 1 <= noise}
        merged["pairs"][key] = pair
    if out is not None:
        out.write_text(json.dumps(merged, indent=1))
    for key, pair in merged["pairs"].items():
        if "error" in pair:
            print(f"{key}: {pair['error']}")
            continue
        off, on = pair["servers"]
        for m, r in pair["metrics"].items():
            print(f"{key:9s} {m:13s} off {r[off]['median_s'] * 1e3:8.1f} ms  on {r[on]['median_s'] * 1e3:8.1f} ms  "
                  f"on/off {r['on_over_off']:.3f}  noise {r['noise']:.3f}  n={r[off]['samples']}  "
                  f"{'ok' if r['ok'] else 'SLOWER'}")
        print(f"{key:9s} greedy ids match in every round: {pair['greedy_ids_match']}")
    return merged


def _main_merge(p: argparse.ArgumentParser, argv: list[str]) -> int:
    p.add_argument("rounds", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    merged = merge(a.rounds, a.out)
    verdicts = [r["ok"] for pair in merged["pairs"].values() for r in pair.get("metrics", {}).values()]
    return 0 if verdicts and all(verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = {"multi": _main_multi, "e2e": _main_e2e, "merge": _main_merge}
    if not argv or argv[0] not in kinds:
        print(f"usage: sglang_summary.py {{{'|'.join(kinds)}}} ... (see the module docstring)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog=f"sglang_summary.py {argv[0]}", description=__doc__.splitlines()[0])
    return kinds[argv[0]](p, argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
