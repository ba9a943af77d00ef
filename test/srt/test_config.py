"""NSAConfig defaults and HuggingFace config.json parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsa_tp.config import ConfigError, NSAConfig

V32_JSON = Path(__file__).parent / "data" / "config-v32.json"


def test_defaults_are_deepseek_v32():
    c = NSAConfig()
    assert (c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (128, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.hidden_size) == (128, 64, 128, 7168)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.page_size) == (64, 128, 2048, 64)
    assert (c.d_qk, c.d_v, c.qk_head_dim) == (576, 512, 192)


def test_from_hf_config_file_and_folder_agree_with_defaults():
    from_file = NSAConfig.from_hf_config(V32_JSON)
    assert from_file == NSAConfig()
    assert NSAConfig.from_hf_config(json.loads(V32_JSON.read_text())) == from_file


def test_yarn_softmax_scale():
    c = NSAConfig()
    mscale = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert NSAConfig(rope_scaling_factor=1.0).softmax_scale == pytest.approx(192**-0.5)


@pytest.mark.parametrize("field", ["num_attention_heads", "kv_lora_rank", "index_topk", "index_n_heads"])
def test_missing_field_is_named(field):
    hf = json.loads(V32_JSON.read_text())
    del hf[field]
    with pytest.raises(ConfigError, match=f"'{field}' is missing"):
        NSAConfig.from_hf_config(hf)


def test_wrong_type_is_named():
    hf = json.loads(V32_JSON.read_text())
    hf["kv_lora_rank"] = "512"
    with pytest.raises(ConfigError, match="'kv_lora_rank' must be a positive integer"):
        NSAConfig.from_hf_config(hf)


def test_not_an_nsa_model():
    hf = json.loads(V32_JSON.read_text())
    hf["architectures"] = ["DeepseekV3ForCausalLM"]
    with pytest.raises(ConfigError, match="not an NSA"):
        NSAConfig.from_hf_config(hf)
    del hf["architectures"]
    with pytest.raises(ConfigError, match="'architectures' is missing"):
        NSAConfig.from_hf_config(hf)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        NSAConfig.from_hf_config(tmp_path)
