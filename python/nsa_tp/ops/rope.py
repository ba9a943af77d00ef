"""Rotary position embedding as DeepSeek-V3.2 uses it, with YaRN frequencies.

Two layouts of the same rotation, and V3.2 uses both (DeepSeek's reference ``inference/model.py``):

- **interleaved** (GPT-J style, pairs ``(x[2i], x[2i+1])``): the MLA rope part (q_pe, k_pe, 64 dims);
  SGLang builds that rotary with ``is_neox_style=False``.
- **non-interleaved** (NeoX style, pairs ``(x[i], x[i + d/2])``): the lightning indexer, on the *first*
  64 of its 128 dims ("rope in indexer is not interleaved"; SGLang's indexer uses ``is_neox_style=True``).

Pair ``i`` rotates by angle ``pos * inv_freq[i]``. YaRN (DeepSeek's ``precompute_freqs_cis``): frequencies
below the ``beta_fast``/``beta_slow`` correction range are divided by ``factor``, those above are kept, a
linear ramp blends between. cos/sin carry ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
(SGLang's DeepseekScalingRotaryEmbedding) — 1.0 for V3.2 (both are 1.0); the attention-side YaRN
correction lives in ``NSAConfig.softmax_scale``.
"""

from __future__ import annotations

import math

import torch

from nsa_tp.ops.check import check_tensor

__all__ = ["yarn_inv_freq", "rope_cos_sin", "apply_rope"]


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    # The dim index whose wavelength completes `num_rotations` turns over the original context.
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(
    rotary_dim: int,
    base: float = 10000.0,
    *,
    factor: float = 1.0,
    original_max_position: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """``[rotary_dim // 2]`` float32 inverse frequencies; plain RoPE when ``factor <= 1``."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even number, got {rotary_dim}")
    if base <= 1.0:
        raise ValueError(f"base: expected > 1, got {base}")
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if factor > 1.0:
        low = max(math.floor(_correction_dim(beta_fast, rotary_dim, base, original_max_position)), 0)
        high = min(math.ceil(_correction_dim(beta_slow, rotary_dim, base, original_max_position)), rotary_dim - 1)
        if low == high:
            high += 0.001  # DeepSeek's guard against a zero-width ramp
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
        keep = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
        inv = inv / factor * (1.0 - keep) + inv * keep
    return inv.float()


def rope_cos_sin(
    positions: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    factor: float = 1.0,
    original_max_position: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float = 1.0,
    mscale_all_dim: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [T]`` int -> ``(cos, sin)`` each ``[T, rotary_dim // 2]`` float32 on positions' device."""
    check_tensor(positions, "positions", ndim=1, dtype=(torch.int32, torch.int64))
    inv = yarn_inv_freq(
        rotary_dim, base, factor=factor, original_max_position=original_max_position,
        beta_fast=beta_fast, beta_slow=beta_slow,
    ).to(positions.device, torch.float64)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]
    amp = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return (torch.cos(angles) * amp).float(), (torch.sin(angles) * amp).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x [T, ..., D]``; the rest pass through.

    ``cos``/``sin``: ``[T, R/2]`` float32 from :func:`rope_cos_sin`. Returns a new tensor in ``x.dtype``
    (float32 math). ``interleaved`` picks the pair layout (see module docstring).
    """
    check_tensor(x, "x", dtype=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    if x.dim() < 2:
        raise ValueError(f"x: expected [T, ..., D], got shape {tuple(x.shape)}")
    T, D = x.shape[0], x.shape[-1]
    check_tensor(cos, "cos", ndim=2, dtype=torch.float32)
    half = cos.shape[1]
    check_tensor(cos, "cos", shape=(T, half))
    check_tensor(sin, "sin", shape=(T, half), dtype=torch.float32)
    if 2 * half > D:
        raise ValueError(f"cos: rotary dim {2 * half} exceeds x's last dim {D}")
    # cos/sin [T, R/2] -> [T, 1.., R/2] broadcast over x's middle dims
    view = (T,) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.view(view), sin.view(view)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot = x[..., : 2 * half].to(work)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., 2 * half :]), dim=-1)
