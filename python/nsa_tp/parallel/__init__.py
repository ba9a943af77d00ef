"""Parallel layout (SGLang's NSA rule), process groups and collectives."""

from nsa_tp.parallel.layout import (
    SUPPORTED_KV_CACHE_DTYPES,
    SUPPORTED_PAGE_SIZE,
    TOKEN_PARALLEL_MODES,
    LayoutError,
    ParallelLayout,
    flashmla_head_multiple,
    padded_heads,
    resolve_layout,
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
]
