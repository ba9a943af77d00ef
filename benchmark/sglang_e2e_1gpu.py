"""Real SGLang on one GPU, plugin off vs on, side by side: TTFT, greedy decode, concurrency, verify mode.

Runs on the GPU machine from the repo root after ``../shared/sglang-on-device``'s three unpack calls (SGLang
0.5.17 in /tmp/site). Several servers share the GPU (a one-layer DeepSeek-V3.2 with dummy weights is small);
each plugin-off / plugin-on pair is measured by alternating requests between the two, so both see the same
GPU state, and every TTFT sample sends a fresh prompt (the radix cache stays on and must not serve it).
SGLang's defaults otherwise: CUDA graphs (decode and piecewise prefill), radix cache, and on Hopper the fp8
KV cache with ``flashmla_kv``; the bf16 servers add ``--kv-cache-dtype bfloat16`` and ``flashmla_sparse``
(FA3, SGLang's bf16 decode default, is not in the device's kernel package).

    python benchmark/sglang_e2e_1gpu.py start [SPEC ...]     # servers in their own sessions, all at once
    python benchmark/sglang_e2e_1gpu.py wait                 # until all answer (the first start compiles)
    python benchmark/sglang_e2e_1gpu.py measure [--name N]   # measures, writes $OUT/e2e_1gpu[_N].json
    python benchmark/sglang_e2e_1gpu.py stop
    python benchmark/sglang_e2e_1gpu.py merge R1.json R2.json ... --out M.json   # pooled on/off, noise, verdict

A SPEC is ``<heads>-<kv>-<on|off|verify>`` (e.g. ``16-fp8-on``); ``verify`` is the plugin on with
``NSA_TP_SGLANG_VERIFY=1`` and ``--disable-cuda-graph`` (so decode is checked too: verify skips captured
calls). Default: the fp8 pairs and verify servers at 16 and 128 heads (six servers); the bf16 ones are a
second round (``start 16-bf16-off 16-bf16-on 128-bf16-off 128-bf16-on`` after ``stop``).
Results: ``$OUT/e2e_1gpu[_N].json`` (per pair: per-pass medians, their spread, on/off ratios; greedy ids;
verify's worst error per path; which path each hooked call took, from the server logs) and
``$OUT/e2e_1gpu[_N]_logs.tgz``. ``--dry-run`` prints the launch commands (tested on CPU).

Two flags depart from a bare ``launch_server`` so that several servers share one card, and neither touches
the attention path: ``--mem-fraction-static`` and ``--max-total-tokens`` (:data:`MAX_TOTAL_TOKENS`, a KV pool
far larger than any request here needs; one layer's pool at that size is under 1 GB).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared client helpers beside this file
from sglang_e2e_client import VOCAB_HI, VOCAB_LO  # noqa: E402 - after the path it needs
from sglang_e2e_client import _post as _post_path  # noqa: E402

STATE = Path(os.environ.get("E2E_STATE", "/tmp/nsa_e2e"))
SITE = Path("/tmp/site")
DEFAULT_SPECS = [f"{h}-fp8-{s}" for h in (16, 128) for s in ("off", "on", "verify")]
CONFIGS = {16: ".sgl/bin/config-v32-1layer-h16.json", 128: ".sgl/bin/config-v32-1layer.json"}
VOCAB = (VOCAB_LO, VOCAB_HI)
LENS = (8192, 32768)
REPS = 3


def parse_spec(spec: str) -> dict:
    m = re.fullmatch(r"(16|128)-(fp8|bf16)-(on|off|verify)", spec)
    if m is None:
        raise SystemExit(f"bad server spec {spec!r}: expected <16|128>-<fp8|bf16>-<on|off|verify>, e.g. 16-fp8-on")
    return {"name": spec, "heads": int(m.group(1)), "kv": m.group(2), "mode": m.group(3)}


def server_command(s: dict, port: int, mem_fraction: float) -> tuple[list[str], dict[str, str]]:
    """The launch command and the environment additions for one server."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", f"{STATE}/m{s['heads']}",
           "--load-format", "dummy", "--tp", "1", "--skip-tokenizer-init", "--sampling-backend", "pytorch",
           "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", f"{mem_fraction:.3f}",
           "--context-length", "40000", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--disable-custom-all-reduce"]
    if s["kv"] == "bf16":
        cmd += ["--kv-cache-dtype", "bfloat16", "--dsa-prefill-backend", "flashmla_sparse",
                "--dsa-decode-backend", "flashmla_sparse"]
    else:
        # Named explicitly: for a checkpoint without fp8 weights (our dummy one) SGLang 0.5.17 resolves `auto`
        # to bf16 and then picks FA3 for decode; fp8_e4m3 gives its Hopper fp8 path (flashmla_kv).
        cmd += ["--kv-cache-dtype", "fp8_e4m3"]
    if s["mode"] == "verify":
        cmd += ["--disable-cuda-graph"]
    env = {"NSA_TP_SGLANG_PLUGIN": "0" if s["mode"] == "off" else "1",
           "NSA_TP_SGLANG_VERIFY": "1" if s["mode"] == "verify" else "0"}
    return cmd, env


