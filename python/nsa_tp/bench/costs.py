"""``nsa-tp bench --costs``: measure the card's one :class:`~nsa_tp.token_parallel.costs.Costs` record.

Kernel fields are timed on this GPU through ``backend="auto"`` (with the card's tuning table, so each is what
``auto`` runs: upstream's kernel unless ours measured faster), and every number names the op, shape and tier
that produced it (``kernels``). Prefill pieces eagerly; the decode indexer as CUDA graph replays (as a serving
engine runs decode). One GPU cannot time collectives: latency and bandwidth come from a committed NCCL
measurement (``--comm-json``, default ``benchmark/results/token_parallel_h200x4_20261127.json``): the latency
is the time of its *small* all-to-all (1.8 MB a rank: almost all fixed cost), the bandwidth the slope between
its two sizes; the all-gather takes the all-to-all's numbers (that run timed no all-gather) — the record says
so in ``collectives_source``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from nsa_tp import ops
from nsa_tp.bench.kernels import _logits_inputs, _random_kv, _timed
from nsa_tp.token_parallel.costs import Costs
from nsa_tp.token_parallel.merge import merge_topk

__all__ = ["DEFAULT_COMM_JSON", "default_comm_json", "collectives_from_a2a", "collectives_from_nccl_run",
           "measure_costs"]

DEFAULT_COMM_JSON = "benchmark/results/token_parallel_h200x4_20261127.json"  # relative to the repository root
_T, _N, _K = 4096, 32768, 2048  # prefill pieces: the last 4096 rows of a 32K causal context, top-k 2048
_DECODE_CTX = (8192, 65536)  # two decode contexts: the decode indexer's floor and slope


def default_comm_json() -> Path:
    """:data:`DEFAULT_COMM_JSON` in this checkout (the package lives at ``<repo>/python/nsa_tp``)."""
    return Path(__file__).resolve().parents[3] / DEFAULT_COMM_JSON


def collectives_from_a2a(points: list[dict[str, float]], label: str) -> dict[str, object]:
    """Latency (µs) and per-rank bandwidth (GB/s) from all-to-all timings at two or more sizes (``bytes_per_rank``
    and ``ms`` each): the latency is the *smallest* all-to-all's time, the bandwidth the slope to the largest."""
    pts = sorted(points, key=lambda a: a["bytes_per_rank"])
    small, big = pts[0], pts[-1]
    if big["bytes_per_rank"] <= small["bytes_per_rank"] or big["ms"] <= small["ms"]:
        raise ValueError(f"{label}: the a2a block needs two sizes with growing time, got {pts}")
    gbps = (big["bytes_per_rank"] - small["bytes_per_rank"]) / ((big["ms"] - small["ms"]) * 1e-3) / 1e9
    lat_us = small["ms"] * 1e3
    source = (f"{label}: latency = its small all-to-all ({small['bytes_per_rank']} B a rank, {lat_us:.1f} us); "
              f"bandwidth = the slope to its large one ({big['bytes_per_rank']} B); all-gather: the all-to-all's "
              "numbers (not timed)")
    return dict(a2a_latency_us=lat_us, a2a_gbytes_per_s=gbps, gather_latency_us=lat_us, gather_gbytes_per_s=gbps,
                collectives_source=source)


def collectives_from_nccl_run(path: str | os.PathLike[str]) -> dict[str, object]:
    """:func:`collectives_from_a2a` of a committed ``benchmark/bench_token_parallel.py`` JSON (its ``"a2a"``
    block: ``heads_to_tokens`` at two sizes)."""
    with open(path) as f:
        data = json.load(f)
    comm = collectives_from_a2a(data["a2a"], f"{Path(path).name} ({data.get('card')} x{data.get('world')}, "
                                             f"NCCL, {data.get('date')})")
    return comm | {"collectives_card": str(data.get("card") or "")}


def _piece(fn: Callable[[], object], graph: bool = False) -> tuple[float, str]:
    ms, note, ran = _timed(fn, graph)
    if ms is None:
        raise RuntimeError(f"a cost piece could not run: {note}")
    return ms, "+".join(ran) + (f"; {note}" if note and note != "CUDA graph replay" else "")


def _indexer(device: torch.device, gen: torch.Generator) -> tuple[float, str]:
    """Prefill indexer per (row, key): fp8 logits + ragged top-k over causal rows."""
    q, kv, w, ks, ke = _logits_inputs(_T, _N, 64, 128, device, gen)
    lengths = (ke - ks).to(torch.int32)

    def run() -> torch.Tensor:
        logits = ops.fp8_mqa_logits(q, kv, w, ks, ke)
        return ops.topk_transform_ragged(logits, _K, row_starts=ks, lengths=lengths, check_values=False)

    ms, tiers = _piece(run)
    row_keys = float(lengths.sum())
    return ms * 1e6 / row_keys, (f"fp8_mqa_logits + topk_transform_ragged [{tiers}], {_T} causal rows ending at "
                                 f"{_N} keys (64 index heads x 128), eager")


