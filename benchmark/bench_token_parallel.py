"""Token-parallel vs pure TP for the NSA attention core (indexer + sparse MLA + collectives), multi-GPU.

What one run measures, on ``--world`` GPUs of one host (NCCL), DeepSeek-V3.2 dims (128 heads, 64 index
heads x 128, top-k 2048, d_qk 576), one fresh causal prompt:

1. **Prefill** at ``--prefill-tokens`` (8K and 32K): the attention core of one layer as the layer runs it
   (``NSABackend`` for pure TP, ``TokenParallelBackend`` forced on for token-parallel: the indexer with its
   projections, top-k, the sparse core, the all-to-alls), per-rank median time (the max over ranks), the
   all-to-all time alone at the same shapes, per-rank peak memory above the caches, and the two outputs'
   relative difference (they must agree); also token-parallel with the core in ``--out-chunks`` slices whose
   output exchanges overlap the next slice's core.
2. **Decode, batch 1** at ``--decode-context`` (128K): the indexer replicated on every rank (pure TP) vs
   key-sharded with the exact top-k merge; then the whole decode core both ways. Target: >= 1.6x at 2 GPUs.
3. **All-to-all bandwidth**: heads_to_tokens at a small and a large size -> latency and GB/s per rank.
4. **Projection to TP4 / TP8** from measured parts (single GPU, rank 0): the indexer over each rank's rows
   of the balanced split, the sparse core at the per-rank shapes (``T x 128/W`` heads for pure TP, the
   rank's rows x 128 heads for token-parallel), plus the all-to-all from the measured latency and bandwidth.
   Assumes the per-GPU all-to-all bandwidth on an 8-GPU NVSwitch host is what 2 GPUs measured.
5. **collectives**: the all-to-all latency (the small size's time) and bandwidth (the slope) from 3, by
   :func:`nsa_tp.bench.costs.collectives_from_a2a` — what ``nsa-tp bench --costs`` reads from this JSON into a
   card's one Costs record (this script writes no cost record of its own).

Run (the lead, on the device; NVLink multicast must stay off):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        PYTHONPATH=python python benchmark/bench_token_parallel.py --world 2 \\
        --out benchmark/results/token_parallel_h100x2.json
    python benchmark/bench_token_parallel.py --plot benchmark/results/token_parallel_h100x2.json  # PNG only

``--quick`` shrinks everything (tokens, context, top-k) for a CPU/gloo smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

HIDDEN, Q_LORA, HEADS, IDX_HEADS, D_QK = 7168, 1536, 128, 64, 576


# ------------------------------------------------------------------------------------------------ timing


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], object], warmup: int, reps: int, barrier: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on GPU); ``barrier`` aligns the ranks before each call."""
    import torch

    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if barrier:
            barrier()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph_ms(fn: Callable[[], object], warmup: int, reps: int,
              barrier: Callable[[], None] | None = None) -> tuple[float, str | None]:
    """``(median ms of replaying fn captured in a CUDA graph, None)``, or ``(nan, why)`` when it cannot be
    captured (CPU, a host sync inside ``fn``, a collective the build cannot capture). Every rank must get
    the same outcome for the collectives inside to match, so a failure is agreed on over the group."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return float("nan"), "no CUDA"
    why = None
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - report why, keep the eager numbers
        why = f"{type(e).__name__}: {str(e)[:200]}"
    if dist.is_initialized():
        flag = torch.tensor([0 if why is None else 1], device="cuda")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and why is None:
            why = "capture failed on another rank"
    if why is not None:
        return float("nan"), why
    return _time_ms(graph.replay, warmup, reps, barrier), None


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak allocated memory of one call above what was allocated before it (MB); 0 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------------ setup


class _Setup:
    """One fresh causal prompt's caches and inputs, identical on every rank (same seed)."""

    def __init__(self, device, T: int, topk: int, kv_dtype: str, budget_mb: float, seed: int = 0,
                 q_rows: int | None = None):
        import torch

        from nsa_tp.attention.indexer import Indexer, IndexerWeights
        from nsa_tp.ops.index_cache import new_index_k_cache
        from nsa_tp.ops.kv_format import pack_fp8_kv
        from nsa_tp.ops.rope import rope_cos_sin

        # Generated on the device (Philox: the same numbers on every rank's GPU for the same seed); a 32K x
        # 128 x 576 query tensor drawn on the host would take tens of seconds.
        g = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=device) * scale

        self.T, self.topk, self.kv_dtype, self.budget_mb, self.device = T, topk, kv_dtype, budget_mb, device
        pages = -(-T // 64)
        self.page_table = torch.arange(pages, dtype=torch.int32, device=device)[None, :]
        self.num_pages = pages
        self.indexer = Indexer(IndexerWeights(
            wq_b=rnd(IDX_HEADS * 128, Q_LORA, scale=Q_LORA**-0.5), wk=rnd(128, HIDDEN, scale=HIDDEN**-0.5),
            k_norm_weight=torch.ones(128, device=device), k_norm_bias=torch.zeros(128, device=device),
            weights_proj=rnd(IDX_HEADS, HIDDEN, scale=HIDDEN**-0.5),
        ), topk=topk, device=device)
        rows = rnd(pages * 64, D_QK).to(torch.bfloat16)
        self.latent = (pack_fp8_kv(rows) if kv_dtype == "fp8_e4m3" else rows).view(pages, 64, 1, -1).contiguous()
        self.index_k = new_index_k_cache(pages, device=device)
        self.x = torch.randn(T, HIDDEN, generator=g, device=device, dtype=torch.bfloat16)
        self.q_lora = rnd(T, Q_LORA).to(torch.bfloat16)
        self.cos, self.sin = (t.to(device) for t in rope_cos_sin(torch.arange(T), 64, 10000.0, factor=40.0,
                                                                 original_max_position=4096))
        # queries of the last q_rows tokens (all by default); decode needs one row, not 128K x 128 heads
        self.q_all = torch.randn(T if q_rows is None else q_rows, HEADS, D_QK, generator=g, device=device,
                                 dtype=torch.bfloat16) * 0.1

    def builder(self, heads: int):
        from nsa_tp.attention.metadata import ForwardMetadataBuilder

        return ForwardMetadataBuilder(num_heads=heads, topk=self.topk, kv_dtype=self.kv_dtype, device=self.device,
                                      logits_budget_mb=self.budget_mb, num_pages=self.num_pages)


# ------------------------------------------------------------------------------------------------ per rank


_T0 = time.perf_counter()


def _progress(rank: int, what: str) -> None:
    """One line on stderr from rank 0 per step (a full run takes minutes; a silent one looks hung)."""
    if rank == 0:
        print(f"[{time.perf_counter() - _T0:7.1f}s] {what}", file=sys.stderr, flush=True)


class _Rank:
    """What every phase of one rank's run shares: the group, the layout, the backends and the timing helpers.
    (A plain class: the tests load this script without registering it as a module, which dataclasses need.)"""

    def __init__(self, args: argparse.Namespace, dev: Any, r: int, W: int, group: Any, layout: Any, *,
                 pure_be: Any, tp_be: Any, tp_pipe: Any, tp_fp8: Any, sm_scale: float) -> None:
        self.args, self.dev, self.r, self.W, self.group, self.layout = args, dev, r, W, group, layout
        self.pure_be, self.tp_be, self.tp_pipe, self.tp_fp8 = pure_be, tp_be, tp_pipe, tp_fp8
        self.sm_scale = sm_scale

    @property
    def h(self) -> int:
        return self.layout.heads_per_rank

    @property
    def mine(self) -> slice:
        return slice(self.r * self.h, (self.r + 1) * self.h)

    def barrier(self) -> None:
        if self.W > 1:
            import torch.distributed as dist

            dist.barrier()

    def tmax(self, ms: float) -> float:  # the layer finishes when the slowest rank does
        if self.W == 1:
            return ms
        import torch
        import torch.distributed as dist

        t = torch.tensor([ms], dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def timed(self, fn: Callable[[], object]) -> float:
        """The slowest rank's median time of ``fn``."""
        return self.tmax(_time_ms(fn, self.args.warmup, self.args.reps, self.barrier))

    def free(self) -> None:
        import torch

        torch.cuda.empty_cache() if self.dev.type == "cuda" else None


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _rank_main(ctx, args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from nsa_tp.attention.backend import NSABackend
    from nsa_tp.parallel.layout import resolve_layout
    from nsa_tp.token_parallel.backend import TokenParallelBackend

    dev, W = ctx.device, ctx.world_size
    sm = torch.cuda.get_device_capability(dev)[0] if dev.type == "cuda" else 9
    sm_scale = 192**-0.5
    rk = _Rank(
        args, dev, ctx.rank, W, dist.group.WORLD if W > 1 else None,
        resolve_layout(W, sm_major=sm, kv_cache_dtype=args.kv_cache_dtype, token_parallel="on"),
        pure_be=NSABackend(sm_scale=sm_scale),
        tp_be=TokenParallelBackend(sm_scale=sm_scale, fp8_q=args.fp8_q),
        tp_pipe=TokenParallelBackend(sm_scale=sm_scale, fp8_q=args.fp8_q, out_chunks=args.out_chunks),
        tp_fp8=TokenParallelBackend(sm_scale=sm_scale, fp8_q=True),  # timed too: the lossy traffic cut
        sm_scale=sm_scale,
    )
    out: dict = {"rank": rk.r, "prefill": [], "decode": {}, "a2a": [], "projection_parts": [], "tiers": {}}
    for T in args.prefill_tokens:  # 1. prefill
        _progress(rk.r, f"prefill {T} tokens: pure TP vs token-parallel")
        row, tiers = _prefill_case(rk, T)
        out["prefill"].append(row)
        out["tiers"].update(tiers)
    for L in (args.decode_context_small, args.decode_context):  # 2. decode, batch 1
        _progress(rk.r, f"decode batch 1, context {L}: replicated vs key-sharded indexer")
        out["decode"][str(L)] = _decode_case(rk, L)
    _progress(rk.r, "all-to-all latency and bandwidth")  # 3.
    out["a2a"] = _a2a_cases(rk)
    # 4. single-GPU parts for the TP4/TP8 projection (rank 0 measures, the others wait)
    _progress(rk.r, f"single-GPU parts of the TP{'/TP'.join(map(str, args.project_to))} projection")
    if rk.r == 0 and not args.skip_projection:
        for T in args.prefill_tokens:
            out["projection_parts"] += _projection_parts(rk, T)
    rk.barrier()
    return out


def _prefill_case(rk: _Rank, T: int) -> tuple[dict, dict]:
    """Pure TP against token-parallel (plain, pipelined, fp8 q, unabsorbed) on one ``T``-token prompt: the row,
    and rank 0's tier explanation."""
    import torch

    from nsa_tp import ops
    from nsa_tp.parallel.collectives import a2a_bytes_per_rank, heads_to_tokens, tokens_to_heads
    from nsa_tp.token_parallel.backend import build_token_parallel_metadata
    from nsa_tp.token_parallel.core import Unabsorbed

    args, dev, r, W, group, layout, h, mine = rk.args, rk.dev, rk.r, rk.W, rk.group, rk.layout, rk.h, rk.mine
    pure_be, tp_be, tp_pipe, tp_fp8 = rk.pure_be, rk.tp_be, rk.tp_pipe, rk.tp_fp8
    barrier, tmax, rel = rk.barrier, rk.tmax, _rel
    tiers: dict = {}
    s = _Setup(dev, T, args.topk, layout.kv_cache_dtype, args.logits_budget_mb)
    q = s.q_all[:, mine].contiguous()
    meta = s.builder(h).prefill([T], [0], s.page_table)
    tpm = build_token_parallel_metadata(s.builder(h), layout, r, seq_lens=[T], prefix_lens=[0],
                                        page_table=s.page_table)

    def pure(s=s, q=q, meta=meta):
        return pure_be.forward(q, s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent, s.index_k, meta)

    def tok(s=s, q=q, tpm=tpm):
        return tp_be.forward(q, s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent, s.index_k, tpm, group)

    def pipe(s=s, q=q, tpm=tpm):
        return tp_pipe.forward(q, s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent, s.index_k, tpm, group)

    def fp8q(s=s, q=q, tpm=tpm):
        return tp_fp8.forward(q, s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent, s.index_k, tpm, group)

    # The unabsorbed exchange needs q before W_UK and gives the output after W_UV: compare it with pure TP
    # doing that absorption and projection on its own heads (the same FLOPs per rank).
    gen = torch.Generator(device=dev).manual_seed(7)
    un_all = Unabsorbed(
        torch.randn(HEADS, 128, 512, generator=gen, device=dev, dtype=torch.bfloat16) * 128**-0.5,
        torch.randn(HEADS, 512, 128, generator=gen, device=dev, dtype=torch.bfloat16) * 512**-0.5)
    un_local = un_all.heads(r * h, h)
    q_un = torch.randn(T, HEADS, 192, generator=gen, device=dev, dtype=torch.bfloat16)[:, mine].contiguous()

    def pure_absorb(s=s, q_un=q_un, meta=meta, un=un_local):
        return un.project(pure_be.forward(un.absorb(q_un), s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent,
                                          s.index_k, meta))

    def tok_unabsorbed(s=s, q_un=q_un, tpm=tpm, un=un_all):
        return tp_be.forward(q_un, s.x, s.q_lora, s.cos, s.sin, s.indexer, s.latent, s.index_k, tpm, group,
                             unabsorbed=un)

    ref_out = pure()
    diff, diff_pipe, diff_fp8 = rel(tok(), ref_out), rel(pipe(), ref_out), rel(fp8q(), ref_out)
    del ref_out
    diff_un = rel(tok_unabsorbed(), pure_absorb())
    pure_ms = rk.timed(pure)
    tok_ms = rk.timed(tok)
    pipe_ms = rk.timed(pipe)
    fp8_ms = rk.timed(fp8q)
    pure_absorb_ms = rk.timed(pure_absorb)
    un_ms = rk.timed(tok_unabsorbed)
    split = tpm.split.splits
    a2a_ms = tmax(_time_ms(lambda q=q, split=split: tokens_to_heads(
        heads_to_tokens(q, group, split, fp8=args.fp8_q)[..., :512].contiguous(), group, split),
        args.warmup, args.reps, barrier))
    row = dict(
        tokens=T, pure_tp_ms=pure_ms, token_parallel_ms=tok_ms, speedup=pure_ms / tok_ms, all_to_all_ms=a2a_ms,
        out_chunks=args.out_chunks, token_parallel_pipelined_ms=pipe_ms, rel_diff_pipelined=diff_pipe,
        token_parallel_fp8_q_ms=fp8_ms, rel_diff_fp8_q=diff_fp8,
        pure_tp_with_absorb_ms=pure_absorb_ms, token_parallel_unabsorbed_ms=un_ms,
        speedup_unabsorbed=pure_absorb_ms / un_ms, rel_diff_unabsorbed=diff_un,
        a2a_bytes_per_rank_unabsorbed=a2a_bytes_per_rank(T, h, 192, W) + a2a_bytes_per_rank(T, h, 128, W),
        pure_tp_peak_mb=_peak_mb(pure), token_parallel_peak_mb=_peak_mb(tok), rel_diff=diff, splits=list(split),
        a2a_bytes_per_rank=a2a_bytes_per_rank(T, h, D_QK, W, fp8=args.fp8_q) + a2a_bytes_per_rank(T, h, 512, W),
    )
    if r == 0:
        tiers["fp8_mqa_logits"] = ops.explain("fp8_mqa_logits", *_explain_logits_args(s))
    del s, meta, tpm
    rk.free()
    return row, tiers



def _decode_case(rk: _Rank, L: int) -> dict:
    """Decode of one request over ``L`` tokens: the replicated indexer against the key-sharded one, and the
    layer's core both ways."""
    import torch

    from nsa_tp.parallel.collectives import all_gather_stack
    from nsa_tp.token_parallel.backend import build_token_parallel_metadata
    from nsa_tp.token_parallel.core import key_sharded_decode_topk, shard_page_table
    from nsa_tp.token_parallel.merge import merge_topk

    args, dev, r, W, group, layout, h, mine = rk.args, rk.dev, rk.r, rk.W, rk.group, rk.layout, rk.h, rk.mine
    pure_be, tp_be = rk.pure_be, rk.tp_be
    barrier, tmax = rk.barrier, rk.tmax
    s = _Setup(dev, L, args.topk, layout.kv_cache_dtype, args.logits_budget_mb, seed=1, q_rows=1)
    s.indexer.forward(s.x, s.q_lora, s.cos, s.sin, s.index_k,
                      s.builder(h).prefill([L], [0], s.page_table, index_rows=slice(0, 0)).index)  # keys
    last = slice(L - 1, L)
    q8, w = s.indexer.project_q(s.q_lora[last], s.x[last], s.cos[last], s.sin[last])
    dmeta = s.builder(h).decode([L], s.page_table)
    seq = dmeta.index.seq_lens

    def replicated(s=s, q8=q8, w=w, dmeta=dmeta):
        return s.indexer.topk_decode(q8, w, s.index_k, dmeta.index)

    shard = shard_page_table(s.page_table, seq, r, W)  # once per batch, as the backend's metadata holds it

    def sharded(s=s, q8=q8, w=w, seq=seq, shard=shard):
        return key_sharded_decode_topk(q8, s.index_k, w, seq, s.page_table, s.topk, group, shard=shard)

    a, b = replicated(), sharded()
    same = bool(torch.equal(a.sort(dim=1).values, b.sort(dim=1).values))
    rep_ms = rk.timed(replicated)
    sh_ms = rk.timed(sharded)
    qd = s.q_all[:, mine].contiguous()  # the decode token's query
    tpm = build_token_parallel_metadata(s.builder(h), layout, r, seq_lens=[L], page_table=s.page_table)
    xs, qls, cs, sn = s.x[last], s.q_lora[last], s.cos[last], s.sin[last]

    def core_heads(s=s, qd=qd, xs=xs, qls=qls, cs=cs, sn=sn, dmeta=dmeta):
        return pure_be.forward(qd, xs, qls, cs, sn, s.indexer, s.latent, s.index_k, dmeta)

    def core_keys_fn(s=s, qd=qd, xs=xs, qls=qls, cs=cs, sn=sn, tpm=tpm):
        return tp_be.forward(qd, xs, qls, cs, sn, s.indexer, s.latent, s.index_k, tpm, group)

    core_pure = rk.timed(core_heads)
    core_keys = rk.timed(core_keys_fn)
    sc = torch.randn(1, s.topk, device=dev)
    pos = torch.arange(s.topk, device=dev)[None] + r * s.topk

    def gather_merge(sc=sc, pos=pos, k=s.topk):
        return merge_topk(all_gather_stack(sc, group), all_gather_stack(pos, group), k)

    gm = rk.timed(gather_merge)
    # Decode is served under CUDA graphs: launch overhead gone, what is left is the kernels' time.
    if args.no_graphs:
        rep_graph, rep_why = sh_graph, sh_why = float("nan"), "--no-graphs"
    else:  # last: a failed capture must not spoil the eager numbers above
        rep_graph, rep_why = _graph_ms(replicated, args.warmup, args.reps, barrier)
        sh_graph, sh_why = _graph_ms(sharded, args.warmup, args.reps, barrier)
    graphs = dict(replicated_indexer_graph_ms=tmax(rep_graph) if rep_why is None else None,
                  key_sharded_indexer_graph_ms=tmax(sh_graph) if sh_why is None else None,
                  graph_unavailable=rep_why or sh_why)
    if rep_why is None and sh_why is None:
        graphs["graph_speedup"] = graphs["replicated_indexer_graph_ms"] / graphs["key_sharded_indexer_graph_ms"]
    row = dict(context=L, replicated_indexer_ms=rep_ms, key_sharded_indexer_ms=sh_ms,
                                 speedup=rep_ms / sh_ms, topk_sets_equal=same, core_pure_tp_ms=core_pure,
                                 core_key_sharded_ms=core_keys, gather_merge_ms=gm, strategy=tpm.strategy,
                                 **graphs)
    del s
    rk.free()
    return row



def _a2a_cases(rk: _Rank) -> list[dict]:
    """The heads -> tokens all-to-all at 64 tokens (latency) and ``--a2a-tokens`` (bandwidth)."""
    import torch

    from nsa_tp.parallel.collectives import a2a_bytes_per_rank, heads_to_tokens
    from nsa_tp.token_parallel.plan import plan_token_split

    args, dev, W, group, h = rk.args, rk.dev, rk.W, rk.group, rk.h
    rows = []
    for T in (64, args.a2a_tokens):
        x = torch.randn(T, h, D_QK, device=dev).to(torch.bfloat16)
        split = plan_token_split(T, W).splits
        ms = rk.tmax(_time_ms(lambda x=x, split=split: heads_to_tokens(x, group, split), args.warmup, args.reps,
                              rk.barrier))
        rows.append(dict(tokens=T, heads_per_rank=h, bytes_per_rank=a2a_bytes_per_rank(T, h, D_QK, W), ms=ms))
    return rows


def _projection_parts(rk: _Rank, T: int) -> list[dict]:
    """One GPU's share of the TP4/TP8 projection at ``T`` tokens (rank 0 only): pure TP's indexer and sparse core
    at ``128 / Wp`` heads, and each token-parallel rank's rows with all heads."""
    import torch

    from nsa_tp import ops
    from nsa_tp.parallel.collectives import a2a_bytes_per_rank
    from nsa_tp.token_parallel.costs import load_costs
    from nsa_tp.token_parallel.plan import plan_token_split
    from nsa_tp.token_parallel.policy import token_costs

    args, dev, layout, sm_scale = rk.args, rk.dev, rk.layout, rk.sm_scale
    parts = []
    s = _Setup(dev, T, args.topk, layout.kv_cache_dtype, args.logits_budget_mb)
    keys = [t + 1 for t in range(T)]
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    for Wp in args.project_to:
        hp = HEADS // Wp
        part = dict(tokens=T, world=Wp, heads_per_rank=hp)
        b_pure = s.builder(hp)
        meta = b_pure.prefill([T], [0], s.page_table)
        part["pure_indexer_ms"] = _time_ms(lambda s=s, meta=meta: s.indexer.forward(
            s.x, s.q_lora, s.cos, s.sin, s.index_k, meta.index), args.warmup, args.reps)
        topk_all = s.indexer.forward(s.x, s.q_lora, s.cos, s.sin, s.index_k, meta.index)
        flat = s.latent.view(-1, 1, s.latent.shape[-1])
        qh = s.q_all[:, :hp].contiguous()
        part["pure_sparse_ms"] = _time_ms(lambda qh=qh, flat=flat, tk=topk_all: ops.sparse_mla_fwd(
            qh, flat, tk[:, None], sm_scale), args.warmup, args.reps)
        split = plan_token_split(T, Wp, costs=token_costs(keys, load_costs(card)[0]))
        idx_ms, sp_ms = [], []
        for rr in range(Wp):
            rows = split.rows(rr)
            if not len(rows):
                continue
            m = b_pure.prefill([T], [0], s.page_table, index_rows=slice(rows.start, rows.stop))
            idx_ms.append(_time_ms(lambda s=s, m=m: s.indexer.forward(
                s.x, s.q_lora, s.cos, s.sin, s.index_k, m.index), args.warmup, args.reps))
            qt, tk = s.q_all[rows.start : rows.stop], topk_all[rows.start : rows.stop]
            sp_ms.append(_time_ms(lambda qt=qt, tk=tk, flat=flat: ops.sparse_mla_fwd(
                qt, flat, tk[:, None], sm_scale), args.warmup, args.reps))
        # a rank's indexer and sparse core run back to back: the busiest rank bounds the layer
        part["tp_rank_ms"] = max(a + b for a, b in zip(idx_ms, sp_ms, strict=True))
        part["tp_sparse_ns_per_token"] = sum(sp_ms) * 1e6 / T  # 128 heads, all ranks' slices
        part["tp_indexer_ms_max"], part["tp_sparse_ms_max"] = max(idx_ms), max(sp_ms)
        part["a2a_bytes_per_rank"] = (a2a_bytes_per_rank(T, hp, D_QK, Wp, fp8=args.fp8_q)
                                      + a2a_bytes_per_rank(T, hp, 512, Wp))
        part["a2a_bytes_per_rank_unabsorbed"] = (a2a_bytes_per_rank(T, hp, 192, Wp)
                                                 + a2a_bytes_per_rank(T, hp, 128, Wp))
        parts.append(part)
    del s
    rk.free()
    return parts


def _explain_logits_args(s: _Setup) -> tuple:
    import torch

    q = torch.zeros(2, IDX_HEADS, 128, device=s.device).to(torch.float8_e4m3fn)
    k = torch.zeros(4, 128, device=s.device).to(torch.float8_e4m3fn)
    z = torch.zeros(2, dtype=torch.int32, device=s.device)
    return q, (k, torch.ones(4, device=s.device)), torch.ones(2, IDX_HEADS, device=s.device), z, z + 4


# ------------------------------------------------------------------------------------------------ report


def _projection(res: dict, comm: dict) -> list[dict]:
    from nsa_tp.token_parallel.costs import collective_ms

    rows = []
    for p in res["projection_parts"]:
        def a2a(nbytes: float) -> float:  # two all-to-alls (q out, o back): two latencies, the bytes of both
            return collective_ms(nbytes, 2 * comm["a2a_latency_us"], comm["a2a_gbytes_per_s"])

        pure = p["pure_indexer_ms"] + p["pure_sparse_ms"]
        tp = p["tp_rank_ms"] + a2a(p["a2a_bytes_per_rank"])
        # unabsorbed: the absorption and W_UV FLOPs per rank are those of pure TP, so only the bytes change
        tp_un = p["tp_rank_ms"] + a2a(p["a2a_bytes_per_rank_unabsorbed"])
        rows.append(dict(tokens=p["tokens"], world=p["world"], pure_tp_ms=pure, token_parallel_ms=tp,
                         all_to_all_ms=a2a(p["a2a_bytes_per_rank"]), speedup=pure / tp,
                         token_parallel_unabsorbed_ms=tp_un, speedup_unabsorbed=pure / tp_un))
    return rows


def _plot(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    pre = data["prefill"]
    labels = [f"{p['tokens'] // 1024}K" for p in pre]
    xs = range(len(pre))
    ax = axes[0]
    ax.bar([x - 0.2 for x in xs], [p["pure_tp_ms"] for p in pre], 0.4, label="pure TP")
    ax.bar([x + 0.2 for x in xs], [p["token_parallel_ms"] - p["all_to_all_ms"] for p in pre], 0.4,
           label="token-parallel (compute)")
    ax.bar([x + 0.2 for x in xs], [p["all_to_all_ms"] for p in pre], 0.4,
           bottom=[p["token_parallel_ms"] - p["all_to_all_ms"] for p in pre], label="all-to-all")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms per layer (max over ranks)")
    ax.set_title(f"prefill, {data['world']} GPUs")
    ax.legend()
    ax = axes[1]
    dec = list(data["decode"].values())
    ax.bar([f"{d['context'] // 1024}K repl." for d in dec], [d["replicated_indexer_ms"] for d in dec])
    ax.bar([f"{d['context'] // 1024}K sharded" for d in dec], [d["key_sharded_indexer_ms"] for d in dec])
    ax.set_ylabel("ms, decode indexer, batch 1")
    ax.set_title("decode indexer: replicated vs key-sharded")
    ax.tick_params(axis="x", rotation=30)
    ax = axes[2]
    for T in sorted({p["tokens"] for p in data["projection"]}):
        pts = sorted((p["world"], p["speedup"]) for p in data["projection"] if p["tokens"] == T)
        ax.plot([w for w, _ in pts], [s for _, s in pts], marker="o", label=f"{T // 1024}K tokens")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("attention TP size")
    ax.set_ylabel("projected speedup, token-parallel / pure TP")
    ax.set_title("projection from measured parts")
    ax.legend()
    fig.suptitle(f"{data['card']} - {data['date']}")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="GPUs (ranks) in the attention TP group")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--decode-context", type=int, default=131072)
    p.add_argument("--decode-context-small", type=int, default=4096, help="second point for the decode fit")
    p.add_argument("--a2a-tokens", type=int, default=16384)
    p.add_argument("--project-to", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--kv-cache-dtype", default="bfloat16")
    p.add_argument("--logits-budget-mb", type=float, default=16384.0,
                   help="indexer logits budget per rank (large: the peak memory shows the logits)")
    p.add_argument("--fp8-q", action="store_true", help="queries in fp8 on the wire")
    p.add_argument("--out-chunks", type=int, default=2,
                   help="also time the prefill with the core in this many slices, output exchange overlapped")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-projection", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timing of the decode indexer")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU/gloo smoke run of this script")
    p.add_argument("--out", default=None,
                   help="result JSON (default benchmark/results/token_parallel.json; --quick: a temp folder, never "
                        "beside the published results)")
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the PNG of an existing result")
    args = p.parse_args(argv)
    if args.plot:
        print(_plot(args.plot))
        return 0
    if args.quick:
        args.prefill_tokens, args.decode_context, args.decode_context_small = [128, 256], 1024, 256
        args.a2a_tokens, args.topk, args.warmup, args.reps, args.project_to = 256, 64, 0, 1, [2, 4]
    import torch

    from nsa_tp.parallel.launch import NCCL_ENV, launch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.world < 1:
        print(f"bench_token_parallel: error: --world must be >= 1, got {args.world}", file=sys.stderr)
        return 2
    if not args.quick and gpus < args.world:
        # At real dims on CPU ranks one prefill point takes tens of minutes: refuse rather than look hung.
        print(f"bench_token_parallel: error: --world {args.world} needs {args.world} CUDA GPUs (NCCL), {gpus} visible; "
              "on CPU use --quick (tiny sizes, checks the script, times nothing meaningful)", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = (os.path.join(tempfile.mkdtemp(prefix="nsa-tp-smoke-"), "token_parallel_quick.json") if args.quick
                    else "benchmark/results/token_parallel.json")
    print(f"bench_token_parallel: {args.world} ranks ({'NCCL' if gpus else 'gloo, CPU smoke run'}); results -> "
          f"{args.out}; each rank's clock starts at its launch", file=sys.stderr, flush=True)
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    results = launch(_rank_main, args.world, (args,), timeout_s=3000)
    res = results[0]
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    from nsa_tp.bench.costs import collectives_from_a2a

    try:
        comm = collectives_from_a2a(res["a2a"], "this run")
    except (ValueError, IndexError, KeyError):  # fewer than two sizes, or times that do not grow (a CPU smoke run)
        comm = None
    report = dict(
        card=card, date=date, world=args.world, torch=torch.__version__,
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        env={k: os.environ.get(k) for k in NCCL_ENV}, fp8_q=args.fp8_q, topk=args.topk,
        kv_cache_dtype=args.kv_cache_dtype, tiers=res["tiers"], prefill=res["prefill"], decode=res["decode"],
        a2a=res["a2a"], collectives=comm, projection_parts=res["projection_parts"],
        projection=_projection(res, comm) if res["projection_parts"] and comm else [],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for row in report["prefill"]:
        print(f"prefill {row['tokens']:>6}: pure TP {row['pure_tp_ms']:.2f} ms, token-parallel "
              f"{row['token_parallel_ms']:.2f} ms ({row['speedup']:.2f}x; all-to-all {row['all_to_all_ms']:.2f} ms; "
              f"{row['out_chunks']} slices overlapped {row['token_parallel_pipelined_ms']:.2f} ms; unabsorbed "
              f"{row['token_parallel_unabsorbed_ms']:.2f} vs {row['pure_tp_with_absorb_ms']:.2f} ms), "
              + (f"peak {row['pure_tp_peak_mb']:.0f} vs {row['token_parallel_peak_mb']:.0f} MB" if gpus
                 else "peak memory n/a on CPU") + ", rel diff "
              f"{row['rel_diff']:.1e}")
    for d in report["decode"].values():
        graph = (f"CUDA graphs {d['replicated_indexer_graph_ms']:.3f} vs {d['key_sharded_indexer_graph_ms']:.3f} ms "
                 f"({d['graph_speedup']:.2f}x)" if d.get("graph_speedup") else f"no graphs: {d['graph_unavailable']}")
        print(f"decode ctx {d['context']:>7}: indexer replicated {d['replicated_indexer_ms']:.3f} ms, key-sharded "
              f"{d['key_sharded_indexer_ms']:.3f} ms ({d['speedup']:.2f}x, top-k equal: {d['topk_sets_equal']}); "
              f"{graph}; core {d['core_pure_tp_ms']:.3f} vs {d['core_key_sharded_ms']:.3f} ms")
    for row in report["projection"]:
        print(f"projection TP{row['world']} {row['tokens']:>6}: pure {row['pure_tp_ms']:.2f} ms, token-parallel "
              f"{row['token_parallel_ms']:.2f} ms ({row['speedup']:.2f}x), unabsorbed "
              f"{row['token_parallel_unabsorbed_ms']:.2f} ms ({row['speedup_unabsorbed']:.2f}x)")
    print(f"wrote {args.out}")
    try:
        print(_plot(args.out))
    except ImportError:
        print("matplotlib not installed: no PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
