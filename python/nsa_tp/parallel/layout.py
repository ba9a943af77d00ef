"""SGLang's parallel-layout rule for NSA (DeepSeek Sparse Attention) models, as one pure function.

Upstream once forced DP attention for NSA models; after the fix, ``dp_size < tp_size`` is allowed:

- ``--tp N``: pure TP, every rank holds ``H / N`` heads (``attn_tp_size = N``).
- ``--tp N --dp D --enable-dp-attention``: ``attn_tp_size = N / D`` ranks per attention group,
  ``D`` groups each serving their own requests. ``D == N`` is full DP attention.
- ``--tp N --dp D`` (no DP attention): ``D`` independent replicas of ``--tp N``.

FlashMLA's sparse kernels only run 64 heads (SM90) or 128 heads (SM100+) per call, so fewer heads are
zero-padded; the layout records what that padding wastes. The head math is a kernel fact and lives in
:mod:`nsa_tp.ops.heads`; this module re-exports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nsa_tp.ops.heads import flashmla_head_multiple, padded_heads  # kernel facts: ops owns them

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "resolve_layout",
    "flashmla_head_multiple",
    "padded_heads",
    "SUPPORTED_KV_CACHE_DTYPES",
    "SUPPORTED_PAGE_SIZE",
    "TOKEN_PARALLEL_MODES",
]

SUPPORTED_PAGE_SIZE = 64  # NSA's index-K cache and FlashMLA's paged decode both use 64-token pages
SUPPORTED_KV_CACHE_DTYPES = ("fp8_e4m3", "bfloat16")
_KV_DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8_e4m3": "fp8_e4m3", "fp8": "fp8_e4m3"}
TOKEN_PARALLEL_MODES = ("auto", "on", "off")


class LayoutError(ValueError):
    """An impossible ``--tp/--dp/...`` combination; the message names the flag to change and to what."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt_choices(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How one NSA attention layer is spread over GPUs (one replica; ``num_replicas`` of them)."""

    tp_size: int
    dp_size: int
    enable_dp_attention: bool
    attn_tp_size: int  # ranks that split one request's heads
    attn_dp_size: int  # attention groups, each serving its own requests
    num_replicas: int  # independent engines (``--dp`` without DP attention)
    world_size: int  # GPUs in total: tp_size * num_replicas
    num_attention_heads: int
    heads_per_rank: int
    mode: str  # "pure_tp" | "partial_dp_attention" | "dp_attention"
    sm_major: int
    kv_cache_dtype: str  # resolved: "fp8_e4m3" or "bfloat16"
    page_size: int
    flashmla_head_multiple: int | None
    flashmla_padded_heads: int
    flashmla_waste_fraction: float  # share of FlashMLA sparse FLOPs spent on zero heads
    token_parallel: str  # "auto" | "on" | "off": all-to-all heads <-> tokens inside the attention TP group
    warnings: tuple[str, ...]

    @property
    def flashmla_flops_factor(self) -> float:
        """Executed / useful FLOPs of FlashMLA's sparse prefill at this head count (4.0 for 16 heads on SM90)."""
        return self.flashmla_padded_heads / self.heads_per_rank

    @property
    def token_parallel_possible(self) -> bool:
        """Token-parallel needs an attention TP group of more than one rank."""
        return self.attn_tp_size > 1 and self.token_parallel != "off"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["warnings"] = list(self.warnings)
        d["flashmla_flops_factor"] = self.flashmla_flops_factor
        return d


