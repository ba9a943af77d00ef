"""Small helpers shared by the Triton kernels: the device's SM count (cached) and split sizing."""

from __future__ import annotations

import functools

import torch

__all__ = ["num_sms", "cdiv", "alloc", "LOG2E", "LN2"]

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): the kernels use exp2, the fast hardware path
LN2 = 0.6931471805599453


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (read once per device: never a query on the per-layer path)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output and workspace is allocated here, uninitialized (the kernels write every element).

    One seam on purpose: the tests replace it with a NaN-filling allocator, so an element a kernel forgot
    to write shows up as NaN instead of as whatever the caching allocator happened to hold.
    """
    return torch.empty(shape, dtype=dtype, device=device)
