"""The one launcher of the SGLang benchmarks: start real SGLang servers with nsa-tp's plugin off and on, send every
server the same requests (:mod:`sglang_client`), summarize (:mod:`sglang_summary`). The GPU count is a parameter.

Runs on the GPU machine from the repo root after ``../shared/sglang-on-device``'s three unpack calls (SGLang
0.5.17 in /tmp/site; carry ``.sgl/bin``, and ``.wheels/`` for the FlashMLA tier). The plugin is made visible to
every SGLang process by a dist-info in /tmp/site that declares its entry point, with ``python/`` on PYTHONPATH.

**One GPU, servers sharing the card** (a one-layer DeepSeek-V3.2 with dummy weights is small)::

    python benchmark/sglang_launch.py --gpus 1 start [SPEC ...]   # servers in their own sessions, all at once
    python benchmark/sglang_launch.py --gpus 1 wait                # until all answer (the first start compiles)
    python benchmark/sglang_launch.py --gpus 1 measure [--name N]  # one round: $OUT/e2e_1gpu[_N].json
    python benchmark/sglang_launch.py --gpus 1 stop
    python benchmark/sglang_summary.py merge R1.json R2.json ... --out M.json   # rounds -> per-row verdicts

A SPEC is ``<heads>-<kv>-<on|off|verify>`` (e.g. ``16-fp8-on``; default: the fp8 pairs and verify servers at 16
and 128 heads). Each off/on pair is measured by alternating requests between the two (same GPU state), every
TTFT sample a fresh prompt (the radix cache stays on); ``verify`` = plugin on, ``NSA_TP_SGLANG_VERIFY=1`` and
``--disable-cuda-graph`` (verify skips captured calls). SGLang's defaults otherwise (CUDA graphs, radix cache,
on Hopper the fp8 KV cache with ``flashmla_kv``); bf16 servers add ``--kv-cache-dtype bfloat16`` and
``flashmla_sparse``. Two flags let several servers share one card, neither touching attention:
``--mem-fraction-static`` and ``--max-total-tokens`` (:data:`MAX_TOTAL_TOKENS`).

**Several GPUs, one server at a time on all of them**::

    python benchmark/sglang_launch.py --gpus 4 run                     # every default server for 4 GPUs
    python benchmark/sglang_launch.py --gpus 4 run off:tp4 tokens:tp4  # STATE:LAYOUT
    python benchmark/sglang_launch.py --gpus 2 run --workload e2e on:tp2 off:tp2 on:dp2 off:dp2
    python benchmark/sglang_launch.py --gpus 8 run --smoke            # print each server; run nothing (CPU)

STATE: ``off`` (plugin off) | ``on`` (plugin on; token-parallel as ``NSA_TP_TOKEN_PARALLEL``, default off) |
``cp`` (plugin off, upstream prefill CP: ``--enable-prefill-cp --cp-strategy interleave``) | ``auto`` |
``tokens`` | ``indexer`` (plugin on, ``NSA_TP_TOKEN_PARALLEL=auto|on|indexer``) | ``verify`` (plugin on,
token-parallel on, ``NSA_TP_SGLANG_VERIFY=1``). LAYOUT: ``tpN`` (``--tp N``), ``tpNdpD`` / ``dpN`` (DP attention,
``D`` groups): spelled ``--dp D --enable-dp-attention`` for SGLang before 0.5.23 (0.5.17 knows nothing else) and
``--attn-dp-size D`` from 0.5.23 on (:func:`parallel_flags`; the installed SGLang's server arguments decide,
``--sglang-version`` overrides).
Per model (``MODELS``: ``1layer``, ``4layer``, ``full`` = 61 layers) results land in
``$OUT/<model>/<state>/``: ``e2e_<layout>.json``, ``server_<layout>.log``, ``proof_<layout>.txt`` (every nsa-tp
line plus upstream's DSA TP and CP lines), then ``$OUT/summary_<N>gpu.json``.
Workloads (``--workload``): ``multi`` (default: fresh-prompt TTFT at ``LENS``, 32 greedy tokens at 32K, 16
concurrent requests sharing cached prefixes; flags bf16 KV, ``flashmla_sparse``, no CUDA graphs, radix cache on)
or ``e2e`` (fixed prompts, TTFT + 8 greedy tokens at ``LENS``; device.sh's easy flags, radix cache off).
Env: ``MODELS``, ``LENS``, ``COSTS`` (a Costs record overriding the card's committed one; unset = the card's),
``SGL_FLAGS`` (replaces the workload's flags; ``""`` = SGLang's defaults), ``SGL_EXTRA``, ``SGL_CONTEXT``,
``E2E_TIMEOUT`` (server start, s), ``PORT_BASE``, ``NSA_TP_SGLANG_BACKEND``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the client and summary beside this file
import sglang_client as client  # noqa: E402 - after the path it needs
import sglang_summary as summary  # noqa: E402
from nsa_tp.parallel import dp_attention_flags  # noqa: E402 - the one writer of either spelling

REPO = Path(__file__).resolve().parent.parent
SITE = Path("/tmp/site")
STATE = Path(os.environ.get("E2E_STATE", "/tmp/nsa_e2e"))
BIN = REPO / ".sgl" / "bin"
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SGLANG_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD": "0",
              "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CP_FLAGS = ["--enable-prefill-cp", "--cp-strategy", "interleave"]
EASY_FLAGS = ("--disable-cuda-graph --kv-cache-dtype bfloat16 --dsa-prefill-backend flashmla_sparse "
              "--dsa-decode-backend flashmla_sparse --disable-radix-cache")  # device.sh's easy mode
MULTI_FLAGS = ("--kv-cache-dtype bfloat16 --dsa-prefill-backend flashmla_sparse --dsa-decode-backend flashmla_sparse "
               "--disable-cuda-graph")  # radix cache on

# ------------------------------------------------------------------------------------------- shared


def attn_dp_spelling(version: str | None = None) -> tuple[bool, str]:
    """``(new, what)``: whether the SGLang the servers will run spells DP attention ``--attn-dp-size`` (0.5.23 on),
    and a few words for the log. ``version`` (``--sglang-version``) decides without looking; otherwise the SGLang
    in /tmp/site (or on sys.path) is read from its files by :func:`nsa_tp.integrations.sglang.launch.installed_sglang`
    (its server arguments declare ``attn_dp_size`` and it ships ``sglang serve``), not by its version number."""
    for path in (str(REPO / "python"), str(SITE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    if version:
        from nsa_tp.integrations.sglang._version import _release

        return (_release(version) or (0, 0, 0)) >= (0, 5, 23), f"sglang {version} (given)"
    from nsa_tp.integrations.sglang.launch import installed_sglang

    found = installed_sglang()  # the new spelling needs both: the attn_dp_size field and `sglang serve`
    new = bool(found.prefers_new_spelling)
    return new, f"sglang {found.version} ({'sglang serve --attn-dp-size' if new else '--dp D --enable-dp-attention'})"


def server_entry(serve: bool) -> list[str]:
    """How a server starts: ``sglang serve`` where the SGLang the servers run ships it (0.5.23 on; SGLang's own
    console-script function, ``sglang.cli.main:main``, run by this Python, since the GPU machines unpack SGLang
    without console scripts), else 0.5.17's ``python -m sglang.launch_server``. Both load the plugin alike."""
    if serve:
        return [sys.executable, "-c", "from sglang.cli.main import main; main()", "serve"]
    return [sys.executable, "-m", "sglang.launch_server"]


