"""Which tier ``backend="auto"`` runs, per card, op and shape class: measured, never guessed.

A *tuning table* is what ``nsa-tp bench`` measured on one card: for every op and shape class, each tier's
median time on the same inputs in the same run. :func:`tier_order` turns it into the order ``auto`` tries
tiers in, with one rule on top of "fastest first": **upstream's kernel keeps first place unless another tier
measured at least** :data:`MARGIN` **faster** (so a tie within run-to-run noise never moves a user off the
kernel SGLang ships). Where the card was never measured, upstream's kernel comes first, then ours, then the
reference.

Upstream's kernel per op (what SGLang itself runs): FlashMLA for sparse MLA, DeepGEMM for the indexer
logits, sgl-kernel for the top-k. Tables live in ``nsa_tp/ops/measured/<card-slug>.json`` (committed, with
the command and results file that made them); ``NSA_TP_TUNING_FILE=<path>`` points at another one (read
once per process). Everything here is host arithmetic on shapes and dtypes: no device query (the card
name comes from the cached :mod:`nsa_tp.ops.capability` probe), no host sync, so it is safe under CUDA
graph capture.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nsa_tp.ops.capability import get_capability
from nsa_tp.ops.kv_format import FP8_BYTES_PER_TOKEN

__all__ = [
    "UPSTREAM",
    "MARGIN",
    "ENV_TUNING_FILE",
    "DEFAULT_ORDER",
    "shape_class",
    "tier_order",
    "route",
    "MEASURED_DIR",
    "order_from_times",
    "table_from_rows",
    "load_table",
    "card_slug",
    "measured_choice",
    "clear_cache",
]

# The kernel SGLang runs for each op: what "never slower than upstream" is measured against. The tiers wrap it in
# our contract: ``flashmla`` pads heads and top-k as SGLang does; ``sgl_kernel``'s top-k is ``fast_topk_v2`` plus
# our fused -inf fix-up (which SGLang does not run), so its time is upstream's kernel plus that pass
# (``benchmark/bench_tp_projection.py`` times sgl-kernel's own fused transform, as SGLang calls it).
UPSTREAM: Mapping[str, str] = {
    "sparse_mla_fwd": "flashmla",
    "plan_sparse_mla_decode": "flashmla",
    "sparse_mla_decode": "flashmla",
    "fp8_mqa_logits": "deep_gemm",
    "fp8_paged_mqa_logits": "deep_gemm",
    "topk_transform_ragged": "sgl_kernel",
    "topk_transform_paged": "sgl_kernel",
}
# A non-upstream tier goes first only when it measured at least this much faster than upstream's kernel.
# 2%: above the run-to-run spread of these kernels on one card (about 1% in benchmark/results), and below the
# auto check's 3% bar (``nsa_tp.bench.kernels.AUTO_CHECK_TOLERANCE``) by that spread, so a tier that wins by a
# hair under the margin in the table's pass cannot put auto more than 3% behind in the check's pass. (At 3%, the
# 2026-12-06 H100 run kept FlashMLA where the table had Triton 2.4% ahead; the check then measured it 5.5% ahead.)
MARGIN = 0.02
ENV_TUNING_FILE = "NSA_TP_TUNING_FILE"
# Unmeasured card: upstream's kernels, then ours, then the plain-torch definition.
DEFAULT_ORDER = ("flashmla", "deep_gemm", "sgl_kernel", "triton", "reference")
MEASURED_DIR = Path(__file__).with_name("measured")  # tuning tables and Costs records, per card
_HEAD_BUCKETS = (16, 32, 64, 128)
_WIDTH_BUCKETS = (2048, 8192, 32768, 131072)
# Rows per decode-kernel call: one request, 2, 4 and 8 (small decode batches), 64 (fills the card), and larger
# "batches", which are SGLang's fp8 prefill running through the decode kernel (one row per prompt token).
# `nsa-tp bench` measures each class at its upper edge (1, 2, 4, 8, 64 rows, and 4096): a class takes over
# only what was measured inside it.
_BATCH_BUCKETS = (1, 2, 4, 8, 64)


def _bucket(x: int, edges: Sequence[int]) -> str:
    """The smallest edge >= x, or ``">last"``."""
    for e in edges:
        if x <= e:
            return str(e)
    return f">{edges[-1]}"


def _batch(rows: int) -> str:
    return "b<=" + _bucket(rows, _BATCH_BUCKETS) if rows <= _BATCH_BUCKETS[-1] else f"b>{_BATCH_BUCKETS[-1]}"


def _kv_format(kv: Any) -> str:
    return "fp8" if isinstance(kv, torch.Tensor) and kv.shape[-1] == FP8_BYTES_PER_TOKEN else "bf16"


def _kv_dtype_format(kv_dtype: Any) -> str:
    text = str(kv_dtype).lower()
    return "fp8" if ("fp8" in text or "float8" in text or "uint8" in text) else "bf16"


def shape_class(op: str, *args: Any, **kwargs: Any) -> str:
    """The shape class of an op call: the key its measured tier order is stored under.

    - ``sparse_mla_fwd``: ``h<heads bucket>/<bf16|fp8>`` (heads rounded up to 16, 32, 64, 128).
    - ``plan_sparse_mla_decode`` / ``sparse_mla_decode``: ``h<bucket>/<kv>/b<=1``, ``b<=2``, ``b<=4``, ``b<=8``,
      ``b<=64`` or ``b>64`` (rows per call: decode proper, or an fp8 prefill that SGLang runs through the
      decode kernel).
    - ``fp8_mqa_logits``: ``n<keys bucket>``; ``fp8_paged_mqa_logits``: ``b<=1`` ... ``b<=64`` / ``b>64``.
    - top-k transforms: ``w<width bucket>`` (2K, 8K, 32K, 128K, larger).
    """
    if op == "sparse_mla_fwd":
        q, kv = args[0], args[1]
        return f"h{_bucket(q.shape[1], _HEAD_BUCKETS)}/{_kv_format(kv)}"
    if op == "plan_sparse_mla_decode":
        batch, heads = args[0], args[1]
        fmt = _kv_dtype_format(kwargs.get("kv_dtype"))
        return f"h{_bucket(heads, _HEAD_BUCKETS)}/{fmt}/{_batch(batch)}"
    if op == "sparse_mla_decode":
        q, kv = args[0], args[1]
        return f"h{_bucket(q.shape[1], _HEAD_BUCKETS)}/{_kv_format(kv)}/{_batch(q.shape[0])}"
    if op == "fp8_mqa_logits":
        return f"n{_bucket(args[1][0].shape[0], _WIDTH_BUCKETS)}"
    if op == "fp8_paged_mqa_logits":
        return _batch(args[0].shape[0])
    if op in ("topk_transform_ragged", "topk_transform_paged"):
        return f"w{_bucket(args[0].shape[1], _WIDTH_BUCKETS)}"
    return "all"


def order_from_times(op: str, times: Mapping[str, float]) -> list[str]:
    """Tier order for one shape class from measured times (ms): fastest first, except that upstream's kernel
    stays ahead of any tier that is not at least :data:`MARGIN` faster than it."""
    ranked = sorted(times, key=lambda t: times[t])
    up = UPSTREAM.get(op)
    if up not in times:
        return ranked
    limit = times[up] * (1.0 - MARGIN)
    ahead = [t for t in ranked if t != up and times[t] <= limit]
    return ahead + [up] + [t for t in ranked if t != up and t not in ahead]


def table_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{op: {class: {tier: ms}}}`` from ``nsa-tp bench`` rows that carry ``op``, ``tier``, ``ms`` and a
    ``class`` (rows without a time, or whose tier is a label such as ``auto``, are left out). Several rows
    in one class add up per tier, counting only the rows every tier of that class ran."""
    by_case: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        if r.get("ms") is None or not r.get("class") or r.get("tier") in (None, "auto", "-"):
            continue
        case = json.dumps(r.get("shape", {}), sort_keys=True)
        by_case.setdefault((r["op"], r["class"], case), {})[r["tier"]] = float(r["ms"])
    table: dict[str, dict[str, dict[str, float]]] = {}
    tiers_of: dict[tuple[str, str], set[str]] = {}
    for (op, cls, _case), times in by_case.items():
        tiers_of.setdefault((op, cls), set()).update(times)
    for (op, cls, _case), times in by_case.items():
        if set(times) != tiers_of[(op, cls)]:
            continue  # a case some tier could not run: not comparable
        slot = table.setdefault(op, {}).setdefault(cls, {})
        for tier, ms in times.items():
            slot[tier] = round(slot.get(tier, 0.0) + ms, 5)
    return table


