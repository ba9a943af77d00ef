"""`nsa-tp bench`: time every tier of every op against upstream's kernel in the same run, on this card.

Per case (op x shape): one row per tier that loads here (Triton, FlashMLA, DeepGEMM, sgl-kernel; the
reference with ``--quick``), with the tiers that really ran and the time of upstream's kernel on the same
inputs. A row whose label names a tier that did not run alone (a fallback anywhere below the dispatcher) fails
the run before anything is written. The tuning table this run implies is written as
``<measured-dir>/<card-slug>.json`` (default: the package's ``nsa_tp/ops/measured/``, where ``auto`` reads it:
this command is the only writer); then the measured auto check runs every case again with that table, timing
``auto`` itself next to the case's fastest tier, and fails (exit 1, naming the shapes) where ``auto`` is more
than :data:`~nsa_tp.bench.kernels.AUTO_CHECK_TOLERANCE` (3%) slower. Results:
``<out>/kernels_<card>_<date>.json`` (card, date, exact command, versions, ceilings, rows, auto check) and PNG
plots when matplotlib is installed
(``--plot-from FILE.json`` redraws them). ``--costs`` instead measures the card's token-parallel
:class:`~nsa_tp.token_parallel.costs.Costs` record (``<measured-dir>/costs_<card-slug>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
    p.add_argument("--decode-batches", type=_ints, default=[1, 2, 4, 8, 64, 4096],
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
    p.add_argument("--measured-dir", default=None, metavar="DIR",
                   help="where the card's tuning table (or Costs record) goes (default: the package's "
                        "nsa_tp/ops/measured/, which auto reads; --quick: --out)")
    p.add_argument("--costs", action="store_true",
                   help="measure the card's token-parallel Costs record instead of the kernel table "
                        "(kernels via auto; collectives from --comm-json)")
    p.add_argument("--comm-json", default=None, metavar="JSON",
                   help="committed NCCL measurement for the Costs record's collectives "
                        "(default benchmark/results/token_parallel_h200x4_20261127.json)")
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


def auto_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case of the auto pass: ``auto``'s measured time over the fastest tier's, timed back to back.

    ``ok`` is False where ``auto`` is more than :data:`~nsa_tp.bench.kernels.AUTO_CHECK_TOLERANCE` slower or
    either was not timed.
    """
    from nsa_tp.bench.kernels import AUTO_CHECK_TOLERANCE, case_key

    cases: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault(case_key(r["op"], r["shape"]), {})["auto" if r["tier"] == "auto" else "best"] = r
    out = []
    for pair in cases.values():
        auto, best = pair.get("auto"), pair.get("best")
        some = auto or best
        ratio = (auto["ms"] / best["ms"]) if auto and best and auto["ms"] and best["ms"] else None
        out.append({"op": some["op"], "shape": some["shape"], "auto": auto["note"] if auto else "not timed",
                    "auto_ms": auto and auto["ms"], "fastest": best and best["tier"], "fastest_ms": best and best["ms"],
                    "auto_over_fastest": ratio, "ok": ratio is not None and ratio <= 1.0 + AUTO_CHECK_TOLERANCE})
    return out


def _sections(args: argparse.Namespace, ceilings: Any, device: Any) -> list[tuple[str, Any]]:
    from nsa_tp.bench import kernels

    T, N, K = args.tokens, args.kv_slots, args.topk
    heads, keys, batches, ctx, topk_cases = args.heads, args.logits_keys, args.decode_batches, args.context, \
        args.topk_cases
    if args.quick:
        T, N, K, heads, keys, batches, ctx = 256, 4096, 512, [16, 64], [4096], [1, 4], 4096
        topk_cases = [(256, 4096)]
    if args.warm_only:  # same divisibility-by-16 pattern as the full shapes: Triton's disk cache hits later
        T, N, keys, ctx, topk_cases = 256, 4096, [4096], 2048, [(256, 4096)]
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
    return sections


