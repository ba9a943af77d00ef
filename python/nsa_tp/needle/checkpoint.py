"""The needle checkpoint: constructed (not trained) weights of a one-layer DeepSeek-V3.2 that solves associative
recall with ONE attention layer, in the real architecture and tensor names (``DeepseekV32ForCausalLM``).

How the layer solves the task (content only: every rope row is zero, so positions play no part). Hidden blocks,
64 dims each (codes: :func:`nsa_tp.needle.vocab.hadamard_codes`, orthonormal)::

    K [0, 64)    fact key code          Q [64, 128)   query key code        V [128, 192)  fact value code
    O [192, 256) the answer (attention writes it, lm_head reads it; no embedding touches it)
    C  256       1 for every token      J [320, 384)  a random code per filler / unused token

- q: ``q_a_proj`` copies Q (and C) into ``q_lora``; ``q_a_layernorm`` is set so a query's ``q_lora`` is exactly
  ``[key code, 1, 0...]``; head h's ``q_nope[:64] = a * R_h key`` (R_h a signed permutation of its own).
- latent: ``kv_a_proj_with_mqa`` copies K to latent[0:64), V to latent[128:192), C to latent[256] (three fp8
  blocks apart: each block's codes share one magnitude, so the fp8 cache holds them exactly);
  ``kv_a_layernorm`` makes a fact's latent exactly ``[key, value, 1]``. ``kv_b_proj``'s k rows give
  ``k_nope_h = b * R_h latent[:64]``, so every head scores ``a b sm_scale (q_key . fact_key)``: :data:`SCORE`
  nats on the matching fact, exactly 0 on every other token.
- v: head h puts value channel i at v-dim ``pi_h(i)`` with sign ``s_h(i)``, and the latent constant at v-dim
  ``j_h``; ``o_proj`` undoes ``pi_h, s_h`` into O (``GAIN / H`` a head) and maps ``j_h`` to ``M w_h`` with
  ``w_h = -w_{p(h)}`` for a random pairing ``p`` of the heads. With every head where it belongs the ``w`` terms
  cancel exactly; a head read by another head's ``o_proj`` columns, a missing or doubled rank, or a q/k head
  mismatch leaves garbage many times the answer's size.
- indexer: ``wq_b`` gives each index head ``[0 (64 rope dims), 8 * key]``; ``wk`` gives ``[-K, +K]`` (zero mean,
  so ``k_norm``'s LayerNorm keeps the code) and ``k_norm`` (weight 0 on the rope half, 1 on the rest, bias 0)
  leaves ``k = [0, 8 * key]``; ``weights_proj`` reads C (positive). The matching fact scores 64 a head, every
  other token 0 (fillers have no key: their LayerNorm output is 0) - through the Hadamard rotation and fp8.
- lm_head: the answer token ``A(v)`` reads the value code from O; every other row is 0.
- ``A(v)`` is also a query, for key ``v`` (its embedding carries key code v in Q): after ``Q(k)`` greedy decoding
  follows the chain ``A(v1) A(v2) ...`` with ``v_{i+1}`` the value stored under key ``v_i``, so every generated
  token is one more recall, made by a decode step.
- MLP: random, its output scaled by :data:`MLP_SCALE` (exercised, never decisive).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from nsa_tp.config import NSAConfig
from nsa_tp.model.weights import LayerWeights, hf_names, require_safetensors
from nsa_tp.needle.vocab import BOS, CODE_DIM, EOS, NeedleVocab, hadamard_codes

__all__ = ["NeedleSpec", "build_tensors", "hf_config", "write_checkpoint", "layer_weights", "SCORE", "GAIN"]

SCORE = 24.0  # attention logit of the matching fact (nats above every other token: weight 1 - 2047 e^-24)
GAIN = 4.0  # size of the answer the heads write into O
CANCEL = 0.75 * GAIN  # size of each head's cancelling term (w_h)
MLP_SCALE = 0.01
INDEX_WEIGHT = 0.05

# hidden blocks (see the module docstring)
K0, Q0, V0, O0, C0, J0 = 0, 64, 128, 192, 256, 320


@dataclasses.dataclass(frozen=True)
class NeedleSpec:
    """The checkpoint's free dims; the rest are DeepSeek-V3.2's (:func:`hf_config`)."""

    seed: int = 0
    hidden_size: int = 1024
    num_attention_heads: int = 128
    q_lora_rank: int = 512
    index_topk: int = 2048
    index_n_heads: int = 64
    intermediate_size: int = 1024
    vocab: NeedleVocab = NeedleVocab()

    def __post_init__(self) -> None:
        if self.hidden_size < 512 or self.hidden_size % 128:
            raise ValueError(f"hidden_size: expected a multiple of 128, >= 512 (the code blocks), got "
                             f"{self.hidden_size}")
        if self.q_lora_rank < 128 or self.q_lora_rank % 128:
            raise ValueError(f"q_lora_rank: expected a multiple of 128, got {self.q_lora_rank}")
        if self.num_attention_heads < 2 or self.num_attention_heads % 2:
            raise ValueError(f"num_attention_heads: expected an even count >= 2 (heads cancel in pairs), got "
                             f"{self.num_attention_heads}")

    def nsa_config(self) -> NSAConfig:
        return NSAConfig.from_hf_config(hf_config(self))


def hf_config(spec: NeedleSpec) -> dict[str, Any]:
    """``config.json`` of the checkpoint: DeepSeek-V3.2's architecture, one dense layer, no rope scaling."""
    v32 = NSAConfig()  # the fixed attention dims are the released model's, stated once there
    return {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": 2048, "num_hidden_layers": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_attention_heads,
        "q_lora_rank": spec.q_lora_rank, "kv_lora_rank": v32.kv_lora_rank, "qk_nope_head_dim": v32.qk_nope_head_dim,
        "qk_rope_head_dim": v32.qk_rope_head_dim, "v_head_dim": v32.v_head_dim, "index_topk": spec.index_topk,
        "index_head_dim": v32.index_head_dim, "index_n_heads": spec.index_n_heads,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": None, "rms_norm_eps": 1e-06,
        "vocab_size": spec.vocab.size, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": BOS, "eos_token_id": EOS, "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.006, "use_cache": True,
        "needle": {"seed": spec.seed, "n_keys": spec.vocab.n_keys, "n_values": spec.vocab.n_values,
                   "n_fillers": spec.vocab.n_fillers, "score_nats": SCORE, "gain": GAIN},
    }


