"""The needle accuracy gate in real SGLang: plugin off (upstream alone), on, and verify, fp8 and bf16 KV caches.

Writes the needle checkpoint (``nsa-tp needle``: one-layer DeepSeek-V3.2, 128 heads, index top-k 2048; loaded
from disk with SGLang's normal load format), starts every server at once on the visible GPUs (they share them:
``--mem-fraction-static`` and ``--max-total-tokens`` keep each small; the first start on a fresh machine
compiles kernels for minutes), then sends to each, in parallel across servers:

- one prompt per length (default 8K, 32K, 64K, 128K): every query position scored from SGLang's input-token
  top-1 (``return_logprob`` + ``logprob_start_len`` + ``top_logprobs_num=1``), and a 4-token greedy chain after
  the final query (one recall per decode step);
- 16 concurrent requests of mixed lengths, 8 of them behind an 8K prefix a warm-up request put in the radix cache.

A row passes at >= 99% of its query positions and its whole greedy chain. The run fails (exit 1) if a row of a
server fails, a server does not come up, or plugin-on / verify differs from plugin-off (any scored top-1 token or
greedy id). Server specs ``<fp8|bf16>-<off|on|verify>``: ``fp8`` = SGLang's Hopper default for DeepSeek-V3.2 (fp8
KV cache, ``flashmla_kv``, CUDA graphs, radix cache), named explicitly because for this bf16 checkpoint ``auto``
resolves to bf16 with FA3 decode, which the device's kernel package lacks; ``bf16`` = ``--kv-cache-dtype bfloat16
--dsa-prefill-backend flashmla_sparse --dsa-decode-backend flashmla_sparse``; ``off`` = ``NSA_TP_SGLANG_PLUGIN=0``;
``verify`` = plugin on with ``NSA_TP_SGLANG_VERIFY=1`` and ``--disable-cuda-graph`` (verify skips captured calls).

    python benchmark/needle_sglang.py [--servers fp8-off,fp8-on,...] [--lens 8192,...] [--tp N [--dp D
        --enable-dp-attention]] [--nsa-token-parallel on|auto] [--name N] [--smoke]

Results: ``$OUT/needle_sglang[_N].json`` (card, date, command, per-server per-row accuracy, upstream-alone score,
on/off comparison, verify's worst error per path from the logs, verdict) and ``$OUT/needle_sglang[_N]_logs.tgz``.
``--smoke`` prints the launch commands and the request plan and starts nothing (tested on CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared SGLang helpers beside this file
from nsa_tp.needle.checkpoint import NeedleSpec, hf_config, write_checkpoint  # noqa: E402
from nsa_tp.needle.serving import PASS, Row, concurrent_rows, plan_rows, score_response  # noqa: E402
from nsa_tp.needle.task import diagnose  # noqa: E402
from sglang_client import _post  # noqa: E402
from sglang_launch import (  # noqa: E402
    MAX_TOTAL_TOKENS,
    MEM_FRACTION,
    SERVER_ENV,
    install_plugin,
    parallel_flags,
    spec_flags,
    wait_all,
)
from sglang_summary import log_facts  # noqa: E402

STATE = Path(os.environ.get("NEEDLE_STATE", "/tmp/nsa_needle"))
DEFAULT_SERVERS = "fp8-off,fp8-on,fp8-verify,bf16-off,bf16-on,bf16-verify"
DEFAULT_LENS = "8192,32768,65536,131072"
CONTEXT = 135_000  # 128K prompts + the greedy chain


def parse_servers(text: str) -> list[dict]:
    out = []
    for spec in text.split(","):
        kv, _, mode = spec.partition("-")
        if kv not in ("fp8", "bf16") or mode not in ("off", "on", "verify"):
            raise SystemExit(f"bad server spec {spec!r}: expected <fp8|bf16>-<off|on|verify>, e.g. fp8-on")
        out.append({"name": spec, "kv": kv, "mode": mode})
    return out


def layout_flags(a: argparse.Namespace) -> list[str]:
    """``--tp``, and ``--dp`` as given: DP attention in 0.5.17's spelling (these servers start through
    ``sglang.launch_server``, which 0.5.23 still takes), or model replicas."""
    if a.dp > 1 and a.enable_dp_attention:
        return parallel_flags(a.tp, a.dp, attn_dp_size=False)
    return ["--tp", str(a.tp)] + (["--dp", str(a.dp)] if a.dp > 1 else [])


def server_command(s: dict, port: int, ckpt: Path, a: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The launch command and environment additions of one server (see the module docstring)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(ckpt), *layout_flags(a),
           "--skip-tokenizer-init", "--sampling-backend", "pytorch", "--host", "127.0.0.1", "--port", str(port),
           "--mem-fraction-static", f"{a.mem_fraction:.3f}", "--context-length", str(CONTEXT),
           "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--disable-custom-all-reduce"]
    flags, env = spec_flags(s)  # the KV cache and mode flags of the one-card servers
    cmd += flags
    if s["mode"] != "off" and a.nsa_token_parallel:
        cmd += ["--nsa-token-parallel", a.nsa_token_parallel]  # a plugin flag: plugin-off servers lack it
    return cmd, env


def start_servers(servers: list[dict], ckpt: Path, a: argparse.Namespace) -> None:
    repo = Path.cwd()
    path = os.environ.get("PYTHONPATH", "")
    base = SERVER_ENV | {"PYTHONPATH": f"/tmp/site:{repo / 'python'}" + (f":{path}" if path else "")}
    for i, s in enumerate(servers):
        port = a.port + i
        cmd, env = server_command(s, port, ckpt, a)
        s.update(port=port, log=str(STATE / f"server_{s['name']}.log"), cmd=cmd, env=env)
        print(f"{s['name']}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}", flush=True)
        if a.smoke:
            continue
        with open(s["log"], "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **base, **env},
                                    start_new_session=True)
        s["pid"] = proc.pid
        time.sleep(2)  # staggered: the weight loads rarely land between another server's two memory readings


def _plugin_visible() -> bool:
    """Whether an installed nsa-tp already declares its ``sglang.srt.plugins`` entry point (pip install)."""
    from importlib.metadata import entry_points

    return any(ep.name == "nsa_tp" for ep in entry_points(group="sglang.srt.plugins"))


def stop_servers(servers: list[dict]) -> None:
    for s in servers:
        with contextlib.suppress(OSError, KeyError):
            os.killpg(s["pid"], 9)


def _send(port: int, row: Row, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        res = score_response(row, _post(f"http://127.0.0.1:{port}", "/generate", row.body(), timeout))
    except Exception as e:  # noqa: BLE001 - a failed request is a failed row, with its reason
        res = {"name": row.name, "ok": False, "error": f"{type(e).__name__}: {e}"[:500], "accuracy": 0.0,
               "correct": 0, "total": 0, "greedy_correct": 0, "greedy_total": len(row.prompt.chain)}
        res["diagnosis"] = diagnose(res, PASS)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def run_server(s: dict, rows: list[Row], prefix: list[int], conc: list[Row], timeout: float) -> dict:
    """Every row on one server: the single prompts in turn, then the warm prefix and 16 concurrent requests."""
    out = {r.name: _send(s["port"], r, timeout) for r in rows}
    with contextlib.suppress(Exception):  # the warm-up only fills the radix cache; its answer is not scored
        _post(f"http://127.0.0.1:{s['port']}", "/generate",
              {"input_ids": prefix, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}, timeout)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(conc)) as pool:
        each = list(pool.map(lambda r: _send(s["port"], r, timeout), conc))
    agg = {k: sum(e[k] for e in each) for k in ("correct", "total", "greedy_correct", "greedy_total")}
    for k in ("rows_needing_selection", "rows_within_topk"):
        agg[k] = [sum(e.get(k, [0, 0])[i] for e in each) for i in (0, 1)]
    agg.update(name="concurrent16", accuracy=agg["correct"] / max(agg["total"], 1), ok=all(e["ok"] for e in each),
               diagnosis="; ".join(f"{e['name']}: {e['diagnosis']}" for e in each if e.get("diagnosis"))[:2000],
               seconds=round(time.perf_counter() - t0, 3), requests=each,
               prefix_cache_hits=sum(bool(e.get("cached_tokens")) for e in each[len(each) // 2 :]))
    out["concurrent16"] = agg
    return out


def _predictions(rows: dict) -> dict[str, tuple]:
    flat = {}
    for name, r in rows.items():
        for sub in r.get("requests", [r]):
            flat[f"{name}/{sub['name']}"] = (tuple(sub.get("top1", ())), tuple(sub.get("greedy_ids", ())))
    return flat


def compare(results: dict[str, dict], servers: list[dict]) -> dict[str, dict]:
    """Per kv: each plugin-on / verify server's scored tokens against the plugin-off server's."""
    out = {}
    for s in servers:
        off = f"{s['kv']}-off"
        if s["mode"] == "off" or off not in results or s["name"] not in results:
            continue
        a, b = _predictions(results[off]), _predictions(results[s["name"]])
        diff = [k for k in a if a[k] != b.get(k)]
        out[f"{s['name']} vs {off}"] = {"requests_compared": len(a), "requests_differing": diff, "equal": not diff}
    return out


def _strip(results: dict[str, dict]) -> dict[str, dict]:
    """The JSON's per-row view: scores, not the per-position tokens (those only feed :func:`compare`)."""
    def clean(r: dict) -> dict:
        return {k: ([clean(x) for x in v] if k == "requests" else v) for k, v in r.items() if k != "top1"}
    return {srv: {name: clean(r) for name, r in rows.items()} for srv, rows in results.items()}


