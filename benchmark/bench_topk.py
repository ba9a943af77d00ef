"""The indexer's top-k (K = 2048) on one GPU: every Triton configuration next to sgl-kernel's ``fast_topk_v2``.

Shapes are issue 12's: 4096 rows x 8K, 4096 x 32K, 1024 x 128K columns (and 4096 x 2K), fresh N(0, 1)
float32 logits, each with *causal* lengths (row ``r`` scores ``(r + 1) * W / R`` keys, like the last R tokens
of a W-token prompt) and *full* lengths (every row scores all W). For each case: the median of CUDA events
over ``--reps`` calls after a warm-up, for every :data:`nsa_tp.ops.triton.topk.VARIANTS` entry and the
tier's default (:data:`~nsa_tp.ops.triton.topk.DEFAULT_BY_WIDTH`), ``sgl_kernel.fast_topk_v2(score,
lengths, topk, row_starts)`` when it imports ('not installed' otherwise), and (``--reference``) the
reference's stable sort. Variants compile first in parallel worker processes.
Every output is checked against the reference with ``topk_mismatch`` before it is timed; a variant that
fails is reported as such, never timed. Writes one JSON to ``--out`` (a file, or a folder to put
``topk_<card>_<date>.json`` in) and prints a table.

    python benchmark/bench_topk.py --out benchmark/results/topk_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from nsa_tp.bench.timing import event_median_ms
from nsa_tp.ops import topk as topk_ref
from nsa_tp.ops.triton import topk as triton_topk

# Issue 12's three shapes, and W = 2048 (every causal row keeps all its keys) to place auto's lower width bound.
SHAPES = ((4096, 8192), (4096, 32768), (1024, 131072), (4096, 2048))



def _compile_one(name: str, has_starts: bool) -> str:
    """Compile one variant in a worker process (fills Triton's on-disk cache; the main process then hits it)."""
    x = torch.randn(4, 4096, device="cuda")
    lengths = torch.full((4,), 4096, dtype=torch.int32, device="cuda")
    starts = torch.zeros(4, dtype=torch.int32, device="cuda") if has_starts else None
    triton_topk.topk_positions(x, 2048, lengths, starts, config=name)
    torch.cuda.synchronize()
    return name


def _precompile(names: list[str]) -> None:
    """Compile every variant, with and without row starts (the tests use both), in parallel processes."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(n, s) for n in names for s in (True, False)]
    with cf.ProcessPoolExecutor(max_workers=min(len(jobs), 16), mp_context=mp.get_context("spawn")) as ex:
        for f in [ex.submit(_compile_one, n, s) for n, s in jobs]:
            try:
                f.result(timeout=300)
            except Exception as e:  # noqa: BLE001 - the timed run reports the error per variant
                print(f"precompile: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)


def _sgl_topk():
    """``sgl_kernel.fast_topk_v2`` or the reason it is missing."""
    try:
        from sgl_kernel import fast_topk_v2
    except Exception as e:  # noqa: BLE001 - a missing or ABI-broken package is a column, not a crash
        return None, f"not installed ({type(e).__name__}: {str(e)[:120]})"
    return fast_topk_v2, None


def _runs(logits, lengths, starts, K, variants, sgl, reference):
    """name -> a call of that implementation on these inputs."""
    runs = {name: (lambda name=name: triton_topk.topk_positions(logits, K, lengths, starts, config=name))
            for name in variants}
    runs["default"] = lambda: triton_topk.topk_positions(logits, K, lengths, starts)
    if sgl is not None and K == 2048:
        runs["sgl_kernel.fast_topk_v2"] = lambda: sgl(logits, lengths, K, starts)
    if reference:
        runs["reference_sort"] = lambda: topk_ref.topk_positions(logits, K, lengths, starts)
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmark/results", help="JSON file, or a folder for an auto-named one")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--shapes", default=",".join(f"{r}x{w}" for r, w in SHAPES), help="RxW,RxW,...")
    p.add_argument("--lengths", default="causal,full")
    p.add_argument("--variants", default=",".join(triton_topk.VARIANTS))
    p.add_argument("--reference", action="store_true", help="also time the reference tier's stable sort")
    p.add_argument("--no-precompile", action="store_true", help="compile in the timed process, one at a time")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_topk: needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.time()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = args.variants.split(",")
    if not args.no_precompile:
        _precompile(variants)
    print(f"compiled in {time.time() - t_start:.0f} s", flush=True)
    sgl, sgl_reason = _sgl_topk()
    K = args.topk
    cases = []
    for R, W in shapes:
        for kind in args.lengths.split(","):
            gen = torch.Generator(device="cuda").manual_seed(R + W)
            logits = torch.randn(R, W, device="cuda", generator=gen)
            if kind == "causal":
                lengths = ((torch.arange(R, device="cuda") + 1) * W // R).int()
            else:
                lengths = torch.full((R,), W, dtype=torch.int32, device="cuda")
            starts = torch.zeros(R, dtype=torch.int32, device="cuda")
            want = topk_ref.topk_positions(logits, K, lengths, starts)

            def value_of(ids, logits=logits, lengths=lengths):
                ok = ids < lengths[:, None].long()
                return torch.where(ok, logits.gather(1, ids.clamp(0, logits.shape[1] - 1)), float("nan"))

            case = {"rows": R, "width": W, "lengths": kind, "topk": K,
                    "mean_length": float(lengths.float().mean()), "ms": {}, "errors": {}}
            for name, fn in _runs(logits, lengths, starts, K, variants, sgl, args.reference).items():
                try:
                    bad = topk_ref.topk_mismatch(fn(), want, value_of)
                    if bad and name != "sgl_kernel.fast_topk_v2":  # ours must be right to be timed
                        case["errors"][name] = bad
                        continue
                    if bad:  # upstream's output convention may differ (e.g. its -1 fill): time it anyway
                        case["upstream_check"] = bad
                    case["ms"][name] = event_median_ms(fn, args.reps if name != "reference_sort" else 3)
                except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
                    case["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            if sgl is None:
                case["ms"]["sgl_kernel.fast_topk_v2"] = sgl_reason
            up = case["ms"].get("sgl_kernel.fast_topk_v2")
            if isinstance(up, float):
                case["ratio_vs_upstream"] = {n: t / up for n, t in case["ms"].items() if isinstance(t, float)}
            tri = {n: t for n, t in case["ms"].items() if n in variants and isinstance(t, float)}
            case["fastest_variant"] = min(tri, key=tri.get) if tri else None
            case["default_config"] = next(n for w, n in triton_topk.DEFAULT_BY_WIDTH if w >= W)
            cases.append(case)
            del logits, want
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc)
    doc = {"benchmark": "bench_topk", "card": card, "date": date.isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "timing": f"CUDA events, median of {args.reps} after warm-up",
           "variants": {n: vars(triton_topk.VARIANTS[n]) for n in variants},
           "programs_per_sm": {n: triton_topk._PER_SM.get((triton_topk.VARIANTS[n], True, torch.cuda.current_device()))
                               for n in variants},
           "default_by_width": triton_topk.DEFAULT_BY_WIDTH, "cases": cases,
           "wall_s": round(time.time() - t_start, 1)}
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"topk_{card.replace(' ', '_')}_{date:%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))

    names = [*variants, "default", "sgl_kernel.fast_topk_v2"] + (["reference_sort"] if args.reference else [])
    print(f"{card}  K={K}  ms (x upstream)")
    print(f"{'case':24s}" + "".join(f"{n[:14]:>16s}" for n in names))
    for c in cases:
        up = c["ms"].get("sgl_kernel.fast_topk_v2")
        cells = []
        for n in names:
            t = c["ms"].get(n)
            if isinstance(t, float):
                cells.append(f"{t:8.3f}" + (f" ({t / up:4.2f})" if isinstance(up, float) else "       "))
            else:
                cells.append("ERROR" if n in c["errors"] else "n/a")
        print(f"{c['rows']}x{c['width']} {c['lengths']:8s}".ljust(24) + "".join(f"{x:>16s}" for x in cells))
        print(f"    fastest variant: {c['fastest_variant']}; default: {c['default_config']}")
        for n, e in c["errors"].items():
            print(f"    {n}: {e}")
        if "upstream_check" in c:
            print(f"    sgl_kernel.fast_topk_v2 output vs the reference: {c['upstream_check']}")
    if sgl is None:
        print(f"sgl_kernel.fast_topk_v2: {sgl_reason}")
    print(f"wrote {out} ({doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