def card_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (the table's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def load_table(card: str) -> dict[str, Any] | None:
    """The tuning table for ``card`` (``NSA_TP_TUNING_FILE`` first, then the committed one), or None.

    Read once per process and card. A file that names another card is ignored for this one.
    """
    path = os.environ.get(ENV_TUNING_FILE)
    candidates = [Path(path)] if path else []
    candidates.append(MEASURED_DIR / f"{card_slug(card)}.json")
    for p in candidates:
        if not p.is_file():
            continue
        with open(p) as f:
            data = json.load(f)
        if card_slug(str(data.get("card", ""))) == card_slug(card):
            return data
    return None


def _device_of(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.device | None:
    if op == "plan_sparse_mla_decode":
        dev = kwargs.get("device")
        return None if dev is None else torch.device(dev)
    first = args[0] if args else None
    return first.device if isinstance(first, torch.Tensor) else None


def measured_choice(op: str, *args: Any, **kwargs: Any) -> tuple[str, str, dict[str, float] | None]:
    """``(card, class, {tier: ms} or None)`` for this call: what was measured for it on this card."""
    device = _device_of(op, args, kwargs)
    cls = shape_class(op, *args, **kwargs)
    if device is None or device.type != "cuda":
        return "cpu", cls, None  # nothing is measured off CUDA
    card = get_capability(device).name
    table = load_table(card)
    # A decode plan picks the tier that will run the decode: it is chosen by the decode's own timings.
    timed_op = "sparse_mla_decode" if op == "plan_sparse_mla_decode" else op
    times = None if table is None else table.get("times", {}).get(timed_op, {}).get(cls)
    return card, cls, times


def tier_order(op: str, *args: Any, **kwargs: Any) -> list[str]:
    """The order ``auto`` tries tiers in for this call (tiers that cannot run it are skipped later).

    Measured tiers first (:func:`order_from_times`), then the rest in :data:`DEFAULT_ORDER`. A measurement
    that did not include upstream's kernel cannot show anything beat it: upstream's kernel then goes first.
    """
    return list(route(op, *args, **kwargs)[2])


def route(op: str, *args: Any, **kwargs: Any) -> tuple[str, str, tuple[str, ...]]:
    """``(card, class, tier order)`` of this call: the key ``auto`` logs its choice under, and the order."""
    device = _device_of(op, args, kwargs)
    cls = shape_class(op, *args, **kwargs)
    card = get_capability(device).name if device is not None and device.type == "cuda" else "cpu"
    return card, cls, _order(op, card, cls)


@functools.cache
def _order(op: str, card: str, cls: str) -> tuple[str, ...]:
    """:func:`tier_order` for one (op, card, class): computed once per process, so ``auto`` on the per-layer path
    is a dictionary lookup, not a sort."""
    table = load_table(card) if card != "cpu" else None
    timed_op = "sparse_mla_decode" if op == "plan_sparse_mla_decode" else op
    times = None if table is None else table.get("times", {}).get(timed_op, {}).get(cls)
    measured = order_from_times(op, times) if times else []
    up = UPSTREAM.get(op)
    if up is not None and up not in measured:
        measured.insert(0, up)
    return tuple(measured + [t for t in DEFAULT_ORDER if t not in measured])


def clear_cache() -> None:
    """Forget the loaded tables and the orders made from them (tests that switch tables; serving never needs it)."""
    load_table.cache_clear()
    _order.cache_clear()