def parallel_flags(tp: int, dp: int, attn_dp_size: bool) -> list[str]:
    """``--tp`` and DP attention in the installed SGLang's spelling: 0.5.23 prefers ``--attn-dp-size D`` (and
    deprecates ``--enable-dp-attention``); 0.5.17 knows only ``--dp D --enable-dp-attention``."""
    return dp_attention_flags(tp, dp, attn_dp_size).split() if dp > 1 else ["--tp", str(tp)]


def spec_flags(s: dict) -> tuple[list[str], dict[str, str]]:
    """The flags and environment additions of a server spec's KV cache (``s["kv"]``: ``fp8`` | ``bf16``) and mode
    (``s["mode"]``: ``off`` | ``on`` | ``verify``), shared by the one-card servers and the needle gate's.

    ``fp8`` is named explicitly: for a checkpoint without fp8 weights (our dummy one, the needle's bf16 one) SGLang
    0.5.17 resolves ``auto`` to bf16 and then picks FA3 for decode; ``fp8_e4m3`` gives its Hopper fp8 path
    (``flashmla_kv``). ``verify`` adds ``--disable-cuda-graph`` (verify skips captured calls).
    """
    if s["kv"] == "bf16":
        flags = ["--kv-cache-dtype", "bfloat16", "--dsa-prefill-backend", "flashmla_sparse",
                 "--dsa-decode-backend", "flashmla_sparse"]
    else:
        flags = ["--kv-cache-dtype", "fp8_e4m3"]
    if s["mode"] == "verify":
        flags.append("--disable-cuda-graph")
    env = {"NSA_TP_SGLANG_PLUGIN": "0" if s["mode"] == "off" else "1",
           "NSA_TP_SGLANG_VERIFY": "1" if s["mode"] == "verify" else "0"}
    return flags, env


