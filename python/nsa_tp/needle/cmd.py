"""`nsa-tp needle --out DIR`: write the needle checkpoint (config.json + model.safetensors), a constructed
one-layer DeepSeek-V3.2 that solves associative recall with its sparse attention (docs/needle.md)."""

from __future__ import annotations

import argparse

from nsa_tp.cli import int_at_least

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write config.json + model.safetensors into")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="every code, permutation and pairing")
    p.add_argument("--hidden", type=int_at_least(512), default=1024, help="hidden size (a multiple of 128)")
    p.add_argument("--heads", type=int_at_least(2), default=128, help="attention heads (DeepSeek-V3.2: 128)")
    p.add_argument("--q-lora-rank", type=int_at_least(128), default=512)
    p.add_argument("--index-topk", type=int_at_least(1), default=2048, help="indexer top-k (DeepSeek-V3.2: 2048)")


def main(args: argparse.Namespace) -> int:
    from nsa_tp.cli import UsageError
    from nsa_tp.needle.checkpoint import NeedleSpec, write_checkpoint

    try:
        spec = NeedleSpec(seed=args.seed, hidden_size=args.hidden, num_attention_heads=args.heads,
                          q_lora_rank=args.q_lora_rank, index_topk=args.index_topk, intermediate_size=args.hidden)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = write_checkpoint(spec, args.out)
    size = (out / "model.safetensors").stat().st_size
    v = spec.vocab
    print(f"wrote {out}/config.json and model.safetensors ({size / 2**20:.0f} MiB, bfloat16): DeepseekV32ForCausalLM, "
          f"1 dense layer, hidden {spec.hidden_size}, {spec.num_attention_heads} heads, index top-k {spec.index_topk}, "
          f"vocab {v.size}, seed {spec.seed}")
    print(f"task: facts D(k,v) = ids {v.fact(0, 0)}..{v.used - 1}, queries Q(k) = {v.query(0)}.."
          f"{v.query(v.n_keys - 1)}, answers A(v) = {v.answer(0)}..{v.answer(v.n_values - 1)}, fillers "
          f"{v.filler(0)}..{v.filler(v.n_fillers - 1)};\n"
          "  after Q(k) the next token is A(v) of the earlier fact with key k (nsa_tp.needle.task)")
    return 0
