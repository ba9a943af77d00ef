"""Our NSA layout rule on SGLang's server arguments, before any GPU work.

SGLang resolves its server arguments in the launcher (0.5.17: ``ServerArgs._handle_model_specific_adjustments``
inside ``__post_init__``; 0.5.23: ``arg_groups.model_hook.handle_model_specific_adjustments`` inside
``resolve_once``). That step is where upstream decides DSA/NSA settings and logs "DSA with TP mode is
active". The plugin runs :func:`nsa_tp.parallel.resolve_layout` right before it, so a bad
``--tp/--attn-dp-size`` or ``--tp/--dp/--enable-dp-attention`` combination fails with our message, naming the
flag in the spelling the user gave (upstream fails later, with a
bare ``AssertionError`` for ``--tp 8 --dp 3``) and the TP-mode warning states what FlashMLA padding costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nsa_tp.integrations.sglang._log import log_once, logger
from nsa_tp.integrations.sglang._switch import plugin_enabled
from nsa_tp.parallel import LayoutError, ParallelLayout, resolve_layout

__all__ = ["parallel_flags", "check_layout", "around_model_specific_adjustments"]


def parallel_flags(server_args: Any) -> dict[str, Any]:
    """:func:`resolve_layout`'s layout arguments as the user gave them (SGLang's raw server-argument fields).

    SGLang 0.5.23 spells DP attention ``--attn-dp-size N`` and rewrites the old ``--dp N --enable-dp-attention``
    to it during resolution, without touching the raw fields: both spellings reach our rule as typed, so
    its messages name the flag the user typed. 0.5.17 has no ``attn_dp_size``; its default 1 means "not given".
    """
    attn_dp = getattr(server_args, "attn_dp_size", None)
    return {
        "tp_size": server_args.tp_size,
        "dp_size": server_args.dp_size,
        "enable_dp_attention": bool(server_args.enable_dp_attention),
        "attn_dp_size": attn_dp if attn_dp is not None and attn_dp > 1 else None,
    }


def check_layout(server_args: Any, num_attention_heads: int, *, sm_major: int | None = None) -> ParallelLayout | None:
    """Resolve the layout of a DSA model's server arguments; None when our rule does not cover them.

    Raises :class:`nsa_tp.parallel.LayoutError` (logged first, so it shows as one line in the server log)
    for an impossible layout. Logs the layout's warnings (TP mode and its FlashMLA padding cost) once.
    Context parallelism (``--attn-cp-size`` / prefill CP) is upstream's own path and is left alone.
    """
    if (getattr(server_args, "attn_cp_size", 1) or 1) > 1 or getattr(server_args, "enable_prefill_cp", False):
        log_once("layout-cp", "layout check skipped: context parallelism is on (not covered by nsa-tp's rule)")
        return None
    flags = parallel_flags(server_args)
    try:
        layout = resolve_layout(**flags, num_attention_heads=num_attention_heads, sm_major=sm_major)
    except LayoutError as e:
        logger.error("invalid parallel layout for this DSA/NSA model: %s", e)
        raise
    key = "layout-" + "-".join(map(str, flags.values())) + f"-{num_attention_heads}"  # once per layout per process
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