def install_plugin(probe: bool = False) -> str:
    """Make nsa_tp importable with its ``sglang.srt.plugins`` entry point in every SGLang process (a dist-info in
    /tmp/site; python/ goes on PYTHONPATH), plus the carried FlashMLA wheel; ``probe``: check it from a fresh
    process and return what it saw (``plugin_install.txt``: entry point, versions, card, the ops tiers)."""
    SITE.mkdir(parents=True, exist_ok=True)
    wheels = sorted((REPO / ".wheels").glob("sgl_flash_mla-*.whl"))
    if wheels and not (SITE / "flash_mla").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(SITE), str(wheels[0])], check=True)
    version = re.search(r'^version = "(.*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    di = SITE / f"nsa_tp-{version}.dist-info"
    if not di.exists():
        tmp = di.with_suffix(".tmp")
        tmp.mkdir(exist_ok=True)
        (tmp / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nsa-tp\nVersion: {version}\n")
        (tmp / "top_level.txt").write_text("nsa_tp\n")
        (tmp / "entry_points.txt").write_text("[sglang.srt.plugins]\nnsa_tp = nsa_tp.integrations.sglang:register\n")
        with contextlib.suppress(OSError):  # another launcher may have won the race: its copy is the same
            tmp.rename(di)
    if not probe:
        return ""
    check = ("from importlib.metadata import entry_points, version\n"
             "eps = [ep for ep in entry_points(group='sglang.srt.plugins') if ep.name == 'nsa_tp']\n"
             "assert eps, 'nsa_tp entry point not visible'\n"
             "import nsa_tp.ops as ops, torch\n"
             "print('entry point:', eps[0].value, '| sglang', version('sglang'), '| torch', torch.__version__,\n"
             "      '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)\n"
             "print('ops tiers:', {n: ('ok' if not isinstance(ops.registry._load(n), str) else ops.registry._load(n))"
             " for n in ops.tier_names()})\n")
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=_env({}))
    print(r.stdout + r.stderr, end="", flush=True)
    return r.stdout + r.stderr


def _env(extra: dict[str, str]) -> dict[str, str]:
    path = f"{SITE}:{REPO / 'python'}" + (f":{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else "")
    return {**os.environ, **SERVER_ENV, "PYTHONPATH": path, **extra}


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, 15)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, 9)


# ---------------------------------------------------------------------------- one GPU, shared card


