"""One DeepSeek-V3.2 attention layer (MLA, absorbed, + the lightning indexer) on one rank of a layout.

Per token (``h`` = this rank's heads, from the layout; shapes for ``T`` rows, ``T_pad >= T_real``)::

    q_lora = rmsnorm(q_a_proj(x))                         [T, q_lora_rank]     replicated
    q      = q_b_proj(q_lora)                             [T, h, 192]          column parallel (heads)
    q_nope, q_pe = q[..., :128], q[..., 128:]
    q_lat  = q_nope @ W_UK                                [T, h, 512]          W_UK from kv_b_proj
    kv     = kv_a_proj_with_mqa(x)                        [T, 576]             replicated
    c_kv   = rmsnorm(kv[:, :512]); k_pe = rope(kv[:, 512:])
    q_pe   = rope(q_pe)                                   interleaved YaRN rope (DeepSeek's MLA layout)
    cache <- [c_kv | k_pe] at the batch's slots           real rows only
    o_lat  = core(q = [q_lat | q_pe] bf16, ...)           [T, h, 512]          indexer -> top-k -> sparse MLA
    o      = o_lat @ W_UV^T                               [T, h * 128]
    y      = all_reduce_attn_tp(o_proj(o))                [T, hidden]          row parallel

The **attention core** (:mod:`nsa_tp.model.core`) is the seam between the per-head projections and "how
the attention runs across the attention TP group": ``"heads"`` (the default, what SGLang does) runs the
indexer for all rows on every rank and the sparse MLA on this rank's heads; ``"token_parallel"`` runs the
per-batch choice of :mod:`nsa_tp.token_parallel`; others register with
:func:`nsa_tp.model.core.register_attention_core` and are picked by name.

Rows past ``batch.num_tokens`` are DP padding (the token count padded to the attention DP groups' max for
the MLP sync): they flow through every projection, are never written to the caches, get no valid top-k
index (output 0 from the core) and are dropped by the caller. An *idle* batch (no real rows: an attention
DP group with no request this step) skips the core and its metadata: its padding rows output 0.
"""

from __future__ import annotations

import torch

from nsa_tp.attention.indexer import Indexer, IndexerWeights
from nsa_tp.attention.kv_cache import NSACaches
from nsa_tp.config import NSAConfig
from nsa_tp.model.core import CoreInputs, LayerBatch, make_core
from nsa_tp.model.sharding import ShardedWeights
from nsa_tp.ops.check import check_tensor
from nsa_tp.ops.rope import apply_rope, rope_cos_sin
from nsa_tp.parallel.groups import ParallelGroups

