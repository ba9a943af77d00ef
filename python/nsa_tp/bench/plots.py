"""PNG plots from a benchmark JSON (matplotlib is optional: the GPU machines may lack it).

- ``*_sparse_mla.png``: sparse MLA prefill time vs heads per rank, one line per tier and KV format.
- ``*_logits.png``: fp8 MQA logits TFLOP/s vs key count, with the fp8 matmul ceiling of the same run.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["plot_results"]


def plot_results(results: dict[str, Any], out_dir: str, stem: str) -> list[str]:
    """Write the plots next to the JSON; returns the paths written (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[str] = []
    card = results.get("card", "?")
    rows = [r for r in results["rows"] if r["ms"] is not None]

    mla = [r for r in rows if r["op"] == "sparse_mla_fwd" and r["tier"] != "auto"]
    if mla:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in mla:
            if r["tier"] in ("flashmla-raw", "flashmla@64", "flashmla@128"):  # the last two: older result files
                label = "FlashMLA kernel, q pre-padded to 64/128 heads (bf16 KV)"
            elif r["tier"] in ("flashmla", "flashmla-tier"):
                label = "FlashMLA tier = upstream's path: pad, run, trim (bf16 KV)"
            else:
                label = f"{r['tier']} ({r['shape']['kv']} KV)"
            series.setdefault(label, []).append((r["shape"]["H"], r["ms"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        s = mla[0]["shape"]
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 32, 64, 128], ["16\n(TP8)", "32\n(TP4)", "64\n(TP2)", "128\n(TP1)"])
        ax.set_xlabel("heads per rank")
        ax.set_ylabel("time (ms, median)")
        ax.set_title(f"sparse MLA prefill T={s['T']} N={s['N']} K={s['K']} — {card}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, f"{stem}_sparse_mla.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    logits = [r for r in rows if r["op"] == "fp8_mqa_logits" and r["tier"] != "auto" and r.get("useful_tflops")]
    if logits:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for tier in sorted({r["tier"] for r in logits}):
            pts = sorted((r["shape"]["N"], r["useful_tflops"]) for r in logits if r["tier"] == tier)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{tier} (useful TFLOP/s)")
        fp8 = results.get("ceilings", {}).get("fp8_tflops")
        if fp8:
            ax.axhline(fp8, color="gray", ls="--", label=f"fp8 matmul, same run ({fp8:.0f})")
        s = logits[0]["shape"]
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys N (causal, last T tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"fp8 MQA logits T={s['T']} H={s['H']} D={s['D']} — {card}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, f"{stem}_logits.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
