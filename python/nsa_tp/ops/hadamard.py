"""Walsh-Hadamard transform, normalized like ``fast_hadamard_transform.hadamard_transform``.

``hadamard_transform(x, scale) = scale * x @ H_D`` where ``H_D`` is the Sylvester Hadamard matrix
(``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, symmetric). With the default ``scale = D^-0.5`` the
transform is orthonormal, so ``(q H) . (k H) = q . k``: the indexer rotates q and k before fp8 quantization
only to spread outliers over all 128 dims (DeepSeek's ``rotate_activation``).
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_tensor

__all__ = ["hadamard_transform"]


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x [..., D]`` -> ``[..., D]`` in ``x.dtype`` (float32 math); ``D`` a power of two; ``scale`` defaults
    to ``D ** -0.5``."""
    check_tensor(x, "x", dtype=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim [..., D], got a scalar")
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"x: last dim must be a power of two for the Hadamard transform, got {d}")
    if scale is None:
        scale = d**-0.5
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, d)
    h = 1
    # Butterfly from the smallest blocks up: after the step with half-width h, every 2h-block holds
    # H_2h applied to it; ends with H_D in Sylvester (natural) order.
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * scale).to(x.dtype)