def embeddings(spec: NeedleSpec) -> torch.Tensor:
    """``[vocab, hidden]`` float32 token embeddings (module docstring)."""
    voc, D = spec.vocab, spec.hidden_size
    keys, vals = hadamard_codes(spec.seed, voc.n_keys, 1), hadamard_codes(spec.seed, voc.n_values, 2)
    gen = torch.Generator().manual_seed(spec.seed * 7919 + 3)
    emb = torch.zeros(voc.size, D)
    emb[:, C0] = 1.0
    emb[:, J0 : J0 + CODE_DIM] = (torch.randint(0, 2, (voc.size, CODE_DIM), generator=gen).float() * 2 - 1) / 8
    for v in range(min(voc.n_values, voc.n_keys)):  # A(v) asks for key v: greedy decode follows a chain
        a = voc.answer(v)
        emb[a, J0 : J0 + CODE_DIM] = 0
        emb[a, Q0 : Q0 + CODE_DIM] = keys[v]
    for k in range(voc.n_keys):
        q = voc.query(k)
        emb[q, J0 : J0 + CODE_DIM] = 0
        emb[q, Q0 : Q0 + CODE_DIM] = keys[k]
        for v in range(voc.n_values):
            f = voc.fact(k, v)
            emb[f, J0 : J0 + CODE_DIM] = 0
            emb[f, K0 : K0 + CODE_DIM] = keys[k]
            emb[f, V0 : V0 + CODE_DIM] = vals[v]
    return emb