DEFAULT_SPECS = [f"{h}-fp8-{s}" for h in (16, 128) for s in ("off", "on", "verify")]
CONFIGS = {16: "config-v32-1layer-h16.json", 128: "config-v32-1layer.json"}
# Servers share the card, so each one's KV pool is capped (--max-total-tokens) and they start all at once.
# SGLang 0.5.17 sizes the pool as (free memory after its weights) - (free memory before them) * (1 - fraction):
# with 0.7 that stays positive even when the other servers load their weights between the two readings
# (five servers at ~6 GB each before their graphs), and the cap, not the fraction, sets the pool. The cap holds
# 16 concurrent requests of up to 30K tokens plus the radix cache several times over.
MEM_FRACTION = 0.7
MAX_TOTAL_TOKENS = 400_000
POOL_LINE = "Memory pool end"  # SGLang 0.5.17 logs this once the KV pool is allocated


def parse_spec(spec: str) -> dict:
    m = re.fullmatch(r"(16|128)-(fp8|bf16)-(on|off|verify)", spec)
    if m is None:
        raise SystemExit(f"bad server spec {spec!r}: expected <16|128>-<fp8|bf16>-<on|off|verify>, e.g. 16-fp8-on")
    return {"name": spec, "heads": int(m.group(1)), "kv": m.group(2), "mode": m.group(3)}


