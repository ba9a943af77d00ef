"""How exact and how repeatable each top-k tier is, against ``torch.topk`` on the same logits (GPU).

Per case (the indexer grid's causal logits, computed by the reference fp8 MQA logits, so exact ties occur as
they do in serving) and tier, over ``--calls`` calls: the rows whose selected logit values (sorted) differ from
the exact top-k's, the largest gap between a row's exact and selected k-th values, and how many calls differ
from the first. Writes ``--out`` JSON (card, date, command, rows) and prints one line per (case, tier).

    PYTHONPATH=/tmp/site:python python3 benchmark/topk_exactness.py --out /tmp/out/topk_exactness.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "srt"))
from test_indexer_grid import (  # noqa: E402 - the grid's own inputs and exactness helpers
    TOPK,
    exact_topk_values,
    logits_inputs,
    ragged_ranges,
    selected_values,
)

from nsa_tp import ops  # noqa: E402


def measure(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, tier: str, calls: int) -> dict:
    lengths = (ke - ks).to(torch.int32)
    exact = exact_topk_values(logits, ks, ke, TOPK)
    first = None
    rows_off, gap, calls_differ = set(), 0.0, 0
    for _ in range(calls):
        ids = ops.topk_transform_ragged(logits, TOPK, row_starts=ks, lengths=lengths, backend=tier)
        got = selected_values(logits, ids)
        off = (got != exact).any(dim=1).nonzero().flatten().tolist()
        rows_off.update(off)
        fin = torch.isfinite(exact[:, -1])
        gap = max(gap, float((exact[:, -1] - got[:, -1])[fin].abs().max()) if fin.any() else 0.0)
        if first is None:
            first = got
        elif not torch.equal(got, first):
            calls_differ += 1
    return {"tier": tier, "calls": calls, "rows": logits.shape[0], "rows_not_exact": len(rows_off),
            "first_rows_not_exact": sorted(rows_off)[:8], "max_kth_value_gap": gap,
            "calls_differing_from_first": calls_differ}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="2048x8192,8192x8192,2048x65536,8192x65536", help="SxN, comma-separated")
    p.add_argument("--tiers", default="triton,sgl_kernel")
    p.add_argument("--calls", type=int, default=21)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for case in args.cases.split(","):
        S, N = (int(x) for x in case.split("x"))
        q, kv, w = logits_inputs(S, N, 64, 128, seed=S + N, device="cuda")
        ks, ke = ragged_ranges(S, N, "causal", "cuda")
        logits = ops.fp8_mqa_logits(q, kv, w, ks, ke, backend="reference")
        for tier in args.tiers.split(","):
            r = {"S": S, "N": N, **measure(logits, ks, ke, tier, args.calls)}
            print(json.dumps(r), flush=True)
            rows.append(r)
        del q, kv, w, logits
        torch.cuda.empty_cache()
    out = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "command": shlex.join(sys.argv), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
