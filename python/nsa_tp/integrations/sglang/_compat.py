"""Every SGLang name the plugin hooks, imports or reads, in one table, with the releases it was checked against.

Checked against SGLang **0.5.17** (the GPU machines; read from its source) and **0.5.23** (installed for the CPU
tests). Where the two spell a name differently, both are listed, newest first. Nothing else in
``nsa_tp.integrations.sglang`` spells an SGLang module path or private method name; a name that moves in a
later release is changed here (and a missing hook target is one log line: :mod:`.plugin`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CHECKED_VERSIONS", "VERSION_MODULE", "ROLE_FUNCTIONS", "HOOK_REGISTRY", "ADD_CLI_ARGS", "LAYOUT_TARGETS",
    "ATTENTION_CLASS", "FLASHMLA_SPARSE", "FLASHMLA_KV", "ATTENTION_REGISTRY", "ATTN_TP_GROUP", "INDEXER_TARGET",
    "SGLANG_ENVS", "INDEXER_CAPTURER", "IS_DEEPSEEK_DSA", "MODEL_CONFIG_OF", "BACKEND_NAME", "ROUTED_IMPLS",
    "resolve", "model_config_of", "dsa_num_attention_heads",
]

CHECKED_VERSIONS = ("0.5.17", "0.5.23")

# --- plugin machinery (0.5.17, 0.5.23)
VERSION_MODULE = "sglang.version"  # __version__, for an unpacked tree without dist-info
# SGLang function that calls ``load_plugins()`` -> the role of the process it runs in (read from the call stack).
ROLE_FUNCTIONS = {
    "run_scheduler_process": "scheduler",
    "run_data_parallel_controller_process": "dp_controller",
    "run_detokenizer_process": "detokenizer",
    "_launch_subprocesses": "launcher",
}
HOOK_REGISTRY = "sglang.srt.plugins.hook_registry"  # HookRegistry.register(target, fn, HookType[...])
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"  # AFTER: our two launch flags

# --- server arguments: the step that makes DSA decisions (first one found wins: newest spelling first)
LAYOUT_TARGETS = (
    "sglang.srt.arg_groups.model_hook.handle_model_specific_adjustments",  # 0.5.23
    "sglang.srt.server_args.ServerArgs._handle_model_specific_adjustments",  # 0.5.17
)
MODEL_CONFIG_OF = "sglang.srt.arg_groups.model_override_base.model_config_of"  # 0.5.23 (0.5.17: a method)
IS_DEEPSEEK_DSA = "sglang.srt.configs.model_config.is_deepseek_dsa"  # 0.5.17, 0.5.23

# --- the DSA/NSA attention backend (0.5.17, 0.5.23; ``nsa_backend`` is only a deprecated re-export)
ATTENTION_CLASS = "sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnBackend"
FLASHMLA_SPARSE = f"{ATTENTION_CLASS}._forward_flashmla_sparse"  # AROUND (attention_hooks): prefill / sparse decode
FLASHMLA_KV = f"{ATTENTION_CLASS}._forward_flashmla_kv"  # AROUND (attention_hooks): paged FlashMLA
# Read on a backend object: ``num_q_heads``, ``use_mha`` and ``dsa_prefill_impl`` (set per batch by
# ``init_forward_metadata``), ``flashmla_kv_format`` (0.5.23 only; 0.5.17 has only the V32 format).
ROUTED_IMPLS = ("flashmla_sparse", "flashmla_kv")  # ``dsa_prefill_impl`` values whose core reaches the two above
ATTENTION_REGISTRY = "sglang.srt.layers.attention.attention_registry"  # public register_attention_backend(name)
BACKEND_NAME = "dsa"  # DeepSeek-V3.2's default backend name; the model code compares with it

# --- token-parallel extend
ATTN_TP_GROUP = "sglang.srt.distributed.parallel_state.get_attn_tp_group"  # .world_size, .device_group
# AROUND: the indexer's ragged (extend) top-k. (self, enable_dual_stream, forward_batch, layer_id, q_fp8
# [T,64,128] fp8, weights [T,64,1] fp32, metadata, topk_result=None) -> [T, 2048] int32, in both releases;
# called by the eager indexer and by the piecewise-CUDA-graph indexer split op (eager), so one hook covers both.
# Its ``metadata`` (``DSAIndexerMetadata``, a frozen dataclass) is read through ``get_indexer_kvcache_range``,
# ``get_seqlens_expanded``, ``get_token_to_batch_idx``, ``topk_transform`` and
# ``attn_metadata.topk_indices_offset``: the row-indexed reads :mod:`.token_parallel.indexer` cuts.
INDEXER_TARGET = "sglang.srt.layers.attention.dsa.dsa_indexer.Indexer._get_topk_ragged"
# ForwardBatch fields read (host lists): ``forward_mode`` (``is_extend_without_speculative()``),
# ``extend_prefix_lens_cpu``, ``extend_seq_lens_cpu``.
SGLANG_ENVS = "sglang.srt.environ.envs"  # .SGLANG_DSA_TOPK_BROADCAST.get()  (both; absent before 0.5.17)
INDEXER_CAPTURER = "sglang.srt.state_capturer.indexer_topk.get_global_indexer_capturer"  # (both)


def resolve(path: str) -> Any:
    """The object a dotted ``module.attr[.attr]`` path of this table names (imports SGLang)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:i]) or i == 1:
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def model_config_of(server_args: Any) -> Any:
    """SGLang's ``ModelConfig`` for these server arguments (built once and memoized by SGLang)."""
    getter = getattr(server_args, "get_model_config", None)
    if getter is not None:  # 0.5.17
        return getter()
    return resolve(MODEL_CONFIG_OF)(server_args)  # 0.5.23


def dsa_num_attention_heads(server_args: Any) -> int | None:
    """The model's attention head count if it is a DSA/NSA model (DeepSeek-V3.2 and kin), else None.

    A dummy/none model path or an instance connector has no config: None (upstream skips those too).
    """
    model_path = str(getattr(server_args, "model_path", "") or "")
    if model_path.lower() in ("", "none", "dummy"):
        return None
    model_config = model_config_of(server_args)
    if not resolve(IS_DEEPSEEK_DSA)(model_config.hf_config):
        return None
    heads = getattr(model_config, "num_attention_heads", None)
    if heads is None:
        text = getattr(model_config.hf_config, "text_config", model_config.hf_config)
        heads = text.num_attention_heads
    return int(heads)
