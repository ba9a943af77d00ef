"""Helper of test_needle_sglang_weights.py, run in its own process (it initializes SGLang's global parallel state):
build SGLang's own ``DeepseekV32ForCausalLM`` on CPU from a checkpoint folder's config.json, load the
checkpoint's tensors through SGLang's own ``load_weights``, and print JSON: every SGLang parameter's name, shape
and dtype, whether it equals what the checkpoint holds (fused q_a/kv_a and gate/up concatenated as SGLang's
stacked-parameter mapping does), and whether the absorbed ``w_kc`` / ``w_vc`` SGLang derives equal the
checkpoint's ``kv_b_proj`` split.

Only on CPU: the GPU's SM is stated as 9.0 (SGLang's DSA argument rules read it) and the rope modules, which hold
no parameters and whose CPU build needs a scaled rope, are replaced by ``nn.Identity``.
"""

from __future__ import annotations

import json
import socket
import sys

import torch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(ckpt: str) -> torch.nn.Module:
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import prepare_server_args

    sa = prepare_server_args(["--model-path", ckpt, "--device", "cpu", "--skip-tokenizer-init"])
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0))
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"tcp://127.0.0.1:{_port()}")
    ps.initialize_model_parallel(backend="gloo")
    import sglang.srt.layers.attention.dsa.dsa_indexer as dsa_indexer
    import sglang.srt.layers.rotary_embedding.factory as rope_factory
    import sglang.srt.models.deepseek_v2 as dv2
    from sglang.srt.configs.model_config import ModelConfig

    def no_rope(*_a, **_k):
        return torch.nn.Identity()

    for mod in (rope_factory, dsa_indexer, dv2):
        if hasattr(mod, "get_rope_wrapper"):
            mod.get_rope_wrapper = no_rope
    torch.set_default_dtype(torch.bfloat16)
    return dv2.DeepseekV32ForCausalLM(ModelConfig.from_server_args(sa).hf_config, quant_config=None)


def main(ckpt: str) -> None:
    from safetensors.torch import load_file

    model = build(ckpt)
    sd = load_file(f"{ckpt}/model.safetensors")
    model.load_weights(iter(sd.items()))
    p = "model.layers.0."
    want = dict(sd)
    want[p + "self_attn.fused_qkv_a_proj_with_mqa.weight"] = torch.cat(
        [want.pop(p + "self_attn.q_a_proj.weight"), want.pop(p + "self_attn.kv_a_proj_with_mqa.weight")])
    want[p + "mlp.gate_up_proj.weight"] = torch.cat([want.pop(p + "mlp.gate_proj.weight"),
                                                     want.pop(p + "mlp.up_proj.weight")])
    params = {}
    for name, t in model.named_parameters():
        ref = want.pop(name, None)
        params[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "equal": ref is not None and ref.shape == t.shape and torch.equal(ref.to(t.dtype), t.data)}
    attn = model.model.layers[0].self_attn
    kv_b = sd[p + "self_attn.kv_b_proj.weight"].view(attn.num_local_heads, 256, 512)
    absorbed = {"w_kc": torch.equal(attn.w_kc.to(torch.bfloat16), kv_b[:, :128]),
                "w_vc": torch.equal(attn.w_vc.to(torch.bfloat16), kv_b[:, 128:].transpose(1, 2))}
    print(json.dumps({"params": params, "unused": sorted(want), "absorbed": absorbed}))


if __name__ == "__main__":
    main(sys.argv[1])
