"""Run one attention layer over a ragged batch — cached-prefix fill, prefill, decode steps — on one rank.

:func:`run_case` is what every rank of a layout executes (directly for one rank, through
:func:`nsa_tp.parallel.launch.launch` for several); :func:`run_layouts` runs several cases in *one* spawn
of ranks (process start-up costs seconds on a small CPU) and returns every rank's results.

A case's batch is a list of requests, each ``(prefix_len, new_len)``:

1. *prefix fill* (only if some request has a prefix): the prefix tokens go through the layer, filling
   the caches — the state a radix-cache hit leaves behind;
2. *prefill*: every request's ``new_len`` tokens, attending to its cached prefix too (measured);
3. *decode*: ``decode_steps`` steps of one token per request (measured).

Under DP attention, request ``i`` is served by attention DP group ``assignment[i]`` (default
``i % attn_dp_size``, SGLang's round-robin), so groups get different token counts. Every forward pads the
local token count to the max over the attention DP group (all-gather of the counts), runs the padded rows
through the layer, and all-gathers the outputs over that group — the MLP sync — so every rank ends with
every request's output rows; the padding rows are dropped there.

Hidden states are random but fixed per ``(seed, request)`` so every layout sees the same inputs.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from nsa_tp.attention.kv_cache import NSACaches
from nsa_tp.config import NSAConfig
from nsa_tp.model.attention import NSAAttention, mla_rope_cos_sin
from nsa_tp.model.core import LayerBatch
from nsa_tp.model.sharding import shard_weights
from nsa_tp.model.weights import LayerWeights, random_weights
from nsa_tp.parallel.groups import ParallelGroups, build_groups
from nsa_tp.parallel.launch import RankContext, launch
from nsa_tp.parallel.layout import ParallelLayout, resolve_layout

__all__ = [
    "Request",
    "RunCase",
    "CaseResult",
    "run_case",
    "run_layouts",
    "request_inputs",
    "compare_results",
    "time_layer_prefill",
    "time_cases",
]


@dataclasses.dataclass(frozen=True)
class Request:
    prefix_len: int  # tokens already in the cache before the measured prefill
    new_len: int  # tokens of the measured prefill (>= 1)


@dataclasses.dataclass(frozen=True)
class RunCase:
    """One layout and one batch; picklable (it crosses into spawned ranks)."""

    tp: int
    dp: int = 1
    enable_dp_attention: bool = False
    cfg: NSAConfig = NSAConfig()
    requests: tuple[Request, ...] = (Request(0, 40),)
    decode_steps: int = 2
    kv_cache_dtype: str = "bfloat16"
    seed: int = 0
    core: str = "heads"
    backend: str = "auto"
    assignment: tuple[int, ...] | None = None  # attention DP group of each request
    weights_path: str | None = None  # a safetensors checkpoint (else random weights from `seed`)
    layer_index: int = 0
    name: str = ""

    def layout(self) -> ParallelLayout:
        sm = None if torch.cuda.is_available() else 9
        return resolve_layout(
            self.tp, self.dp, self.enable_dp_attention, num_attention_heads=self.cfg.num_attention_heads,
            sm_major=sm, kv_cache_dtype=self.kv_cache_dtype,
        )

    def label(self) -> str:
        if self.name:
            return self.name
        lay = self.layout()
        if lay.mode == "pure_tp":
            return f"TP{self.tp}"
        return f"DP{lay.attn_dp_size}xTP{lay.attn_tp_size}" if lay.attn_tp_size > 1 else f"DP{lay.attn_dp_size}"

    def groups_of_requests(self, attn_dp_size: int) -> list[list[int]]:
        """Request ids served by each attention DP group, in order."""
        assign = self.assignment or tuple(i % attn_dp_size for i in range(len(self.requests)))
        if len(assign) != len(self.requests) or any(not 0 <= a < attn_dp_size for a in assign):
            raise ValueError(f"assignment: expected {len(self.requests)} group ids in [0, {attn_dp_size}), "
                             f"got {assign}")
        return [[i for i, a in enumerate(assign) if a == g] for g in range(attn_dp_size)]


@dataclasses.dataclass
class CaseResult:
    """One rank's view of a case: outputs of every request (float32, CPU) and its own timings."""

    label: str
    rank: int
    world_size: int
    heads_per_rank: int
    mode: str
    prefill: dict[int, torch.Tensor]  # request -> [new_len, hidden]
    decode: list[dict[int, torch.Tensor]]  # per step: request -> [1, hidden]
    pad_rows: int  # DP padding rows this rank computed over the prefill and decode steps
    prefill_ms: float  # the layer alone on this rank (per-batch metadata excluded: it is shared by all layers)
    decode_ms: float  # per step, mean
    peak_mem_mb: float
    device: str


