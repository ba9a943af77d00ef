"""Client for the multi-GPU SGLang run (benchmark/sglang_multi_gpu.sh, through sglang_e2e.sh and device.sh).

Same arguments and output file as benchmark/sglang_e2e_client.py (``$OUT/e2e_<label>.json``), so device.sh
runs it unchanged. After the server is up:

1. TTFT per prompt length (``--lens``, default 8K/32K/64K): one warm-up, then ``--reps`` samples, each a
   **fresh** random prompt (the radix cache must not serve a sample from an earlier one), ``max_new_tokens=1``.
2. Greedy: 32 new tokens at temperature 0 on one fixed 32K prompt (the same in every server, so output ids
   can be compared across upstream TP, upstream CP and the plugin).
3. Concurrency: 16 requests at once, mixed lengths (1K..24K), 8 of them sharing one of two cached 8K prefixes
   (sent once first, so the radix cache holds them), 8 greedy tokens each; per-request latency and ids.

    python benchmark/sglang_multi_gpu_client.py --port 30001 --label tp4 [--lens 8192,32768,65536] [--pid PID]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

# device.sh runs this file as client.py beside a copy of sglang_e2e_client.py; in the repo they share benchmark/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sglang_e2e_client import _post, prompt, wait_healthy  # noqa: E402 - after the path it needs

GREEDY_LEN, GREEDY_TOKENS = 32768, 32
CONCURRENT = 16
PREFIX_LEN = 8192
ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, ValueError)


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


def _generate(base: str, ids: list[int], new: int, timeout: float) -> tuple[float, list[int]]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0}}
    t = time.perf_counter()
    out = _post(base, "/generate", body, timeout)
    return time.perf_counter() - t, out.get("output_ids", [])[:new]


def ttft(base: str, n: int, reps: int, timeout: float, rng: random.Random) -> dict:
    res: dict = {"prompt": n, "ttft_s": [], "errors": []}
    for rep in range(-1, reps):  # rep -1: warm-up (JIT, first-touch allocations)
        try:
            dt, _ = _generate(base, prompt(n, seed=rng.randrange(1 << 62)), 1, timeout)
        except ERRORS as e:
            res["errors"].append(f"rep {rep}: {e!r}"[:300])
            continue
        if rep >= 0:
            res["ttft_s"].append(round(dt, 4))
    res["ttft_s_median"] = statistics.median(res["ttft_s"]) if res["ttft_s"] else None
    return res


def greedy(base: str, timeout: float) -> dict:
    try:
        dt, ids = _generate(base, prompt(GREEDY_LEN, seed=GREEDY_LEN + 1), GREEDY_TOKENS, timeout)
    except ERRORS as e:
        return {"prompt": GREEDY_LEN, "error": repr(e)[:300]}
    return {"prompt": GREEDY_LEN, "new_tokens": GREEDY_TOKENS, "s": round(dt, 4), "out_ids": ids}


def concurrency(base: str, timeout: float) -> dict:
    batch = concurrent_batch()
    for pre in (batch[0][:PREFIX_LEN], batch[2][:PREFIX_LEN]):  # fill the radix cache with both prefixes
        with contextlib.suppress(ERRORS):
            _generate(base, pre, 1, timeout)

    def one(ids: list[int]) -> dict:
        try:
            dt, out = _generate(base, ids, 8, timeout)
            return {"prompt": len(ids), "s": round(dt, 4), "out_ids": out}
        except ERRORS as e:
            return {"prompt": len(ids), "error": repr(e)[:300]}

    t = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        reqs = list(pool.map(one, batch))
    return {"requests": reqs, "wall_s": round(time.perf_counter() - t, 4),
            "errors": sum("error" in r for r in reqs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--timeout", type=float, default=420, help="seconds to wait for the server to come up")
    p.add_argument("--lens", default="8192,32768,65536")
    p.add_argument("--pid", type=int, default=0, help="server pid: stop waiting if it dies")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    base = f"http://127.0.0.1:{a.port}"
    t0 = time.time()
    up = wait_healthy(base, a.timeout, a.pid)
    res: dict = {"label": a.label, "startup_s": round(time.time() - t0, 1), "up": up, "ttft": [], "greedy": None,
                 "concurrent": None}
    if up:
        rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # fresh prompts in every run
        res["ttft"] = [ttft(base, int(n), a.reps, 900, rng) for n in a.lens.split(",")]
        res["greedy"] = greedy(base, 900)
        res["concurrent"] = concurrency(base, 900)
    print(json.dumps({k: v for k, v in res.items() if k != "concurrent"}, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"e2e_{a.label}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0 if up else 1


if __name__ == "__main__":
    raise SystemExit(main())
