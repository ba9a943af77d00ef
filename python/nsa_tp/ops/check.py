"""One boundary checker for every op: ``ValueError`` naming the argument, expected vs got."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["check_tensor", "check_same_device", "host_ints"]


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check ``x`` at an op's boundary; ``None`` in ``shape`` is a wildcard. Returns ``x``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims{_fmt(shape)}, got shape {tuple(x.shape)}")
    if shape is not None:
        for got, want in zip(x.shape, shape, strict=True):
            if want is not None and got != want:
                raise ValueError(f"{name}: expected shape {_fmt(shape).strip()}, got {tuple(x.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            want = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(f"{name}: expected dtype {want}, got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected device {first} like the other inputs, got {dev}")
    return first


def _fmt(shape: Sequence[int | None] | None) -> str:
    if shape is None:
        return ""
    return " [" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def host_ints(values: Iterable[int] | torch.Tensor, name: str) -> list[int]:
    """Per-batch host data as a list of Python ints: a 1-D integer tensor (copied to the host once) or a
    sequence of ints. Builders call this once per batch, never on the per-layer path."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {tuple(values.shape)} {values.dtype}")
        return [int(v) for v in values.cpu().tolist()]
    out = list(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected integers, got {v!r}")
    return out