def _install_plugin(repo: Path) -> None:
    """Make nsa_tp importable with its ``sglang.srt.plugins`` entry point in every SGLang process."""
    SITE.mkdir(parents=True, exist_ok=True)
    wheels = sorted((repo / ".wheels").glob("sgl_flash_mla-*.whl"))
    if wheels and not (SITE / "flash_mla").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(SITE), str(wheels[0])], check=True)
    version = re.search(r'^version = "(.*)"', (repo / "pyproject.toml").read_text(), re.M).group(1)
    di = SITE / f"nsa_tp-{version}.dist-info"
    if not di.exists():
        di.mkdir()
        (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nsa-tp\nVersion: {version}\n")
        (di / "top_level.txt").write_text("nsa_tp\n")
        (di / "entry_points.txt").write_text("[sglang.srt.plugins]\nnsa_tp = nsa_tp.integrations.sglang:register\n")


# Servers share the card, so each one's KV pool is capped (--max-total-tokens) and they start all at once.
# SGLang 0.5.17 sizes the pool as (free memory after its weights) - (free memory before them) * (1 - fraction):
# with 0.7 that stays positive even when the other servers load their weights between the two readings
# (five servers at ~6 GB each before their graphs), and the cap, not the fraction, sets the pool. The cap holds
# 16 concurrent requests of up to 30K tokens plus the radix cache several times over.
MEM_FRACTION = 0.7
MAX_TOTAL_TOKENS = 400_000
POOL_LINE = "Memory pool end"  # SGLang 0.5.17 logs this once the KV pool is allocated


def _wait_for_pool(s: dict, timeout: float = 300) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if POOL_LINE in Path(s["log"]).read_text(errors="replace"):
            return True
        if not _alive(s["pid"]):
            return False
        time.sleep(2)
    return False


def start(specs: list[str], dry_run: bool) -> int:
    repo = Path.cwd()
    servers = [parse_spec(s) for s in specs]
    mem = MEM_FRACTION
    env_base = {"PYTHONPATH": f"{SITE}:{repo / 'python'}", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "SGLANG_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD": "0", "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if not dry_run:
        STATE.mkdir(parents=True, exist_ok=True)
        _install_plugin(repo)
        for h, cfg in CONFIGS.items():
            (STATE / f"m{h}").mkdir(exist_ok=True)
            shutil.copy(repo / cfg, STATE / f"m{h}" / "config.json")
    for i, s in enumerate(servers):
        port = 31000 + i
        cmd, env = server_command(s, port, mem)
        s.update(port=port, log=str(STATE / f"server_{s['name']}.log"), cmd=cmd, env=env)
        print(f"{s['name']}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        with open(s["log"], "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env_base, **env},
                                    start_new_session=True)  # its own session: outlives this device call
        s["pid"] = proc.pid
        time.sleep(2)  # staggered a little: the weight loads rarely land between another's two memory readings
    if dry_run:
        return 0
    (STATE / "servers.json").write_text(json.dumps(servers, indent=1))
    t0 = time.time()
    for s in servers:  # progress: each server's KV pool (the graphs and compiles come after; `wait` covers them)
        ok = _wait_for_pool(s)
        print(f"  {s['name']}: {'KV pool allocated' if ok else 'NO KV pool (see its log)'} "
              f"{time.time() - t0:.0f} s after the launches", flush=True)
    return 0


def _post(port: int, body: dict, timeout: float = 600) -> dict:
    return _post_path(f"http://127.0.0.1:{port}", "/generate", body, timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def wait_all(servers: list[dict], timeout: float) -> list[dict]:
    """Servers that answer /health within ``timeout`` (progress every 30 s); dead ones are reported."""
    t0, up = time.time(), {}
    while time.time() - t0 < timeout and len(up) < len(servers):
        for s in servers:
            if s["name"] in up or not _alive(s["pid"]):
                continue
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{s['port']}/health", timeout=5)
                up[s["name"]] = round(time.time() - t0, 1)
                print(f"[{time.time() - t0:5.0f}s] {s['name']} up", flush=True)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        if all(not _alive(s["pid"]) or s["name"] in up for s in servers):
            break
        time.sleep(5)
        if int(time.time() - t0) % 30 < 5:
            print(f"[{time.time() - t0:5.0f}s] waiting: {[s['name'] for s in servers if s['name'] not in up]}",
                  flush=True)
    for s in servers:
        if s["name"] not in up:
            tail = Path(s["log"]).read_text(errors="replace").splitlines()[-5:]
            print(f"{s['name']}: NOT up ({'died' if not _alive(s['pid']) else 'timeout'}): {tail}", flush=True)
    return [s for s in servers if s["name"] in up]


def prompt(n: int, *key: object) -> list[int]:
    rng = random.Random(repr((n, *key)))
    return [rng.randrange(*VOCAB) for _ in range(n)]


def _timed(port: int, ids: list[int], new: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    out = _post(port, {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0}})
    return time.perf_counter() - t, list(out.get("output_ids", []))


def _concurrent(port: int, prompts: list[list[int]], new: int) -> float:
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda ids: _post(port, {"input_ids": ids, "sampling_params": {"max_new_tokens": new,
                                                                                      "temperature": 0}}), prompts))
    return time.perf_counter() - t


