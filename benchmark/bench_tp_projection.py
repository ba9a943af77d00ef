"""Per-rank cost of one DSA attention layer's prefill under ``--tp 2/4/8``, measured on ONE GPU (issue 13).

For each prompt length (``--tokens``: 8K, 32K, 128K; one request, causal, top-k 2048, 64 index heads of
dim 128, DeepSeek-V3.2's 128 attention heads, d_qk 576) and each TP size ``N`` (``--tp``: heads per rank
128/N), the busiest rank's pieces, each timed on this GPU with the fastest kernels ``nsa_tp.ops`` has
(``--backend auto`` prefers DeepGEMM / sgl-kernel / FlashMLA where installed and measured faster):

- ``heads`` (upstream pure TP): the indexer over all ``T`` rows (fp8 MQA logits + top-k, nsa-tp's chunked
  path: row chunks under ``--logits-budget-gb``, each over its key window, exactly the loop of
  ``Indexer.topk_prefill`` without the small q/k projections and the key gather), plus the sparse core for
  the rank's ``128/N`` heads padded as FlashMLA pads them (to 64 on SM90, 128 on SM100: ``--pad-heads``),
  i.e. ``sparse_mla_fwd`` with the padded head count — what upstream executes.
- ``indexer``: the indexer over the busiest rank's rows of :func:`nsa_tp.token_parallel.plan_index_split`
  + the all-gather of ``T x 2048`` int32 ids + ``heads``' sparse core.
- ``tokens``: the indexer and the 128-head sparse core over the busiest rank's rows of the token split
  (:func:`nsa_tp.token_parallel.plan_token_split`, balanced by per-row costs measured in this run: the
  all-rows indexer per (row, key) and a 128-head sparse probe on the prompt's last 4096 rows) + two
  all-to-alls (q ``576`` and o ``512`` bf16 values per row and head).

"Busiest": the first and the last rank of each split are timed (the first holds the most, shortest rows;
the last the fewest, longest) and the larger is kept. The collectives cannot run on one GPU: they are
modeled as ``latency + bytes / bandwidth`` per rank, the bytes being the most any rank sends or receives,
with the latency and bandwidth read from the committed 4xH200 NCCL run (``--comm-json``, default
``benchmark/results/token_parallel_h200x4_20261127.json``, its ``"a2a"`` block: two ``heads_to_tokens``
sizes; bandwidth = the slope between them, latency = the intercept) unless given on the command line. The
all-gather uses the same numbers (it moves ``(N-1)/N`` of the gathered bytes through each rank's links, as
the all-to-all does). The JSON keeps the measured pieces and the modeled ones apart.

Projected per-layer attention time of each strategy = the sum of its pieces; ratios ``tokens/heads`` and
``indexer/heads``; ``x61`` = the attention share of TTFT for DeepSeek-V3.2's 61 layers (the MLPs and
projections are the same under every strategy and not included). A piece whose buffers would not fit in
free GPU memory, or that would start after ``--time-limit-s`` (200 s), is skipped and named in the case's
``"skipped"`` list (the case then has no projection).

Run (the lead, one H200, < 4 minutes):

    PYTHONPATH=python python benchmark/bench_tp_projection.py --out benchmark/results/tp_projection_h200.json

``--smoke``: tiny shapes on CPU with the reference tier (CI runs it: test/srt/test_bench_tp_projection.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

import torch  # noqa: E402

from nsa_tp import ops  # noqa: E402
from nsa_tp.attention.indexer import build_prefill_index_batch  # noqa: E402
from nsa_tp.ops.capability import get_capability  # noqa: E402
from nsa_tp.ops.registry import auto_tier  # noqa: E402
from nsa_tp.parallel.layout import padded_heads  # noqa: E402
from nsa_tp.token_parallel import (  # noqa: E402
    BatchShape,
    causal_key_counts,
    choose,
    plan_index_split,
    plan_token_split,
)
from nsa_tp.token_parallel.policy import DEFAULT_COSTS, TokenParallelCosts, token_costs  # noqa: E402

HEADS, IDX_HEADS, IDX_DIM, D_QK, D_V = 128, 64, 128, 576, 512
LAYERS = 61  # DeepSeek-V3.2's decoder layers
DEFAULT_COMM_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "token_parallel_h200x4_20261127.json")


def _log(msg: str) -> None:
    print(f"[bench_tp_projection {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ comm model


def comm_from_json(path: str) -> dict[str, Any]:
    """Latency (µs) and per-rank bandwidth (GB/s) of an all-to-all, from a bench_token_parallel JSON.

    Its ``"a2a"`` block times ``heads_to_tokens`` at two sizes (``bytes_per_rank``: bytes one rank sends to
    the others). A line through the two points: bandwidth = the slope, latency = the intercept at 0 bytes.
    On the committed 4xH200 run: (452,984,832 - 1,769,472) B / (2.2869 - 0.2425) ms = 220.7 GB/s, and
    0.2425 ms - 1,769,472 B / 220.7 GB/s = 0.2345 ms.
    """
    with open(path) as f:
        data = json.load(f)
    pts = sorted(data["a2a"], key=lambda a: a["bytes_per_rank"])
    small, big = pts[0], pts[-1]
    if big["bytes_per_rank"] <= small["bytes_per_rank"] or big["ms"] <= small["ms"]:
        raise ValueError(f"{path}: the a2a block needs two sizes with growing time, got {pts}")
    gbps = (big["bytes_per_rank"] - small["bytes_per_rank"]) / ((big["ms"] - small["ms"]) * 1e-3) / 1e9
    lat_us = (small["ms"] - small["bytes_per_rank"] / (gbps * 1e9) * 1e3) * 1e3
    return dict(a2a_gbytes_per_s=gbps, a2a_latency_us=lat_us,
                source=f"{os.path.relpath(path)} ({data.get('card')}, x{data.get('world')}, {data.get('date')}): "
                       f"slope and intercept of its two all-to-all sizes")


def collective_ms(nbytes: float, latency_us: float, gbytes_per_s: float) -> float:
    return latency_us / 1e3 + nbytes / (gbytes_per_s * 1e9) * 1e3


def a2a_bytes(splits: tuple[int, ...], heads_per_rank: int, d: int) -> int:
    """The most bytes any rank sends or receives in one regrouping of ``[T, h, d]`` bf16 over ``splits``:
    rank ``r`` sends its heads of the other ranks' rows, ``(T - t_r) h d``, and receives the other ranks'
    heads of its own rows, ``t_r (N-1) h d``."""
    T, n = sum(splits), len(splits)
    return max(max(T - t, t * (n - 1)) for t in splits) * heads_per_rank * d * 2


def gather_bytes(splits: tuple[int, ...], topk: int) -> int:
    """Bytes each rank receives in the ids all-gather: ``N - 1`` blocks of ``max(splits) x topk`` int32."""
    return (len(splits) - 1) * max(splits) * topk * 4


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """Median ms of a callable: CUDA events on a GPU, wall clock on CPU. Repetitions adapt to the call's cost
    (one warm-up, then as many as fit ``target_ms``, 1..``max_reps``) so 128K pieces stay affordable."""

    def __init__(self, device: torch.device, target_ms: float, max_reps: int):
        self.device, self.target_ms, self.max_reps = device, target_ms, max_reps

    def _once(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], object]) -> float:
        first = self._once(fn)  # warm-up: compiles, autotunes, allocates
        reps = max(1, min(self.max_reps, int(self.target_ms / max(first, 1e-3))))
        return statistics.median(self._once(fn) for _ in range(reps))


# ------------------------------------------------------------------------------------------------ inputs


class Prompt:
    """One fresh causal prompt of ``T`` tokens: index queries / keys / weights, the latent KV, and sparse
    indices shaped like the indexer's output (row ``t``: ``min(t + 1, K)`` valid ids in ``[0, t]``)."""

    def __init__(self, T: int, topk: int, device: torch.device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.T, self.topk, self.device = T, topk, device
        self.q8 = torch.randn(T, IDX_HEADS, IDX_DIM, device=device, generator=g).to(torch.float8_e4m3fn)
        self.k8 = torch.randn(T, IDX_DIM, device=device, generator=g).to(torch.float8_e4m3fn)
        self.k_scale = torch.rand(T, device=device, generator=g) + 0.5
        self.weights = torch.randn(T, IDX_HEADS, device=device, generator=g)
        self.kv = torch.randn(T, 1, D_QK, device=device, generator=g).to(torch.bfloat16)
        pos = torch.arange(T, device=device)[:, None]
        col = torch.arange(topk, device=device)[None, :]
        rand = (torch.rand(T, topk, device=device, generator=g) * (pos + 1)).long()  # in [0, t]
        self.indices = torch.where(pos + 1 <= topk, torch.where(col <= pos, col, -1), rand).to(torch.int32)
        self.page_table = torch.arange(-(-T // 64), dtype=torch.int32)[None, :]
        self.keys = causal_key_counts([T], [0])

    def q(self, rows: int, heads: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(rows, heads, D_QK, device=self.device, generator=g, dtype=torch.bfloat16)


def indexer_fn(p: Prompt, rows: range, budget_bytes: int, backend: str) -> Callable[[], torch.Tensor]:
    """nsa-tp's chunked prefill indexer over ``rows`` (logits chunks under the budget, top-k into one buffer)."""
    batch = build_prefill_index_batch([p.T], [0], p.page_table, budget_bytes=budget_bytes, device=p.device,
                                      q_rows=slice(rows.start, rows.stop))
    q8, w = p.q8[rows.start : rows.stop], p.weights[rows.start : rows.stop]
    out = torch.full((len(rows), p.topk), -1, dtype=torch.int32, device=p.device)
    tiers: dict[str, str] = {}

    def run() -> torch.Tensor:
        for c in batch.chunks:
            kv = (p.k8[c.lo : c.hi], p.k_scale[c.lo : c.hi])
            if not tiers:  # the tier each op runs, read from the first chunk's real arguments
                tiers["fp8_mqa_logits"] = _tier(backend, "fp8_mqa_logits", q8[c.rows], kv, w[c.rows], c.row_starts,
                                                c.row_ends)
            logits = ops.fp8_mqa_logits(q8[c.rows], kv, w[c.rows], c.row_starts, c.row_ends, backend=backend)
            topk_kw = dict(row_starts=c.row_starts, lengths=c.lengths, offset_override=c.offsets, check_values=False)
            if "topk_transform_ragged" not in tiers:
                tiers["topk_transform_ragged"] = _tier(backend, "topk_transform_ragged", logits, p.topk, **topk_kw)
            out[c.rows] = ops.topk_transform_ragged(logits, p.topk, backend=backend, **topk_kw)
        return out

    run.tiers = tiers  # type: ignore[attr-defined]
    run.num_chunks = len(batch.chunks)  # type: ignore[attr-defined]
    return run


def sparse_fn(p: Prompt, rows: range, heads: int, sm_scale: float, backend: str) -> Callable[[], torch.Tensor]:
    q = p.q(len(rows), heads)
    idx = p.indices[rows.start : rows.stop].unsqueeze(1)  # [t, 1, K]

    def run() -> torch.Tensor:
        return ops.sparse_mla_fwd(q, p.kv, idx, sm_scale, D_V, backend=backend)[0]

    run.tiers = {"sparse_mla_fwd": _tier(backend, "sparse_mla_fwd", q, p.kv, idx, sm_scale, D_V)}  # type: ignore
    return run


def _tier(backend: str, op: str, *args: Any, **kwargs: Any) -> str:
    return auto_tier(op, *args, **kwargs) if backend == "auto" else backend


def _sparse_bytes(rows: int, heads: int, topk: int) -> int:
    return rows * heads * (D_QK + D_V) * 2 + rows * topk * 4 + rows * heads * 8  # q, out, ids, lse + max


def _indexer_bytes(rows: int, topk: int, budget: int) -> int:
    return rows * topk * 4 + budget + rows * IDX_HEADS * 5  # top-k buffer, one logits chunk, q8 + weights


# ------------------------------------------------------------------------------------------------ the run


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.timer = Timer(device, args.target_ms, args.max_reps)
        self.cache: dict[tuple, float | str] = {}
        self.tiers: dict[tuple, dict[str, str]] = {}  # piece key -> the tier each of its ops ran
        self.budget = int(args.logits_budget_gb * (1 << 30))
        self.sm_scale = D_QK**-0.5
        self.t0 = time.perf_counter()

    def fits(self, nbytes: int) -> str | None:
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        if nbytes > 0.9 * free:
            return f"needs ~{nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return None

    def timed(self, key: tuple, what: str, nbytes: int, make: Callable[[], Callable[[], object]]) -> float | str:
        """ms of the piece (cached by ``key``), or the reason it was skipped."""
        if key in self.cache:
            return self.cache[key]
        why = self.fits(nbytes)
        spent = time.perf_counter() - self.t0
        if spent > self.args.time_limit_s:  # the run must end in time: the rest is named, not measured
            why = f"time limit ({spent:.0f} s > --time-limit-s {self.args.time_limit_s:.0f})"
        if why:
            _log(f"skip {what}: {why}")
            self.cache[key] = f"skipped: {why}"
            return self.cache[key]
        try:
            fn = make()
            ms = self.timer(fn)
            self.tiers[key] = dict(getattr(fn, "tiers", {}))
        except torch.cuda.OutOfMemoryError as e:  # an estimate that was too low: say so, keep going
            _log(f"skip {what}: out of memory ({e})")
            self.cache[key] = "skipped: out of memory"
            return self.cache[key]
        except Exception as e:  # noqa: BLE001 - one run on the card: a piece that fails is named, the rest runs
            _log(f"FAILED {what}: {type(e).__name__}: {e}")
            self.cache[key] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            return self.cache[key]
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        _log(f"{what}: {ms:.3f} ms")
        self.cache[key] = ms
        return ms

    def indexer(self, p: Prompt, rows: range, label: str) -> float | str:
        self.last_key = ("idx", p.T, rows.start, rows.stop)
        return self.timed(self.last_key, f"T={p.T} indexer {label} rows "
                          f"[{rows.start}, {rows.stop})", _indexer_bytes(len(rows), p.topk, self.budget),
                          lambda: indexer_fn(p, rows, self.budget, self.args.backend))

    def sparse(self, p: Prompt, rows: range, heads: int, label: str) -> float | str:
        self.last_key = ("sparse", p.T, rows.start, rows.stop, heads)
        return self.timed(self.last_key, f"T={p.T} sparse core {heads} heads "
                          f"{label} rows [{rows.start}, {rows.stop})", _sparse_bytes(len(rows), heads, p.topk),
                          lambda: sparse_fn(p, rows, heads, self.sm_scale, self.args.sparse_backend))

    def split_costs(self, p: Prompt, indexer_all_ms: float | str) -> TokenParallelCosts:
        """The per-row costs that balance the token split on this card: the indexer per (row, key) from the
        all-rows indexer, the 128-head sparse core per row from a probe on the prompt's last rows (every one
        with a full top-k). Where either was skipped, :data:`DEFAULT_COSTS`."""
        n = min(p.T, 4096)
        probe = self.sparse(p, range(p.T - n, p.T), HEADS, "probe (split costs),")
        if isinstance(probe, str) or isinstance(indexer_all_ms, str):
            return DEFAULT_COSTS
        return dataclasses.replace(
            DEFAULT_COSTS, source="this run: all-rows indexer and a 128-head sparse probe",
            indexer_ns_per_row_key=indexer_all_ms * 1e6 / (p.T * (p.T + 1) / 2),
            sparse_ns_per_token=((HEADS, probe * 1e6 / n),))

    def case(self, p: Prompt, tp: int, comm: dict[str, float]) -> dict[str, Any]:
        a, T, K = self.args, p.T, p.topk
        h = HEADS // tp
        hp = padded_heads(h, a.pad_heads)
        all_rows = range(T)
        pieces: dict[str, Any] = {}
        tiers: dict[str, dict[str, str]] = {}
        pieces["heads_indexer_all_rows"] = self.indexer(p, all_rows, "all")
        tiers["heads_indexer_all_rows"] = self.tiers.get(self.last_key, {})
        pieces["heads_sparse_padded"] = self.sparse(p, all_rows, hp, f"padded {h}->{hp},")
        tiers["heads_sparse_padded"] = self.tiers.get(self.last_key, {})
        isplit = plan_index_split(p.keys, tp)
        split_costs = self.split_costs(p, pieces["heads_indexer_all_rows"])
        tsplit = plan_token_split(T, tp, costs=token_costs(p.keys, split_costs, HEADS))
        ranks = sorted({0, tp - 1})
        idx_rank = {r: self.indexer(p, isplit.rows(r), f"index split rank {r}/{tp}") for r in ranks}
        tok_rank = {r: (self.indexer(p, tsplit.rows(r), f"token split rank {r}/{tp}"),
                        self.sparse(p, tsplit.rows(r), HEADS, f"token split rank {r}/{tp},")) for r in ranks}
        skipped = sorted({v for v in [*pieces.values(), *idx_rank.values(), *(x for t in tok_rank.values() for x in t)]
                          if isinstance(v, str)})
        modeled_bytes = dict(all_gather_ids=gather_bytes(isplit.splits, K),
                             all_to_all_q=a2a_bytes(tsplit.splits, h, D_QK),
                             all_to_all_o=a2a_bytes(tsplit.splits, h, D_V))
        modeled = dict(
            all_gather_ids=collective_ms(modeled_bytes["all_gather_ids"], comm["gather_latency_us"],
                                         comm["gather_gbytes_per_s"]),
            all_to_all_q=collective_ms(modeled_bytes["all_to_all_q"], comm["a2a_latency_us"],
                                       comm["a2a_gbytes_per_s"]),
            all_to_all_o=collective_ms(modeled_bytes["all_to_all_o"], comm["a2a_latency_us"],
                                       comm["a2a_gbytes_per_s"]),
        )
        out: dict[str, Any] = dict(tokens=T, tp=tp, heads_per_rank=h, padded_heads=hp,
                                   index_split=list(isplit.splits), token_split=list(tsplit.splits),
                                   token_split_costs=dict(source=split_costs.source,
                                                          indexer_ns_per_row_key=split_costs.indexer_ns_per_row_key,
                                                          sparse_ns_per_row_128_heads=split_costs.sparse_ns(HEADS)),
                                   modeled_bytes=modeled_bytes, modeled_ms=modeled, skipped=skipped)
        if skipped:
            out.update(measured_ms=pieces, projected_ms=None, ratio=None)
            return out
        ri = max(ranks, key=lambda r: idx_rank[r])
        rt = max(ranks, key=lambda r: tok_rank[r][0] + tok_rank[r][1])
        pieces.update(indexer_index_split=idx_rank[ri], indexer_token_split=tok_rank[rt][0],
                      sparse_all_heads=tok_rank[rt][1])
        tiers["indexer_index_split"] = self.tiers.get(("idx", T, *_ends(isplit.rows(ri))), {})
        tiers["indexer_token_split"] = self.tiers.get(("idx", T, *_ends(tsplit.rows(rt))), {})
        tiers["sparse_all_heads"] = self.tiers.get(("sparse", T, *_ends(tsplit.rows(rt)), HEADS), {})
        out.update(busiest_rank=dict(indexer=ri, tokens=rt), measured_ms=pieces, tiers=tiers)
        heads = pieces["heads_indexer_all_rows"] + pieces["heads_sparse_padded"]
        indexer = pieces["indexer_index_split"] + modeled["all_gather_ids"] + pieces["heads_sparse_padded"]
        tokens = (pieces["indexer_token_split"] + pieces["sparse_all_heads"] + modeled["all_to_all_q"]
                  + modeled["all_to_all_o"])
        proj = dict(heads=heads, indexer=indexer, tokens=tokens)
        out.update(
            projected_ms=proj,
            ratio=dict(tokens_over_heads=tokens / heads, indexer_over_heads=indexer / heads),
            best=min(proj, key=proj.__getitem__),
            attention_ms_x61=dict((k, v * LAYERS) for k, v in proj.items()),
        )
        return out


def _ends(r: range) -> tuple[int, int]:
    return r.start, r.stop


def fitted_costs(cases: list[dict], comm: dict[str, float], card: str, date: str) -> TokenParallelCosts | None:
    """The policy's costs from this run (indexer per row-key and the sparse core per row, at the largest
    prompt measured); the decode fields stay :data:`DEFAULT_COSTS`' (not measured here)."""
    done = [c for c in cases if c["projected_ms"]]
    if not done:
        return None
    T = max(c["tokens"] for c in done)
    big = [c for c in done if c["tokens"] == T]
    m = big[0]["measured_ms"]
    table = {c["padded_heads"]: c["measured_ms"]["heads_sparse_padded"] * 1e6 / T for c in big}
    c0 = big[0]
    rows = c0["token_split"][c0["busiest_rank"]["tokens"]]
    table[HEADS] = c0["measured_ms"]["sparse_all_heads"] * 1e6 / max(rows, 1)
    return TokenParallelCosts(
        card=card, date=date, source=f"bench_tp_projection at T={T}: indexer and sparse core measured on one "
        f"GPU; collectives from {comm['source']}; decode fields from DEFAULT_COSTS",
        indexer_ns_per_row_key=m["heads_indexer_all_rows"] * 1e6 / (T * (T + 1) / 2),
        sparse_ns_per_token=tuple(sorted(table.items())),
        a2a_latency_us=comm["a2a_latency_us"], a2a_gbytes_per_s=comm["a2a_gbytes_per_s"],
        decode_indexer_ns_per_key=DEFAULT_COSTS.decode_indexer_ns_per_key,
        decode_indexer_fixed_us=DEFAULT_COSTS.decode_indexer_fixed_us, gather_merge_us=DEFAULT_COSTS.gather_merge_us,
        gather_latency_us=comm["gather_latency_us"], gather_gbytes_per_s=comm["gather_gbytes_per_s"],
    )


def _table(cases: list[dict]) -> str:
    head = (f"{'T':>7} {'tp':>3} {'h':>3} {'idx all':>9} {'sparse pad':>10} {'idx /N':>8} {'gather':>7} "
            f"{'idx tok':>8} {'sparse128':>9} {'a2a q+o':>8} | {'heads':>9} {'indexer':>9} {'tokens':>9} "
            f"{'tok/hd':>6} {'idx/hd':>6}")
    lines = [head, "-" * len(head)]
    for c in cases:
        m, mod = c["measured_ms"], c["modeled_ms"]
        if not c["projected_ms"]:
            lines.append(f"{c['tokens']:>7} {c['tp']:>3} {c['heads_per_rank']:>3}  skipped: {'; '.join(c['skipped'])}")
            continue
        p, r = c["projected_ms"], c["ratio"]
        lines.append(
            f"{c['tokens']:>7} {c['tp']:>3} {c['heads_per_rank']:>3} {m['heads_indexer_all_rows']:>9.3f} "
            f"{m['heads_sparse_padded']:>10.3f} {m['indexer_index_split']:>8.3f} {mod['all_gather_ids']:>7.3f} "
            f"{m['indexer_token_split']:>8.3f} {m['sparse_all_heads']:>9.3f} "
            f"{mod['all_to_all_q'] + mod['all_to_all_o']:>8.3f} | {p['heads']:>9.3f} {p['indexer']:>9.3f} "
            f"{p['tokens']:>9.3f} {r['tokens_over_heads']:>6.3f} {r['indexer_over_heads']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--backend", default="auto", help="tier of the indexer's logits and top-k (default auto)")
    ap.add_argument("--sparse-backend", default="auto", help="tier of the sparse core (default auto)")
    ap.add_argument("--pad-heads", type=int, default=None,
                    help="FlashMLA's head multiple for the heads strategy (default: this card's, else 64 = SM90)")
    ap.add_argument("--logits-budget-gb", type=float, default=4.0, help="one logits chunk's fp32 bytes at most")
    ap.add_argument("--comm-json", default=DEFAULT_COMM_JSON, help="bench_token_parallel JSON with an a2a block")
    ap.add_argument("--a2a-gbps", type=float, default=None, help="per-rank all-to-all GB/s (default: --comm-json)")
    ap.add_argument("--a2a-latency-us", type=float, default=None, help="all-to-all latency (default: --comm-json)")
    ap.add_argument("--gather-gbps", type=float, default=None, help="all-gather GB/s (default: the all-to-all's)")
    ap.add_argument("--gather-latency-us", type=float, default=None, help="all-gather latency (default: a2a's)")
    ap.add_argument("--target-ms", type=float, default=300.0, help="timed repetitions per piece fill about this")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--time-limit-s", type=float, default=200.0,
                    help="no piece starts after this many seconds (skipped and named instead)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, reference tier (CI)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmark/results/tp_projection_<card>_<yyyymmdd>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens = [t for t in args.tokens if t <= 256] or [64, 160]
        args.topk = min(args.topk, 32)
        # the reference tier unless a tier is named (the CPU test forces one that cannot run here)
        args.backend = "reference" if args.backend == "auto" else args.backend
        args.sparse_backend = "reference" if args.sparse_backend == "auto" else args.sparse_backend
        args.target_ms, args.max_reps = 1.0, 1
        args.logits_budget_gb = 64 * 1024 / 2**30  # 64 KiB: several chunks even at these sizes
    if any(t < 1 for t in args.tokens) or any(n < 1 or HEADS % n for n in args.tp):
        ap.error("--tokens must be positive and --tp must divide 128 heads")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        ap.error("no GPU: this benchmark measures a GPU (use --smoke for the CPU run)")
    cap = get_capability(device)
    if args.pad_heads is None:
        args.pad_heads = cap.flashmla_head_multiple or 64  # upstream's FlashMLA: 64 heads a call on SM90
    comm = comm_from_json(args.comm_json)
    comm["a2a_gbytes_per_s"] = args.a2a_gbps or comm["a2a_gbytes_per_s"]
    comm["a2a_latency_us"] = comm["a2a_latency_us"] if args.a2a_latency_us is None else args.a2a_latency_us
    comm["gather_gbytes_per_s"] = args.gather_gbps or comm["a2a_gbytes_per_s"]
    comm["gather_latency_us"] = comm["a2a_latency_us"] if args.gather_latency_us is None else args.gather_latency_us
    if args.a2a_gbps or args.a2a_latency_us is not None:
        comm["source"] = "command line (" + comm["source"] + " otherwise)"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    if args.out is None:
        slug = "".join(ch if ch.isalnum() else "_" for ch in card.lower()).strip("_")
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"tp_projection_{slug}_{date.replace('-', '')}.json")
    _log(f"{card}: tp {args.tp}, tokens {args.tokens}, top-k {args.topk}, backend {args.backend}/"
         f"{args.sparse_backend}, heads padded to multiples of {args.pad_heads}; collectives modeled at "
         f"{comm['a2a_gbytes_per_s']:.1f} GB/s + {comm['a2a_latency_us']:.1f} us ({comm['source']})")
    t0 = time.perf_counter()
    bench, cases = Bench(args, device), []
    for T in args.tokens:
        p = Prompt(T, args.topk, device)
        for tp in args.tp:
            cases.append(bench.case(p, tp, comm))
            _write(args.out, dict(partial=True, card=card, date=date, command=command, cases=cases))
        del p
        if device.type == "cuda":
            torch.cuda.empty_cache()
    costs = fitted_costs(cases, comm, card, date)
    for c in cases:
        if c["projected_ms"] and costs is not None:  # what the pure choice picks with this run's costs
            c["policy_choice"] = choose(BatchShape(c["tokens"], (c["tokens"] + 1) / 2, c["tokens"], HEADS, c["tp"],
                                                   topk=args.topk), costs)
    elapsed = time.perf_counter() - t0
    table = _table(cases)
    print(table)
    result = dict(
        partial=False, card=card, date=date, command=command,
        torch=torch.__version__, smoke=args.smoke, elapsed_s=elapsed, heads=HEADS, index_heads=IDX_HEADS,
        index_head_dim=IDX_DIM, topk=args.topk, backend=args.backend, sparse_backend=args.sparse_backend,
        pad_heads_multiple=args.pad_heads, logits_budget_bytes=bench.budget,
        comm_model=comm, layers=LAYERS, cases=cases, costs=costs.to_dict() if costs else None,
        notes=["measured_ms: timed on this GPU; modeled_ms: collectives as latency + bytes / bandwidth",
               "projected_ms: heads = heads_indexer_all_rows + heads_sparse_padded; indexer = indexer_index_split"
               " + all_gather_ids + heads_sparse_padded; tokens = indexer_token_split + sparse_all_heads +"
               " all_to_all_q + all_to_all_o",
               "indexer = fp8 logits + top-k (chunked), without the q/k projections and the key gather"],
    )
    _write(args.out, result)
    _log(f"wrote {args.out} ({elapsed:.1f} s)")
    return 0


def _write(path: str, data: dict) -> None:
    """Write the JSON (also after every case, marked ``partial``, so an interrupted run keeps what it had)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
