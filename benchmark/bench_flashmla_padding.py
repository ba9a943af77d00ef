"""The padding-waste table: FlashMLA's sparse prefill at the per-rank head counts of TP1/2/4/8.

FlashMLA runs 64 heads (SM90) or 128 (SM100+) per call, so a rank with 128 / tp heads is zero-padded up to
that multiple. This times the FlashMLA tier (pad + kernel + trim, what ``nsa_tp.ops.sparse_mla_fwd`` runs)
and the raw kernel at the padded count, at DeepSeek-V3.2 prefill sizes (T=4096 queries, N=32768 cached
tokens, top-k 2048), and reports executed vs useful TFLOP/s next to the card's measured bf16 matmul ceiling.

    python benchmark/bench_flashmla_padding.py --out benchmark/results/flashmla_padding.json
    python benchmark/bench_flashmla_padding.py --plot benchmark/results/flashmla_padding.json   # PNG, no GPU

Flop count per (query, head): ``2 * K * 576`` for q.k plus ``2 * K * 512`` for p.v. Useful flops count the
real heads, executed flops the padded heads. Bytes (the least a kernel must move): q and out of the real
heads, the K gathered kv rows of each query (bf16, 576 values), the indices, the two fp32 stats.
Timing: CUDA events around each call, median over ``--reps`` after ``--warmup`` calls. One kv buffer of
N=32768 rows (38 MB) is reused, as in the anchor measurement; it fits the H100's 50 MB L2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

D_QK, D_V = 576, 512
ANCHOR_MS = {64: 1.94, 128: 4.17}  # H100, sgl-flash-mla 1.0.0, T=4096 N=32768 K=2048 (DESIGN.md)


def _ceilings(warmup: int, reps: int) -> dict[str, float]:
    """The card's measured bf16 matmul rate and device-to-device copy bandwidth, in this run."""
    import torch

    from nsa_tp.bench.timing import event_median_ms

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = event_median_ms(lambda: a @ b, reps, warmup)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cp_ms = event_median_ms(lambda: dst.copy_(src), reps, warmup)
    return {
        "bf16_matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "copy_gbps": 2 * src.numel() / cp_ms / 1e6,  # bytes read + written
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from nsa_tp.bench.timing import event_median_ms
    from nsa_tp.ops import flashmla
    from nsa_tp.ops.capability import get_capability
    from nsa_tp.ops.heads import pad_heads
    from nsa_tp.parallel.layout import padded_heads

    reason = flashmla._available()
    if reason:
        raise SystemExit(f"FlashMLA tier unavailable: {reason}")
    cap = get_capability(torch.cuda.current_device())
    multiple = cap.flashmla_head_multiple
    if multiple is None:
        raise SystemExit(f"{cap.name} is {cap.sm_label}: no FlashMLA sparse kernel")
    fm = flashmla._flash_mla()
    T, N, K = args.tokens, args.kv, args.topk
    sm_scale = 1 / math.sqrt(D_QK)
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(N, 1, D_QK, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = torch.randint(0, N, (T, 1, K), device="cuda", dtype=torch.int32, generator=gen)

    ceil = _ceilings(args.warmup, args.reps)
    print(f"# {cap.name} ({cap.sm_label}, {cap.num_sms} SMs): bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_gbps']:.0f} GB/s; T={T} N={N} K={K}, median of {args.reps}")
    print(f"{'tp':>3} {'heads':>5} {'padded':>6} {'tier ms':>8} {'kernel ms':>9} {'exec TF/s':>9} {'useful TF/s':>11} "
          f"{'useful/ceil':>11} {'GB/s':>7} {'waste':>6}")
    cases = []
    flop_per_qh = 2 * K * (D_QK + D_V)
    for tp, heads in ((1, 128), (2, 64), (4, 32), (8, 16)):
        hp = padded_heads(heads, multiple)
        q = torch.randn(T, heads, D_QK, device="cuda", dtype=torch.bfloat16, generator=gen)
        q_p, _ = pad_heads(q, multiple)
        tier_ms = event_median_ms(lambda q=q: flashmla.sparse_mla_fwd(q, kv, idx, sm_scale), args.reps, args.warmup)
        kernel_ms = event_median_ms(lambda q_p=q_p: flashmla._prefill_kernel(q_p, kv, idx, sm_scale),
                                    args.reps, args.warmup)
        useful, executed = T * heads * flop_per_qh, T * hp * flop_per_qh
        nbytes = T * (heads * (D_QK + D_V) * 2 + K * D_QK * 2 + K * 4 + heads * 8)
        case = {
            "tp": tp,
            "heads_per_rank": heads,
            "padded_heads": hp,
            "tier_ms": tier_ms,
            "kernel_ms": kernel_ms,
            "useful_tflops": useful / tier_ms / 1e9,
            "executed_tflops": executed / kernel_ms / 1e9,
            "useful_fraction_of_matmul_ceiling": useful / tier_ms / 1e9 / ceil["bf16_matmul_tflops"],
            "gbps": nbytes / tier_ms / 1e6,
            "waste_fraction": 1 - heads / hp,
            "anchor_ms": ANCHOR_MS.get(hp),
        }
        cases.append(case)
        print(f"{tp:>3} {heads:>5} {hp:>6} {tier_ms:>8.3f} {kernel_ms:>9.3f} {case['executed_tflops']:>9.0f} "
              f"{case['useful_tflops']:>11.0f} {case['useful_fraction_of_matmul_ceiling']:>11.1%} "
              f"{case['gbps']:>7.0f} {case['waste_fraction']:>6.0%}")
    # A padded call costs what a full call of the padded size costs: time / time of the unpadded call of that size.
    full = {c["padded_heads"]: c["tier_ms"] for c in cases if c["heads_per_rank"] == c["padded_heads"]}
    for c in cases:
        c["time_vs_full_call"] = c["tier_ms"] / full[c["padded_heads"]] if c["padded_heads"] in full else None

    # The fact the padding exists for: the raw kernel refuses the unpadded TP8 head count.
    rejected = {}
    q16 = torch.randn(T, 16, D_QK, device="cuda", dtype=torch.bfloat16, generator=gen)
    try:
        fm.flash_mla_sparse_fwd(q16, kv, idx, sm_scale, D_V, use_legacy=True)
        torch.cuda.synchronize()
        rejected["16"] = None
    except Exception as e:  # noqa: BLE001 - recording the kernel's own message is the point
        rejected["16"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"# raw kernel at 16 heads: {rejected['16'] or 'accepted'}")

    return {
        "benchmark": "flashmla_padding",
        "card": cap.name,
        "sm": cap.sm_label,
        "num_sms": cap.num_sms,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "flash_mla": getattr(fm, "__version__", "?"),
        "shape": {"T": T, "N": N, "K": K, "d_qk": D_QK, "d_v": D_V},
        "timing": {"method": "CUDA events per call, median", "warmup": args.warmup, "reps": args.reps},
        "ceilings": ceil,
        "head_multiple": multiple,
        "anchor_ms_h100": ANCHOR_MS,
        "cases": cases,
        "raw_kernel_rejects": rejected,
    }


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        res = json.load(f)
    cases = res["cases"]
    labels = [f"TP{c['tp']}\n{c['heads_per_rank']}->{c['padded_heads']} heads" for c in cases]
    x = range(len(cases))
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.bar(x, [c["tier_ms"] for c in cases], color="#4c72b0")
    for i, c in enumerate(cases):
        ax_t.text(i, c["tier_ms"], f"{c['tier_ms']:.2f}", ha="center", va="bottom", fontsize=8)
    ax_t.set_xticks(list(x), labels, fontsize=8)
    ax_t.set_ylabel("ms per call (median)")
    ax_t.set_title("FlashMLA sparse prefill per rank")
    w = 0.38
    ax_f.bar([i - w / 2 for i in x], [c["executed_tflops"] for c in cases], w,
             label="executed (padded heads / kernel time)", color="#8c8c8c")
    ax_f.bar([i + w / 2 for i in x], [c["useful_tflops"] for c in cases], w, label="useful (real heads / tier time)",
             color="#dd8452")
    ax_f.axhline(res["ceilings"]["bf16_matmul_tflops"], ls="--", lw=1, color="k", label="bf16 matmul (measured)")
    ax_f.set_ylim(0, res["ceilings"]["bf16_matmul_tflops"] * 1.3)  # headroom: the legend sits above the line
    ax_f.set_xticks(list(x), labels, fontsize=8)
    ax_f.set_ylabel("TFLOP/s")
    ax_f.set_title("executed vs useful work")
    ax_f.legend(fontsize=8, loc="upper right")
    s = res["shape"]
    fig.suptitle(f"{res['card']} ({res['sm']}), sgl-flash-mla {res['flash_mla']}, T={s['T']} N={s['N']} K={s['K']}, "
                 f"{res['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--plot", metavar="JSON", help="make the PNG from an existing results JSON (no GPU)")
    p.add_argument("--png", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--kv", type=int, default=32768)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png or os.path.splitext(args.plot)[0] + ".png")
        return
    res = run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
