"""`nsa-tp bench`: time every tier of every op against upstream's kernel in the same run, on this card.

Per case (op x shape): one row per tier that loads here (Triton, FlashMLA, DeepGEMM, sgl-kernel; the
reference with ``--quick``), the time of upstream's kernel on the same inputs and the ratio, and the tier
``auto`` picks. Writes ``<out>/kernels_<card>_<date>.json`` (card, date, exact command, versions, ceilings,
rows), ``<out>/tuning_<card-slug>.json`` (the tuning table this run implies: copy it to
``python/nsa_tp/ops/measured/`` to make ``auto`` use it, or point ``NSA_TP_TUNING_FILE`` at it) and PNG plots
when matplotlib is installed (``--plot-from FILE.json`` redraws them on another machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
from typing import Any

from nsa_tp.cli import UsageError, int_at_least

__all__ = ["add_arguments", "main", "SECTIONS"]

SECTIONS = ("sparse_mla_fwd", "sparse_mla_decode", "fp8_mqa_logits", "fp8_paged_mqa_logits", "topk")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


DEFAULT_OUT = "benchmark/results"


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (x.lower().split("x") for x in text.split(",") if x)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxWIDTH pairs like 4096x32768,1024x131072, got {text!r}") \
            from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    pos = int_at_least(1)
    p.add_argument("--out", default=None,
                   help=f"folder for the JSON and PNG files (default {DEFAULT_OUT}; with --plot-from: the JSON's)")
    p.add_argument("--heads", type=_ints, default=[16, 32, 64, 128], help="sparse MLA heads per rank")
    p.add_argument("--tokens", type=pos, default=4096, help="sparse MLA / logits query tokens T")
    p.add_argument("--kv-slots", type=pos, default=32768, help="sparse MLA KV rows N")
    p.add_argument("--topk", type=pos, default=2048)
    p.add_argument("--logits-keys", type=_ints, default=[4096, 8192, 16384, 32768, 65536],
                   help="key counts N for the fp8 MQA logits sweep (causal over the last T tokens)")
    p.add_argument("--decode-batches", type=_ints, default=[1, 8, 64, 4096],
                   help="rows per decode-kernel call (SGLang runs fp8 prefill through it: one row per token)")
    p.add_argument("--topk-cases", type=_pairs, default=[(4096, 8192), (4096, 32768), (1024, 131072)],
                   help="top-k cases as ROWSxWIDTH,... (causal rows)")
    p.add_argument("--context", type=pos, default=32768, help="decode context per request")
    p.add_argument("--ops", type=lambda t: [x for x in t.split(",") if x], default=list(SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--sweep", action="store_true", help="also sweep the kernels' launch configs")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run, includes the reference tier)")
    p.add_argument("--plot-from", default=None, metavar="JSON",
                   help="only redraw the PNGs of a results file (needs matplotlib: pip install -e '.[bench]')")
    p.add_argument("--warm-only", action="store_true",
                   help="compile every kernel variant the full run needs (small shapes with the same integer "
                        "specializations), time nothing, write nothing; run it beside other work to hide compiles")


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _plot_from(args: argparse.Namespace) -> int:
    """``--plot-from FILE``: redraw the PNGs of a results JSON into ``--out`` (default: the JSON's folder)."""
    from nsa_tp.bench.plots import plot_results

    src = args.plot_from
    try:
        with open(src) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--plot-from {src}: no such file; pass a kernels_*.json written by `nsa-tp bench`") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--plot-from {src}: not a readable results JSON ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise UsageError(f"--plot-from {src}: not an `nsa-tp bench` results file (no 'rows' list)")
    if not _have_matplotlib():
        print("nsa-tp bench: error: --plot-from needs matplotlib, which is not installed; "
              "pip install -e '.[bench]' (or pip install matplotlib)", file=sys.stderr)
        return 1
    out = args.out if args.out is not None else (os.path.dirname(src) or ".")
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(src))[0]
    written = plot_results(results, out, stem)
    if not written:
        print(f"nsa-tp bench: error: {src} has no measured rows to plot", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _versions() -> dict[str, str | None]:
    import torch

    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "flash_mla", "deep_gemm", "sgl_kernel"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'op':<22} {'tier':<13} {'shape':<40} {'ms':>9} {'upstr ms':>9} {'x upstr':>7} {'TF/s':>7} "
          f"{'GB/s':>7} {'ceil%':>6}  note")
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        frac = None if r["frac_ceiling"] is None else 100 * r["frac_ceiling"]
        print(f"{r['op']:<22} {r['tier']:<13} {shape:<40} {_fmt(r['ms'], '.4f'):>9} "
              f"{_fmt(r.get('upstream_ms'), '.4f'):>9} {_fmt(r.get('vs_upstream'), '.2f'):>7} "
              f"{_fmt(r['useful_tflops'], '.1f'):>7} {_fmt(r['gbps'], '.0f'):>7} {_fmt(frac, '.1f'):>6}  "
              f"{r['note'][:90]}")