def _run(sections: list[tuple[str, Any]], label: str) -> list[Any]:
    import torch

    from nsa_tp.bench import kernels

    rows: list[Any] = []
    for name, run in sections:
        try:
            rows += run()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' numbers
            rows.append(kernels.Row(name, "-", {}, None, note=f"section failed: {type(e).__name__}: {e}"[:300]))
        torch.cuda.empty_cache()
        print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {label} {name} done ({len(rows)} rows)",
              flush=True)
    return rows


def _fastest(rows: list[dict[str, Any]]) -> dict[str, str]:
    from nsa_tp.bench.kernels import case_key

    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["class"] and r["ms"] is not None:
            k = case_key(r["op"], r["shape"])
            if k not in best or r["ms"] < best[k]["ms"]:
                best[k] = r
    return {k: r["tier"] for k, r in best.items()}


def _setup(args: argparse.Namespace) -> tuple[Any, str] | int:
    """The CUDA device and card name, or an exit code after printing why not."""
    unknown = sorted(set(args.ops) - set(SECTIONS))
    if unknown:
        print(f"nsa-tp bench: error: --ops: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("nsa-tp bench: error: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    from nsa_tp.ops.triton import available

    reason = available()
    if reason:
        print(f"nsa-tp bench: error: the Triton tier cannot run here: {reason}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.get_device_name(device)


def main(args: argparse.Namespace) -> int:
    if args.plot_from:
        return _plot_from(args)
    if args.out is None:
        args.out = DEFAULT_OUT
    setup = _setup(args)
    if isinstance(setup, int):
        return setup
    device, card = setup
    now = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    if args.measured_dir is None:
        from nsa_tp.ops.tuning import MEASURED_DIR

        args.measured_dir = args.out if args.quick else str(MEASURED_DIR)
    if args.costs:
        return _costs_main(args, device, card, now, command)
    return _kernels_main(args, device, card, now, command)


def _costs_main(args: argparse.Namespace, device: Any, card: str, now: Any, command: str) -> int:
    from nsa_tp.bench.costs import default_comm_json, measure_costs
    from nsa_tp.token_parallel.costs import costs_path

    comm = args.comm_json or str(default_comm_json())
    costs = measure_costs(device, card, now.isoformat(timespec="seconds"), command, comm)
    path = costs_path(card, args.measured_dir)
    os.makedirs(path.parent, exist_ok=True)
    record = {"costs": costs.to_dict(), "versions": _versions(),
              "note": "written by `nsa-tp bench --costs` on this card (never by hand): kernel fields measured here "
                      "through backend='auto' (kernels names each one's op, shape and tier); collectives from "
                      "the cited committed NCCL run (one GPU cannot time them)"}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    for k, v in costs.to_dict().items():
        print(f"{k:<26} {v}")
    print(f"wrote {path}")
    return 0


def _kernels_main(args: argparse.Namespace, device: Any, card: str, now: Any, command: str) -> int:
    from nsa_tp.bench import kernels
    from nsa_tp.bench.plots import plot_results
    from nsa_tp.bench.timing import Ceilings, measure_ceilings
    from nsa_tp.ops import tuning

    if args.warm_only:
        ceilings = Ceilings(1.0, 1.0, 1.0, ("warm-up run: nothing measured",))
        kernels.median_ms = lambda fn, **_kw: (fn(), 1.0)[1]  # run once (compiles); a dummy 1 ms, never written
    else:
        ceilings = measure_ceilings(device)
    print(f"{card}: bf16 {ceilings.bf16_tflops:.0f} TFLOP/s, fp8 {_fmt(ceilings.fp8_tflops, '.0f')} TFLOP/s, "
          f"copy {ceilings.copy_gbps:.0f} GB/s")
    sections = _sections(args, ceilings, device)
    rows = _run(sections, "tiers")
    if args.warm_only:
        for r in (r for r in rows if r.ms is None):
            print(f"warm-up: {r.op} {r.tier} {r.shape}: {r.note}")
        return 1 if any(r.ms is None for r in rows) else 0
    if _refuse_mislabelled(rows, "tier rows"):
        return 1
    dicts = [r.to_dict() for r in rows]
    stem = f"kernels_{tuning.card_slug(card)}_{now:%Y%m%d}"
    table = {"card": card, "date": now.date().isoformat(), "command": command,
             "sources": [{"file": stem + ".json", "command": command}],
             "note": "sums of per-case medians (ms) per op and shape class, written by nsa-tp bench (never by hand)",
             "times": tuning.table_from_rows(dicts)}
    auto_rows = _auto_pass(sections, dicts, table)
    if _refuse_mislabelled(auto_rows, "auto rows"):
        return 1
    check = auto_check([r.to_dict() for r in auto_rows])
    results = {"card": card, "date": now.isoformat(timespec="seconds"), "command": command, "versions": _versions(),
               "timing": "median of CUDA-event timings (triton.testing.do_bench, L2 cleared between repetitions)",
               "ceilings": ceilings.to_dict(), "rows": dicts, "auto_rows": [r.to_dict() for r in auto_rows],
               "auto_check": check}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, stem + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    os.makedirs(args.measured_dir, exist_ok=True)
    tuning_path = os.path.join(args.measured_dir, f"{tuning.card_slug(card)}.json")
    with open(tuning_path, "w") as f:
        json.dump(table, f, indent=1)
    _print_table(dicts + [r.to_dict() for r in auto_rows])
    print(f"wrote {path}\nwrote {tuning_path}")
    for png in plot_results(results, args.out, stem):
        print(f"wrote {png}")
    return _report_auto(check)


def _refuse_mislabelled(rows: list[Any], what: str) -> bool:
    from nsa_tp.bench.kernels import mislabelled

    bad = mislabelled(rows)
    for line in bad:
        print(f"nsa-tp bench: error: {what}: {line}", file=sys.stderr)
    if bad:
        print("nsa-tp bench: error: a row ran another tier than its label; nothing written", file=sys.stderr)
    return bool(bad)


def _auto_pass(sections: list[tuple[str, Any]], dicts: list[dict[str, Any]], table: dict[str, Any]) -> list[Any]:
    """Every case again with this run's table loaded: ``auto`` and the case's fastest tier, both timed."""
    import tempfile

    from nsa_tp.bench import kernels
    from nsa_tp.ops import tuning

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(table, f)
    old = os.environ.get(tuning.ENV_TUNING_FILE)
    os.environ[tuning.ENV_TUNING_FILE] = f.name
    tuning.clear_cache()
    try:
        with kernels.auto_pass(_fastest(dicts)):
            return _run(sections, "auto check")
    finally:
        if old is None:
            os.environ.pop(tuning.ENV_TUNING_FILE, None)
        else:
            os.environ[tuning.ENV_TUNING_FILE] = old
        tuning.clear_cache()
        os.unlink(f.name)


def _report_auto(check: list[dict[str, Any]]) -> int:
    from nsa_tp.bench.kernels import AUTO_CHECK_TOLERANCE

    bar = f"{AUTO_CHECK_TOLERANCE:.0%}"
    bad = [c for c in check if not c["ok"]]
    for c in check:
        ratio = "-" if c["auto_over_fastest"] is None else f"{c['auto_over_fastest']:.3f}"
        print(f"auto check {'ok  ' if c['ok'] else 'FAIL'} {c['op']:<22} {json.dumps(c['shape'])}: {ratio}x the "
              f"fastest ({c['auto']}; fastest {c['fastest']})")
    if bad:
        names = "; ".join(f"{c['op']} {json.dumps(c['shape'])}" for c in bad)
        print(f"nsa-tp bench: error: auto is not within {bar} of the fastest tier (timed) on: {names}", file=sys.stderr)
        return 1
    print(f"auto check: all {len(check)} cases within {bar} of the fastest tier, timed")
    return 0