MIXED = [1024, 2048, 4096, 8192, 16384, 3000, 6000, 12000, 1500, 2500, 5000, 10000, 700, 20000, 900, 7000]


def measure_pair(pair: dict[str, dict], salt: str = "") -> dict:
    """Alternate every measurement between the servers of one (heads, kv) pair; two passes, opposite order.

    ``salt`` (the round's name) makes every prompt new to servers that a previous round already measured.
    """
    names = [pair[k]["name"] for k in ("off", "on") if k in pair]
    res: dict = {n: {"ttft_s": {str(L): [[], []] for L in LENS}, "greedy32_s": [[], []], "concurrent16_s": [[], []],
                     "greedy_ids": []} for n in names}
    ports = {pair[k]["name"]: pair[k]["port"] for k in pair}
    for n in names:  # warm-up: JIT, first-touch allocations, every prefill and decode shape measured below once
        for L in LENS:
            _timed(ports[n], prompt(L, "warm", n, salt), 4)
        # The whole mixed batch: a 4-request warm-up left the first measured pass 3.6x slower than the second
        # (new prefill chunk sizes and decode batch sizes met for the first time; H200, 2026-11-29).
        _concurrent(ports[n], [prompt(L, "warmc", n, i, salt) for i, L in enumerate(MIXED)], 16)
    for p in (0, 1):
        order = names if p == 0 else names[::-1]
        for L in LENS:
            for rep in range(REPS):
                ids = prompt(L, "ttft", p, rep, salt)  # the same fresh prompt for both servers: neither has seen it
                for n in order:
                    res[n]["ttft_s"][str(L)][p].append(round(_timed(ports[n], ids, 1)[0], 4))
        ids = prompt(32768, "greedy", p, salt)
        for n in order:
            dt, out = _timed(ports[n], ids, 32)
            res[n]["greedy32_s"][p].append(round(dt, 4))
            res[n]["greedy_ids"].append(out)
        batch = [prompt(L, "conc", p, i, salt) for i, L in enumerate(MIXED)]
        for n in order:
            res[n]["concurrent16_s"][p].append(round(_concurrent(ports[n], batch, 16), 4))
    summary = {}
    for n in names:
        metrics = {f"ttft_{L}": res[n]["ttft_s"][str(L)] for L in LENS}
        metrics.update(greedy32=res[n]["greedy32_s"], concurrent16=res[n]["concurrent16_s"])
        summary[n] = {}
        for m, passes in metrics.items():
            meds = [statistics.median(x) for x in passes]
            summary[n][m] = {"median_s": statistics.median([v for x in passes for v in x]), "pass_medians_s": meds,
                             "spread": max(meds) / min(meds) - 1}
    out = {"servers": names, "raw": res, "summary": summary}
    if "off" in pair and "on" in pair:
        off, on = pair["off"]["name"], pair["on"]["name"]
        out["on_over_off"] = {m: summary[on][m]["median_s"] / summary[off][m]["median_s"] for m in summary[on]}
        out["noise"] = {m: max(summary[on][m]["spread"], summary[off][m]["spread"]) for m in summary[on]}
        out["greedy_ids_match"] = res[on]["greedy_ids"] == res[off]["greedy_ids"]
    return out


def exercise_verify(s: dict) -> None:
    """Prefill, decode, radix-cache hits and 16 concurrent mixed requests sharing prefixes on a verify server."""
    port = s["port"]
    for L in LENS:
        _timed(port, prompt(L, "v", L), 32)
    bases = [prompt(4096, "vbase", i) for i in range(4)]
    batch = [bases[i % 4] + prompt(L, "vsuffix", i) for i, L in enumerate(MIXED)]
    _concurrent(port, [b[:30000] for b in batch], 16)


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