def request_inputs(cfg: NSAConfig, seed: int, req: int, length: int, device: torch.device) -> torch.Tensor:
    """``[length, hidden]`` bfloat16 hidden states of request ``req`` (same bits on every rank)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (req + 1))
    return torch.randn(length, cfg.hidden_size, generator=gen).to(device, torch.bfloat16)


def build_layer_batch(
    layer: NSAAttention, caches: NSACaches, reqs: list[int], starts: list[int], ends: list[int], num_padded: int,
    is_decode: bool,
) -> LayerBatch:
    """One forward's batch: request ``reqs[i]`` contributes its tokens ``[starts[i], ends[i])`` (cache reserved;
    tokens before ``starts[i]`` are already cached). Built once per batch; every layer reuses it."""
    device = layer.device
    n = sum(e - s for s, e in zip(starts, ends, strict=True))
    if num_padded < n:
        raise ValueError(f"num_padded: expected >= {n} real tokens, got {num_padded}")
    positions = torch.zeros(num_padded, dtype=torch.int64)
    if n:
        positions[:n] = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    positions = positions.to(device)
    out_slots = (
        torch.cat([caches.slots(r, s, e) for r, s, e in zip(reqs, starts, ends, strict=True)])
        if n else torch.zeros(0, dtype=torch.int64, device=device)
    )
    cos, sin = mla_rope_cos_sin(layer.cfg, positions)
    meta = None
    if n:  # an idle batch (no request in this attention DP group) has no metadata: the layer skips the core
        meta = layer.core.build_metadata(caches, ends, starts, caches.page_table(reqs), num_padded, is_decode)
    return LayerBatch(n, num_padded, positions, out_slots, cos, sin, is_decode, meta)


class _Rank:
    """One rank's layer, caches and requests for a case."""

    def __init__(self, case: RunCase, groups: ParallelGroups, device: torch.device, weights: LayerWeights):
        self.case, self.groups, self.device = case, groups, device
        cfg = case.cfg
        lay = groups.layout
        self.layer = NSAAttention(
            cfg, shard_weights(weights, cfg, lay, groups.attn_tp_rank), groups,
            core=case.core, backend=case.backend, device=device,
        )
        self.by_group = case.groups_of_requests(lay.attn_dp_size)
        self.mine = self.by_group[groups.attn_dp_rank]
        total = {i: r.prefix_len + r.new_len + case.decode_steps for i, r in enumerate(case.requests)}
        pages = sum(NSACaches.pages_for(total[i]) for i in self.mine) + 1
        self.caches = NSACaches(pages, lay.kv_cache_dtype, device)
        for i in self.mine:
            self.caches.reserve(i, total[i])
        self.inputs = {i: request_inputs(cfg, case.seed, i, total[i], device) for i in self.mine}
        self.pad_rows = 0
        self.last_layer_ms = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, spans: dict[int, tuple[int, int]], is_decode: bool) -> dict[int, torch.Tensor]:
        """Run the layer on ``spans`` (every request of the case -> token range; empty ranges skip).

        Returns every request's output rows (after the attention-DP all-gather), float32 on CPU.
        """
        reqs = [i for i in self.mine if spans[i][1] > spans[i][0]]
        starts, ends = [spans[i][0] for i in reqs], [spans[i][1] for i in reqs]
        n = sum(e - s for s, e in zip(starts, ends, strict=True))
        counts = self.groups.all_gather_attn_dp_counts(n, self.device)
        num_padded = max(counts)
        self.pad_rows += num_padded - n
        batch = build_layer_batch(self.layer, self.caches, reqs, starts, ends, num_padded, is_decode)
        x = torch.zeros(num_padded, self.case.cfg.hidden_size, dtype=torch.bfloat16, device=self.device)
        if n:
            x[:n] = torch.cat([self.inputs[i][s:e] for i, s, e in zip(reqs, starts, ends, strict=True)])
        # Timed: the layer itself (projections, indexer, sparse MLA, o_proj, all-reduce). The batch and its
        # metadata above are built once per batch and shared by every layer of a model, so they are not.
        self._sync()
        self.groups_barrier()
        t0 = time.perf_counter()
        y = self.layer(x, batch, self.caches)
        self._sync()
        self.last_layer_ms = (time.perf_counter() - t0) * 1e3
        y_all = self.groups.all_gather_attn_dp(y)  # [attn_dp * num_padded, hidden]: the MLP's input
        out: dict[int, torch.Tensor] = {}
        for g, group_reqs in enumerate(self.by_group):
            row = g * num_padded  # group g's real rows come first in its block; the rest is padding
            for i in group_reqs:
                s, e = spans[i]
                if e > s:
                    out[i] = y_all[row : row + e - s].float().cpu()
                    row += e - s
        return out

    def timed_forward(self, spans: dict[int, tuple[int, int]], is_decode: bool) -> tuple[dict[int, torch.Tensor],
                                                                                          float]:
        """:meth:`forward` and the layer's wall time on this rank in ms (see the comment in forward)."""
        out = self.forward(spans, is_decode)
        return out, self.last_layer_ms

    def groups_barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _default_device() -> torch.device:
    """This process's GPU with its index (``cuda:N``: tensors report the index, so checks compare equal), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def run_case(ctx: RankContext | None, case: RunCase, weights: LayerWeights | None = None) -> CaseResult:
    """Execute ``case`` on this rank (``ctx=None``: one process, no torch.distributed)."""
    device = ctx.device if ctx is not None else _default_device()
    layout = case.layout()
    groups = build_groups(layout)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if weights is None:
        weights = _case_weights(case, {})
    rank = _Rank(case, groups, device, weights)
    reqs = case.requests
    every = range(len(reqs))
    if any(r.prefix_len for r in reqs):
        rank.forward({i: (0, reqs[i].prefix_len) for i in every}, is_decode=False)
    prefill, prefill_ms = rank.timed_forward(
        {i: (reqs[i].prefix_len, reqs[i].prefix_len + reqs[i].new_len) for i in every}, is_decode=False)
    decode: list[dict[int, torch.Tensor]] = []
    decode_ms = 0.0
    for step in range(case.decode_steps):
        spans = {i: (reqs[i].prefix_len + reqs[i].new_len + step,) * 2 for i in every}
        spans = {i: (s, s + 1) for i, (s, _) in spans.items()}
        out, ms = rank.timed_forward(spans, is_decode=True)
        decode.append(out)
        decode_ms += ms
    return CaseResult(
        label=case.label(), rank=groups.rank, world_size=layout.world_size, heads_per_rank=layout.heads_per_rank,
        mode=layout.mode, prefill=prefill, decode=decode, pad_rows=rank.pad_rows, prefill_ms=prefill_ms,
        decode_ms=decode_ms / max(case.decode_steps, 1), peak_mem_mb=_peak_mem_mb(device), device=str(device),
    )


def _case_weights(case: RunCase, memo: dict[tuple[Any, ...], LayerWeights]) -> LayerWeights:
    """The case's whole-layer weights, drawn or loaded once per process for cases that share them (at real
    dims a draw is ~200M values: seconds of CPU per case otherwise)."""
    key = (case.cfg, case.seed, case.weights_path, case.layer_index)
    if key not in memo:
        memo.clear()  # keep one set: they are large
        if case.weights_path:
            from nsa_tp.model.weights import load_layer_weights

            memo[key] = load_layer_weights(case.weights_path, case.layer_index, case.cfg)
        else:
            memo[key] = random_weights(case.cfg, case.seed)
    return memo[key]


def time_layer_prefill(
    ctx: RankContext | None, case: RunCase, warmup: int = 2, iters: int = 5, weights: LayerWeights | None = None
) -> dict[str, Any]:
    """Latency of the attention layer alone (projections, indexer, sparse MLA, o_proj, the attention-TP
    all-reduce) for the case's prefill on this rank: the batch and its metadata are built once, then
    ``layer.forward`` is timed ``iters`` times after ``warmup`` runs (CUDA events on GPUs, wall clock on CPU).

    Each run rewrites the same cache slots with the same values, so the runs are identical. Ranks of an
    idle attention DP group (no request) run their padding rows like upstream's idle batches do.
    Returns ``{"median_ms", "times_ms", "num_tokens", "num_padded", "peak_mem_mb", "device"}``.
    """
    device = ctx.device if ctx is not None else _default_device()
    groups = build_groups(case.layout())
    rank = _Rank(case, groups, device, weights if weights is not None else _case_weights(case, {}))
    reqs = case.requests
    if any(r.prefix_len for r in reqs):
        rank.forward({i: (0, reqs[i].prefix_len) for i in range(len(reqs))}, is_decode=False)
    mine = [i for i in rank.mine if reqs[i].new_len]
    starts = [reqs[i].prefix_len for i in mine]
    ends = [reqs[i].prefix_len + reqs[i].new_len for i in mine]
    n = sum(e - s for s, e in zip(starts, ends, strict=True))
    num_padded = max(groups.all_gather_attn_dp_counts(n, device))
    batch = build_layer_batch(rank.layer, rank.caches, mine, starts, ends, num_padded, is_decode=False)
    x = torch.zeros(num_padded, case.cfg.hidden_size, dtype=torch.bfloat16, device=device)
    if n:
        x[:n] = torch.cat([rank.inputs[i][s:e] for i, s, e in zip(mine, starts, ends, strict=True)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for it in range(warmup + iters):
        rank.groups_barrier()  # every rank starts together: the all-reduce then measures compute skew too
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            rank.layer(x, batch, rank.caches)
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop)
        else:
            t0 = time.perf_counter()
            rank.layer(x, batch, rank.caches)
            ms = (time.perf_counter() - t0) * 1e3
        if it >= warmup:
            times.append(ms)
    return {
        "median_ms": statistics.median(times), "times_ms": times, "num_tokens": n,
        "num_padded": num_padded, "peak_mem_mb": _peak_mem_mb(device), "device": str(device),
    }


def time_cases(ctx: RankContext, cases: Sequence[RunCase], warmup: int, iters: int) -> list[dict[str, Any]]:
    """Rank body for benchmarks: :func:`time_layer_prefill` of every case, in order (pass to ``launch``)."""
    memo: dict[tuple[Any, ...], LayerWeights] = {}
    return [time_layer_prefill(ctx, c, warmup, iters, _case_weights(c, memo)) for c in cases]


def _run_cases(ctx: RankContext, cases: Sequence[RunCase]) -> list[CaseResult | None]:
    """Rank body of :func:`run_layouts`: every case whose layout fits the world, group state torn down between."""
    out: list[CaseResult | None] = []
    memo: dict[tuple[Any, ...], LayerWeights] = {}
    for case in cases:
        if case.layout().world_size != ctx.world_size:
            out.append(None)
            continue
        res = run_case(ctx, case, _case_weights(case, memo))
        # Ranks other than 0 return timings only: rank 0's outputs are every request's (after the gather).
        if ctx.rank != 0:
            res.prefill, res.decode = {}, []
        out.append(res)
    return out


def run_layouts(cases: Sequence[RunCase], world_size: int, *, backend: str = "auto",
                timeout_s: float = 600.0) -> list[list[CaseResult]]:
    """Run every case (all with ``world_size`` ranks) in one spawn; per case, the per-rank results."""
    for c in cases:
        if c.layout().world_size != world_size:
            raise ValueError(f"{c.label()}: needs {c.layout().world_size} ranks, this spawn has {world_size}")
    if world_size == 1 and not os.environ.get("RANK"):
        out = [[run_case(None, c)] for c in cases]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give GPU 0 back to the ranks that a later launch puts there
        return out
    per_rank = launch(_run_cases, world_size, (tuple(cases),), backend=backend, timeout_s=timeout_s)
    return [[per_rank[r][k] for r in range(world_size)] for k in range(len(cases))]


def compare_results(ref: CaseResult, got: CaseResult) -> dict[str, float]:
    """Worst per-request relative error ``||got - ref|| / ||ref||`` for the prefill and over the decode steps.

    NaN anywhere gives ``inf`` (never passes a tolerance).
    """

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        if not torch.isfinite(a).all():
            return float("inf")
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    if set(got.prefill) != set(ref.prefill) or len(got.decode) != len(ref.decode):
        raise ValueError(f"{got.label}: results cover other requests/steps than the reference")
    pre = max((rel(got.prefill[i], ref.prefill[i]) for i in ref.prefill), default=0.0)
    dec = max((rel(g[i], r[i]) for g, r in zip(got.decode, ref.decode, strict=True) for i in r), default=0.0)
    return {"prefill": pre, "decode": dec, "max": max(pre, dec)}
