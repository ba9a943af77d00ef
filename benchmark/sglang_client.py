"""The one client of the SGLang benchmarks: HTTP helpers, prompts, and the request workloads every server gets.

Used by ``benchmark/sglang_launch.py`` (in-process) and runnable on its own against one server (the form
``device.sh``'s ``client.py`` slot takes: same arguments, same ``$OUT/e2e_<label>.json``):

    python benchmark/sglang_client.py --port 30001 --label tp4 [--workload multi|e2e] [--lens ...] [--pid PID]

Workloads (all send token ids, temperature 0):

- ``e2e`` (:func:`e2e_lengths`): per prompt length one warm-up, then ``--reps`` rounds of TTFT
  (``max_new_tokens=1``) and 8 greedy tokens on a fixed prompt (the same in every run: plugin-on and plugin-off
  servers compare token for token; with the radix cache on, only the first TTFT sample is a cold prefill).
- ``multi`` (:func:`multi_workload`): TTFT per length on **fresh** random prompts (the radix cache must not
  serve a sample), 32 greedy tokens on one fixed 32K prompt, 16 concurrent mixed-length requests of which 8
  sit behind one of two cached 8K prefixes.
- the shared-card pair (:func:`measure_pair`, one GPU): every measurement alternates between a plugin-off and
  a plugin-on server, two passes in opposite order, on prompts keyed by the round's name (fresh to servers a
  previous round measured); :func:`exercise_verify` drives a verify server through every hooked path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

VOCAB_LO, VOCAB_HI = 2, 120000  # token ids inside DeepSeek-V3.2's vocabulary, clear of BOS/EOS (0, 1)
VOCAB = (VOCAB_LO, VOCAB_HI)
ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, ValueError)


# ------------------------------------------------------------------------------------------------- HTTP


def _post(base: str, path: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read() or b"null")
    return out[0] if isinstance(out, list) else out


def healthy(base: str) -> bool:
    """True when ``/health`` answers now."""
    try:
        urllib.request.urlopen(base + "/health", timeout=5)
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_healthy(base: str, timeout: float, pid: int) -> bool:
    """True once ``/health`` answers; False on timeout or when the server process ``pid`` died."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if healthy(base):
            return True
        if pid and not alive(pid):
            return False
        time.sleep(3)
    return False


