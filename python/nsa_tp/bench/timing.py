"""Timing and the card's own ceilings, measured in the same run as the kernels they judge.

Times are medians of CUDA-event timings (``triton.testing.do_bench``, which also clears L2 between
repetitions so a kernel never reads last run's data from cache). Ceilings: a large bf16 and fp8 matrix
product (TFLOP/s) and a large device-to-device copy (GB/s, bytes read + written).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["Ceilings", "median_ms", "event_median_ms", "measure_ceilings"]


def median_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in milliseconds (CUDA events, L2 cleared before each repetition)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def event_median_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` single-call CUDA-event timings of ``fn`` after ``warmup`` calls (no L2 clearing:
    for benchmarks that compare variants on the same resident inputs, each call synchronized)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@dataclasses.dataclass(frozen=True)
class Ceilings:
    bf16_tflops: float
    fp8_tflops: float | None  # None where torch has no fp8 matmul for this card
    copy_gbps: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def measure_ceilings(device: torch.device, size: int = 8192, copy_bytes: int = 1 << 30) -> Ceilings:
    """``size``^3 bf16 and fp8 products on random data (never zeros: they run faster) and a copy."""
    notes: list[str] = []
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    flops = 2.0 * size**3
    bf16 = flops / (median_ms(lambda: a @ b) * 1e-3) / 1e12

    fp8: float | None = None
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t()  # column-major B, as cuBLASLt's fp8 path wants
        one = torch.ones((), device=device, dtype=torch.float32)
        fp8 = flops / (median_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) * 1e-3) / 1e12
    except (RuntimeError, AttributeError) as e:
        notes.append(f"fp8 matmul unavailable: {e}")

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 256, generator=gen)
    dst = torch.empty_like(src)
    copy = 2.0 * copy_bytes / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    return Ceilings(bf16_tflops=bf16, fp8_tflops=fp8, copy_gbps=copy, notes=tuple(notes))
