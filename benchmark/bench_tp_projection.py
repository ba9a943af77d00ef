"""Per-rank cost of one DSA attention layer's prefill under ``--tp 2/4/8``, measured on ONE GPU (issues 13, 20).

Per prompt length (``--tokens``: 8K, 32K, 128K; one request, causal, top-k 2048, 64 index heads x 128, 128
heads, d_qk 576) and TP size ``N`` (``128/N`` heads a rank), the busiest rank's pieces, timed on this GPU:

- ``heads`` (upstream pure TP) runs **upstream's kernels as SGLang 0.5.17-0.5.23 calls them**: the chunked
  indexer over all ``T`` rows with DeepGEMM's ``fp8_mqa_logits`` (``deep_gemm`` tier) and sgl-kernel's
  ``fast_topk_transform_ragged_fused`` called directly with SGLang's arguments, plus the sparse core for the
  rank's heads through the ``flashmla`` tier (pad to FlashMLA's multiple, run, trim). Every piece records the
  tiers that ran; a ``heads`` piece that ran anything else fails the run and no JSON is written. (``--smoke`` on
  CPU, where the wheel is absent, takes the ``sgl_kernel`` tier; the tests install stand-ins under upstream's
  names.)
- ``indexer``: the indexer (``--backend``, default ``auto``) over the busiest rank's rows of
  :func:`nsa_tp.token_parallel.plan_index_split` + the all-gather of ``T x 2048`` int32 ids + ``heads``' core.
- ``tokens``: the indexer and the 128-head sparse core (``auto``) over the busiest rank's rows of the token split
  (weighted by the card's Costs record) + two all-to-alls (q ``576``, o ``512`` bf16 values a row and head).

The first and the last rank of each split are timed, the larger kept. Collectives use the one collective model
(:mod:`nsa_tp.token_parallel.costs`) with the latency and bandwidth of the card's Costs record (``--costs FILE``,
default ``load_costs``; without one, the committed NCCL run the record cites); with a record each case also
carries :func:`nsa_tp.token_parallel.choose`'s choice and predicted ms. Projected attention time per layer =
the sum of each strategy's pieces; ratios against ``heads``; ``x61`` for DeepSeek-V3.2's layers. A piece that
would not fit in free memory, fails, or would start after ``--time-limit-s`` is named in ``"skipped"``.

Run (one H100 or H200, < 4 minutes; /tmp/site holds flash_mla, deep_gemm, sgl_kernel; or benchmark/gpu_costs.sh):

    PYTHONPATH=/tmp/site:python python benchmark/bench_tp_projection.py --out /tmp/out/tp_projection.json
"""

from __future__ import annotations

import argparse
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
from nsa_tp.bench.costs import collectives_from_nccl_run, default_comm_json  # noqa: E402
from nsa_tp.bench.upstream import tiers_of, upstream_violations  # noqa: E402
from nsa_tp.bench_cmd import _versions  # noqa: E402
from nsa_tp.ops.capability import get_capability  # noqa: E402
from nsa_tp.ops.registry import record_tiers  # noqa: E402
from nsa_tp.ops.tuning import UPSTREAM  # noqa: E402 - the kernels the heads pieces must run
from nsa_tp.parallel.layout import padded_heads  # noqa: E402
from nsa_tp.token_parallel import BatchShape, causal_key_counts, choose, plan_index_split, plan_token_split  # noqa: E402
from nsa_tp.token_parallel.costs import Costs, a2a_bytes, collective_ms, gather_bytes, load_costs  # noqa: E402
from nsa_tp.token_parallel.policy import token_costs  # noqa: E402

HEADS, IDX_HEADS, IDX_DIM, D_QK, D_V = 128, 64, 128, 576, 512
LAYERS = 61  # DeepSeek-V3.2's decoder layers
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
UPSTREAM_TOPK = "sgl_kernel.fast_topk_transform_ragged_fused"  # what SGLang's DSA indexer calls for extend


