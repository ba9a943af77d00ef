"""`nsa-tp run`: the sharded DeepSeek-V3.2 attention layer in every layout this machine allows, checked.

With no arguments: a DeepSeek-V3.2-shaped layer (128 heads, real head dims; on CPU a smaller hidden size
and top-k so it stays quick) and a batch of 3 requests of uneven lengths, one with a cached prefix:
prefix fill, a measured prefill, then decode steps. It runs one rank holding everything (the reference),
then every layout the hardware allows — up to the GPU count with NCCL, else 2 and 4 gloo ranks on CPU —
compares each layout's output with the reference per request, and prints a table (progress on stderr).
Each layout runs its batch once untimed first (compiles, allocator, caches), then the timed run. The table
ends with a footer that explains the columns and one PASS/FAIL line naming the worst layout.
``--tp/--attn-dp-size`` (or ``--tp/--dp/--enable-dp-attention``) pick one layout. Exit code 0 PASS, 1 if any
layout misses the tolerance, 2 for a flag that cannot work (one line naming the flag and the fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nsa_tp.cli import UsageError, add_layout_args, int_at_least, layout_from_args
from nsa_tp.config import NSAConfig
from nsa_tp.model.core import CORE_MODES
from nsa_tp.model.runner import CaseResult, Request, RunCase, compare_results, run_layouts
from nsa_tp.ops.capability import card_name
from nsa_tp.token_parallel.costs import load_costs
from nsa_tp.token_parallel.policy import BatchShape, choose

__all__ = ["add_arguments", "main", "default_layouts", "default_requests", "case_strategies", "verdict", "COLUMNS"]

TOLERANCE = 1e-2  # bf16: relative error per request


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_args(p, tp_default=None)
    p.add_argument("--prompt-len", type=int_at_least(4, " (3 requests of uneven lengths)"), default=None,
                   help="longest request's new tokens (default 160 on CPU, 4096 on GPU); the others are shorter")
    p.add_argument("--decode-steps", type=int_at_least(0), default=4)
    p.add_argument("--hidden-size", type=_hidden_size, default=None,
                   help="model width, a multiple of 128 (default 512 on CPU, 7168 = DeepSeek-V3.2's on GPU)")
    p.add_argument("--topk", type=int_at_least(1), default=None,
                   help="indexer top-k (default 64 on CPU, 2048 on GPU)")
    p.add_argument("--heads", type=int_at_least(1), default=128,
                   help="attention heads of the layer (DeepSeek-V3.2: 128)")
    p.add_argument("--model-path", default=None,
                   help="a HF checkpoint folder (config.json + *.safetensors): real weights")
    p.add_argument("--layer", type=int_at_least(0), default=0, help="which layer's weights to load with --model-path")
    p.add_argument("--core", default="heads", help="attention core strategy (nsa_tp.model.core; default heads)")
    p.add_argument("--backend", default="auto", help="kernel tier: auto | reference | triton | flashmla")
    p.add_argument("--max-ranks", type=int_at_least(1), default=None,
                   help="largest world size to try when no --tp is given (default: GPUs, else 4)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def _hidden_size(text: str) -> int:
    # DeepSeek's widths are multiples of its 128x128 fp8 weight block (7168 = 56 x 128); a smaller layer for
    # CPU keeps that shape, and a width like 7 (accepted silently before) is almost surely a typo.
    value = int_at_least(128)(text)
    if value % 128:
        raise argparse.ArgumentTypeError(f"must be a multiple of 128 (DeepSeek-V3.2: 7168), got {value}")
    return value


def default_requests(prompt_len: int) -> tuple[Request, ...]:
    """3 uneven requests: a long fresh prompt, a shorter one behind a cached prefix, a short one."""
    if prompt_len < 4:
        raise UsageError(f"--prompt-len must be at least 4, got {prompt_len}")
    return (
        Request(0, prompt_len),
        Request(prompt_len // 2, prompt_len // 3 + 1),  # half a prompt already cached (a radix-cache hit)
        Request(0, prompt_len // 5 + 3),
    )


def default_layouts(max_ranks: int) -> list[tuple[int, int, bool]]:
    """``(tp, dp, enable_dp_attention)`` for world sizes 2, 4, 8 up to ``max_ranks``: pure TP, partial DP
    attention (every split with 2+ ranks per group) and full DP attention."""
    out: list[tuple[int, int, bool]] = []
    n = 2
    while n <= max_ranks:
        out.append((n, 1, False))
        d = 2
        while d < n:
            out.append((n, d, True))
            d *= 2
        out.append((n, n, True))
        n *= 2
    return out


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    fmt: Callable[[dict[str, Any]], str]


# The table's columns, in order; another mode adds a column by appending here (e.g. token-parallel's split).
COLUMNS: list[Column] = [
    Column("layout", lambda r: r["layout"]),
    Column("mode", lambda r: r["mode"]),
    Column("ranks", lambda r: str(r["ranks"])),
    Column("heads/rank", lambda r: str(r["heads_per_rank"])),
    Column("core", lambda r: r["core"]),
    # what the attention TP group splits, prefill/decode: heads (pure TP), tokens or keys (token-parallel)
    Column("split pre/dec", lambda r: r["split"]),
    Column("DP pad rows", lambda r: str(r["pad_rows"])),
    Column("max rel err", lambda r: f"{r['max_rel_err']:.1e}" + ("" if r["ok"] else " FAIL")),
    Column("prefill ms", lambda r: f"{r['prefill_ms']:.1f}"),
    Column("decode ms/step", lambda r: f"{r['decode_ms']:.1f}"),
    Column("peak MiB", lambda r: f"{r['peak_mem_mb']:.0f}"),
]


class Progress:
    """A one-line bar on stderr (redrawn in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width, self.t0 = total, 0, width, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, what: str) -> None:
        self.show(f"running {what}")

    def advance(self, what: str) -> None:
        self.done += 1
        self.show(what)
        if self.done == self.total and self.tty:
            sys.stderr.write("\n")

    def show(self, what: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s {what}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100)[:100])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def case_strategies(case: RunCase) -> str:
    """What a :class:`~nsa_tp.model.runner.RunCase`'s core splits over the attention TP group, as
    ``"<prefill>/<decode>"`` per attention DP group (distinct values joined by ``,``): ``heads`` (pure TP),
    ``indexer``, ``tokens`` or ``keys``; ``-`` for a core that is not token-parallel aware. The same pure
    policy the core runs (``choose`` with this machine's measured costs), for the run table."""
    if case.core not in CORE_MODES:
        return "-"
    lay = case.layout()
    mode = CORE_MODES[case.core]
    costs = load_costs(card_name())[0]
    seen: list[str] = []
    for reqs in case.groups_of_requests(lay.attn_dp_size):
        if not reqs:
            continue  # an idle attention DP group runs no core
        rs = [case.requests[i] for i in reqs]
        keys = [r.prefix_len + i + 1 for r in rs for i in range(r.new_len)]
        pre = choose(BatchShape.of(lay, len(keys), sum(keys) / len(keys), max(keys)), costs, mode).strategy
        ctx = [r.prefix_len + r.new_len + 1 for r in rs]
        dec = choose(BatchShape.of(lay, len(rs), sum(ctx) / len(ctx), max(ctx), is_decode=True), costs, mode).strategy
        if f"{pre}/{dec}" not in seen:
            seen.append(f"{pre}/{dec}")
    return ",".join(seen) or "-"


