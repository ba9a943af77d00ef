"""SGLang's parallel-layout rule for NSA (DeepSeek Sparse Attention) models, as one pure function.

Upstream once forced DP attention for NSA models; after the fix, ``dp_size < tp_size`` is allowed:

- ``--tp N``: pure TP, every rank holds ``H / N`` heads (``attn_tp_size = N``).
- ``--tp N --attn-dp-size D`` (SGLang 0.5.23), spelled ``--tp N --dp D --enable-dp-attention`` in 0.5.17-0.5.22:
  ``attn_tp_size = N / D`` ranks per attention group, ``D`` groups each serving their own requests.
  ``D == N`` is full DP attention. Both spellings give the same layout; messages use the one given.
- ``--tp N --dp D`` (no DP attention): ``D`` independent replicas of ``--tp N``.

FlashMLA's sparse kernels only run 64 heads (SM90) or 128 heads (SM100+) per call, so fewer heads are
zero-padded; the layout records what that padding wastes. The head math is a kernel fact and lives in
:mod:`nsa_tp.ops.heads`; this module re-exports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nsa_tp.ops.heads import flashmla_head_multiple, padded_heads  # kernel facts: ops owns them
from nsa_tp.ops.tuning import MARGIN  # the router's margin, quoted in the --tp warning

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


@dataclasses.dataclass(frozen=True)
class _DpSpelling:
    """The attention-DP width as the user spelled it, so every message names the flag they typed.

    ``new``: SGLang 0.5.23's ``--attn-dp-size D``; otherwise 0.5.17's ``--dp D --enable-dp-attention``
    (deprecated in 0.5.23, removed after 2026-12-31 per SGLang's ``server_args.py``).
    """

    new: bool

    def flag(self, width: int | str) -> str:
        return f"--attn-dp-size {width}" if self.new else f"--dp {width}"

    def flags(self, tp_size: int, width: int) -> str:
        return dp_attention_flags(tp_size, width, self.new)


def dp_attention_flags(tp_size: int, attn_dp_size: int, new_spelling: bool) -> str:
    """Partial DP attention as SGLang spells it: ``--tp 8 --attn-dp-size 4`` (0.5.23) or
    ``--tp 8 --dp 4 --enable-dp-attention`` (0.5.17-0.5.22). The one place either spelling is written."""
    if new_spelling:
        return f"--tp {tp_size} --attn-dp-size {attn_dp_size}"
    return f"--tp {tp_size} --dp {attn_dp_size} --enable-dp-attention"


def sglang_flags(layout: ParallelLayout, new_spelling: bool) -> str:
    """The SGLang flags that serve ``layout``: attention DP in the chosen spelling, model replicas as ``--dp R``
    (the same in both), pure TP as ``--tp N`` alone."""
    if layout.enable_dp_attention and layout.attn_dp_size > 1:
        return dp_attention_flags(layout.tp_size, layout.attn_dp_size, new_spelling)
    return f"--tp {layout.tp_size}" + (f" --dp {layout.num_replicas}" if layout.num_replicas > 1 else "")


def _merge_dp_spellings(
    dp_size: int, enable_dp_attention: bool, attn_dp_size: int | None
) -> tuple[int, bool, _DpSpelling, list[str]]:
    """Both spellings of attention DP -> one ``(dp_size, enable_dp_attention)`` in 0.5.17's terms.

    ``--attn-dp-size D`` (D > 1) is ``--dp D --enable-dp-attention``; ``--attn-dp-size 1`` is no attention DP.
    Two different widths, or replicas (``--dp`` alone) beside attention DP, are errors naming both flags
    (SGLang 0.5.23 refuses both too). ``--enable-dp-attention`` without ``--dp`` adds nothing, as in SGLang.
    """
    if attn_dp_size is None:
        return dp_size, enable_dp_attention, _DpSpelling(new=False), []
    attn_dp_size = _check_positive_int(attn_dp_size, "--attn-dp-size")
    old = f"--dp {dp_size} --enable-dp-attention"
    if enable_dp_attention and dp_size > 1 and dp_size != attn_dp_size:
        raise LayoutError(
            f"--attn-dp-size {attn_dp_size} and {old} give two attention DP widths ({attn_dp_size} and "
            f"{dp_size}); give one: --attn-dp-size D (SGLang 0.5.23) or --dp D --enable-dp-attention (0.5.17-0.5.22)"
        )
    if not enable_dp_attention and dp_size > 1 and attn_dp_size > 1:
        raise LayoutError(
            f"--dp {dp_size} (model replicas) with --attn-dp-size {attn_dp_size}: SGLang does not combine replicas "
            f"with attention DP; drop --dp {dp_size}"
        )
    warnings = []
    if enable_dp_attention and dp_size > 1:
        warnings.append(
            f"--attn-dp-size {attn_dp_size} and {old} say the same; give one (SGLang 0.5.23 refuses "
            f"--dp-size {dp_size} beside --attn-dp-size {attn_dp_size})"
        )
    if attn_dp_size > 1:
        return attn_dp_size, True, _DpSpelling(new=True), warnings
    return dp_size, False, _DpSpelling(new=True), warnings  # --attn-dp-size 1: no attention DP (replicas stay)


def _attention_groups(
    tp_size: int, dp_size: int, enable_dp_attention: bool, num_attention_heads: int, spelling: _DpSpelling
) -> tuple[int, int, int, list[str]]:
    """SGLang's rule: ``(attn_tp_size, attn_dp_size, num_replicas, warnings)``; with DP attention
    ``attn_tp_size = tp_size // dp_size``, without it ``--dp`` counts independent replicas."""
    if not enable_dp_attention:
        return tp_size, 1, dp_size, []
    choices = _fmt_choices(_divisors(tp_size))
    if dp_size > tp_size:
        where = "" if spelling.new else "with --enable-dp-attention "
        raise LayoutError(
            f"{spelling.flag(dp_size)} is larger than --tp {tp_size}; {where}use {spelling.flag(choices)}"
        )
    if tp_size % dp_size:
        raise LayoutError(f"{spelling.flag(dp_size)} does not divide --tp {tp_size}; use {spelling.flag(choices)}")
    warnings = []
    if dp_size == 1:
        warnings.append(
            "--enable-dp-attention with --dp 1 is pure TP: every rank holds "
            f"{num_attention_heads // tp_size if num_attention_heads % tp_size == 0 else '?'} heads"
        )
    return tp_size // dp_size, dp_size, 1, warnings


def _heads_per_rank(
    num_attention_heads: int, tp_size: int, dp_size: int, enable_dp_attention: bool, spelling: _DpSpelling
) -> int:
    """Heads on each rank of an attention TP group; a LayoutError naming ``--tp`` or the DP flag otherwise."""
    attn_tp_size = tp_size // dp_size if enable_dp_attention else tp_size
    if num_attention_heads % attn_tp_size == 0:
        return num_attention_heads // attn_tp_size
    flags = spelling.flags(tp_size, dp_size) if enable_dp_attention else f"--tp {tp_size}"
    good_dp = [d for d in _divisors(tp_size) if num_attention_heads % (tp_size // d) == 0]
    if enable_dp_attention and good_dp:
        hint = f"use {spelling.flag(_fmt_choices(good_dp))}"
    else:
        hint = f"use --tp {_fmt_choices([d for d in _divisors(num_attention_heads) if d <= max(tp_size, 8)])}"
    raise LayoutError(
        f"{num_attention_heads} attention heads do not split over an attention TP group of "
        f"{attn_tp_size} ranks ({flags}); {hint}"
    )


def _resolve_sm_major(sm_major: int | None) -> int:
    if sm_major is None:
        sm_major = _detect_sm_major()
    if isinstance(sm_major, bool) or not isinstance(sm_major, int) or not 7 <= sm_major <= 12:
        raise LayoutError(f"--sm {sm_major!r} is not a GPU generation this project knows; use --sm 90 or 100")
    return sm_major


def _resolve_kv_cache_dtype(kv_cache_dtype: str, sm_major: int) -> str:
    """``auto`` -> upstream's choice for the card; an alias -> its canonical name; else a LayoutError."""
    if kv_cache_dtype == "auto":
        # Upstream's choice: the fp8 656-byte cache is FlashMLA's native format on Blackwell; Hopper's
        # legacy sparse kernels read bf16 for prefill, so bf16 is the default there.
        return "fp8_e4m3" if sm_major >= 10 else "bfloat16"
    kv = _KV_DTYPE_ALIASES.get(kv_cache_dtype)
    if kv is None:
        raise LayoutError(
            f"--kv-cache-dtype {kv_cache_dtype} is not supported for NSA models; use auto, fp8_e4m3 or bfloat16"
        )
    return kv


def _check_page_size(page_size: Any) -> int:
    page_size = _check_positive_int(page_size, "--page-size")
    if page_size != SUPPORTED_PAGE_SIZE:
        raise LayoutError(
            f"--page-size {page_size} is not supported for NSA models (the index-K cache and FlashMLA's paged "
            f"decode use 64-token pages); use --page-size {SUPPORTED_PAGE_SIZE}"
        )
    return page_size


def _mode(attn_tp_size: int, attn_dp_size: int, enable_dp_attention: bool) -> str:
    if attn_tp_size == 1:
        return "dp_attention" if enable_dp_attention else "pure_tp"
    return "pure_tp" if attn_dp_size == 1 else "partial_dp_attention"


def _tp_mode_warning(mode: str, attn_tp_size: int, heads_per_rank: int, sm_major: int, padded: int) -> str:
    """The line SGLang's "DSA with TP mode is active" becomes: the group, the heads, what FlashMLA pads."""
    what = "NSA TP mode is active" if mode == "pure_tp" else "NSA partial DP attention is active"
    msg = f"{what}: attn_tp_size={attn_tp_size}, {heads_per_rank} heads per rank"
    if flashmla_head_multiple(sm_major) is None:
        return msg + f"; SM{sm_major}0 has no FlashMLA sparse kernel, the Triton tier serves every head count"
    if padded == heads_per_rank:
        return msg + f"; no FlashMLA head padding on SM{sm_major}0"
    # What runs is measured, not assumed: nsa_tp.ops.tuning orders the tiers per (card, op, shape class) from
    # the card's committed table, upstream's FlashMLA first unless a tier beat it by tuning.MARGIN (a test
    # holds this text to it). The committed H100 table (2026-12-06) runs Triton for 16-head bf16 prefill (5%
    # faster) and FlashMLA for 32-128 heads; a card without a table runs FlashMLA.
    return msg + (
        f"; FlashMLA pads them to {padded} on SM{sm_major}0 = {padded / heads_per_rank:.1f}x the sparse-prefill "
        f"FLOPs ({1.0 - heads_per_rank / padded:.0%} wasted). The kernel is picked per shape class from this "
        "card's measured tuning table (nsa_tp/ops/measured/; in SGLang, by the plugin's router): FlashMLA with "
        f"the padding unless an nsa-tp tier measured at least {MARGIN:.0%} faster for that class; an unmeasured card "
        "runs FlashMLA"
    )


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
    attn_dp_size: int | None = None,
) -> ParallelLayout:
    """SGLang's NSA layout rule: ``(--tp, --dp, --enable-dp-attention, ...)`` -> :class:`ParallelLayout`.

    ``attn_dp_size`` is SGLang 0.5.23's spelling, ``--attn-dp-size D`` = ``--dp D --enable-dp-attention``
    (None: not given); the layout is the same either way, and messages name the flag in the spelling given.
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
    dp_size, enable_dp_attention, spelling, warnings = _merge_dp_spellings(dp_size, enable_dp_attention, attn_dp_size)
    attn_tp_size, attn_dp, num_replicas, group_warnings = _attention_groups(
        tp_size, dp_size, enable_dp_attention, num_attention_heads, spelling
    )
    warnings += group_warnings
    heads_per_rank = _heads_per_rank(num_attention_heads, tp_size, dp_size, enable_dp_attention, spelling)
    sm_major = _resolve_sm_major(sm_major)
    kv = _resolve_kv_cache_dtype(kv_cache_dtype, sm_major)
    page_size = _check_page_size(page_size)
    mode = _mode(attn_tp_size, attn_dp, enable_dp_attention)
    multiple = flashmla_head_multiple(sm_major)
    padded = padded_heads(heads_per_rank, multiple)
    if attn_tp_size > 1:
        warnings.append(_tp_mode_warning(mode, attn_tp_size, heads_per_rank, sm_major, padded))
    if token_parallel == "on" and attn_tp_size == 1:
        warnings.append("--nsa-token-parallel on has no effect: the attention TP group has one rank")

    return ParallelLayout(
        tp_size=tp_size,
        dp_size=dp_size,
        enable_dp_attention=enable_dp_attention,
        attn_tp_size=attn_tp_size,
        attn_dp_size=attn_dp,
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
        flashmla_waste_fraction=1.0 - heads_per_rank / padded,
        token_parallel=token_parallel,
        warnings=tuple(warnings),
    )
