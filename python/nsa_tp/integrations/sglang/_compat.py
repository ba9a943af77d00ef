"""The few SGLang internals the plugin reads, with their 0.5.17 and 0.5.23 spellings side by side."""

from __future__ import annotations

from typing import Any

__all__ = ["model_config_of", "dsa_num_attention_heads", "LAYOUT_TARGETS", "ATTENTION_CLASS"]

# The server-args step that makes DSA decisions (first one found wins: newest spelling first).
LAYOUT_TARGETS = (
    "sglang.srt.arg_groups.model_hook.handle_model_specific_adjustments",  # 0.5.23
    "sglang.srt.server_args.ServerArgs._handle_model_specific_adjustments",  # 0.5.17
)
# The DSA/NSA attention backend (0.5.17 and 0.5.23; ``nsa_backend`` is only a deprecated re-export).
ATTENTION_CLASS = "sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnBackend"


def model_config_of(server_args: Any) -> Any:
    """SGLang's ``ModelConfig`` for these server arguments (built once and memoized by SGLang)."""
    getter = getattr(server_args, "get_model_config", None)
    if getter is not None:  # 0.5.17
        return getter()
    from sglang.srt.arg_groups.model_override_base import model_config_of as _of  # 0.5.23

    return _of(server_args)


def dsa_num_attention_heads(server_args: Any) -> int | None:
    """The model's attention head count if it is a DSA/NSA model (DeepSeek-V3.2 and kin), else None.

    A dummy/none model path or an instance connector has no config: None (upstream skips those too).
    """
    model_path = str(getattr(server_args, "model_path", "") or "")
    if model_path.lower() in ("", "none", "dummy"):
        return None
    from sglang.srt.configs.model_config import is_deepseek_dsa

    model_config = model_config_of(server_args)
    if not is_deepseek_dsa(model_config.hf_config):
        return None
    heads = getattr(model_config, "num_attention_heads", None)
    if heads is None:
        text = getattr(model_config.hf_config, "text_config", model_config.hf_config)
        heads = text.num_attention_heads
    return int(heads)
