"""The indexer's top-k transform on one GPU: the reference's stable sort, a keyed torch.topk, the Triton kernel.

Causal prefill rows (row ``r`` scores ``r * W / R`` keys, like the last ``R`` tokens of a ``W``-token
prompt), random fp32 logits, K = 2048, for every ``--rows`` x ``--widths``. All three give identical ids
(same total order: logit descending, ties to the lower position); the run checks it. Measured on H100
(2026-11-27) the keyed top-k was 1.2-1.3x *slower* than the sort, so the reference keeps the sort; the
Triton tier's radix-select kernel (:mod:`nsa_tp.ops.triton.topk`) is ranked by these numbers. CUDA events,
median of ``--reps``.

    python benchmark/bench_topk.py --out benchmark/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from nsa_tp.ops import topk as topk_mod
from nsa_tp.ops.triton import topk as triton_topk


def keyed_topk_positions(logits, topk, lengths, row_starts):
    """The alternative: one torch.topk over (logit, position) int64 keys."""
    R, W = logits.shape
    out = torch.full((R, topk), -1, dtype=torch.int32, device=logits.device)
    keep = min(topk, W)
    cols = torch.arange(W, device=logits.device)
    step = max(1, topk_mod._MAX_SORT_ELEMS // W)
    for r0 in range(0, R, step):
        lg = logits[r0 : r0 + step]
        rel = cols[None, :] - row_starts[r0 : r0 + step, None].long()
        ok = (rel >= 0) & (rel < lengths[r0 : r0 + step, None].long()) & (lg > float("-inf"))
        best, _ = torch.topk(topk_mod.order_keys(lg, rel.clamp_min(0), ok), keep, dim=1)
        out[r0 : r0 + step, :keep] = topk_mod.key_positions(best).to(torch.int32)
    return out


def _time(fn, args: tuple, reps: int) -> float:
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4096])
    p.add_argument("--widths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmark/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_topk: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for R, W in [(R, W) for R in args.rows for W in args.widths]:
        logits = torch.randn(R, W, device="cuda")
        lengths = torch.linspace(W / R, W, R, device="cuda").int()
        starts = torch.zeros(R, dtype=torch.int32, device="cuda")
        inputs = (logits, args.topk, lengths, starts)
        want = topk_mod.topk_positions(*inputs)
        same = bool(torch.equal(want, keyed_topk_positions(*inputs)))
        same_triton = bool(torch.equal(want, triton_topk.topk_positions(*inputs)))
        t_old = _time(topk_mod.topk_positions, inputs, args.reps)  # the stable sort the reference uses
        t_new = _time(keyed_topk_positions, inputs, args.reps)
        t_tri = _time(triton_topk.topk_positions, inputs, args.reps)
        rows.append({"rows": R, "width": W, "topk": args.topk, "stable_sort_ms": t_old, "keyed_topk_ms": t_new,
                     "speedup": t_old / t_new, "identical": same, "triton_ms": t_tri,
                     "triton_speedup": t_old / t_tri, "triton_identical": same_triton})
        print(f"R={R:5d} W={W:6d} K={args.topk}: stable sort {t_old:8.3f} ms, keyed top-k {t_new:8.3f} ms "
              f"({t_old / t_new:.2f}x, identical={same}), triton {t_tri:8.3f} ms ({t_old / t_tri:.2f}x, "
              f"identical={same_triton})")
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc)
    doc = {"benchmark": "bench_topk", "card": card, "date": date.isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "torch": torch.__version__,
           "timing": "CUDA events, median", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"topk_{card.replace(' ', '_')}_{date:%Y%m%d}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