def auto_check(rows: list[dict[str, Any]], table: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case: the tier ``table`` makes ``auto`` run, its time over the fastest tier's, and upstream's.

    The evidence for "auto is never more than the margin slower than the fastest tier" in the results JSON.
    """
    from nsa_tp.ops import tuning

    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("class") and r["ms"] is not None:
            cases.setdefault((r["op"], json.dumps(r["shape"], sort_keys=True)), []).append(r)
    out = []
    for (op, shape), rs in cases.items():
        times = {r["tier"]: r["ms"] for r in rs}
        order = tuning.order_from_times(op, table.get(op, {}).get(rs[0]["class"], times))
        chosen = next((t for t in order if t in times), min(times, key=times.get))
        best = min(times, key=times.get)
        up = tuning.UPSTREAM.get(op)
        out.append({"op": op, "shape": json.loads(shape), "class": rs[0]["class"], "auto": chosen,
                    "auto_ms": times[chosen], "fastest": best, "fastest_ms": times[best],
                    "auto_over_fastest": times[chosen] / times[best],
                    "upstream_ms": times.get(up), "auto_vs_upstream": (times[up] / times[chosen]) if up in times
                    else None})
    return out


def main(args: argparse.Namespace) -> int:
    if args.plot_from:
        return _plot_from(args)
    from nsa_tp.bench.plots import plot_results

    unknown = sorted(set(args.ops) - set(SECTIONS))
    if unknown:
        print(f"nsa-tp bench: error: --ops: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if args.out is None:
        args.out = DEFAULT_OUT
    import torch

    if not torch.cuda.is_available():
        print("nsa-tp bench: error: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    from nsa_tp.bench import kernels
    from nsa_tp.bench.timing import Ceilings, measure_ceilings
    from nsa_tp.ops.triton import available

    reason = available()
    if reason:
        print(f"nsa-tp bench: error: the Triton tier cannot run here: {reason}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    card = torch.cuda.get_device_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    T, N, K = args.tokens, args.kv_slots, args.topk
    heads, keys, batches, ctx = args.heads, args.logits_keys, args.decode_batches, args.context
    topk_cases = args.topk_cases
    if args.quick:
        T, N, K, heads, keys, batches, ctx = 256, 4096, 512, [16, 64], [4096], [1, 4], 4096
        topk_cases = [(256, 4096)]

    if args.warm_only:
        # Same divisibility-by-16 pattern as the full shapes, so Triton's on-disk cache hits in the timed run.
        T, N, keys, ctx, topk_cases = 256, 4096, [4096], 2048, [(256, 4096)]
        ceilings = Ceilings(1.0, 1.0, 1.0, ("warm-up run: nothing measured",))
        kernels.median_ms = lambda fn, **_kw: (fn(), 1.0)[1]  # run once (compiles); a dummy 1 ms, never written
    else:
        ceilings = measure_ceilings(device)
    print(f"{card}: bf16 {ceilings.bf16_tflops:.0f} TFLOP/s, fp8 {_fmt(ceilings.fp8_tflops, '.0f')} TFLOP/s, "
          f"copy {ceilings.copy_gbps:.0f} GB/s")
    sections = [
        ("sparse_mla_fwd", lambda: kernels.sparse_mla_rows(T, N, K, heads, ["bf16", "fp8"], ceilings, device,
                                                           with_reference=args.quick)),
        ("sparse_mla_decode", lambda: kernels.decode_rows(batches, heads, ctx, K, ceilings, device)),
        ("fp8_mqa_logits", lambda: kernels.logits_rows(T, keys, 64, 128, ceilings, device,
                                                       with_reference=args.quick)),
        ("fp8_paged_mqa_logits", lambda: kernels.paged_logits_rows([b for b in batches if b <= 64], 64, ctx,
                                                                   ceilings, device)),
        ("topk", lambda: kernels.topk_rows(topk_cases, 2048 if not args.quick else K, ceilings, device)),
    ]
    sections = [sec for sec in sections if sec[0] in args.ops]
    if args.sweep:
        sections.append(("sweep", lambda: kernels.sweep_rows(ceilings, device, T, N, K)))
    stem = f"kernels_{_slug(card)}_{now:%Y%m%d}"
    path = os.path.join(args.out, stem + ".json")
    results: dict[str, Any] = {
        "card": card,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "versions": _versions(),
        "timing": "median of CUDA-event timings (triton.testing.do_bench, L2 cleared between repetitions)",
        "ceilings": ceilings.to_dict(),
        "rows": [],
    }
    if not args.warm_only:
        os.makedirs(args.out, exist_ok=True)
    rows: list[kernels.Row] = []
    for name, run in sections:
        try:
            rows += run()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' numbers
            rows.append(kernels.Row(name, "-", {}, None, note=f"section failed: {type(e).__name__}: {e}"[:300]))
        torch.cuda.empty_cache()
        print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {name} done ({len(rows)} rows so far)",
              flush=True)
        if not args.warm_only:  # rewritten after every section: a run cut short keeps what it measured
            results["rows"] = [r.to_dict() for r in rows]
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    if args.warm_only:
        failed = [r for r in rows if r.ms is None]
        for r in failed:
            print(f"warm-up: {r.op} {r.tier} {r.shape}: {r.note}")
        return 1 if failed else 0
    from nsa_tp.ops import tuning

    table = tuning.table_from_rows(results["rows"])
    results["auto_check"] = auto_check(results["rows"], table)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    tuning_path = os.path.join(args.out, f"tuning_{tuning.card_slug(card)}.json")
    with open(tuning_path, "w") as f:
        json.dump({"card": card, "date": results["date"][:10],
                   "sources": [{"file": os.path.basename(path), "command": results["command"]}],
                   "note": "sums of per-case medians (ms) per op and shape class, from nsa-tp bench",
                   "times": table}, f, indent=1)
    _print_table(results["rows"])
    worst = max(results["auto_check"], key=lambda c: c["auto_over_fastest"], default=None)
    if worst is not None:
        print(f"auto with this run's table: worst case {worst['auto_over_fastest']:.3f}x the fastest tier "
              f"({worst['op']} {worst['shape']}: {worst['auto']} vs {worst['fastest']})")
    print(f"wrote {path}")
    print(f"wrote {tuning_path}")
    for png in plot_results(results, args.out, stem):
        print(f"wrote {png}")
    if not _have_matplotlib():
        print(f"note: no PNG plots (matplotlib is not installed: pip install -e '.[bench]'); draw them later with "
              f"nsa-tp bench --plot-from {path}")
    return 0