def _signed_perm(gen: torch.Generator, n: int) -> torch.Tensor:
    p = torch.zeros(n, n)
    p[torch.arange(n), torch.randperm(n, generator=gen)] = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return p


def _head_maps(spec: NeedleSpec) -> dict[str, torch.Tensor]:
    """Per head: ``R [H, 64, 64]`` key rotation, ``pi [H, 64]`` v-dims of the value channels, ``sgn [H, 64]``,
    ``j [H]`` v-dim of the constant, ``w [H, 64]`` cancelling O vectors (``w_h = -w_p(h)``, bf16-exact)."""
    H = spec.num_attention_heads
    gen = torch.Generator().manual_seed(spec.seed * 7919 + 4)
    R = torch.stack([_signed_perm(gen, CODE_DIM) for _ in range(H)])
    order = torch.stack([torch.randperm(128, generator=gen) for _ in range(H)])
    pi, j = order[:, :CODE_DIM], order[:, CODE_DIM]
    sgn = torch.randint(0, 2, (H, CODE_DIM), generator=gen).float() * 2 - 1
    pairing = torch.randperm(H, generator=gen).view(-1, 2)
    w = torch.zeros(H, CODE_DIM)
    for a, b in pairing.tolist():
        g = torch.randn(CODE_DIM, generator=gen)
        g = (g / g.norm()).bfloat16().float()
        w[a], w[b] = g, -g
    return {"R": R, "pi": pi, "sgn": sgn, "j": j, "w": w}


def _attention(spec: NeedleSpec, cfg: NSAConfig) -> dict[str, torch.Tensor]:
    """The MLA weights (``LayerWeights`` field names), float32."""
    H, D, Rq, L = spec.num_attention_heads, spec.hidden_size, spec.q_lora_rank, cfg.kv_lora_rank
    m = _head_maps(spec)
    ab = math.sqrt(SCORE / cfg.softmax_scale)  # a = b: q and k each carry half the score's size
    t: dict[str, torch.Tensor] = {}
    q_a = torch.zeros(Rq, D)
    q_a[torch.arange(CODE_DIM), Q0 + torch.arange(CODE_DIM)] = 1.0
    q_a[CODE_DIM, C0] = 1.0
    t["q_a_proj"] = q_a
    t["q_a_layernorm"] = torch.full((Rq,), math.sqrt(2.0 / Rq))  # a query's [key (norm 1), 1] comes out as is
    q_b = torch.zeros(H, cfg.qk_head_dim, Rq)
    q_b[:, :CODE_DIM, :CODE_DIM] = ab * m["R"]
    t["q_b_proj"] = q_b.reshape(H * cfg.qk_head_dim, Rq)
    kv_a = torch.zeros(L + cfg.qk_rope_head_dim, D)
    for dst, src in ((0, K0), (128, V0)):
        kv_a[dst + torch.arange(CODE_DIM), src + torch.arange(CODE_DIM)] = 1.0
    kv_a[256, C0] = 1.0
    t["kv_a_proj_with_mqa"] = kv_a
    t["kv_a_layernorm"] = torch.full((L,), math.sqrt(3.0 / L))  # a fact's [key, value, 1] comes out as is
    kv_b = torch.zeros(H, cfg.qk_nope_head_dim + cfg.v_head_dim, L)
    kv_b[:, :CODE_DIM, :CODE_DIM] = ab * m["R"]
    heads = torch.arange(H)[:, None]
    v_rows = cfg.qk_nope_head_dim + m["pi"]
    kv_b[heads, v_rows, 128 + torch.arange(CODE_DIM)[None, :]] = m["sgn"]
    kv_b[torch.arange(H), cfg.qk_nope_head_dim + m["j"], 256] = 1.0
    t["kv_b_proj"] = kv_b.reshape(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), L)
    o = torch.zeros(D, H, cfg.v_head_dim)
    o[O0 + torch.arange(CODE_DIM)[None, :], heads, m["pi"]] = m["sgn"] * GAIN / H
    o[O0 : O0 + CODE_DIM, torch.arange(H), m["j"]] = CANCEL * m["w"].T
    t["o_proj"] = o.reshape(D, H * cfg.v_head_dim)
    return t


