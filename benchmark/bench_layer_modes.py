"""Batch-1 prefill latency of the DeepSeek-V3.2 attention layer: pure TP vs DP attention (NCCL).

One request of T tokens (default 8192 and 32768, no cached prefix) through the attention layer alone
(q/kv projections, indexer, sparse MLA, o_proj and the attention-TP all-reduce) at the real dims, on
``--world`` GPUs in every layout of that size: pure TP (``--tp W``: H/W heads a rank), partial DP attention
(``--tp W --dp D --enable-dp-attention``) and full DP attention (``--dp W``: one rank serves the request with
all 128 heads while the other groups run padding rows). Per rank: CUDA-event median of ``--iters`` runs
after ``--warmup``; the layout's latency is the slowest rank's median. Upstream reports pure TP several
times faster than DP attention at batch 1; this measures it.

Writes ``<out>/layer_modes_<card>_<date>.json`` (card, date, command, versions, rows) and a PNG when
matplotlib is installed. Run on the GPU host (NVLS off)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmark/bench_layer_modes.py --world 2
    # or: torchrun --nproc-per-node 2 benchmark/bench_layer_modes.py --world 2

``--smoke`` runs tiny dims on CPU with gloo (checks the script, times nothing meaningful) and writes into a
temp folder unless ``--out`` is given. Without GPUs and without ``--smoke`` it refuses (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, time_cases
from nsa_tp.parallel.launch import NCCL_ENV, launch, under_torchrun


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def layouts_for(world: int) -> list[tuple[int, int, bool]]:
    """Pure TP, every partial DP attention split with >= 2 ranks a group, full DP attention."""
    out = [(world, 1, False)]
    d = 2
    while d < world:
        out.append((world, d, True))
        d *= 2
    if world > 1:
        out.append((world, world, True))
    return out


def _label(case: RunCase) -> str:
    lay = case.layout()
    if lay.mode == "pure_tp":
        return f"TP{lay.tp_size}"
    return f"DP{lay.attn_dp_size}xTP{lay.attn_tp_size}" if lay.attn_tp_size > 1 else f"DP{lay.attn_dp_size}"


def _plot(doc: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = doc["rows"]
    tokens = sorted({r["tokens"] for r in rows})
    labels = list(dict.fromkeys(r["layout"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        ys = [next((r["latency_ms"] for r in rows if r["layout"] == lab and r["tokens"] == t), 0.0) for t in tokens]
        xs = [i + j * width for i in range(len(tokens))]
        bars = ax.bar(xs, ys, width, label=lab)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(tokens))], [f"{t // 1024}K" for t in tokens])
    ax.set_xlabel("prefill tokens (batch 1)")
    ax.set_ylabel("attention layer latency, ms (slowest rank)")
    ax.set_title(f"DeepSeek-V3.2 attention layer, {doc['world']} x {doc['card']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=None, help="ranks (default: the visible GPUs)")
    p.add_argument("--tokens", type=_ints, default=None, help="prefill lengths (default 8192,32768; smoke: 128)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--kv-cache-dtype", default="bfloat16", choices=("bfloat16", "fp8_e4m3"))
    p.add_argument("--backend", default="auto", help="kernel tier for every op")
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default benchmark/results; --smoke: a temp folder, never "
                        "beside the published results)")
    p.add_argument("--smoke", action="store_true", help="tiny dims on CPU/gloo: checks the script only")
    args = p.parse_args(argv)

    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world or int(os.environ.get("WORLD_SIZE", 0)) or gpus
    if not args.smoke and (world < 1 or gpus < world):
        print(f"bench_layer_modes: error: needs {world or 'some'} CUDA GPUs (NCCL), {gpus} visible; on CPU use --smoke "
              "(tiny dims, checks the script, times nothing meaningful)", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="nsa-tp-smoke-") if args.smoke else "benchmark/results"
    cfg = NSAConfig()
    if args.smoke:
        cfg = cfg.replace(hidden_size=256, q_lora_rank=128, num_attention_heads=32, index_topk=64)
        world = args.world or 2
    if args.tokens is None:
        args.tokens = [128] if args.smoke else [8192, 32768]
    cases = [
        RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, cfg=cfg, requests=(Request(0, t),), decode_steps=0,
                kv_cache_dtype=args.kv_cache_dtype, backend=args.backend, seed=0)
        for t in args.tokens for (tp, dp, dpa) in layouts_for(world)
    ]
    comm = "gloo, CPU smoke run" if args.smoke else "NCCL"
    print(f"bench_layer_modes: {len(cases)} cases on {world} ranks ({comm}); results -> {args.out}",
          file=sys.stderr, flush=True)
    per_rank = launch(time_cases, world, (cases, args.warmup, args.iters, True),
                      backend="gloo" if args.smoke else "nccl", timeout_s=3600)
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return 0
    rows = []
    for k, case in enumerate(cases):
        ranks = [per_rank[r][k] for r in range(world)]
        lay = case.layout()
        rows.append({
            "layout": _label(case), "mode": lay.mode, "tokens": case.requests[0].new_len,
            "heads_per_rank": lay.heads_per_rank, "attn_tp": lay.attn_tp_size, "attn_dp": lay.attn_dp_size,
            "latency_ms": max(r["median_ms"] for r in ranks), "rank_median_ms": [r["median_ms"] for r in ranks],
            "rank_times_ms": [r["times_ms"] for r in ranks], "padded_rows": [r["num_padded"] - r["num_tokens"]
                                                                           for r in ranks],
            "peak_mem_mb": [r["peak_mem_mb"] for r in ranks],
        })
    card = torch.cuda.get_device_name(0) if gpus and not args.smoke else "cpu-smoke"
    date = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "benchmark": "bench_layer_modes", "card": card, "world": world, "comm": "gloo" if args.smoke else "nccl",
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "torch": torch.__version__, "cuda": torch.version.cuda, "kv_cache_dtype": args.kv_cache_dtype,
        "backend": args.backend, "warmup": args.warmup, "iters": args.iters,
        "config": cfg.to_dict(), "timing": "CUDA events, median per rank; latency = slowest rank",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layer_modes_{re.sub(r'[^A-Za-z0-9]+', '_', card).strip('_')}_x{world}_{date:%Y%m%d}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    png = _plot(doc, out / f"{stem}.png")
    base = {t: next(r["latency_ms"] for r in rows if r["tokens"] == t and r["mode"] == "pure_tp")
            for t in args.tokens}
    print(f"{'layout':9s} {'tokens':>7s} {'heads/rank':>10s} {'latency ms':>11s} {'vs pure TP':>10s}")
    for r in rows:
        print(f"{r['layout']:9s} {r['tokens']:7d} {r['heads_per_rank']:10d} {r['latency_ms']:11.2f} "
              f"{r['latency_ms'] / base[r['tokens']]:9.2f}x")
    print(f"wrote {out / (stem + '.json')}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
