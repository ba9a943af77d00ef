"""Our NSA layout rule on SGLang's server arguments, before any GPU work.

SGLang resolves its server arguments in the launcher (0.5.17: ``ServerArgs._handle_model_specific_adjustments``
inside ``__post_init__``; 0.5.23: ``arg_groups.model_hook.handle_model_specific_adjustments`` inside
``resolve_once``). That step is where upstream decides DSA/NSA settings and logs "DSA with TP mode is
active". The plugin runs :func:`nsa_tp.parallel.resolve_layout` right before it, so a bad
``--tp/--dp/--enable-dp-attention`` combination fails with our message (upstream fails later, with a
bare ``AssertionError`` for ``--tp 8 --dp 3``) and the TP-mode warning states what FlashMLA padding costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nsa_tp.integrations.sglang._log import log_once, logger
from nsa_tp.integrations.sglang._switch import plugin_enabled
from nsa_tp.parallel import LayoutError, ParallelLayout, resolve_layout

__all__ = ["parallel_flags", "check_layout", "around_model_specific_adjustments"]


def parallel_flags(server_args: Any) -> tuple[int, int, bool]:
    """``(tp_size, dp_size, enable_dp_attention)`` as the user gave them.

    SGLang 0.5.23 also spells DP attention ``--attn-dp-size N`` (and rewrites the old spelling to it
    internally without touching these fields); both spellings map onto our rule's three flags.
    """
    tp = server_args.tp_size
    attn_dp = getattr(server_args, "attn_dp_size", 1) or 1
    if attn_dp > 1:
        return tp, attn_dp, True
    return tp, server_args.dp_size, bool(server_args.enable_dp_attention)


def check_layout(server_args: Any, num_attention_heads: int, *, sm_major: int | None = None) -> ParallelLayout | None:
    """Resolve the layout of a DSA model's server arguments; None when our rule does not cover them.

    Raises :class:`nsa_tp.parallel.LayoutError` (logged first, so it shows as one line in the server log)
    for an impossible layout. Logs the layout's warnings (TP mode and its FlashMLA padding cost) once.
    Context parallelism (``--attn-cp-size`` / prefill CP) is upstream's own path and is left alone.
    """
    if (getattr(server_args, "attn_cp_size", 1) or 1) > 1 or getattr(server_args, "enable_prefill_cp", False):
        log_once("layout-cp", "layout check skipped: context parallelism is on (not covered by nsa-tp's rule)")
        return None
    tp, dp, dp_attn = parallel_flags(server_args)
    try:
        layout = resolve_layout(tp, dp, dp_attn, num_attention_heads=num_attention_heads, sm_major=sm_major)
    except LayoutError as e:
        logger.error("invalid parallel layout for this DSA/NSA model: %s", e)
        raise
    key = f"layout-{tp}-{dp}-{dp_attn}-{num_attention_heads}"  # once per layout per process
    log_once(
        key,
        "layout: mode=%s tp=%d dp=%d attn_tp_size=%d heads_per_rank=%d",
        layout.mode,
        layout.tp_size,
        layout.dp_size,
        layout.attn_tp_size,
        layout.heads_per_rank,
    )
    for i, warning in enumerate(layout.warnings):
        log_once(f"{key}-warning-{i}", "%s", warning)
    return layout


def around_model_specific_adjustments(original: Callable[..., Any], server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook: check the layout of a DSA model, then run upstream's step unchanged.

    ``server_args`` is ``self`` for 0.5.17's method and the first argument of 0.5.23's function.
    """
    if plugin_enabled():
        from nsa_tp.integrations.sglang._compat import dsa_num_attention_heads

        heads = dsa_num_attention_heads(server_args)
        if heads is not None:
            check_layout(server_args, heads)
    return original(server_args, *args, **kwargs)
