"""Parallel layout (SGLang's NSA rule), process groups and collectives."""

from nsa_tp.parallel.layout import (
    SUPPORTED_KV_CACHE_DTYPES,
    SUPPORTED_PAGE_SIZE,
    TOKEN_PARALLEL_MODES,
    LayoutError,
    ParallelLayout,
    dp_attention_flags,
    flashmla_head_multiple,
    padded_heads,
    resolve_layout,
    sglang_flags,
)

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "resolve_layout",
    "flashmla_head_multiple",
    "padded_heads",
    "SUPPORTED_KV_CACHE_DTYPES",
    "SUPPORTED_PAGE_SIZE",
    "TOKEN_PARALLEL_MODES",
    "dp_attention_flags",
    "sglang_flags",
]
