"""Split one layer's weights by heads over the attention TP group (the layout decides how many).

Per :class:`~nsa_tp.parallel.ParallelLayout` (``heads_per_rank`` comes from the layout and nowhere else):

- ``q_b_proj`` (column parallel): rank r keeps the rows of heads ``[r*h, (r+1)*h)`` (192 rows a head).
- ``kv_b_proj`` (W_UK / W_UV, column parallel): the same heads (256 rows a head: 128 k_nope, 128 v).
- ``o_proj`` (row parallel): the same heads' input columns (128 a head); the partial sums are all-reduced
  over the attention TP group.
- ``q_a_proj``, ``kv_a_proj_with_mqa``, both norms and the whole indexer: replicated (every rank of the
  attention TP group needs the full latent KV and the full top-k).

Under full DP attention (``attn_tp_size == 1``) every rank keeps all heads.
"""

from __future__ import annotations

import dataclasses

import torch

from nsa_tp.config import NSAConfig
from nsa_tp.model.weights import LayerWeights, expected_shapes
from nsa_tp.parallel import ParallelLayout

__all__ = ["ShardedWeights", "shard_weights", "head_range"]


@dataclasses.dataclass(frozen=True)
class ShardedWeights:
    """One rank's weights: ``weights`` holds this rank's slices (head-split fields have ``heads`` heads)."""

    weights: LayerWeights
    heads: int  # heads on this rank
    head_start: int  # first global head index on this rank
    attn_tp_rank: int
    attn_tp_size: int


def head_range(layout: ParallelLayout, attn_tp_rank: int) -> range:
    """Global head ids served by ``attn_tp_rank`` of an attention TP group under ``layout``."""
    if not 0 <= attn_tp_rank < layout.attn_tp_size:
        raise ValueError(f"attn_tp_rank: expected 0 <= rank < {layout.attn_tp_size}, got {attn_tp_rank}")
    h = layout.heads_per_rank
    return range(attn_tp_rank * h, (attn_tp_rank + 1) * h)


def shard_weights(
    weights: LayerWeights, cfg: NSAConfig, layout: ParallelLayout, attn_tp_rank: int
) -> ShardedWeights:
    """This rank's slice of ``weights`` (views where possible; cloned so later edits cannot alias)."""
    if layout.num_attention_heads != cfg.num_attention_heads:
        raise ValueError(
            f"layout: built for {layout.num_attention_heads} heads, but the model config has "
            f"{cfg.num_attention_heads}; pass num_attention_heads={cfg.num_attention_heads} to resolve_layout"
        )
    for name, shape in expected_shapes(cfg).items():
        got = tuple(getattr(weights, name).shape)
        if got != shape:
            raise ValueError(f"weights.{name}: expected shape {shape} for this config, got {got}")
    heads = head_range(layout, attn_tp_rank)
    H, h0, h1 = cfg.num_attention_heads, heads.start, heads.stop

    def rows_by_head(w: torch.Tensor, per_head: int) -> torch.Tensor:
        # [H*per_head, in] -> [h, per_head, in] for this rank's heads -> [h*per_head, in]
        return w.view(H, per_head, w.shape[1])[h0:h1].reshape(-1, w.shape[1]).clone()

    o_cols = weights.o_proj.view(cfg.hidden_size, H, cfg.v_head_dim)[:, h0:h1]  # [hidden, h, 128]
    local = dataclasses.replace(
        weights,
        q_b_proj=rows_by_head(weights.q_b_proj, cfg.qk_head_dim),
        kv_b_proj=rows_by_head(weights.kv_b_proj, cfg.qk_nope_head_dim + cfg.v_head_dim),
        o_proj=o_cols.reshape(cfg.hidden_size, -1).clone(),
    )
    return ShardedWeights(local, h1 - h0, h0, attn_tp_rank, layout.attn_tp_size)