def server_command(s: dict, port: int, mem_fraction: float) -> tuple[list[str], dict[str, str]]:
    """The launch command and the environment additions for one shared-card server."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", f"{STATE}/m{s['heads']}",
           "--load-format", "dummy", "--tp", "1", "--skip-tokenizer-init", "--sampling-backend", "pytorch",
           "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", f"{mem_fraction:.3f}",
           "--context-length", "40000", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--disable-custom-all-reduce"]
    flags, env = spec_flags(s)
    return cmd + flags, env


def _wait_for_pool(s: dict, timeout: float = 300) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if POOL_LINE in Path(s["log"]).read_text(errors="replace"):
            return True
        if not _alive(s["pid"]):
            return False
        time.sleep(2)
    return False


def _alive(pid: int) -> bool:
    return client.alive(pid)


def start(specs: list[str], dry_run: bool) -> int:
    servers = [parse_spec(s) for s in specs]
    if not dry_run:
        STATE.mkdir(parents=True, exist_ok=True)
        install_plugin()
        for h, cfg in CONFIGS.items():
            (STATE / f"m{h}").mkdir(exist_ok=True)
            shutil.copy(BIN / cfg, STATE / f"m{h}" / "config.json")
    for i, s in enumerate(servers):
        port = 31000 + i
        cmd, env = server_command(s, port, MEM_FRACTION)
        s.update(port=port, log=str(STATE / f"server_{s['name']}.log"), cmd=cmd, env=env)
        print(f"{s['name']}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        with open(s["log"], "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(env),
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


def wait_all(servers: list[dict], timeout: float) -> list[dict]:
    """Servers that answer /health within ``timeout`` (progress every 30 s); dead ones are reported."""
    t0, up = time.time(), {}
    while time.time() - t0 < timeout and len(up) < len(servers):
        for s in servers:
            if s["name"] in up or not _alive(s["pid"]):
                continue
            if client.healthy(f"http://127.0.0.1:{s['port']}"):
                up[s["name"]] = round(time.time() - t0, 1)
                print(f"[{time.time() - t0:5.0f}s] {s['name']} up", flush=True)
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


def measure(timeout: float, name: str = "") -> int:
    """One measured round of the started servers: ``$OUT/e2e_1gpu[_NAME].json`` and its log archive."""
    servers = json.loads((STATE / "servers.json").read_text())
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    up = wait_all(servers, timeout)
    up_names = {s["name"] for s in up}
    card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    results = {"card": card, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": "python benchmark/sglang_launch.py --gpus 1 start " + " ".join(s["name"] for s in servers)
               + " && python benchmark/sglang_launch.py --gpus 1 measure" + (f" --name {name}" if name else ""),
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
            results["pairs"][key] = client.measure_pair(pair, salt=name)
        except Exception as e:  # noqa: BLE001 - one broken pair must not lose the others
            results["pairs"][key] = {"error": f"{type(e).__name__}: {e}"}
        _write(out_dir / f"{stem}.json", results)
    for s in up:
        if s["mode"] == "verify":
            print(f"exercising {s['name']}", flush=True)
            try:
                client.exercise_verify(s)
            except Exception as e:  # noqa: BLE001
                results["logs"][s["name"] + "_error"] = f"{type(e).__name__}: {e}"
    time.sleep(2)
    for s in servers:
        results["logs"][s["name"]] = summary.log_facts(s["log"]) | {"up": s["name"] in up_names}
    _write(out_dir / f"{stem}.json", results)
    with tarfile.open(out_dir / f"{stem}_logs.tgz", "w:gz") as tar:
        for s in servers:
            tar.add(s["log"], arcname=Path(s["log"]).name)
    _print_round(results)
    return 0 if len(up) == len(servers) else 1


def _write(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1))


def _print_round(results: dict) -> None:
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


def stop() -> int:
    path = STATE / "servers.json"
    if path.exists():
        for s in json.loads(path.read_text()):
            with contextlib.suppress(OSError, KeyError):
                os.killpg(s["pid"], 9)
        path.unlink()  # nothing left to wait for (gpu_kernels.sh tests waits only for started servers)
    return 0


# ------------------------------------------------------------------------ several GPUs, one by one


# run state -> (NSA_TP_SGLANG_PLUGIN, NSA_TP_TOKEN_PARALLEL or None = the environment's, VERIFY, extra flags)
STATES = {"on": ("1", None, "0", []), "off": ("0", None, "0", []), "cp": ("0", None, "0", CP_FLAGS),
          "auto": ("1", "auto", "0", []), "tokens": ("1", "on", "0", []), "indexer": ("1", "indexer", "0", []),
          "verify": ("1", "on", "1", [])}
GPU_LAYOUTS = {2: ("tp2",), 4: ("tp4", "tp4dp2"), 8: ("tp8", "tp8dp4")}
GPU_MODELS = {2: "1layer 4layer", 4: "1layer 4layer", 8: "full"}


def parse_layout(layout: str) -> tuple[int, int]:
    """``tp4`` -> (4, 1), ``tp4dp2`` -> (4, 2), ``dp2`` -> (2, 2) (DP attention over every rank)."""
    m = re.fullmatch(r"tp(\d+)(?:dp(\d+))?|dp(\d+)", layout)
    if m is None:
        raise ValueError(f"bad layout {layout!r}: expected tpN, tpNdpD or dpN")
    if m.group(3):
        return int(m.group(3)), int(m.group(3))
    return int(m.group(1)), int(m.group(2) or 1)


def default_runs(gpus: int, workload: str) -> list[str]:
    if workload == "e2e":
        return [f"{s}:{lay}" for lay in (f"tp{gpus}", f"dp{gpus}") for s in ("on", "off")]
    runs = []
    for lay in GPU_LAYOUTS[gpus]:
        states = ("off", "auto", "tokens", "verify") if "dp" in lay else ("off", "cp", "auto", "tokens", "verify")
        runs += [f"{s}:{lay}" for s in states]  # upstream CP cannot run with DP attention
    return runs


def model_config(model: str, write: bool) -> Path:
    """A model name -> its config (the 61-layer one is written from the 4-layer config)."""
    if model in ("1layer", "4layer"):
        return BIN / f"config-v32-{model}.json"
    if model != "full":
        raise ValueError(f"unknown model {model!r}: expected 1layer, 4layer or full")
    path = Path("/tmp/config-v32-61layer.json")
    if write:
        c = json.loads((BIN / "config-v32-4layer.json").read_text())
        c.update(num_hidden_layers=61, first_k_dense_replace=3)  # DeepSeek-V3.2: 61 layers, the first 3 dense
        path.write_text(json.dumps(c, indent=1))
    return path


def run_command(run: str, port: int, *, attn_dp_size: bool, flags: str, context: int,
                model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """One multi-GPU server's launch command and environment additions (``run`` = ``STATE:LAYOUT``).
    ``attn_dp_size``: the servers' SGLang is 0.5.23 or later, so DP attention is spelled ``--attn-dp-size`` and the
    server starts through ``sglang serve`` (:func:`server_entry`)."""
    state, _, layout = run.partition(":")
    if state not in STATES:
        raise ValueError(f"bad run {run!r}: STATE one of {', '.join(STATES)}")
    plugin, tp_mode, verify, extra = STATES[state]
    tp, dp = parse_layout(layout)
    cmd = [*server_entry(attn_dp_size), "--model-path", str(model_dir), "--load-format", "dummy",
           *parallel_flags(tp, dp, attn_dp_size), "--skip-tokenizer-init", "--sampling-backend", "pytorch",
           *shlex.split(flags), "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", "0.6",
           "--context-length", str(context), "--disable-custom-all-reduce",
           *shlex.split(os.environ.get("SGL_EXTRA", "")), *extra]
    env = {"NSA_TP_SGLANG_PLUGIN": plugin, "NSA_TP_TOKEN_PARALLEL": tp_mode or os.environ.get(
        "NSA_TP_TOKEN_PARALLEL", "off"), "NSA_TP_SGLANG_VERIFY": verify}
    return cmd, env


def run_servers(gpus: int, runs: list[str], workload: str, smoke: bool, version: str | None = None) -> int:
    """Every ``STATE:LAYOUT`` of every model, one server at a time, then the summary (module docstring)."""
    if gpus not in GPU_LAYOUTS:
        print(f"sglang_launch.py: --gpus {gpus}: needs 1 (shared card), 2, 4 or 8 GPUs", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "/tmp/out"))
    runs = runs or default_runs(gpus, workload)
    models = os.environ.get("MODELS", GPU_MODELS[gpus] if workload == "multi" else "1layer").split()
    lens = os.environ.get("LENS", os.environ.get("E2E_LENS", "8192,32768,65536" if workload == "multi"
                                                 else "2048,8192,32768"))
    context = int(os.environ.get("SGL_CONTEXT") or max(int(n) for n in lens.split(",")) + 4096)
    flags = os.environ.get("SGL_FLAGS", MULTI_FLAGS if workload == "multi" else EASY_FLAGS)
    costs = os.environ.get("COSTS", "")  # empty: the card's committed record (nsa_tp/ops/measured)
    if costs:
        os.environ["NSA_TP_TOKEN_PARALLEL_COSTS"] = costs
    attn_dp_size, spelled = attn_dp_spelling(version)
    print(f"sglang_launch: {gpus} GPUs, {spelled}, models: {' '.join(models)}, runs: {' '.join(runs)}, "
          f"workload {workload}, lens {lens}, context {context}, auto costs: {costs or 'the card record'}", flush=True)
    installed = "" if smoke else install_plugin(probe=True)
    port = int(os.environ.get("PORT_BASE", "30000"))
    for model in models:
        cfg = model_config(model, write=not smoke)
        print(f"=== model {model} ({cfg}) {time.strftime('%H:%M:%S', time.gmtime())}", flush=True)
        model_dir = Path(f"/tmp/m-{model}")
        if not smoke:
            model_dir.mkdir(exist_ok=True)
            shutil.copy(cfg, model_dir / "config.json")
            (out / model).mkdir(parents=True, exist_ok=True)
            (out / model / "plugin_install.txt").write_text(installed)  # what the summaries read
        for run in runs:
            port += 1
            try:
                cmd, env = run_command(run, port, attn_dp_size=attn_dp_size, flags=flags, context=context,
                                       model_dir=model_dir)
            except ValueError as e:
                print(f"skipped: {e}", flush=True)
                continue
            state, _, layout = run.partition(":")
            print(f"RUN {run} {' '.join(f'{k}={v}' for k, v in env.items())} SGL_CONFIG={cfg} LENS={lens} "
                  f"costs={costs or 'card-record'} OUT={out / model / state} :: {shlex.join(cmd)}", flush=True)
            if not smoke:
                _serve_one(cmd, env, out / model / state, layout, workload, lens)
    kind = "multi" if workload == "multi" else "e2e"
    args = ([str(out), "--gpus", str(gpus), "--out", str(out / f"summary_{gpus}gpu.json")] if kind == "multi"
            else [str(out / m) for m in models] + ["--out", str(out / f"summary_{gpus}gpu.json")])
    print(f"SUMMARY python3 benchmark/sglang_summary.py {kind} {' '.join(args)}", flush=True)
    return 0 if smoke else summary.main([kind, *args])


def _serve_one(cmd: list[str], env: dict[str, str], out: Path, layout: str, workload: str, lens: str) -> None:
    """Start one server, run the client against it, stop it, keep its log and its proof lines."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"server_{layout}.log"
    print(f"=== {out.name}:{layout} {time.strftime('%H:%M:%S', time.gmtime())}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True)
    try:
        port = int(cmd[cmd.index("--port") + 1])
        res = client.run_client(port, layout, workload, lens, float(os.environ.get("E2E_TIMEOUT", "420")),
                                proc.pid, 3)
        (out / f"e2e_{layout}.json").write_text(json.dumps(res, indent=1))
    finally:
        _stop(proc)
    text = log.read_text(errors="replace").splitlines()
    keep = re.compile(r"\[nsa-tp pid=|DSA with TP mode|Enabled DSA context parallel|Traceback|Error")
    proof = [ln for ln in text if keep.search(ln)]
    (out / f"proof_{layout}.txt").write_text("\n".join(proof) + "\n")
    print(f"--- {out.name}:{layout}: {sum('role=scheduler' in ln for ln in proof)} scheduler(s) loaded the plugin",
          flush=True)
    print("\n".join(proof[:20]), flush=True)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, required=True, help="1: servers share one card; 2, 4, 8: one server a time")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="--gpus 1: start the servers")
    st.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    st.add_argument("--dry-run", action="store_true", help="print the launch commands only")
    wt = sub.add_parser("wait", help="--gpus 1: wait until every started server answers (progress lines)")
    wt.add_argument("--timeout", type=float, default=540)
    me = sub.add_parser("measure", help="--gpus 1: one measured round")
    me.add_argument("--timeout", type=float, default=540, help="seconds to wait for the servers")
    me.add_argument("--name", default="", help="results go to $OUT/e2e_1gpu_NAME.json (one name per round)")
    sub.add_parser("stop", help="--gpus 1: stop the servers")
    rn = sub.add_parser("run", help="--gpus 2|4|8: every STATE:LAYOUT, one server at a time, then the summary")
    rn.add_argument("runs", nargs="*")
    rn.add_argument("--workload", choices=("multi", "e2e"), default="multi")
    rn.add_argument("--smoke", action="store_true", help="print each server's command and environment only")
    rn.add_argument("--sglang-version", default=None, help="flag spelling for this SGLang (default: the installed)")
    a = p.parse_args(argv)
    one_gpu = a.cmd in ("start", "wait", "measure", "stop")
    if one_gpu != (a.gpus == 1):
        p.error(f"{a.cmd} is for {'--gpus 1' if one_gpu else '--gpus 2, 4 or 8'}")
    if a.cmd == "start":
        return start(a.specs, a.dry_run)
    if a.cmd == "wait":
        servers = json.loads((STATE / "servers.json").read_text())
        return 0 if len(wait_all(servers, a.timeout)) == len(servers) else 1
    if a.cmd == "measure":
        return measure(a.timeout, a.name)
    if a.cmd == "stop":
        return stop()
    return run_servers(a.gpus, a.runs, a.workload, a.smoke, a.sglang_version)


if __name__ == "__main__":
    raise SystemExit(main())
