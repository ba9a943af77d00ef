"""Client for the real-SGLang end-to-end run (benchmark/sglang_e2e.sh): waits for the server, then per
prompt length times time-to-first-token and records the greedy output tokens.

Drop-in for ``../shared/sglang-on-device/client.py`` (same arguments, same ``$OUT/e2e_<label>.json``), so
``device.sh`` runs it unchanged. Per length: one warm-up, then ``--reps`` measured rounds of
- TTFT: ``/generate`` with ``max_new_tokens=1`` (prefill + one sampled token; wall time on 127.0.0.1),
- greedy: ``max_new_tokens=8``, temperature 0, its output ids and wall time.
Prompts are random token ids from a fixed seed, the same in every run, so plugin-on and plugin-off runs
can be compared token for token.

    python benchmark/sglang_e2e_client.py --port 30001 --label tp2 --lens 8192,32768 [--pid PID]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import urllib.error
import urllib.request

VOCAB_LO, VOCAB_HI = 2, 120000  # token ids inside DeepSeek-V3.2's vocabulary, clear of BOS/EOS (0, 1)


def _post(base: str, path: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read() or b"null")
    return out[0] if isinstance(out, list) else out


def wait_healthy(base: str, timeout: float, pid: int) -> bool:
    """True once ``/health`` answers; False on timeout or when the server process ``pid`` died."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(base + "/health", timeout=5)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if pid:
                try:
                    os.kill(pid, 0)
                except OSError:
                    return False
            time.sleep(3)
    return False


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def measure(base: str, n: int, reps: int, timeout: float) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--timeout", type=float, default=420, help="seconds to wait for the server to come up")
    p.add_argument("--lens", default="2048,8192,32768")
    p.add_argument("--pid", type=int, default=0, help="server pid: stop waiting if it dies")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    base = f"http://127.0.0.1:{a.port}"
    t0 = time.time()
    up = wait_healthy(base, a.timeout, a.pid)
    res = {"label": a.label, "startup_s": round(time.time() - t0, 1), "up": up, "runs": []}
    if up:
        res["runs"] = [measure(base, int(n), a.reps, timeout=600) for n in a.lens.split(",")]
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"e2e_{a.label}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0 if up else 1


if __name__ == "__main__":
    raise SystemExit(main())