def _sparse(device: torch.device, gen: torch.Generator) -> tuple[tuple[tuple[int, float], ...], str]:
    kv = _random_kv(_N, False, device, gen)
    idx = torch.randint(0, _N, (_T, 1, _K), device=device, dtype=torch.int32, generator=gen)
    table, what = [], []
    for h in (16, 32, 64, 128):
        q = torch.randn(_T, h, 576, device=device, dtype=torch.bfloat16, generator=gen)
        ms, tiers = _piece(lambda q=q: ops.sparse_mla_fwd(q, kv, idx, 576**-0.5))
        table.append((h, ms * 1e6 / _T))
        what.append(f"h{h} [{tiers}]")
    return tuple(table), f"sparse_mla_fwd {', '.join(what)}: T={_T}, N={_N}, K={_K}, bf16 kv, eager"


def _decode_indexer(device: torch.device, gen: torch.Generator) -> tuple[float, float, str]:
    """The batch-1 decode indexer at two contexts: (ns per key, fixed µs)."""
    from nsa_tp.ops.index_cache import INDEX_PAGE_BYTES

    points, tiers = [], ""
    for ctx in _DECODE_CTX:
        pages = ctx // 64
        cache = torch.empty(pages, INDEX_PAGE_BYTES, dtype=torch.uint8, device=device)
        cache[:, :8192] = torch.randn(pages, 8192, device=device, generator=gen).to(torch.float8_e4m3fn).view(
            torch.uint8)
        cache[:, 8192:] = (torch.rand(pages, 64, device=device, generator=gen) + 0.5).view(torch.uint8)
        table = torch.randperm(pages, device=device, generator=gen).to(torch.int32).view(1, pages)
        lens = torch.full((1,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(1, 64, 128, device=device, generator=gen).to(torch.float8_e4m3fn)
        w = torch.randn(1, 64, device=device, generator=gen)

        def run(q=q, cache=cache, w=w, lens=lens, table=table, ctx=ctx) -> torch.Tensor:
            logits = ops.fp8_paged_mqa_logits(q, cache, w, lens, table, ctx)
            return ops.topk_transform_paged(logits, _K, lengths=lens, page_table=table, check_values=False)

        ms, tiers = _piece(run, graph=True)
        points.append((ctx, ms))
    (c0, m0), (c1, m1) = points
    per_key = max((m1 - m0) / (c1 - c0), 0.0)
    fixed_us = max(m0 - per_key * c0, 0.0) * 1e3
    return per_key * 1e6, fixed_us, (f"fp8_paged_mqa_logits + topk_transform_paged [{tiers}], batch 1 at "
                                     f"{c0} and {c1} keys, CUDA graph replays: slope and intercept")


def _merge(device: torch.device, gen: torch.Generator) -> tuple[float, str]:
    W = 8  # the largest group: the most candidates to merge
    scores = torch.randn(W, 1, _K, device=device, generator=gen)
    pos = torch.randperm(W * _K, device=device, generator=gen).to(torch.int32).view(W, 1, _K)
    ms, _ = _piece(lambda: merge_topk(scores, pos, _K))
    return ms * 1e3, f"nsa_tp.token_parallel.merge_topk of {W} x [1, {_K}] candidates (torch), eager"


def measure_costs(device: torch.device, card: str, date: str, command: str, comm_json: str) -> Costs:
    """Every field of the card's :class:`Costs`, measured here (kernels) or read from ``comm_json``."""
    gen = torch.Generator(device=device).manual_seed(7)
    comm = collectives_from_nccl_run(comm_json)
    idx_ns, idx_what = _indexer(device, gen)
    torch.cuda.empty_cache()
    sparse, sparse_what = _sparse(device, gen)
    torch.cuda.empty_cache()
    dec_ns, dec_us, dec_what = _decode_indexer(device, gen)
    merge_us, merge_what = _merge(device, gen)
    return Costs(
        card=card, date=date, command=command, indexer_ns_per_row_key=idx_ns, sparse_ns_per_token=sparse,
        decode_indexer_ns_per_key=dec_ns, decode_indexer_fixed_us=dec_us, merge_us=merge_us,
        kernels=(("indexer_ns_per_row_key", idx_what), ("sparse_ns_per_token", sparse_what),
                 ("decode_indexer_ns_per_key", dec_what), ("decode_indexer_fixed_us", dec_what),
                 ("merge_us", merge_what)),
        **comm,  # type: ignore[arg-type]
    )