def _row(case: RunCase, ranks: list[CaseResult], ref: CaseResult) -> dict[str, Any]:
    lay = case.layout()
    err = compare_results(ref, ranks[0])
    return {
        "layout": case.label(), "mode": lay.mode, "ranks": lay.world_size, "tp": case.tp, "dp": case.dp,
        "enable_dp_attention": case.enable_dp_attention, "heads_per_rank": lay.heads_per_rank, "core": case.core,
        "split": case_strategies(case),
        "pad_rows": sum(r.pad_rows for r in ranks), "prefill_rel_err": err["prefill"], "decode_rel_err": err["decode"],
        "max_rel_err": err["max"], "ok": err["max"] < TOLERANCE,
        # the slowest rank bounds the step; memory is per rank
        "prefill_ms": max(r.prefill_ms for r in ranks), "decode_ms": max(r.decode_ms for r in ranks),
        "peak_mem_mb": max(r.peak_mem_mb for r in ranks), "device": ranks[0].device,
    }


def _format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[c.header for c in COLUMNS]] + [[c.fmt(r) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_core(name: str) -> None:
    from nsa_tp.model import core as core_mod

    # Cores registered so far, and those whose modules register themselves on first use.
    known = sorted(set(core_mod.ATTENTION_CORES) | set(getattr(core_mod, "_PLUGIN_CORES", {})))
    if name not in known:
        raise UsageError(f"--core {name!r}: unknown attention core; use one of {', '.join(known)}")


def _check_backend(name: str) -> None:
    """A forced tier must exist and run on this machine; checked here, before any rank starts."""
    if name == "auto":
        return
    from nsa_tp.ops.registry import BackendUnavailableError, get_tier, tier_names

    if name not in tier_names():
        raise UsageError(f"--backend {name!r}: unknown kernel tier; use auto or one of {', '.join(tier_names())}")
    try:
        get_tier(name)
    except BackendUnavailableError as e:
        raise UsageError(f"--backend {name}: cannot run on this machine ({e}); use --backend auto (it picks a "
                         "tier that runs here) or --backend reference") from None


def _model_paths(model_path: str, layer: int) -> tuple[str, str]:
    """``--model-path`` -> (where its config.json is, where its weights are), refusing what cannot work."""
    from nsa_tp.model.weights import check_checkpoint

    path = Path(model_path)
    if path.is_file() and path.suffix == ".json":
        raise UsageError(f"--model-path {path}: `nsa-tp run` loads real weights, so it needs the checkpoint "
                         f"folder (config.json + *.safetensors), not the config file; pass --model-path "
                         f"{path.parent} (or drop --model-path for random weights)")
    check_checkpoint(path, layer)  # WeightsError (a ConfigError) names a missing, empty or unreadable checkpoint
    return (str(path.parent) if path.is_file() else str(path)), str(path)


def _plan(args: argparse.Namespace, gpus: int) -> tuple[NSAConfig, tuple[Request, ...], list[RunCase], RunCase]:
    """Config, batch, the layouts' cases and the reference case from the flags (ValueError names the flag)."""
    on_gpu = gpus > 0
    _check_core(args.core)
    _check_backend(args.backend)
    weights_path = None
    if args.model_path:
        if args.hidden_size is not None or args.heads != 128:
            raise UsageError("--hidden-size/--heads: the checkpoint's config.json sets them with --model-path; "
                             "drop them")
        config_path, weights_path = _model_paths(args.model_path, args.layer)
        cfg = NSAConfig.from_hf_config(config_path)
    else:
        cfg = NSAConfig(
            hidden_size=args.hidden_size or (7168 if on_gpu else 512),
            q_lora_rank=1536 if on_gpu else 256,  # CPU: a smaller q_lora keeps the 2-core run under 2 minutes
            num_attention_heads=args.heads,
        )
    cfg = cfg.replace(index_topk=args.topk if args.topk is not None else (cfg.index_topk if on_gpu else 64))
    requests = default_requests(args.prompt_len if args.prompt_len is not None else (4096 if on_gpu else 160))
    if args.tp is not None:
        if args.max_ranks is not None:
            raise UsageError("--max-ranks picks the layouts to try when no --tp is given; drop one of them")
        lay = layout_from_args(args, cfg.num_attention_heads)  # LayoutError names the flag to change
        # --dp without --enable-dp-attention: independent replicas of one --tp layout; one replica is run.
        layouts = [(lay.tp_size, 1 if lay.num_replicas > 1 else lay.dp_size, lay.enable_dp_attention)]
    else:
        layouts = default_layouts(args.max_ranks if args.max_ranks is not None else (gpus if on_gpu else 4))
    one_rank = {"tp": 1, "dp": 1, "enable_dp_attention": False, "attn_dp_size": None}
    kv = layout_from_args(argparse.Namespace(**{**vars(args), **one_rank}), cfg.num_attention_heads).kv_cache_dtype

    # --nsa-token-parallel on (with the default core) runs the token-parallel core, forced on
    core = "token_parallel_on" if args.core == "heads" and args.nsa_token_parallel == "on" else args.core

    def case(tp: int, dp: int, dpa: bool) -> RunCase:
        return RunCase(
            tp=tp, dp=dp, enable_dp_attention=dpa, cfg=cfg, requests=requests, decode_steps=args.decode_steps,
            kv_cache_dtype=kv, seed=args.seed, core=core if tp > 1 or dpa else "heads",
            backend=args.backend, weights_path=weights_path, layer_index=args.layer, warmup=True,
        )

    cases = [case(*lo) for lo in layouts]
    for c in cases:
        need = c.layout().world_size
        if on_gpu and need > gpus:
            raise UsageError(f"--tp {c.tp}: {c.label()} needs {need} GPUs, {gpus} visible; use a smaller --tp/--dp")
    return cfg, requests, cases, case(1, 1, False)


def main(args: argparse.Namespace) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus > 0
    try:
        cfg, requests, cases, ref_case = _plan(args, gpus)
    except ValueError as e:  # bad flags: one line naming the flag, exit 2 (as `nsa-tp plan` does)
        print(f"nsa-tp run: error: {e}", file=sys.stderr)
        return 2
    kv = ref_case.kv_cache_dtype
    replicas = args.dp if args.tp is not None and not args.enable_dp_attention and args.dp > 1 else 1
    progress = Progress(len(cases) + 1)
    progress.step("TP1 reference (one rank holds everything)")
    ref = run_layouts([ref_case], 1)[0]
    rows = [_row(ref_case, ref, ref[0])]
    progress.advance("TP1 reference")
    for c in cases:
        progress.step(c.label())
        res = run_layouts([c], c.layout().world_size)[0]
        rows.append(_row(c, res, ref[0]))
        progress.advance(c.label())

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "nsa-tp run " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["run"] else " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "comm": "nccl" if on_gpu else "gloo",
        "config": {k: v for k, v in cfg.to_dict().items() if k in (
            "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "index_topk")},
        "requests": [dataclasses.asdict(r) for r in requests], "decode_steps": args.decode_steps,
        "kv_cache_dtype": kv, "tolerance": TOLERANCE, "replicas": replicas,
        "replica_gpus": args.tp if args.tp is not None else None, "warmup": "one untimed run of the same batch",
        "peak_memory": "torch.cuda.max_memory_allocated" if on_gpu else "process peak RSS (includes torch itself)",
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        c0 = meta["config"]
        print(f"DeepSeek-V3.2 attention layer: {c0['num_attention_heads']} heads, hidden {c0['hidden_size']}, "
              f"q_lora {c0['q_lora_rank']}, latent {c0['kv_lora_rank']}+{c0['qk_rope_head_dim']}, top-k "
              f"{c0['index_topk']}, {kv} KV cache; {meta['device']}, {meta['comm']}")
        print("batch: " + ", ".join(f"{r.new_len} new" + (f" + {r.prefix_len} cached" if r.prefix_len else "")
                                    for r in requests) + f" tokens; then {args.decode_steps} decode steps")
        print(_format_table(rows))
        print(_footer(meta, replicas))
        print(verdict(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def _footer(meta: dict[str, Any], replicas: int) -> str:
    """What the columns mean (printed under the table)."""
    lines = [
        "layout: TPn = pure TP over n ranks; DPaxTPb = a attention groups of b ranks (--attn-dp-size a, or "
        "--dp a --enable-dp-attention); "
        "DPa = full DP attention. ranks: processes run here (one per GPU; gloo processes on CPU).",
        "heads/rank: attention heads each rank computes. split pre/dec: what the attention TP group splits in "
        "prefill/decode (heads = pure TP; tokens or keys = token-parallel).",
        "DP pad rows: dummy token rows the ranks computed, summed over ranks and steps, because under DP attention "
        "every group pads its tokens to the largest group's count (the MLP sync); 0 without DP attention.",
        f"max rel err: worst request's ||out - TP1|| / ||TP1|| over prefill and decode (pass < {TOLERANCE}).",
        "prefill ms, decode ms/step: the layer alone on the slowest rank, after a warm-up run of the same batch "
        f"(timed once: a sanity figure, not a benchmark). peak MiB: {meta['peak_memory']}, per rank.",
    ]
    if replicas > 1:
        lines.append(f"--dp {replicas} without --enable-dp-attention = {replicas} replicas of this layout "
                     f"(independent copies, {replicas} x {meta['replica_gpus']} GPUs); one replica is run.")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str:
    """One PASS/FAIL line naming the worst layout (the exit code follows it: 0 PASS, 1 FAIL)."""
    others = rows[1:] or rows  # row 0 is the reference itself (error 0 by construction)
    worst = max(others, key=lambda r: r["max_rel_err"])
    failed = [r["layout"] for r in rows if not r["ok"]]
    head = (f"FAIL: {len(failed)} of {len(rows)} layouts miss the tolerance ({', '.join(failed)})" if failed
            else f"PASS: {len(rows)} layouts match one rank holding everything")
    return f"{head}; worst {worst['layout']} at {worst['max_rel_err']:.1e} (tolerance {TOLERANCE:.0e})"