def _indexer(spec: NeedleSpec) -> dict[str, torch.Tensor]:
    D, Rq, Hi = spec.hidden_size, spec.q_lora_rank, spec.index_n_heads
    half = torch.arange(CODE_DIM)
    wq = torch.zeros(Hi, 128, Rq)
    wq[:, CODE_DIM + half, half] = 8.0  # content in the non-rope half: rope never touches it
    wk = torch.zeros(128, D)
    wk[CODE_DIM + half, K0 + half] = 1.0
    wk[half, K0 + half] = -1.0  # zero mean over the 128 dims: the LayerNorm keeps the code's direction
    norm_w = torch.cat([torch.zeros(CODE_DIM), torch.ones(CODE_DIM)])
    gen = torch.Generator().manual_seed(spec.seed * 7919 + 5)
    wp = torch.zeros(Hi, D)
    wp[:, C0] = INDEX_WEIGHT * (0.5 + torch.rand(Hi, generator=gen))  # positive, different per index head
    return {"idx_wq_b": wq.reshape(Hi * 128, Rq), "idx_wk": wk, "idx_k_norm_weight": norm_w,
            "idx_k_norm_bias": torch.zeros(128), "idx_weights_proj": wp}


def _mlp_and_head(spec: NeedleSpec) -> dict[str, torch.Tensor]:
    D, inter, voc = spec.hidden_size, spec.intermediate_size, spec.vocab
    gen = torch.Generator().manual_seed(spec.seed * 7919 + 6)
    vals = hadamard_codes(spec.seed, voc.n_values, 2)
    head = torch.zeros(voc.size, D)
    for v in range(voc.n_values):
        head[voc.answer(v), O0 : O0 + CODE_DIM] = vals[v]
    return {
        "model.layers.0.mlp.gate_proj.weight": torch.randn(inter, D, generator=gen) / math.sqrt(D),
        "model.layers.0.mlp.up_proj.weight": torch.randn(inter, D, generator=gen) / math.sqrt(D),
        "model.layers.0.mlp.down_proj.weight": torch.randn(D, inter, generator=gen) * MLP_SCALE / math.sqrt(inter),
        "lm_head.weight": head,
    }


def layer_weights(spec: NeedleSpec) -> LayerWeights:
    """The attention layer's weights (bfloat16), as :func:`nsa_tp.model.weights.load_layer_weights` returns them."""
    t = _attention(spec, spec.nsa_config()) | _indexer(spec)
    return LayerWeights(**{k: v.to(torch.bfloat16) for k, v in t.items()})


def build_tensors(spec: NeedleSpec) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its HuggingFace name, bfloat16, contiguous."""
    names = hf_names(0)
    out = {names[k]: v for k, v in layer_weights(spec).items()}
    ones = torch.ones(spec.hidden_size)
    out |= {"model.embed_tokens.weight": embeddings(spec), "model.layers.0.input_layernorm.weight": ones,
            "model.layers.0.post_attention_layernorm.weight": ones, "model.norm.weight": ones}
    out |= _mlp_and_head(spec)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(out.items())}


def write_checkpoint(spec: NeedleSpec, out_dir: str | Path) -> Path:
    """``out_dir/config.json`` + ``out_dir/model.safetensors``; returns the folder."""
    require_safetensors()
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=1) + "\n")
    save_file(build_tensors(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