def ours_routed(logs: dict) -> dict[str, list[str]]:
    """Per server, the hooked call classes the plugin routed to an nsa-tp tier (from its route log lines): what
    "plugin on" really ran; an empty list means upstream's path ran on every hooked call."""
    return {name: [r for r in facts["routes"] if " runs nsa-tp tier " in r] for name, facts in logs.items()}


def verdict(servers: list[dict], up: set[str], results: dict, comparison: dict, logs: dict) -> list[str]:
    """Why the run fails (empty: it passes). An ``off`` server is the upstream baseline: it must route nothing."""
    why = [f"{s['name']}: server not up (see its log)" for s in servers if s["name"] not in up]
    why += [f"{name}: labelled upstream (plugin off) but logged {len(facts['routes'])} plugin routes"
            for name, facts in logs.items() if name.endswith("-off") and facts["routes"]]
    for srv, rows in results.items():
        why += [f"{srv} {name}: accuracy {r['accuracy']:.4f}, greedy {r['greedy_correct']}/{r['greedy_total']} - "
                + r.get("diagnosis", "") for name, r in rows.items() if not r["ok"]]
    why += [f"{k}: {len(c['requests_differing'])} requests differ" for k, c in comparison.items() if not c["equal"]]
    return why


def card() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().replace("\n", " + ")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def summary(res: dict) -> None:
    for srv, rows in res["rows"].items():
        for name, r in rows.items():
            print(f"{srv:12s} {name:14s} accuracy {r['accuracy']:.4f} ({r['correct']}/{r['total']} positions)  "
                  f"greedy {r['greedy_correct']}/{r['greedy_total']}  {r['seconds']:7.2f} s"
                  + (f"  prefix cache hits {r['prefix_cache_hits']}/8" if "prefix_cache_hits" in r else "")
                  + (f"\n    why: {r['diagnosis']}" if r.get("diagnosis") else ""))
    for k, c in res["compare"].items():
        print(f"{k}: {'equal' if c['equal'] else 'DIFFERENT'} over {c['requests_compared']} requests")
    for name, f in res["logs"].items():
        print(f"{name}: tracebacks {f['tracebacks']}, verify worst {f['verify_worst']}")
    print("PASS" if res["ok"] else "FAIL: " + "; ".join(res["failures"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=DEFAULT_SERVERS)
    p.add_argument("--lens", default=DEFAULT_LENS)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--nsa-token-parallel", default="", help="on | auto | off | indexer (plugin servers only)")
    p.add_argument("--mem-fraction", type=float, default=MEM_FRACTION)
    p.add_argument("--port", type=int, default=31500)
    p.add_argument("--timeout", type=float, default=420, help="seconds for the servers to come up")
    p.add_argument("--name", default="", help="results go to $OUT/needle_sglang_NAME.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="print the commands and the request plan; start nothing")
    a = p.parse_args(argv)
    servers = parse_servers(a.servers)
    spec = NeedleSpec(seed=a.seed)
    rows = plan_rows(spec.vocab, [int(x) for x in a.lens.split(",")], spec.index_topk, a.seed)
    prefix, conc = concurrent_rows(spec.vocab, spec.index_topk, a.seed)
    for r in rows + conc:
        print(f"row {r.name}: {len(r.prompt)} tokens, {sum(q >= r.start for q, _ in r.prompt.queries)} query "
              f"positions from {r.start}, greedy chain {len(r.prompt.chain)}", flush=True)
    ckpt = STATE / "ckpt"
    if not a.smoke:
        STATE.mkdir(parents=True, exist_ok=True)
        if not _plugin_visible():
            install_plugin()  # the entry point SGLang loads plugins through, into /tmp/site
        cfg = ckpt / "config.json"
        if not cfg.is_file() or json.loads(cfg.read_text()) != json.loads(json.dumps(hf_config(spec))):
            write_checkpoint(spec, ckpt)
    start_servers(servers, ckpt, a)
    if a.smoke:
        return 0
    try:
        return measure(servers, rows, prefix, conc, a, argv)
    finally:
        stop_servers(servers)


def measure(servers: list[dict], rows: list[Row], prefix: list[int], conc: list[Row], a: argparse.Namespace,
            argv: list[str] | None) -> int:
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    up = {s["name"] for s in wait_all(servers, a.timeout)}
    print(f"[{time.time() - t0:5.0f}s] up: {sorted(up)}; sending", flush=True)
    live = [s for s in servers if s["name"] in up]
    with concurrent.futures.ThreadPoolExecutor(max(len(live), 1)) as pool:
        futs = {s["name"]: pool.submit(run_server, s, rows, prefix, conc, 600.0) for s in live}
        results = {n: f.result() for n, f in futs.items()}
    print(f"[{time.time() - t0:5.0f}s] scored", flush=True)
    comparison = compare(results, servers)
    logs = {s["name"]: log_facts(s["log"]) for s in servers}
    failures = verdict(servers, up, results, comparison, logs)
    stem = "needle_sglang" + (f"_{a.name}" if a.name else "")
    res = {"card": card(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python benchmark/needle_sglang.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "checkpoint": hf_config(NeedleSpec(seed=a.seed)), "launch": {s["name"]: s["cmd"] for s in servers},
           "env": {s["name"]: s["env"] for s in servers}, "rows": _strip(results),
           "upstream_alone": {n: {r: v["accuracy"] for r, v in rows_.items()} for n, rows_ in _strip(results).items()
                              if n.endswith("-off")},
           "compare": comparison, "logs": logs, "ours_routed": ours_routed(logs),
           "ok": not failures, "failures": failures}
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    with tarfile.open(out_dir / f"{stem}_logs.tgz", "w:gz") as tar:
        for s in servers:
            tar.add(s["log"], arcname=Path(s["log"]).name)
    summary(res)
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
