"""The needle checkpoint through SGLang's own DeepSeek-V3.2 model on CPU: every parameter SGLang builds is
filled from the checkpoint by SGLang's own ``load_weights`` (names, shapes, dtypes, fused projections) and equals
what nsa-tp wrote; nothing in the file goes unused. The model is built in a child process
(``needle_sglang_load.py``): it sets SGLang's process-wide parallel state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nsa_tp.needle.checkpoint import NeedleSpec, write_checkpoint

pytestmark = pytest.mark.sglang

HELPER = Path(__file__).with_name("needle_sglang_load.py")


def test_sglang_loads_every_tensor_of_the_needle_checkpoint(tmp_path):
    pytest.importorskip("sglang", reason="needs the sglang package (scripts/install_sglang_cpu.sh)")
    spec = NeedleSpec(seed=2, hidden_size=512, num_attention_heads=16, q_lora_rank=128)
    d = write_checkpoint(spec, tmp_path)
    proc = subprocess.run([sys.executable, str(HELPER), str(d)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    params = got["params"]
    a = "model.layers.0.self_attn."
    for name in ("indexer.wq_b.weight", "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias",
                 "indexer.weights_proj.weight", "kv_b_proj.weight", "q_b_proj.weight", "o_proj.weight",
                 "fused_qkv_a_proj_with_mqa.weight", "q_a_layernorm.weight", "kv_a_layernorm.weight"):
        assert a + name in params, (name, sorted(params))
    assert params[a + "indexer.wq_b.weight"]["shape"] == [64 * 128, 128]
    assert params[a + "fused_qkv_a_proj_with_mqa.weight"]["shape"] == [128 + 576, 512]
    assert params[a + "kv_b_proj.weight"]["shape"] == [16 * 256, 512]
    wrong = [n for n, p in params.items() if not p["equal"]]
    print(f"SGLang built {len(params)} parameters from the needle checkpoint; unequal: {wrong}; "
          f"unused tensors: {got['unused']}; absorbed w_kc/w_vc equal: {got['absorbed']}")
    assert not wrong and not got["unused"] and all(got["absorbed"].values())
