"""The device capability probe, read once per device and reused: SM version, SM count, optional kernel packages.

Upstream read the SM major inside the attention forward pass (a device-property query per layer per step).
Here every device-dependent decision (FlashMLA's head multiple, which tiers can run) reads a
:class:`Capability` built on the first :func:`get_capability` call for that device — normally at backend
construction — and served from a cache afterwards. The forward pass never queries the device again;
``test/srt/test_capability.py`` proves it by making ``torch.cuda.get_device_capability`` raise after
construction.

Which optional kernel packages import (``flash_mla``, ``triton``) is a process-wide fact, probed once by
:func:`import_error` and cached the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import torch

from nsa_tp.ops.heads import flashmla_head_multiple

__all__ = ["Capability", "get_capability", "card_name", "import_error", "clear_cache"]


@dataclasses.dataclass(frozen=True)
class Capability:
    """What one device can run, read once.

    ``device`` is normalized (``cuda:<index>`` or ``cpu``). ``sm`` is ``(major, minor)`` for CUDA devices and
    None elsewhere; ``num_sms`` is the multiprocessor count (None off CUDA).
    """

    device: torch.device
    name: str
    sm: tuple[int, int] | None
    num_sms: int | None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sm_major(self) -> int | None:
        return None if self.sm is None else self.sm[0]

    @property
    def sm_label(self) -> str:
        """``"SM90"``, ``"SM100"``, ... or ``"cpu"``."""
        return self.device.type if self.sm is None else f"SM{self.sm[0]}{self.sm[1]}"

    @property
    def flashmla_head_multiple(self) -> int | None:
        """Heads per FlashMLA sparse call on this device (64 SM90, 128 SM100+, None otherwise)."""
        return None if self.sm is None else flashmla_head_multiple(self.sm[0])


def _normalize(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # "cuda" means the current device; pin the index so each physical GPU has one cache entry.
        return torch.device("cuda", torch.cuda.current_device())
    return dev


@functools.cache
def _probe(device: torch.device) -> Capability:
    """The only place that asks the driver about a device."""
    if device.type != "cuda":
        return Capability(device=device, name=device.type, sm=None, num_sms=None)
    major, minor = torch.cuda.get_device_capability(device)
    props = torch.cuda.get_device_properties(device)
    return Capability(device=device, name=str(props.name), sm=(int(major), int(minor)),
                      num_sms=int(props.multi_processor_count))


def get_capability(device: torch.device | str | int | None = None) -> Capability:
    """The :class:`Capability` of ``device`` (default: the current CUDA device, else CPU). Cached per device.

    A tensor's ``.device`` always carries its index, so calling this with ``x.device`` on a hot path is a
    dictionary lookup, not a driver query.
    """
    return _probe(_normalize(device))


def card_name(device: torch.device | str | int | None = None) -> str | None:
    """The GPU's name (the key of its tuning table and Costs record) for ``device`` (default: the current CUDA
    device), or None where it is not a CUDA device. Cached like :func:`get_capability`."""
    if device is None and not torch.cuda.is_available():
        return None
    cap = get_capability(device)
    return cap.name if cap.is_cuda else None


@functools.cache
def import_error(module: str) -> str | None:
    """Why ``module`` cannot be imported here (None if it imports). Probed once per process."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken extension (missing libcudart, ABI skew) is a reason, not a crash
        return f"cannot import {module}: {type(e).__name__}: {e}"
    return None


def clear_cache() -> None:
    """Forget every probe (tests that fake devices use this; serving code never needs it)."""
    _probe.cache_clear()
    import_error.cache_clear()