def _detect_sm_major() -> int:
    """This machine's GPU SM major, or 9 (Hopper, the serving target) when there is no GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_capability()[0])
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop `nsa-tp plan`
        pass
    return 9


def _check_positive_int(value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{flag} must be a positive integer, got {value!r}")
    return value


def resolve_layout(
    tp_size: int,
    dp_size: int = 1,
    enable_dp_attention: bool = False,
    *,
    num_attention_heads: int = 128,
    sm_major: int | None = None,
    kv_cache_dtype: str = "auto",
    page_size: int = SUPPORTED_PAGE_SIZE,
    token_parallel: str = "auto",
) -> ParallelLayout:
    """SGLang's NSA layout rule: ``(--tp, --dp, --enable-dp-attention, ...)`` -> :class:`ParallelLayout`.

    Raises :class:`LayoutError` (a ``ValueError``) naming the flag to change for any impossible layout.
    ``sm_major=None`` reads this machine's GPU once (9 when there is none).
    """
    tp_size = _check_positive_int(tp_size, "--tp")
    dp_size = _check_positive_int(dp_size, "--dp")
    num_attention_heads = _check_positive_int(num_attention_heads, "num_attention_heads (model config)")
    if token_parallel not in TOKEN_PARALLEL_MODES:
        raise LayoutError(
            f"--nsa-token-parallel {token_parallel!r} is not a mode; use {', '.join(TOKEN_PARALLEL_MODES)}"
        )
    warnings: list[str] = []

    if enable_dp_attention:
        if dp_size > tp_size:
            raise LayoutError(
                f"--dp {dp_size} is larger than --tp {tp_size}; with --enable-dp-attention use --dp "
                f"{_fmt_choices(_divisors(tp_size))}"
            )
        if tp_size % dp_size:
            raise LayoutError(
                f"--dp {dp_size} does not divide --tp {tp_size}; use --dp {_fmt_choices(_divisors(tp_size))}"
            )
        attn_tp_size, attn_dp_size, num_replicas = tp_size // dp_size, dp_size, 1
        if dp_size == 1:
            warnings.append(
                "--enable-dp-attention with --dp 1 is pure TP: every rank holds "
                f"{num_attention_heads // tp_size if num_attention_heads % tp_size == 0 else '?'} heads"
            )
    else:
        attn_tp_size, attn_dp_size, num_replicas = tp_size, 1, dp_size

    if num_attention_heads % attn_tp_size:
        flags = f"--tp {tp_size}" + (f" --dp {dp_size} --enable-dp-attention" if enable_dp_attention else "")
        good_dp = [d for d in _divisors(tp_size) if num_attention_heads % (tp_size // d) == 0]
        if enable_dp_attention and good_dp:
            hint = f"use --dp {_fmt_choices(good_dp)}"
        else:
            hint = f"use --tp {_fmt_choices([d for d in _divisors(num_attention_heads) if d <= max(tp_size, 8)])}"
        raise LayoutError(
            f"{num_attention_heads} attention heads do not split over an attention TP group of "
            f"{attn_tp_size} ranks ({flags}); {hint}"
        )
    heads_per_rank = num_attention_heads // attn_tp_size

    if sm_major is None:
        sm_major = _detect_sm_major()
    if isinstance(sm_major, bool) or not isinstance(sm_major, int) or not 7 <= sm_major <= 12:
        raise LayoutError(f"--sm {sm_major!r} is not a GPU generation this project knows; use --sm 90 or 100")

    kv = _KV_DTYPE_ALIASES.get(kv_cache_dtype) if kv_cache_dtype != "auto" else None
    if kv_cache_dtype == "auto":
        # Upstream's choice: the fp8 656-byte cache is FlashMLA's native format on Blackwell; Hopper's
        # legacy sparse kernels read bf16 for prefill, so bf16 is the default there.
        kv = "fp8_e4m3" if sm_major >= 10 else "bfloat16"
    if kv is None:
        raise LayoutError(
            f"--kv-cache-dtype {kv_cache_dtype} is not supported for NSA models; use auto, fp8_e4m3 or bfloat16"
        )

    page_size = _check_positive_int(page_size, "--page-size")
    if page_size != SUPPORTED_PAGE_SIZE:
        raise LayoutError(
            f"--page-size {page_size} is not supported for NSA models (the index-K cache and FlashMLA's paged "
            f"decode use 64-token pages); use --page-size {SUPPORTED_PAGE_SIZE}"
        )

    if attn_tp_size == 1:
        mode = "dp_attention" if enable_dp_attention else "pure_tp"
    elif attn_dp_size == 1:
        mode = "pure_tp"
    else:
        mode = "partial_dp_attention"

    multiple = flashmla_head_multiple(sm_major)
    padded = padded_heads(heads_per_rank, multiple)
    waste = 1.0 - heads_per_rank / padded
    if attn_tp_size > 1:
        what = "NSA TP mode is active" if mode == "pure_tp" else "NSA partial DP attention is active"
        msg = f"{what}: attn_tp_size={attn_tp_size}, {heads_per_rank} heads per rank"
        if multiple is None:
            msg += f"; SM{sm_major}0 has no FlashMLA sparse kernel, the Triton tier serves every head count"
        elif padded != heads_per_rank:
            msg += (
                f"; FlashMLA pads them to {padded} on SM{sm_major}0 = {padded / heads_per_rank:.1f}x the "
                f"sparse-prefill FLOPs ({waste:.0%} wasted); nsa-tp's Triton tier runs {heads_per_rank} heads "
                "without padding"
            )
        else:
            msg += f"; no FlashMLA head padding on SM{sm_major}0"
        warnings.append(msg)
    if token_parallel == "on" and attn_tp_size == 1:
        warnings.append("--nsa-token-parallel on has no effect: the attention TP group has one rank")

    return ParallelLayout(
        tp_size=tp_size,
        dp_size=dp_size,
        enable_dp_attention=enable_dp_attention,
        attn_tp_size=attn_tp_size,
        attn_dp_size=attn_dp_size,
        num_replicas=num_replicas,
        world_size=tp_size * num_replicas,
        num_attention_heads=num_attention_heads,
        heads_per_rank=heads_per_rank,
        mode=mode,
        sm_major=sm_major,
        kv_cache_dtype=kv,
        page_size=page_size,
        flashmla_head_multiple=multiple,
        flashmla_padded_heads=padded,
        flashmla_waste_fraction=waste,
        token_parallel=token_parallel,
        warnings=tuple(warnings),
    )