def _log(msg: str) -> None:
    print(f"[bench_tp_projection {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)



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

    def __call__(self, fn: Callable[[], object]) -> tuple[float, list[tuple[str, str]]]:
        """(median ms, the (op, tier) pairs the warm-up call dispatched)."""
        with record_tiers() as calls:
            first = self._once(fn)  # warm-up: compiles, autotunes, allocates
        reps = max(1, min(self.max_reps, int(self.target_ms / max(first, 1e-3))))
        return statistics.median(self._once(fn) for _ in range(reps)), calls



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


def _upstream_topk() -> Callable[..., torch.Tensor] | None:
    """sgl-kernel's fused ragged top-k transform, the call SGLang's DSA indexer makes for extend batches."""
    try:
        import sgl_kernel
    except Exception:  # noqa: BLE001 - absent (CPU smoke): the caller says what ran instead
        return None
    return getattr(sgl_kernel, "fast_topk_transform_ragged_fused", None)


def indexer_fn(p: Prompt, rows: range, budget_bytes: int, backend: str) -> Callable[[], torch.Tensor]:
    """nsa-tp's chunked prefill indexer over ``rows`` (logits chunks under the budget, top-k into one buffer).

    ``backend="upstream"``: DeepGEMM's logits (``deep_gemm`` tier) and sgl-kernel's fused ragged transform called
    directly as SGLang calls it (on CPU, where the wheel is absent, the ``sgl_kernel`` tier); ``run.direct``
    names the kernels called without the dispatcher."""
    batch = build_prefill_index_batch([p.T], [0], p.page_table, budget_bytes=budget_bytes, device=p.device,
                                      q_rows=slice(rows.start, rows.stop))
    q8, w = p.q8[rows.start : rows.stop], p.weights[rows.start : rows.stop]
    out = torch.full((len(rows), p.topk), -1, dtype=torch.int32, device=p.device)
    fused = _upstream_topk() if backend == "upstream" and p.device.type == "cuda" else None
    logits_tier = "deep_gemm" if backend == "upstream" else backend
    topk_tier = "sgl_kernel" if backend == "upstream" else backend

    def run() -> torch.Tensor:
        for c in batch.chunks:
            kv = (p.k8[c.lo : c.hi], p.k_scale[c.lo : c.hi])
            logits = ops.fp8_mqa_logits(q8[c.rows], kv, w[c.rows], c.row_starts, c.row_ends, backend=logits_tier)
            if fused is not None:
                out[c.rows] = fused(score=logits, lengths=c.lengths, topk_indices_offset=c.offsets, topk=p.topk,
                                    row_starts=c.row_starts)
            else:
                out[c.rows] = ops.topk_transform_ragged(logits, p.topk, row_starts=c.row_starts, lengths=c.lengths,
                                                        offset_override=c.offsets, check_values=False,
                                                        backend=topk_tier)
        return out

    run.direct = {"topk_transform_ragged": UPSTREAM_TOPK} if fused is not None else {}  # type: ignore[attr-defined]
    if backend == "upstream" and fused is None and p.device.type == "cuda":
        raise RuntimeError(f"{UPSTREAM_TOPK} is not importable: install sglang-kernel (the heads baseline must be "
                           "upstream's kernel)")
    return run


def sparse_fn(p: Prompt, rows: range, heads: int, sm_scale: float, backend: str) -> Callable[[], torch.Tensor]:
    q = p.q(len(rows), heads)
    idx = p.indices[rows.start : rows.stop].unsqueeze(1)  # [t, 1, K]

    def run() -> torch.Tensor:
        return ops.sparse_mla_fwd(q, p.kv, idx, sm_scale, D_V, backend=backend)[0]

    return run


def _sparse_bytes(rows: int, heads: int, topk: int) -> int:
    return rows * heads * (D_QK + D_V) * 2 + rows * topk * 4 + rows * heads * 8  # q, out, ids, lse + max


def _indexer_bytes(rows: int, topk: int, budget: int) -> int:
    return rows * topk * 4 + budget + rows * IDX_HEADS * 5  # top-k buffer, one logits chunk, q8 + weights



class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, costs: Costs | None,
                 comm: dict[str, Any]):
        self.args, self.device, self.costs, self.comm = args, device, costs, comm
        self.timer = Timer(device, args.target_ms, args.max_reps)
        self.cache: dict[tuple, float | str] = {}
        self.tiers: dict[tuple, dict[str, str]] = {}  # piece key -> the tier each of its ops ran
        self.budget = int(args.logits_budget_gb * (1 << 30))
        self.sm_scale = D_QK**-0.5
        self.t0 = time.perf_counter()

    def fits(self, nbytes: int) -> str | None:
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else float("inf")
        return f"needs ~{nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free" if nbytes > 0.9 * free else None

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
            ms, calls = self.timer(fn)
            self.tiers[key] = tiers_of(calls, getattr(fn, "direct", {}))
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

    def indexer(self, p: Prompt, rows: range, label: str, backend: str) -> float | str:
        self.last_key = ("idx", p.T, rows.start, rows.stop, backend)
        return self.timed(self.last_key, f"T={p.T} indexer {label} rows [{rows.start}, {rows.stop}) ({backend})",
                          _indexer_bytes(len(rows), p.topk, self.budget),
                          lambda: indexer_fn(p, rows, self.budget, backend))

    def sparse(self, p: Prompt, rows: range, heads: int, label: str, backend: str) -> float | str:
        self.last_key = ("sparse", p.T, rows.start, rows.stop, heads, backend)
        return self.timed(self.last_key, f"T={p.T} sparse core {heads} heads {label} rows [{rows.start}, "
                          f"{rows.stop}) ({backend})", _sparse_bytes(len(rows), max(heads, self.args.pad_heads),
                                                                     p.topk),
                          lambda: sparse_fn(p, rows, heads, self.sm_scale, backend))

    def case(self, p: Prompt, tp: int) -> dict[str, Any]:
        a, T, K, costs = self.args, p.T, p.topk, self.costs
        h = HEADS // tp
        pieces: dict[str, Any] = {}
        tiers: dict[str, dict[str, str]] = {}
        pieces["heads_indexer_all_rows"] = self.indexer(p, range(T), "all", "upstream")
        tiers["heads_indexer_all_rows"] = self.tiers.get(self.last_key, {})
        pieces["heads_sparse_padded"] = self.sparse(p, range(T), h, f"{h} (FlashMLA pads to {a.pad_heads}),",
                                                    "flashmla")
        tiers["heads_sparse_padded"] = self.tiers.get(self.last_key, {})
        isplit = plan_index_split(p.keys, tp)
        tsplit = plan_token_split(T, tp, costs=token_costs(p.keys, costs, HEADS))
        ranks = sorted({0, tp - 1})
        idx_rank = {r: self.indexer(p, isplit.rows(r), f"index split rank {r}/{tp}", a.backend) for r in ranks}
        tok_rank = {r: (self.indexer(p, tsplit.rows(r), f"token split rank {r}/{tp}", a.backend),
                        self.sparse(p, tsplit.rows(r), HEADS, f"token split rank {r}/{tp},", a.sparse_backend))
                    for r in ranks}
        skipped = sorted({v for v in [*pieces.values(), *idx_rank.values(), *(x for t in tok_rank.values() for x in t)]
                          if isinstance(v, str)})
        modeled_bytes, modeled = _modeled(isplit.splits, tsplit.splits, h, K, self.comm)
        out: dict[str, Any] = dict(tokens=T, tp=tp, heads_per_rank=h, padded_heads=padded_heads(h, a.pad_heads),
                                   index_split=list(isplit.splits), token_split=list(tsplit.splits),
                                   modeled_bytes=modeled_bytes, modeled_ms=modeled, skipped=skipped, tiers=tiers)
        if costs is not None:  # the decider's own view of this batch, next to the measurement
            plan = choose(BatchShape(T, (T + 1) / 2, T, HEADS, tp, topk=K), costs)
            out.update(policy_choice=plan.strategy,
                       predicted_ms={s: v["total"] for s, v in plan.predicted.items()})
        if skipped:
            out.update(measured_ms=pieces, projected_ms=None, ratio=None)
            return out
        ri = max(ranks, key=lambda r: idx_rank[r])
        rt = max(ranks, key=lambda r: tok_rank[r][0] + tok_rank[r][1])
        pieces.update(indexer_index_split=idx_rank[ri], indexer_token_split=tok_rank[rt][0],
                      sparse_all_heads=tok_rank[rt][1])
        ir, tr = isplit.rows(ri), tsplit.rows(rt)
        tiers["indexer_index_split"] = self.tiers.get(("idx", T, ir.start, ir.stop, a.backend), {})
        tiers["indexer_token_split"] = self.tiers.get(("idx", T, tr.start, tr.stop, a.backend), {})
        tiers["sparse_all_heads"] = self.tiers.get(("sparse", T, tr.start, tr.stop, HEADS, a.sparse_backend), {})
        out.update(busiest_rank=dict(indexer=ri, tokens=rt), measured_ms=pieces)
        heads = pieces["heads_indexer_all_rows"] + pieces["heads_sparse_padded"]
        indexer = pieces["indexer_index_split"] + modeled["all_gather_ids"] + pieces["heads_sparse_padded"]
        tokens = (pieces["indexer_token_split"] + pieces["sparse_all_heads"] + modeled["all_to_all_q"]
                  + modeled["all_to_all_o"])
        proj = dict(heads=heads, indexer=indexer, tokens=tokens)
        out.update(projected_ms=proj, ratio=dict(tokens_over_heads=tokens / heads, indexer_over_heads=indexer / heads),
                   best=min(proj, key=proj.__getitem__), attention_ms_x61={k: v * LAYERS for k, v in proj.items()})
        return out


