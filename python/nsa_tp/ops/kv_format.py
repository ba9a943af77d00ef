"""The latent KV cache's fp8 format (FlashMLA's "V3.2" sparse format), 656 bytes a token.

Byte layout of one token (little-endian), all in one ``uint8`` row::

    [  0, 512)  512 x float8_e4m3fn   the latent (nope) part, quantized in 4 tiles of 128 values
    [512, 528)    4 x float32         one dequantization scale per tile (value = fp8 * scale)
    [528, 656)   64 x bfloat16        the rope part, unquantized

A bf16 cache row is simply ``[512 latent | 64 rope]`` = 576 bf16 values.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_tensor

__all__ = [
    "D_LATENT",
    "D_ROPE",
    "D_QK",
    "FP8_TILE",
    "FP8_BYTES_PER_TOKEN",
    "FP8_E4M3_MAX",
    "pack_fp8_kv",
    "unpack_fp8_kv",
    "is_fp8_kv",
    "LATENT_PAGE_SIZE",
]

D_LATENT = 512
D_ROPE = 64
D_QK = D_LATENT + D_ROPE  # 576
FP8_TILE = 128
_NUM_TILES = D_LATENT // FP8_TILE  # 4
FP8_BYTES_PER_TOKEN = D_LATENT + 4 * _NUM_TILES + 2 * D_ROPE  # 512 + 16 + 128 = 656
FP8_E4M3_MAX = 448.0
# Tokens a page of the paged latent cache: FlashMLA's paged decode reads 64-token pages (SGLang's NSA page size).
LATENT_PAGE_SIZE = 64


def is_fp8_kv(kv: torch.Tensor) -> bool:
    """True for the packed 656-byte format (``uint8`` or ``float8_e4m3fn`` view of the bytes)."""
    return kv.shape[-1] == FP8_BYTES_PER_TOKEN and kv.dtype in (torch.uint8, torch.float8_e4m3fn)


def pack_fp8_kv(kv: torch.Tensor) -> torch.Tensor:
    """``[..., 576]`` bf16/fp32 -> ``[..., 656]`` uint8 (per-128 absmax scales, rope kept in bf16).

    A tile of zeros gets scale 1 (not 0) so that dequantization never divides by or multiplies into NaN.
    """
    check_tensor(kv, "kv", dtype=(torch.bfloat16, torch.float16, torch.float32))
    if kv.shape[-1] != D_QK:
        raise ValueError(f"kv: expected last dim {D_QK} (512 latent + 64 rope), got {kv.shape[-1]}")
    lead = kv.shape[:-1]
    flat = kv.reshape(-1, D_QK)
    nope = flat[:, :D_LATENT].float().reshape(-1, _NUM_TILES, FP8_TILE)
    amax = nope.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))  # [M, 4]
    q = (nope / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch.empty(flat.shape[0], FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    out[:, :D_LATENT] = q.reshape(-1, D_LATENT).view(torch.uint8)
    out[:, D_LATENT : D_LATENT + 16] = scale.float().contiguous().view(torch.uint8)
    out[:, D_LATENT + 16 :] = flat[:, D_LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out.reshape(*lead, FP8_BYTES_PER_TOKEN)


def unpack_fp8_kv(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., 656]`` packed bytes -> ``[..., 576]`` dequantized values in ``dtype``."""
    if not is_fp8_kv(packed):
        raise ValueError(
            f"kv: expected the fp8 format [..., {FP8_BYTES_PER_TOKEN}] uint8/float8_e4m3fn, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, FP8_BYTES_PER_TOKEN).view(torch.uint8)
    nope = flat[:, :D_LATENT].contiguous().view(torch.float8_e4m3fn).float().reshape(-1, _NUM_TILES, FP8_TILE)
    scale = flat[:, D_LATENT : D_LATENT + 16].contiguous().view(torch.float32)  # [M, 4]
    rope = flat[:, D_LATENT + 16 :].contiguous().view(torch.bfloat16).float()
    values = torch.cat([(nope * scale[..., None]).reshape(-1, D_LATENT), rope], dim=-1)
    return values.to(dtype).reshape(*lead, D_QK)