__all__ = ["NSAAttention", "rms_norm", "mla_rope_cos_sin"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, returned in ``x.dtype``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def mla_rope_cos_sin(cfg: NSAConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[T, 32]`` float32 for the MLA rope part (64 dims, YaRN from ``cfg``)."""
    return rope_cos_sin(
        positions, cfg.qk_rope_head_dim, cfg.rope_theta,
        factor=cfg.rope_scaling_factor, original_max_position=cfg.rope_original_max_position_embeddings,
        beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
        mscale=cfg.rope_mscale, mscale_all_dim=cfg.rope_mscale_all_dim,
    )


class NSAAttention:
    """This rank's part of one attention layer. Weights are moved once to ``device`` in ``compute_dtype``.

    ``compute_dtype`` defaults to bfloat16 on GPUs and float32 on CPU (CPUs without bf16 matmul units run
    bf16 GEMMs an order of magnitude slower). The tensors handed to the core keep the kernels' formats
    either way: q in bfloat16, the latent cache in bfloat16 or fp8.
    """

    def __init__(
        self,
        cfg: NSAConfig,
        sharded: ShardedWeights,
        groups: ParallelGroups,
        *,
        core: str = "heads",
        backend: str = "auto",
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ):
        if sharded.attn_tp_size != groups.layout.attn_tp_size or sharded.attn_tp_rank != groups.attn_tp_rank:
            raise ValueError(
                f"sharded: weights are for attn_tp rank {sharded.attn_tp_rank} of {sharded.attn_tp_size}, this rank "
                f"is {groups.attn_tp_rank} of {groups.layout.attn_tp_size}"
            )
        self.cfg = cfg
        self.groups = groups
        self.heads = groups.layout.heads_per_rank
        self.head_start = sharded.head_start
        self.backend = backend
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # tensors report "cuda:N"; keep the index so device checks compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute_dtype = compute_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.out_dtype = out_dtype
        w = sharded.weights
        cd, dev, h = self.compute_dtype, self.device, self.heads
        self.q_a = w.q_a_proj.to(dev, cd)
        self.q_a_norm = w.q_a_layernorm.to(dev, torch.float32)
        self.q_b = w.q_b_proj.to(dev, cd)  # [h*192, q_lora]
        self.kv_a = w.kv_a_proj_with_mqa.to(dev, cd)  # [576, hidden]
        self.kv_a_norm = w.kv_a_layernorm.to(dev, torch.float32)
        kv_b = w.kv_b_proj.view(h, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        self.w_uk = kv_b[:, : cfg.qk_nope_head_dim].to(dev, cd).contiguous()  # [h, 128, 512]
        # [h, 128, 512] -> [h, 512, 128]: o_lat [h, T, 512] @ W_UV^T gives the per-head values [h, T, 128]
        self.w_uv_t = kv_b[:, cfg.qk_nope_head_dim :].transpose(1, 2).to(dev, cd).contiguous()
        self.o_proj = w.o_proj.to(dev, cd)  # [hidden, h*128]
        # The indexer (replicated) keeps its own float32 copy of its weights and quantizes to fp8 itself.
        self.indexer = Indexer(
            IndexerWeights(w.idx_wq_b, w.idx_wk, w.idx_k_norm_weight, w.idx_k_norm_bias, w.idx_weights_proj),
            topk=cfg.index_topk, backend=backend, device=dev,
        )
        self.core = make_core(core, self)  # last: a core may read anything above

    @property
    def sm_scale(self) -> float:
        return self.cfg.softmax_scale

    def project(self, x: torch.Tensor, batch: LayerBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T_pad, hidden]`` -> ``(q [T_pad, h, 576] bf16, q_lora [T_pad, q_lora_rank], latent [T_pad, 576])``."""
        cfg, cd = self.cfg, self.compute_dtype
        T = x.shape[0]
        xc = x.to(cd)
        q_lora = rms_norm(xc @ self.q_a.T, self.q_a_norm, cfg.rms_norm_eps)
        q = (q_lora @ self.q_b.T).view(T, self.heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        # absorb W_UK: [T, h, 128] -> [h, T, 128] @ [h, 128, 512] -> [h, T, 512] -> [T, h, 512]
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
        q_pe = apply_rope(q_pe, batch.cos, batch.sin, interleaved=True)
        kv = xc @ self.kv_a.T  # [T, 576]
        c_kv = rms_norm(kv[:, : cfg.kv_lora_rank], self.kv_a_norm, cfg.rms_norm_eps)
        k_pe = apply_rope(kv[:, cfg.kv_lora_rank :], batch.cos, batch.sin, interleaved=True)
        q_full = torch.cat([q_lat, q_pe], dim=-1).to(torch.bfloat16)
        return q_full, q_lora, torch.cat([c_kv, k_pe], dim=-1)

    def forward(self, x: torch.Tensor, batch: LayerBatch, caches: NSACaches) -> torch.Tensor:
        """``x [T_pad, hidden]`` -> ``y [T_pad, hidden]`` in ``out_dtype``, summed over the attention TP group.

        Writes the real rows' latent KV (and, through the core, their index keys) into ``caches``.
        """
        check_tensor(x, "x", shape=(batch.num_padded, self.cfg.hidden_size), device=self.device)
        q, q_lora, latent = self.project(x, batch)
        # out_slots come from NSACaches.slots (in range by construction): no per-layer host sync to check them
        caches.latent.store(batch.out_slots, latent[: batch.num_tokens], check_slots=False)
        if batch.num_tokens:
            o_lat = self.core.forward(CoreInputs(q=q, q_lora=q_lora, x=x, batch=batch, caches=caches, layer=self))
            check_tensor(o_lat, "attention core output", shape=(batch.num_padded, self.heads, self.cfg.kv_lora_rank))
        else:  # idle batch: nothing to attend, the padding rows' output is 0 (as a -1 top-k row gives)
            o_lat = q.new_zeros(batch.num_padded, self.heads, self.cfg.kv_lora_rank)
        # [T, h, 512] -> [h, T, 512] @ [h, 512, 128] -> [h, T, 128] -> [T, h*128]
        o = torch.bmm(o_lat.to(self.compute_dtype).transpose(0, 1), self.w_uv_t).transpose(0, 1)
        y = o.reshape(batch.num_padded, -1) @ self.o_proj.T
        return self.groups.all_reduce_attn_tp(y).to(self.out_dtype)

    __call__ = forward