def _modeled(isplit: tuple[int, ...], tsplit: tuple[int, ...], h: int, K: int,
             comm: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """Bytes and ms of the three collectives, by the one collective model (nsa_tp.token_parallel.costs)."""
    nbytes = dict(all_gather_ids=gather_bytes(isplit, K * 4), all_to_all_q=a2a_bytes(tsplit, h, D_QK),
                  all_to_all_o=a2a_bytes(tsplit, h, D_V))
    gather = (comm["gather_latency_us"], comm["gather_gbytes_per_s"])
    a2a = (comm["a2a_latency_us"], comm["a2a_gbytes_per_s"])
    return nbytes, {k: collective_ms(b, *(gather if k == "all_gather_ids" else a2a)) for k, b in nbytes.items()}


HEADS_OPS = {"heads_indexer_all_rows": ("fp8_mqa_logits", "topk_transform_ragged"),
             "heads_sparse_padded": ("sparse_mla_fwd",)}


def heads_violations(cases: list[dict[str, Any]]) -> list[str]:
    """Every heads piece that ran something other than upstream's kernel, or failed (upstream's kernel missing
    or refusing is no baseline). Pieces skipped for the time or memory limit are named in their case instead."""
    out = []
    for c in cases:
        for piece, ops_ in HEADS_OPS.items():
            where, got = f"T={c['tokens']} tp={c['tp']} {piece}", c["measured_ms"].get(piece)
            if isinstance(got, str) and got.startswith("failed"):
                out.append(f"{where}: upstream's kernel did not run ({got[:200]})")
            elif isinstance(got, float):
                out += upstream_violations(where, c["tiers"].get(piece, {}), ops_,
                                           {"topk_transform_ragged": UPSTREAM_TOPK})
    return out


def _table(cases: list[dict]) -> str:
    cols = [("idx all", "heads_indexer_all_rows"), ("sparse pad", "heads_sparse_padded"),
            ("idx /N", "indexer_index_split"), ("gather", "all_gather_ids"), ("idx tok", "indexer_token_split"),
            ("sparse128", "sparse_all_heads"), ("a2a q", "all_to_all_q"), ("a2a o", "all_to_all_o")]
    head = (f"{'T':>7} {'tp':>3} {'h':>3} " + " ".join(f"{n:>10}" for n, _ in cols) + " | "
            + " ".join(f"{n:>9}" for n in ("heads", "indexer", "tokens", "tok/hd", "idx/hd")))
    lines = [head, "-" * len(head)]
    for c in cases:
        m = {**c["measured_ms"], **c["modeled_ms"]}
        row = f"{c['tokens']:>7} {c['tp']:>3} {c['heads_per_rank']:>3} "
        if not c["projected_ms"]:
            lines.append(row + f" skipped: {'; '.join(c['skipped'])}")
            continue
        p, r = c["projected_ms"], c["ratio"]
        ends = (p["heads"], p["indexer"], p["tokens"], r["tokens_over_heads"], r["indexer_over_heads"])
        lines.append(row + " ".join(f"{m[k]:>10.3f}" for _, k in cols) + " | " + " ".join(f"{v:>9.3f}" for v in ends))
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--backend", default="auto", help="tier of the token-parallel indexer pieces (default auto)")
    ap.add_argument("--sparse-backend", default="auto", help="tier of the 128-head sparse core (default auto)")
    ap.add_argument("--pad-heads", type=int, default=None,
                    help="FlashMLA's head multiple, for the record (default: this card's, else 64 = SM90)")
    ap.add_argument("--logits-budget-gb", type=float, default=4.0, help="one logits chunk's fp32 bytes at most")
    ap.add_argument("--costs", default=None, metavar="JSON",
                    help="the card's Costs record (default: load_costs for this card: the committed one)")
    ap.add_argument("--comm-json", default=str(default_comm_json()),
                    help="NCCL run for the collectives when there is no Costs record")
    ap.add_argument("--target-ms", type=float, default=300.0, help="timed repetitions per piece fill about this")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--time-limit-s", type=float, default=200.0,
                    help="no piece starts after this many seconds (skipped and named instead)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI, with stand-in upstream tiers)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmark/results/tp_projection_<card>_<yyyymmdd>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens = [t for t in args.tokens if t <= 256] or [64, 160]
        args.topk = min(args.topk, 32)
        args.backend = "reference" if args.backend == "auto" else args.backend
        args.sparse_backend = "reference" if args.sparse_backend == "auto" else args.sparse_backend
        args.target_ms, args.max_reps = 1.0, 1
        args.logits_budget_gb = 64 * 1024 / 2**30  # 64 KiB: several chunks even at these sizes
    if any(t < 1 for t in args.tokens) or any(n < 1 or HEADS % n for n in args.tp):
        ap.error("--tokens must be positive and --tp must divide 128 heads")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no GPU: this benchmark measures a GPU (use --smoke for the CPU run)")
    return args


def _costs_and_comm(args: argparse.Namespace, card: str) -> tuple[Costs | None, dict[str, Any], str]:
    """The card's Costs record (or None) and the collective numbers the projection uses, with their source."""
    if args.costs:
        with open(args.costs) as f:
            data = json.load(f)
        costs, where = Costs.from_dict(data.get("costs", data)), args.costs
    else:
        costs, where = load_costs(card if card != "cpu" else None)
    if costs is not None:
        comm = {k: getattr(costs, k) for k in ("a2a_latency_us", "a2a_gbytes_per_s", "gather_latency_us",
                                               "gather_gbytes_per_s")}
        comm["source"] = f"Costs record ({costs.card}, {costs.date}): {costs.collectives_source}"
        return costs, comm, str(where)
    comm = collectives_from_nccl_run(args.comm_json)
    comm["source"] = comm.pop("collectives_source")
    return None, comm, f"none ({where}); token split weighted by key counts"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.pad_heads is None:
        args.pad_heads = get_capability(device).flashmla_head_multiple or 64  # FlashMLA: 64 heads a call on SM90
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    costs, comm, cost_record = _costs_and_comm(args, card)
    date = datetime.date.today().isoformat()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    if args.out is None:
        slug = "".join(ch if ch.isalnum() else "_" for ch in card.lower()).strip("_")
        args.out = os.path.join(ROOT, "benchmark", "results", f"tp_projection_{slug}_{date.replace('-', '')}.json")
    _log(f"{card}: tp {args.tp}, tokens {args.tokens}, top-k {args.topk}; heads = upstream's kernels, tokens/indexer "
         f"= {args.backend}/{args.sparse_backend}; collectives {comm['a2a_gbytes_per_s']:.1f} GB/s + "
         f"{comm['a2a_latency_us']:.1f} us ({comm['source']})")
    t0 = time.perf_counter()
    bench, cases = Bench(args, device, costs, comm), []
    for T in args.tokens:
        p = Prompt(T, args.topk, device)
        cases += [bench.case(p, tp) for tp in args.tp]
        del p
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = heads_violations(cases)
    if bad:
        for line in bad:
            _log(f"ERROR {line}")
        _log("a piece labelled heads (upstream) ran another tier: no JSON written")
        return 1
    print(_table(cases))
    _write(args.out, dict(
        card=card, date=date, command=command, torch=torch.__version__, versions=_versions(), smoke=args.smoke,
        elapsed_s=time.perf_counter() - t0, heads=HEADS, index_heads=IDX_HEADS, index_head_dim=IDX_DIM,
        topk=args.topk, heads_tiers=dict(UPSTREAM, topk_transform_ragged=UPSTREAM_TOPK),
        backend=args.backend, sparse_backend=args.sparse_backend, pad_heads_multiple=args.pad_heads,
        logits_budget_bytes=bench.budget, cost_record=cost_record, comm_model=comm, layers=LAYERS, cases=cases,
        notes=["measured_ms: timed on this GPU; modeled_ms: collectives as latency + bytes / bandwidth "
               "(nsa_tp.token_parallel.costs)",
               "heads pieces: upstream's kernels only (tiers per piece in 'tiers'; checked before writing)",
               "projected_ms: heads = heads_indexer_all_rows + heads_sparse_padded; indexer = indexer_index_split"
               " + all_gather_ids + heads_sparse_padded; tokens = indexer_token_split + sparse_all_heads +"
               " all_to_all_q + all_to_all_o",
               "predicted_ms / policy_choice: nsa_tp.token_parallel.choose with the Costs record (when one exists)",
               "indexer = fp8 logits + top-k (chunked), without the q/k projections and the key gather"]))
    _log(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