def measure(timeout: float, name: str = "") -> int:
    servers = json.loads((STATE / "servers.json").read_text())
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    up = wait_all(servers, timeout)
    up_names = {s["name"] for s in up}
    card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    results = {"card": card, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": "python benchmark/sglang_e2e_1gpu.py start " + " ".join(s["name"] for s in servers)
               + " && python benchmark/sglang_e2e_1gpu.py measure" + (f" --name {name}" if name else ""),
               "tuning_file": os.environ.get("NSA_TP_TUNING_FILE") or "the committed table for this card",
               "servers": servers, "pairs": {}, "logs": {}}
    stem = "e2e_1gpu" + (f"_{name}" if name else "")
    pairs: dict[str, dict[str, dict]] = {}
    for s in up:
        if s["mode"] in ("on", "off"):
            pairs.setdefault(f"{s['heads']}-{s['kv']}", {})[s["mode"]] = s
    for key, pair in pairs.items():
        print(f"measuring {key} ({', '.join(p['name'] for p in pair.values())})", flush=True)
        try:
            results["pairs"][key] = measure_pair(pair, salt=name)
        except Exception as e:  # noqa: BLE001 - one broken pair must not lose the others
            results["pairs"][key] = {"error": f"{type(e).__name__}: {e}"}
        _write(out_dir / f"{stem}.json", results)
    for s in up:
        if s["mode"] == "verify":
            print(f"exercising {s['name']}", flush=True)
            try:
                exercise_verify(s)
            except Exception as e:  # noqa: BLE001
                results["logs"][s["name"] + "_error"] = f"{type(e).__name__}: {e}"
    time.sleep(2)
    for s in servers:
        results["logs"][s["name"]] = log_facts(s["log"]) | {"up": s["name"] in up_names}
    _write(out_dir / f"{stem}.json", results)
    with tarfile.open(out_dir / f"{stem}_logs.tgz", "w:gz") as tar:
        for s in servers:
            tar.add(s["log"], arcname=Path(s["log"]).name)
    _print_summary(results)
    return 0 if len(up) == len(servers) else 1


def _write(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1))


def _print_summary(results: dict) -> None:
    for key, r in results["pairs"].items():
        if "error" in r:
            print(f"{key}: {r['error']}")
            continue
        for m, ratio in r.get("on_over_off", {}).items():
            off = r["summary"][r["servers"][0]][m]["median_s"] * 1e3
            on = r["summary"][r["servers"][1]][m]["median_s"] * 1e3
            print(f"{key:9s} {m:14s} off {off:8.1f} ms  on {on:8.1f} ms  on/off {ratio:.3f}  "
                  f"noise {r['noise'][m]:.3f}")
        print(f"{key:9s} greedy ids match: {r.get('greedy_ids_match')}")
    for name, facts in results["logs"].items():
        if isinstance(facts, dict):
            print(f"{name}: up={facts['up']} tracebacks={facts['tracebacks']} verify worst={facts['verify_worst']}")
            for route in facts["routes"]:
                print(f"    {route[:160]}")


METRICS = tuple(f"ttft_{L}" for L in LENS) + ("greedy32", "concurrent16")


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
                    "merge_command": "python benchmark/sglang_e2e_1gpu.py merge "
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


def stop() -> int:
    path = STATE / "servers.json"
    if path.exists():
        for s in json.loads(path.read_text()):
            with contextlib.suppress(OSError, KeyError):
                os.killpg(s["pid"], 9)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start")
    st.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    st.add_argument("--dry-run", action="store_true", help="print the launch commands only")
    wt = sub.add_parser("wait", help="wait until every started server answers (progress lines)")
    wt.add_argument("--timeout", type=float, default=540)
    me = sub.add_parser("measure")
    me.add_argument("--timeout", type=float, default=540, help="seconds to wait for the servers")
    me.add_argument("--name", default="", help="results go to $OUT/e2e_1gpu_NAME.json (one name per round)")
    sub.add_parser("stop")
    mg = sub.add_parser("merge", help="pool several measured rounds (JSON files) into one verdict per row")
    mg.add_argument("rounds", nargs="+", type=Path)
    mg.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.cmd == "start":
        return start(a.specs, a.dry_run)
    if a.cmd == "wait":
        servers = json.loads((STATE / "servers.json").read_text())
        return 0 if len(wait_all(servers, a.timeout)) == len(servers) else 1
    if a.cmd == "measure":
        return measure(a.timeout, a.name)
    if a.cmd == "merge":
        merged = merge(a.rounds, a.out)
        verdicts = [r["ok"] for p in merged["pairs"].values() for r in p.get("metrics", {}).values()]
        return 0 if verdicts and all(verdicts) else 1
    return stop()


if __name__ == "__main__":
    raise SystemExit(main())
