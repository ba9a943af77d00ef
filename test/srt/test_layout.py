"""The NSA layout rule: a table of layouts, every error path, and the `nsa-tp plan` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nsa_tp.parallel import LayoutError, resolve_layout

# (tp, dp, dp_attn, heads, sm) -> (mode, attn_tp, attn_dp, replicas, heads_per_rank, padded, kv dtype)
LAYOUTS = [
    # pure TP, DeepSeek-V3.2's 128 heads, Hopper (pad to 64) and Blackwell (pad to 128)
    ((1, 1, False, 128, 9), ("pure_tp", 1, 1, 1, 128, 128, "bfloat16")),
    ((2, 1, False, 128, 9), ("pure_tp", 2, 1, 1, 64, 64, "bfloat16")),
    ((4, 1, False, 128, 9), ("pure_tp", 4, 1, 1, 32, 64, "bfloat16")),
    ((8, 1, False, 128, 9), ("pure_tp", 8, 1, 1, 16, 64, "bfloat16")),
    ((16, 1, False, 128, 9), ("pure_tp", 16, 1, 1, 8, 64, "bfloat16")),
    ((1, 1, False, 128, 10), ("pure_tp", 1, 1, 1, 128, 128, "fp8_e4m3")),
    ((2, 1, False, 128, 10), ("pure_tp", 2, 1, 1, 64, 128, "fp8_e4m3")),
    ((4, 1, False, 128, 10), ("pure_tp", 4, 1, 1, 32, 128, "fp8_e4m3")),
    ((8, 1, False, 128, 10), ("pure_tp", 8, 1, 1, 16, 128, "fp8_e4m3")),
    ((16, 1, False, 128, 10), ("pure_tp", 16, 1, 1, 8, 128, "fp8_e4m3")),
    # DP attention: partial (1 < dp < tp) and full (dp == tp)
    ((8, 2, True, 128, 9), ("partial_dp_attention", 4, 2, 1, 32, 64, "bfloat16")),
    ((8, 4, True, 128, 9), ("partial_dp_attention", 2, 4, 1, 64, 64, "bfloat16")),
    ((8, 8, True, 128, 9), ("dp_attention", 1, 8, 1, 128, 128, "bfloat16")),
    ((4, 2, True, 128, 9), ("partial_dp_attention", 2, 2, 1, 64, 64, "bfloat16")),
    ((4, 4, True, 128, 9), ("dp_attention", 1, 4, 1, 128, 128, "bfloat16")),
    ((2, 2, True, 128, 9), ("dp_attention", 1, 2, 1, 128, 128, "bfloat16")),
    ((16, 4, True, 128, 9), ("partial_dp_attention", 4, 4, 1, 32, 64, "bfloat16")),
    ((16, 8, True, 128, 10), ("partial_dp_attention", 2, 8, 1, 64, 128, "fp8_e4m3")),
    ((8, 4, True, 128, 10), ("partial_dp_attention", 2, 4, 1, 64, 128, "fp8_e4m3")),
    # --enable-dp-attention with --dp 1 is pure TP
    ((8, 1, True, 128, 9), ("pure_tp", 8, 1, 1, 16, 64, "bfloat16")),
    # --dp without DP attention: independent replicas of --tp N
    ((8, 2, False, 128, 9), ("pure_tp", 8, 1, 2, 16, 64, "bfloat16")),
    ((4, 4, False, 128, 9), ("pure_tp", 4, 1, 4, 32, 64, "bfloat16")),
    ((1, 8, False, 128, 9), ("pure_tp", 1, 1, 8, 128, 128, "bfloat16")),
    # other head counts (smaller models / tests)
    ((8, 1, False, 64, 9), ("pure_tp", 8, 1, 1, 8, 64, "bfloat16")),
    ((4, 1, False, 64, 9), ("pure_tp", 4, 1, 1, 16, 64, "bfloat16")),
    ((2, 2, True, 64, 9), ("dp_attention", 1, 2, 1, 64, 64, "bfloat16")),
    ((16, 1, False, 16, 9), ("pure_tp", 16, 1, 1, 1, 64, "bfloat16")),
    ((4, 1, False, 16, 10), ("pure_tp", 4, 1, 1, 4, 128, "fp8_e4m3")),
    ((8, 4, True, 16, 9), ("partial_dp_attention", 2, 4, 1, 8, 64, "bfloat16")),
    # SM80 has no FlashMLA sparse kernel: no padding recorded
    ((8, 1, False, 128, 8), ("pure_tp", 8, 1, 1, 16, 16, "bfloat16")),
]


@pytest.mark.parametrize(("args", "want"), LAYOUTS, ids=[str(a) for a, _ in LAYOUTS])
def test_layout_table(args, want):
    tp, dp, dp_attn, heads, sm = args
    lay = resolve_layout(tp, dp, dp_attn, num_attention_heads=heads, sm_major=sm)
    mode, attn_tp, attn_dp, replicas, hpr, padded, kv = want
    assert (lay.mode, lay.attn_tp_size, lay.attn_dp_size, lay.num_replicas) == (mode, attn_tp, attn_dp, replicas)
    assert (lay.heads_per_rank, lay.flashmla_padded_heads, lay.kv_cache_dtype) == (hpr, padded, kv)
    assert lay.world_size == tp * replicas
    assert lay.attn_tp_size * lay.attn_dp_size == tp
    assert lay.flashmla_waste_fraction == pytest.approx(1 - hpr / padded)
    if attn_tp > 1:
        assert any("attn_tp_size" in w for w in lay.warnings), lay.warnings
    else:
        assert not any("attn_tp_size" in w for w in lay.warnings), lay.warnings


def test_tp_mode_warning_states_padding_cost():
    (w,) = resolve_layout(8, sm_major=9).warnings
    assert "NSA TP mode is active" in w and "padded" not in w
    assert "pads them to 64" in w and "4.0x" in w and "75% wasted" in w
    (w,) = resolve_layout(8, sm_major=10).warnings
    assert "pads them to 128" in w and "8.0x" in w


def test_tp_mode_warning_says_the_measured_table_picks_the_kernel():
    """The warning claims no speedup: the tuning table picks per class, FlashMLA unless beaten by the margin."""
    from nsa_tp.ops import tuning

    (w,) = resolve_layout(8, sm_major=9).warnings
    assert "without padding" not in w and "faster" in w
    assert "per shape class" in w and "nsa_tp/ops/measured/" in w and "router" in w
    assert f"at least {tuning.MARGIN:.0%} faster" in w  # the prose follows the router's real margin
    # What the comment above the warning says of the committed tables (bf16 prefill, where FlashMLA runs)
    assert tuning.load_table("NVIDIA H200") is None  # removed: an unmeasured card keeps FlashMLA
    want = {"NVIDIA H100 80GB HBM3": {"h16/bf16": "triton"}}
    for card, first in want.items():
        table = tuning.load_table(card)
        for cls, times in table["times"]["sparse_mla_fwd"].items():
            if "flashmla" in times:
                got = tuning.order_from_times("sparse_mla_fwd", times)[0]
                assert got == first.get(cls, "flashmla"), (card, cls, times)


# --attn-dp-size D (SGLang 0.5.23) is --dp D --enable-dp-attention (0.5.17): the same layout, messages in its spelling
@pytest.mark.parametrize(("tp", "d"), [(8, 4), (8, 2), (8, 8), (4, 2), (16, 8), (2, 2)])
def test_attn_dp_size_is_the_old_spelling(tp, d):
    assert resolve_layout(tp, attn_dp_size=d, sm_major=9) == resolve_layout(tp, d, True, sm_major=9)


def test_attn_dp_size_one_is_no_attention_dp():
    assert resolve_layout(8, attn_dp_size=1, sm_major=9) == resolve_layout(8, sm_major=9)
    assert resolve_layout(8, 2, attn_dp_size=1, sm_major=9).num_replicas == 2  # --dp alone: replicas


def test_attn_dp_size_beside_its_old_spelling():
    same = resolve_layout(8, 4, True, attn_dp_size=4, sm_major=9)
    assert (same.mode, same.attn_tp_size, same.heads_per_rank) == ("partial_dp_attention", 2, 64)
    assert any("say the same; give one" in w for w in same.warnings), same.warnings
    # --enable-dp-attention without --dp adds nothing (SGLang drops it beside --attn-dp-size)
    assert resolve_layout(8, 1, True, attn_dp_size=4, sm_major=9) == resolve_layout(8, attn_dp_size=4, sm_major=9)


ATTN_DP_ERRORS = [
    (dict(tp_size=8, attn_dp_size=3), "--attn-dp-size 3 does not divide --tp 8; use --attn-dp-size 1, 2, 4 or 8"),
    (dict(tp_size=4, attn_dp_size=8), "--attn-dp-size 8 is larger than --tp 4; use --attn-dp-size 1, 2 or 4"),
    (dict(tp_size=6, attn_dp_size=2), "(--tp 6 --attn-dp-size 2); use --attn-dp-size 3 or 6"),
    (dict(tp_size=8, attn_dp_size=0), "--attn-dp-size must be a positive integer"),
    (dict(tp_size=8, dp_size=4, enable_dp_attention=True, attn_dp_size=2),
     "--attn-dp-size 2 and --dp 4 --enable-dp-attention give two attention DP widths"),
    (dict(tp_size=8, dp_size=4, enable_dp_attention=True, attn_dp_size=1),
     "--attn-dp-size 1 and --dp 4 --enable-dp-attention give two attention DP widths"),
    (dict(tp_size=8, dp_size=2, attn_dp_size=4), "--dp 2 (model replicas) with --attn-dp-size 4"),
]


@pytest.mark.parametrize(("kwargs", "message"), ATTN_DP_ERRORS, ids=[m[:40] for _, m in ATTN_DP_ERRORS])
def test_attn_dp_size_errors_name_the_flag_given(kwargs, message):
    with pytest.raises(LayoutError) as info:
        resolve_layout(**kwargs, sm_major=9)
    assert message in str(info.value), str(info.value)
    if "dp_size" not in kwargs:  # only the new spelling was given: the old one is never named
        assert "--dp " not in str(info.value) and "--enable-dp-attention" not in str(info.value)


def test_dp_attention_with_dp1_warns_it_is_pure_tp():
    lay = resolve_layout(8, 1, True, sm_major=9)
    assert lay.mode == "pure_tp"
    assert any("--dp 1 is pure TP" in w for w in lay.warnings)


def test_kv_cache_dtype_aliases_and_explicit_choice():
    assert resolve_layout(8, sm_major=9, kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    assert resolve_layout(8, sm_major=10, kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"


ERRORS = [
    (dict(tp_size=8, dp_size=3, enable_dp_attention=True), "--dp 3 does not divide --tp 8; use --dp 1, 2, 4 or 8"),
    (dict(tp_size=4, dp_size=8, enable_dp_attention=True), "--dp 8 is larger than --tp 4"),
    (dict(tp_size=0), "--tp must be a positive integer"),
    (dict(tp_size=8, dp_size=0), "--dp must be a positive integer"),
    (dict(tp_size=3), "use --tp 1, 2, 4 or 8"),
    (dict(tp_size=256), "do not split over an attention TP group of 256"),
    (dict(tp_size=6, dp_size=2, enable_dp_attention=True), "use --dp 3 or 6"),
    (dict(tp_size=8, kv_cache_dtype="fp8_e5m2"), "--kv-cache-dtype fp8_e5m2"),
    (dict(tp_size=8, page_size=32), "use --page-size 64"),
    (dict(tp_size=8, sm_major=5), "--sm"),
    (dict(tp_size=8, token_parallel="maybe"), "--nsa-token-parallel"),
    (dict(tp_size=8, num_attention_heads=0), "num_attention_heads"),
]


@pytest.mark.parametrize(("kwargs", "message"), ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_layout_errors_name_the_flag(kwargs, message):
    kwargs.setdefault("sm_major", 9)
    with pytest.raises(LayoutError, match=None) as info:
        resolve_layout(**kwargs)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value), str(info.value)


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsa_tp", "plan", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "heads", "mode"),
    [
        (["--tp", "8"], 16, "pure_tp"),
        (["--tp", "8", "--dp", "4", "--enable-dp-attention"], 64, "partial_dp_attention"),
        (["--tp", "8", "--dp", "8", "--enable-dp-attention"], 128, "dp_attention"),
    ],
)
def test_plan_cli_text_and_json(args, heads, mode):
    text = _plan(*args, "--sm", "90")
    assert text.returncode == 0, text.stderr
    assert f"heads per rank           {heads} of 128" in text.stdout
    assert mode in text.stdout
    js = _plan(*args, "--sm", "90", "--json")
    data = json.loads(js.stdout)
    for key in ("mode", "tp_size", "dp_size", "attn_tp_size", "attn_dp_size", "heads_per_rank",
                "flashmla_padded_heads", "kv_cache_dtype", "warnings"):
        assert key in data
    assert data["heads_per_rank"] == heads and data["mode"] == mode


def test_plan_cli_impossible_layout_exits_2_naming_dp():
    res = _plan("--tp", "8", "--dp", "3", "--enable-dp-attention")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dp" in lines[0]


def test_plan_cli_reads_model_path(tmp_path):
    cfg = {
        "architectures": ["DeepseekV32ForCausalLM"], "hidden_size": 1024, "num_attention_heads": 32,
        "q_lora_rank": 256, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = _plan("--tp", "8", "--sm", "100", "--model-path", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["heads_per_rank"] == 4 and data["flashmla_padded_heads"] == 128
    assert data["kv_cache_dtype"] == "fp8_e4m3"
    bad = _plan("--tp", "8", "--model-path", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_sglang_flags_spell_each_layout_one_way():
    """One writer of the DP spellings (plan output, launch commands and warnings all call it)."""
    from nsa_tp.parallel import dp_attention_flags, sglang_flags

    assert sglang_flags(resolve_layout(8), new_spelling=True) == "--tp 8"
    part = resolve_layout(8, attn_dp_size=4)
    assert sglang_flags(part, new_spelling=True) == "--tp 8 --attn-dp-size 4"
    assert sglang_flags(part, new_spelling=False) == "--tp 8 --dp 4 --enable-dp-attention"
    assert sglang_flags(resolve_layout(8, dp_size=2), new_spelling=True) == "--tp 8 --dp 2"  # replicas
    assert dp_attention_flags(4, 2, new_spelling=False) == "--tp 4 --dp 2 --enable-dp-attention"