def prompt(n: int, seed: int) -> list[int]:
    """``n`` token ids from ``seed`` (the same in every server and run)."""
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def keyed_prompt(n: int, *key: object) -> list[int]:
    """``n`` token ids keyed by ``(n, *key)``: a new key is a prompt no server has seen (radix cache)."""
    rng = random.Random(repr((n, *key)))
    return [rng.randrange(*VOCAB) for _ in range(n)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def generate(base: str, ids: list[int], new: int, timeout: float = 600) -> tuple[float, list[int]]:
    """Wall seconds of one ``/generate`` (greedy, ``new`` tokens) and its output ids."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0}}
    t = time.perf_counter()
    out = _post(base, "/generate", body, timeout)
    return time.perf_counter() - t, list(out.get("output_ids", []))[:new]


def concurrent_wall(base: str, prompts: list[list[int]], new: int) -> float:
    """Wall seconds of ``prompts`` sent all at once."""
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda ids: generate(base, ids, new), prompts))
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------- workload "e2e"


def e2e_lengths_one(base: str, n: int, reps: int, timeout: float) -> dict:
    """One prompt length: ``{prompt, ttft_s [reps], greedy_s [reps], out_ids, errors}``."""
    ids = prompt(n, seed=n)
    res: dict = {"prompt": n, "ttft_s": [], "greedy_s": [], "out_ids": None, "errors": []}
    for rep in range(-1, reps):  # rep -1 warms up (kernel JIT, first-touch allocations)
        for kind, new in (("ttft_s", 1), ("greedy_s", 8)):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0}}
            t = time.perf_counter()
            try:
                out = _post(base, "/generate", body, timeout)
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as e:
                res["errors"].append(f"{kind} rep {rep}: {e!r}"[:300])
                continue
            dt = time.perf_counter() - t
            if rep < 0:
                continue
            res[kind].append(round(dt, 4))
            if new == 8:
                got = out.get("output_ids", [])[:8]
                if res["out_ids"] is None:
                    res["out_ids"] = got
                elif got != res["out_ids"]:  # greedy must be repeatable inside one run
                    res["errors"].append(f"greedy rep {rep}: output ids changed {res['out_ids']} -> {got}")
    for kind in ("ttft_s", "greedy_s"):
        res[kind + "_median"] = statistics.median(res[kind]) if res[kind] else None
    return res


def e2e_lengths(base: str, lens: list[int], reps: int) -> list[dict]:
    return [e2e_lengths_one(base, n, reps, timeout=600) for n in lens]


# ----------------------------------------------------------------------------------- workload "multi"


GREEDY_LEN, GREEDY_TOKENS = 32768, 32
CONCURRENT = 16
PREFIX_LEN = 8192


def concurrent_batch(seed: int = 1234) -> list[list[int]]:
    """The 16 mixed-length prompts: even ones behind one of two shared 8K prefixes, odd ones fresh."""
    rng = random.Random(seed)
    prefixes = [prompt(PREFIX_LEN, seed=seed + 1), prompt(PREFIX_LEN, seed=seed + 2)]
    batch = []
    for i in range(CONCURRENT):
        n = rng.choice([1024, 2048, 4096, 8192, 12288, 16384, 24576])
        tail = prompt(n, seed=seed + 100 + i)
        batch.append(prefixes[(i // 2) % 2] + tail if i % 2 == 0 else tail)
    return batch


def ttft(base: str, n: int, reps: int, timeout: float, rng: random.Random) -> dict:
    res: dict = {"prompt": n, "ttft_s": [], "errors": []}
    for rep in range(-1, reps):  # rep -1: warm-up (JIT, first-touch allocations)
        try:
            dt, _ = generate(base, prompt(n, seed=rng.randrange(1 << 62)), 1, timeout)
        except ERRORS as e:
            res["errors"].append(f"rep {rep}: {e!r}"[:300])
            continue
        if rep >= 0:
            res["ttft_s"].append(round(dt, 4))
    res["ttft_s_median"] = statistics.median(res["ttft_s"]) if res["ttft_s"] else None
    return res


def greedy(base: str, timeout: float) -> dict:
    try:
        dt, ids = generate(base, prompt(GREEDY_LEN, seed=GREEDY_LEN + 1), GREEDY_TOKENS, timeout)
    except ERRORS as e:
        return {"prompt": GREEDY_LEN, "error": repr(e)[:300]}
    return {"prompt": GREEDY_LEN, "new_tokens": GREEDY_TOKENS, "s": round(dt, 4), "out_ids": ids}


def concurrency(base: str, timeout: float) -> dict:
    batch = concurrent_batch()
    for pre in (batch[0][:PREFIX_LEN], batch[2][:PREFIX_LEN]):  # fill the radix cache with both prefixes
        with contextlib.suppress(ERRORS):
            generate(base, pre, 1, timeout)

    def one(ids: list[int]) -> dict:
        try:
            dt, out = generate(base, ids, 8, timeout)
            return {"prompt": len(ids), "s": round(dt, 4), "out_ids": out}
        except ERRORS as e:
            return {"prompt": len(ids), "error": repr(e)[:300]}

    t = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        reqs = list(pool.map(one, batch))
    return {"requests": reqs, "wall_s": round(time.perf_counter() - t, 4),
            "errors": sum("error" in r for r in reqs)}


def multi_workload(base: str, lens: list[int], reps: int) -> dict:
    """``{"ttft": [...], "greedy": {...}, "concurrent": {...}}`` (module docstring)."""
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # fresh prompts in every run
    return {"ttft": [ttft(base, n, reps, 900, rng) for n in lens], "greedy": greedy(base, 900),
            "concurrent": concurrency(base, 900)}


# ------------------------------------------------------------------------- shared-card pairs (one GPU)


PAIR_LENS = (8192, 32768)
PAIR_REPS = 3


def _base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _timed(port: int, ids: list[int], new: int) -> tuple[float, list[int]]:
    return generate(_base(port), ids, new)


MIXED = [1024, 2048, 4096, 8192, 16384, 3000, 6000, 12000, 1500, 2500, 5000, 10000, 700, 20000, 900, 7000]


def measure_pair(pair: dict[str, dict], salt: str = "") -> dict:
    """Alternate every measurement between the servers of one (heads, kv) pair; two passes, opposite order.

    ``salt`` (the round's name) makes every prompt new to servers that a previous round already measured.
    """
    names = [pair[k]["name"] for k in ("off", "on") if k in pair]
    res: dict = {n: {"ttft_s": {str(L): [[], []] for L in PAIR_LENS}, "greedy32_s": [[], []],
                     "concurrent16_s": [[], []], "greedy_ids": []} for n in names}
    ports = {pair[k]["name"]: pair[k]["port"] for k in pair}
    for n in names:  # warm-up: JIT, first-touch allocations, every prefill and decode shape measured below once
        for L in PAIR_LENS:
            _timed(ports[n], keyed_prompt(L, "warm", n, salt), 4)
        # The whole mixed batch: a 4-request warm-up left the first measured pass 3.6x slower than the second
        # (new prefill chunk sizes and decode batch sizes met for the first time; H200, 2026-11-29).
        concurrent_wall(_base(ports[n]), [keyed_prompt(L, "warmc", n, i, salt) for i, L in enumerate(MIXED)], 16)
    for p in (0, 1):
        order = names if p == 0 else names[::-1]
        for L in PAIR_LENS:
            for rep in range(PAIR_REPS):
                ids = keyed_prompt(L, "ttft", p, rep, salt)  # the same fresh prompt for both: neither has seen it
                for n in order:
                    res[n]["ttft_s"][str(L)][p].append(round(_timed(ports[n], ids, 1)[0], 4))
        ids = keyed_prompt(32768, "greedy", p, salt)
        for n in order:
            dt, out = _timed(ports[n], ids, 32)
            res[n]["greedy32_s"][p].append(round(dt, 4))
            res[n]["greedy_ids"].append(out)
        batch = [keyed_prompt(L, "conc", p, i, salt) for i, L in enumerate(MIXED)]
        for n in order:
            res[n]["concurrent16_s"][p].append(round(concurrent_wall(_base(ports[n]), batch, 16), 4))
    summary = {}
    for n in names:
        metrics = {f"ttft_{L}": res[n]["ttft_s"][str(L)] for L in PAIR_LENS}
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
    for L in PAIR_LENS:
        _timed(port, keyed_prompt(L, "v", L), 32)
    bases = [keyed_prompt(4096, "vbase", i) for i in range(4)]
    batch = [bases[i % 4] + keyed_prompt(L, "vsuffix", i) for i, L in enumerate(MIXED)]
    concurrent_wall(_base(port), [b[:30000] for b in batch], 16)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--workload", choices=("e2e", "multi"), default=os.environ.get("E2E_WORKLOAD", "e2e"))
    p.add_argument("--timeout", type=float, default=420, help="seconds to wait for the server to come up")
    p.add_argument("--lens", default=None, help="prompt lengths (default 2048,8192,32768 e2e; 8192,32768,65536 multi)")
    p.add_argument("--pid", type=int, default=0, help="server pid: stop waiting if it dies")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    res = run_client(a.port, a.label, a.workload, a.lens, a.timeout, a.pid, a.reps)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"e2e_{a.label}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0 if res["up"] else 1


def run_client(port: int, label: str, workload: str, lens: str | None, timeout: float, pid: int, reps: int) -> dict:
    """Wait for the server, run ``workload``, print and return the result (``e2e_<label>.json``'s content)."""
    lens = lens or ("2048,8192,32768" if workload == "e2e" else "8192,32768,65536")
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    up = wait_healthy(base, timeout, pid)
    res: dict = {"label": label, "startup_s": round(time.time() - t0, 1), "up": up}
    ns = [int(n) for n in lens.split(",")]
    if workload == "e2e":
        res["runs"] = e2e_lengths(base, ns, reps) if up else []
    else:
        res.update(ttft=[], greedy=None, concurrent=None)
        if up:
            res.update(multi_workload(base, ns, reps))
    print(json.dumps({k: v for k, v in res.items() if k != "concurrent"}, indent=1))
    return res


if __name__ == "__main__":
    raise SystemExit(main())
