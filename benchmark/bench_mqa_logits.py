"""Our Triton fp8 MQA logits (ragged prefill and paged decode) next to DeepGEMM's, one GPU, one run.

Each variant (launch shape) of our kernels is first checked against the reference tier (relative error
< 1e-2 over the in-range entries, exactly the same ``-inf`` positions, no NaN); a wrong one is marked FAIL
and not timed. DeepGEMM (``deep_gemm.fp8_mqa_logits`` / ``fp8_paged_mqa_logits``) is timed when it imports,
twice: ``clean_logits=False`` (what SGLang 0.5.17 calls: columns outside ``[ks, ke)`` are left unwritten) and
``clean_logits=True`` (our contract: ``-inf`` there). Ragged cases: causal prefill of the last S tokens of an
N-token context (row t scores keys ``[0, N - S + t + 1)``), 64 heads, D = 128; TFLOP/s count only the
in-range work. Paged cases: one query per request, 32K context, 64 heads; GB/s count the cache bytes read
and the logits written. Times: median of CUDA events after warm-up; the paged ones replay a CUDA graph of
``--graph-calls`` calls (decode runs under CUDA graphs; eager timing would measure the Python launch).

    python benchmark/bench_mqa_logits.py --out benchmark/results/mqa_logits_h200.json

The summary names the fastest correct variant per case: copy it into ``DEFAULT_CONFIG``
(python/nsa_tp/ops/triton/mqa_logits.py) or ``DEFAULT_PAGED_CONFIG`` (paged_mqa_logits.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nsa_tp.bench.timing import event_median_ms
from nsa_tp.ops import reference
from nsa_tp.ops.triton import mqa_logits as ml
from nsa_tp.ops.triton import paged_mqa_logits as pml

C = ml.MQALogitsConfig
# Ragged variants, H = 64 (block_n, block_t, warps, stages[, maxnreg]). Registers / shared memory per
# program from an offline sm_90a compile (Triton 3.6): programs per SM in brackets.
RAGGED_VARIANTS: dict[str, ml.MQALogitsConfig] = {
    "default": ml.DEFAULT_CONFIG,  # kv64x4w4s3 when this was written: 250 regs, 58 KB [2]
    "kv64x4w4s4": C(64, 4, 4, 4),  # 251 regs, 66 KB [2]
    "kv64x2w4s3r128": C(64, 2, 4, 3, maxnreg=128),  # 128 regs + 24 B spilled in the loop, 41 KB [4]
    "kv128x2w4s3": C(128, 2, 4, 3),  # 237 regs, 66 KB [2]
    "kv128x2w4s4": C(128, 2, 4, 4),  # 232 regs, 83 KB [2]
    "kv128x2w8s3r128": C(128, 2, 8, 3, maxnreg=128),  # 128 regs + 24 B spilled, 66 KB [2]
    "kv128x2w8s3": C(128, 2, 8, 3),  # 162 regs [1]
    "kv128x1w4s3": C(128, 1, 4, 3),  # 117 regs, 58 KB [3]
    "kv128x4w8s3": C(128, 4, 8, 3),  # 248 regs [1]
    "kv256x2w8s3": C(256, 2, 8, 3),  # 242 regs, 116 KB [1]
}
P = pml.PagedLogitsConfig
PAGED_VARIANTS: dict[str, pml.PagedLogitsConfig] = {
    "default": pml.DEFAULT_PAGED_CONFIG,  # n128w4 since the 2026-11-29 H200 run (was n256w8)
    "n256w8": P(256, 8),  # 124 regs, 32 KB [2]
    "n64w4": P(64, 4),  # 80 regs, 8 KB: one page a program, the most programs (B=1: 512) [8+]
    "n128w4": P(128, 4),  # 128 regs, 16 KB [4]
    "n256w4": P(256, 4),  # 223 regs [2]
    "n512w8": P(512, 8),  # 224 regs, 64 KB [1]
}
RAGGED_CASES = [(4096, 65536), (4096, 8192), (16384, 32768)]  # (S, N)
PAGED_CASES = [1, 64]  # batch
H, D, CTX = 64, 128, 32768
DEV = torch.device("cuda")



def _graph_ms(fn: Callable[[], Any], reps: int, calls: int) -> tuple[float, str]:
    """Per-call GPU time from a CUDA graph of ``calls`` calls; eager events if capture fails."""
    try:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        return event_median_ms(g.replay, reps) / calls, f"graph of {calls}"
    except Exception as e:  # noqa: BLE001 - report and fall back
        torch.cuda.synchronize()
        return event_median_ms(fn, reps), f"eager (graph failed: {type(e).__name__})"


def check(got: torch.Tensor, want: torch.Tensor, inf_exact: bool = True) -> tuple[bool, float, str]:
    """(ok, rel err over the in-range entries, why not ok)."""
    fin = torch.isfinite(want)
    if torch.isnan(got[fin]).any() or (inf_exact and torch.isnan(got).any()):
        return False, float("nan"), "NaN"
    if inf_exact and not torch.equal(torch.isneginf(got), torch.isneginf(want)):
        bad = (torch.isneginf(got) != torch.isneginf(want)).nonzero()[0].tolist()
        return False, float("nan"), f"-inf positions differ, first at {bad}"
    g, w = got[fin].double(), want[fin].double()
    err = float((g - w).norm() / w.norm().clamp_min(1e-30))
    return err < 1e-2, err, "" if err < 1e-2 else f"rel err {err:.2e}"


def _deep_gemm() -> tuple[Any | None, str]:
    try:
        import deep_gemm  # noqa: PLC0415 - optional

        return deep_gemm, getattr(deep_gemm, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - absent or ABI-mismatched: report, never crash
        return None, f"{type(e).__name__}: {e}"[:200]


def _entry(name: str, cfg: Any, ok: bool, err: float, why: str, ms: float | None, useful: float | None,
           nbytes: float | None, note: str = "") -> dict[str, Any]:
    return {"variant": name, "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg,
            "ok": ok, "rel_err": None if err != err else err, "why": why, "ms": ms,
            "tflops": useful / ms / 1e9 if ms and useful else None,
            "gbps": nbytes / ms / 1e6 if ms and nbytes else None, "note": note}


def ragged_case(S: int, N: int, reps: int, dg: Any, gen: torch.Generator) -> dict[str, Any]:
    dev = DEV
    q = torch.randn(S, H, D, device=dev, generator=gen).to(torch.float8_e4m3fn)
    k = torch.randn(N, D, device=dev, generator=gen).to(torch.float8_e4m3fn)
    k_scale = torch.rand(N, device=dev, generator=gen) + 0.5
    w = torch.randn(S, H, device=dev, generator=gen)
    ke = (torch.arange(S, device=dev, dtype=torch.int32) + (N - S + 1)).clamp(min=0, max=N)
    ks = torch.zeros(S, device=dev, dtype=torch.int32)
    useful = 2.0 * H * D * float((ke - ks).clamp(min=0).sum())
    want = reference.fp8_mqa_logits(q, (k, k_scale), w, ks, ke)
    rows = []
    for name, cfg in RAGGED_VARIANTS.items():
        def fn(cfg: ml.MQALogitsConfig = cfg) -> torch.Tensor:
            return ml.fp8_mqa_logits(q, (k, k_scale), w, ks, ke, config=cfg)
        try:
            ok, err, why = check(fn(), want)
            ms = event_median_ms(fn, reps) if ok else None
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a crash
            ok, err, why, ms = False, float("nan"), f"{type(e).__name__}: {e}"[:300], None
        rows.append(_entry(name, cfg, ok, err, why, ms, useful, None))
        torch.cuda.empty_cache()
    for clean in (False, True):
        name = f"deep_gemm(clean_logits={clean})"
        if dg is None:
            continue
        def dfn(clean: bool = clean) -> torch.Tensor:
            return dg.fp8_mqa_logits(q, (k, k_scale), w, ks, ke, clean_logits=clean)
        try:
            ok, err, why = check(dfn(), want, inf_exact=clean)
            ms = event_median_ms(dfn, reps)  # timed even if our check disagrees: it is the anchor
        except Exception as e:  # noqa: BLE001
            ok, err, why, ms = False, float("nan"), f"{type(e).__name__}: {e}"[:300], None
        rows.append(_entry(name, "upstream", ok, err, why, ms, useful, None))
    del want
    torch.cuda.empty_cache()
    return {"op": "fp8_mqa_logits", "shape": {"S": S, "N": N, "H": H, "D": D, "mask": "causal"},
            "useful_flop": useful, "rows": rows}


def paged_case(B: int, reps: int, calls: int, dg: Any, gen: torch.Generator) -> dict[str, Any]:
    dev = DEV
    pages = CTX // pml.PAGE_SIZE
    Pn = B * pages
    cache = torch.empty(Pn, pml.PAGE_BYTES, dtype=torch.uint8, device=dev)
    cache[:, :8192] = torch.randn(Pn, 8192, device=dev, generator=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    cache[:, 8192:] = (torch.rand(Pn, 64, device=dev, generator=gen) + 0.5).view(torch.uint8)
    page_table = torch.randperm(Pn, device=dev, generator=gen).to(torch.int32).view(B, pages).contiguous()
    seq_lens = torch.full((B,), CTX, dtype=torch.int32, device=dev)
    seq_lens[0] = CTX - 77  # one ragged request (a partial last page)
    q = torch.randn(B, H, D, device=dev, generator=gen).to(torch.float8_e4m3fn)
    w = torch.randn(B, H, device=dev, generator=gen)
    want = reference.fp8_paged_mqa_logits(q, cache, w, seq_lens, page_table, CTX)
    keys = float(seq_lens.sum())
    nbytes = keys * (D + 4) + B * CTX * 4
    useful = 2.0 * H * D * keys
    rows = []
    for name, cfg in PAGED_VARIANTS.items():
        def fn(cfg: pml.PagedLogitsConfig = cfg) -> torch.Tensor:
            return pml.fp8_paged_mqa_logits(q, cache, w, seq_lens, page_table, CTX, config=cfg)
        try:
            ok, err, why = check(fn(), want)
            ms, note = _graph_ms(fn, reps, calls) if ok else (None, "")
        except Exception as e:  # noqa: BLE001
            ok, err, why, ms, note = False, float("nan"), f"{type(e).__name__}: {e}"[:300], None, ""
        rows.append(_entry(name, cfg, ok, err, why, ms, useful, nbytes, note))
    if dg is not None:
        try:
            num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
            lens2d = seq_lens.unsqueeze(-1).contiguous()  # [B, next_n = 1], as SGLang passes it
            meta = dg.get_paged_mqa_logits_metadata(lens2d, pml.PAGE_SIZE, num_sms)
            kv4 = cache.view(Pn, pml.PAGE_SIZE, 1, D + 4)  # SGLang's view of the same pages
            q4 = q.unsqueeze(1).contiguous()  # [B, next_n = 1, H, D]
        except Exception as e:  # noqa: BLE001
            rows.append(_entry("deep_gemm", "upstream", False, float("nan"), f"{type(e).__name__}: {e}"[:300],
                               None, None, None))
        else:
            for clean in (False, True):
                def dfn(clean: bool = clean) -> torch.Tensor:
                    return dg.fp8_paged_mqa_logits(q4, kv4, w, lens2d, page_table, meta, CTX, clean_logits=clean)
                try:
                    ok, err, why = check(dfn(), want, inf_exact=clean)
                    ms, note = _graph_ms(dfn, reps, calls)
                except Exception as e:  # noqa: BLE001
                    ok, err, why, ms, note = False, float("nan"), f"{type(e).__name__}: {e}"[:300], None, ""
                rows.append(_entry(f"deep_gemm(clean_logits={clean})", "upstream", ok, err, why, ms, useful,
                                   nbytes, note))
    return {"op": "fp8_paged_mqa_logits", "shape": {"B": B, "H": H, "D": D, "ctx": CTX}, "useful_flop": useful,
            "bytes": nbytes, "rows": rows}


def _ratios(case: dict[str, Any]) -> None:
    """Ours / DeepGEMM as a speed ratio (>1: we are faster), against both DeepGEMM modes."""
    anchors = {r["variant"]: r["ms"] for r in case["rows"] if r["variant"].startswith("deep_gemm") and r["ms"]}
    for r in case["rows"]:
        r["speed_vs"] = {a: (ms / r["ms"] if r["ms"] else None) for a, ms in anchors.items()}
    ours = [r for r in case["rows"] if not r["variant"].startswith("deep_gemm") and r["ok"] and r["ms"]]
    case["best"] = min(ours, key=lambda r: r["ms"])["variant"] if ours else None


def _print(case: dict[str, Any]) -> None:
    print(f"\n{case['op']} {case['shape']}  best of ours: {case['best']}  ({case['seconds']:.0f} s incl. compiles)")
    print(f"  {'variant':30s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>7s} {'x DG':>6s} {'x DGc':>6s}  check")
    for r in case["rows"]:
        sv = r.get("speed_vs", {})
        dg0, dg1 = sv.get("deep_gemm(clean_logits=False)"), sv.get("deep_gemm(clean_logits=True)")
        f = lambda v, fmt: (fmt % v) if v else "-"  # noqa: E731
        chk = "ok" if r["ok"] else "FAIL " + r["why"]
        err = "-" if r["rel_err"] is None else format(r["rel_err"], ".1e")
        print(f"  {r['variant']:30s} {f(r['ms'], '%8.3f'):>8s} {f(r['tflops'], '%8.1f'):>8s} "
              f"{f(r['gbps'], '%7.0f'):>7s} {f(dg0, '%6.2f'):>6s} {f(dg1, '%6.2f'):>6s}  {chk} {err}"
              + (f" [{r['note']}]" if r.get("note") else ""), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--graph-calls", type=int, default=20)
    p.add_argument("--cases", choices=["all", "ragged", "paged"], default="all")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dg, dg_note = _deep_gemm()
    jit = " (its kernels JIT-compile on first use: the first case's seconds include that)" if dg else ""
    print(f"{torch.cuda.get_device_name()}  deep_gemm: {dg_note if dg is None else 'version ' + dg_note}{jit}",
          flush=True)
    gen = torch.Generator(device=DEV).manual_seed(12)
    cases = []
    if args.cases in ("all", "ragged"):
        for S, N in RAGGED_CASES:
            t0 = time.perf_counter()
            cases.append(ragged_case(S, N, args.reps, dg, gen))
            cases[-1]["seconds"] = time.perf_counter() - t0
            _ratios(cases[-1])
            _print(cases[-1])
    if args.cases in ("all", "paged"):
        for B in PAGED_CASES:
            t0 = time.perf_counter()
            cases.append(paged_case(B, args.reps, args.graph_calls, dg, gen))
            cases[-1]["seconds"] = time.perf_counter() - t0
            _ratios(cases[-1])
            _print(cases[-1])
    import triton  # noqa: PLC0415

    result = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "torch": torch.__version__, "triton": triton.__version__,
        "deep_gemm": dg_note if dg is not None else None, "deep_gemm_missing": None if dg is not None else dg_note,
        "default_config": dataclasses.asdict(ml.DEFAULT_CONFIG),
        "default_paged_config": dataclasses.asdict(pml.DEFAULT_PAGED_CONFIG), "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
