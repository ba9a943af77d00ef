"""fp8 e4m3 block quantization, one scale per ``1 x 128`` block (DeepSeek's ``act_quant``).

``x ~= dequantize(quantize(x))`` with ``value = fp8 * scale``. The indexer quantizes its q and k this way
(block = the 128-dim head, so one scale per head per token). DeepSeek-V3.2 ships ``scale_fmt = "ue8m0"``:
scales rounded *up* to a power of two, so ``pow2_scale=True`` reproduces the released model's numerics.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_tensor

__all__ = ["FP8_BLOCK", "FP8_E4M3_MAX", "quantize_fp8_blocks", "dequantize_fp8_blocks"]

FP8_BLOCK = 128
FP8_E4M3_MAX = 448.0
# DeepSeek's act_quant floors each block's absmax at 1e-4 so an all-zero block gets a small, finite,
# nonzero scale (never 0, never a division by 0).
_AMAX_FLOOR = 1e-4


def quantize_fp8_blocks(
    x: torch.Tensor, block: int = FP8_BLOCK, *, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` (bf16/fp16/fp32) -> ``(x_fp8 [..., D] float8_e4m3fn, scale [..., D // block] float32)``.

    ``scale = max(absmax(block), 1e-4) / 448``, rounded up to a power of two when ``pow2_scale``; the
    quantized value is ``clamp(x / scale, -448, 448)`` in e4m3 (round to nearest even).
    ``D`` must be a multiple of ``block``.
    """
    check_tensor(x, "x", dtype=(torch.bfloat16, torch.float16, torch.float32))
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim [..., D], got a scalar")
    if block <= 0 or x.shape[-1] % block != 0:
        raise ValueError(f"block: expected a positive divisor of the last dim {x.shape[-1]}, got {block}")
    lead, d = x.shape[:-1], x.shape[-1]
    xb = x.float().reshape(*lead, d // block, block)
    amax = xb.abs().amax(dim=-1).clamp_min(_AMAX_FLOOR)
    scale = amax / FP8_E4M3_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xb / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*lead, d), scale


def dequantize_fp8_blocks(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_blocks`: ``[..., D]`` float32."""
    check_tensor(x_fp8, "x_fp8", dtype=torch.float8_e4m3fn)
    d = x_fp8.shape[-1]
    if block <= 0 or d % block != 0:
        raise ValueError(f"block: expected a positive divisor of the last dim {d}, got {block}")
    check_tensor(scale, "scale", shape=(*x_fp8.shape[:-1], d // block), dtype=torch.float32)
    xb = x_fp8.float().reshape(*x_fp8.shape[:-1], d // block, block)
    return (xb * scale[..., None]).reshape(x_fp8.shape)
