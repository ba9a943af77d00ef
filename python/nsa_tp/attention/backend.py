"""The NSA attention backend: per layer, indexer -> top-k -> pad to q's rows -> sparse MLA.

Roles kept apart (STYLE.md): :class:`~nsa_tp.attention.metadata.ForwardMetadataBuilder` decides everything
once per batch; :class:`NSABackend` only executes, once per layer, and never queries the device, syncs
with the host or plans. Prefill runs ``ops.sparse_mla_fwd`` on the latent cache flattened to
``[num_pages * 64, 1, D]`` (indices are global slots); decode runs ``ops.sparse_mla_decode`` with the
batch's plan. Both accept the bf16 and the fp8 (656-byte) latent cache.
"""

from __future__ import annotations

import torch

from nsa_tp import ops
from nsa_tp.attention.indexer import Indexer
from nsa_tp.attention.metadata import ForwardMetadata
from nsa_tp.attention.padding import pad_topk_indices
from nsa_tp.ops.check import check_tensor
from nsa_tp.ops.kv_format import D_QK
from nsa_tp.ops.plan import kv_cache_dtype_of

__all__ = ["NSABackend"]


class NSABackend:
    """Executes the NSA attention core of one rank.

    Args:
        sm_scale: softmax scale of ``q . k`` (``NSAConfig.softmax_scale``, YaRN-corrected).
        d_v: latent value dim (512).
        backend: tier for every op (``"auto"``, ``"reference"``, ``"triton"``, ``"flashmla"``); decode
            runs the tier that built the batch's plan, which must agree.
    """

    def __init__(self, *, sm_scale: float, d_v: int = 512, backend: str = "auto"):
        if not sm_scale > 0:
            raise ValueError(f"sm_scale: expected > 0, got {sm_scale!r}")
        self.sm_scale = float(sm_scale)
        self.d_v = d_v
        self.backend = backend

    def forward(
        self,
        q_latent: torch.Tensor,
        x: torch.Tensor,
        q_lora: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        indexer: Indexer,
        latent_cache: torch.Tensor,
        index_k_cache: torch.Tensor,
        meta: ForwardMetadata,
    ) -> torch.Tensor:
        """One layer's sparse attention: ``[T_pad, H, 512]`` bfloat16 latent output.

        Args:
            q_latent: ``[T_pad, H, 576]`` bfloat16 absorbed queries (rope applied), ``T_pad = meta.num_padded``.
            x, q_lora: ``[T_pad, hidden]``, ``[T_pad, q_lora_rank]`` — the indexer's inputs.
            cos, sin: ``[T_pad, 32]`` float32, the layer's YaRN rope table at each row's position.
            indexer: this layer's :class:`~nsa_tp.attention.indexer.Indexer` (its top-k = ``meta.topk``).
            latent_cache: ``[num_pages, 64, 1, 576]`` bf16 or ``[num_pages, 64, 1, 656]`` uint8, the new
                tokens' rows already stored at ``meta.token_slots`` by the caller.
            index_k_cache: ``[num_pages, 8448]`` uint8; the indexer stores the new tokens' keys here.
            meta: the batch's :class:`~nsa_tp.attention.metadata.ForwardMetadata`.

        DP-padding rows (``>= meta.num_tokens``) get top-k rows of -1 and so an output of 0.
        """
        check_tensor(q_latent, "q_latent", shape=(meta.num_padded, meta.num_heads, D_QK), dtype=torch.bfloat16)
        check_tensor(latent_cache, "latent_cache", ndim=4)
        if not latent_cache.is_contiguous():
            raise ValueError("latent_cache: expected a contiguous [num_pages, 64, 1, D] buffer (slots index its rows)")
        if kv_cache_dtype_of(latent_cache) != meta.kv_dtype:
            raise ValueError(f"latent_cache: the metadata was built for a {meta.kv_dtype} cache")
        if indexer.topk != meta.topk:
            raise ValueError(f"indexer: top-k {indexer.topk} differs from the metadata's {meta.topk}")
        if meta.index.q_rows != slice(0, meta.num_tokens):
            raise ValueError("meta: built for a subset of index rows (token-parallel); run it with that core")
        topk = indexer.forward(x, q_lora, cos, sin, index_k_cache, meta.index)  # [T, K] global slots
        indices = pad_topk_indices(topk, meta.num_padded).unsqueeze(1)  # [T_pad, 1, K]
        if meta.is_decode:
            out, _lse = ops.sparse_mla_decode(
                q_latent, latent_cache, indices, self.sm_scale, self.d_v, plan=meta.decode_plan,
                backend=self.backend,
            )
            return out
        flat = latent_cache.view(-1, 1, latent_cache.shape[-1])  # [pages, 64, 1, D] -> [slots, 1, D]
        out, _max_logits, _lse = ops.sparse_mla_fwd(
            q_latent, flat, indices, self.sm_scale, self.d_v, backend=self.backend
        )
        return out
