"""Every layout gives the single-rank layer output: TP2, TP4, DP2 x TP2, DP2, DP4 on CPU with gloo.

Ranks are spawned once per world size (start-up costs seconds on a small CPU) and each spawn runs
several layouts. The batch is ragged (uneven lengths, cached prefixes, a page boundary), then decode
steps; the indexer's top-k is smaller than the contexts so the sparse selection matters. DP layouts get
uneven request splits, so some attention DP groups pad (DP4 with 3 requests: one group is idle).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, compare_results, run_case, run_layouts
from nsa_tp.parallel import resolve_layout
from nsa_tp.parallel.groups import group_ranks, rank_coords
from nsa_tp.parallel.launch import RankContext, RankFailedError, launch

# 32 heads (real head dims) keep four gloo ranks fast; top-k 48 < the longer contexts.
CFG = NSAConfig(hidden_size=256, q_lora_rank=128, num_attention_heads=32, index_topk=48)
REQS = (Request(0, 90), Request(70, 23), Request(5, 40))
TOL = 1e-2  # bf16 tolerance, per request


def _case(tp: int, dp: int = 1, dpa: bool = False, **kw) -> RunCase:
    return RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, cfg=CFG, requests=REQS, decode_steps=2, seed=5, **kw)


@pytest.fixture(scope="module")
def reference():
    return {dt: run_case(None, _case(1, kv_cache_dtype=dt)) for dt in ("bfloat16", "fp8_e4m3")}


def _check(case: RunCase, results, reference) -> None:
    rank0 = results[0]
    err = compare_results(reference[case.kv_cache_dtype], rank0)
    assert err["max"] < TOL, (rank0.label, err)
    assert all(r.heads_per_rank == rank0.heads_per_rank for r in results)
    padded = sum(r.pad_rows for r in results)
    assert (padded > 0) == case.enable_dp_attention, (rank0.label, [r.pad_rows for r in results])


def test_two_ranks(reference):
    cases = [
        _case(2, name="TP2"),
        _case(2, name="TP2/fp8_e4m3", kv_cache_dtype="fp8_e4m3"),
        _case(2, 2, True, name="DP2"),  # requests 0, 2 on group 0 and 1 on group 1: group 1 pads
        _case(2, 2, True, name="DP2 skewed", assignment=(1, 1, 1)),  # group 0 idle, all padding
    ]
    res = run_layouts(cases, 2)
    for case, r in zip(cases, res, strict=True):
        assert r[0].heads_per_rank == case.layout().heads_per_rank
        _check(case, r, reference)


def test_four_ranks(reference):
    cases = [_case(4, name="TP4"), _case(4, 2, True, name="DP2xTP2"), _case(4, 4, True, name="DP4")]
    res = run_layouts(cases, 4)
    assert [r[0].heads_per_rank for r in res] == [8, 16, 32]
    for case, r in zip(cases, res, strict=True):
        _check(case, r, reference)


def test_group_ranks_follow_sglang_numbering():
    lay = resolve_layout(8, 4, True, sm_major=9)
    g = group_ranks(lay)
    assert g["tp"] == [list(range(8))]
    assert g["attn_tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["attn_dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert rank_coords(lay, 5) == {"replica": 0, "tp_rank": 5, "attn_dp_rank": 2, "attn_tp_rank": 1}
    rep = resolve_layout(2, 2, False, sm_major=9)  # --dp without DP attention: two replicas of TP2
    assert group_ranks(rep) == {"tp": [[0, 1], [2, 3]], "attn_tp": [[0, 1], [2, 3]], "attn_dp": [[0], [1], [2], [3]]}
    with pytest.raises(ValueError, match="rank"):
        rank_coords(lay, 8)


def _fail_on_rank1(ctx: RankContext, how: str) -> int:
    if ctx.rank == 1:
        if how == "raise":
            raise KeyError("rank one is broken")
        os._exit(3)  # dies without a word
    dist.barrier()  # rank 0 would wait here for ever without the launcher's handling
    return ctx.rank


def test_launcher_failures_name_the_rank():
    with pytest.raises(RankFailedError, match="rank 1: raised") as e:
        launch(_fail_on_rank1, 2, ("raise",), timeout_s=60)
    assert e.value.rank == 1 and "KeyError: 'rank one is broken'" in e.value.rank_traceback
    with pytest.raises(RankFailedError, match="rank 1: exited with code 3"):
        launch(_fail_on_rank1, 2, ("exit",), timeout_s=60)
    with pytest.raises(ValueError, match="world_size"):
        launch(_fail_on_rank1, 0)


def test_run_layouts_rejects_wrong_world():
    with pytest.raises(ValueError, match="needs 4 ranks"):
        run_layouts([_case(4)], 2)


def test_nsa_tp_run_cli_one_layout_json_and_bad_flags(capsys):
    """`nsa-tp run` end to end for one layout (JSON), and the flag errors (exit 2, the flag named)."""
    import json

    from nsa_tp.cli import main

    base = ["run", "--heads", "32", "--hidden-size", "256", "--prompt-len", "40", "--decode-steps", "1"]
    assert main(base + ["--tp", "2", "--dp", "2", "--enable-dp-attention", "--json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)["rows"]
    assert [r["layout"] for r in rows] == ["TP1", "DP2"]
    assert rows[1]["heads_per_rank"] == 32 and rows[1]["pad_rows"] > 0
    assert all(r["ok"] and r["max_rel_err"] < 1e-2 for r in rows)
    assert "2/2" in out.err and "3/3" not in out.err  # the progress bar counted its two steps
    assert main(base + ["--tp", "3"]) == 2
    assert "error: 32 attention heads do not split" in capsys.readouterr().err
    assert main(base + ["--prompt-len", "2"]) == 2
    assert "argument --prompt-len: must be >= 4" in capsys.readouterr().err


def test_nsa_tp_run_with_checkpoint_weights(tmp_path, capsys):
    """`--model-path`: config.json + safetensors of one layer, loaded by every rank, same answer as TP1."""
    import json

    from nsa_tp.cli import main
    from nsa_tp.model.weights import random_weights, save_layer_weights

    hf = json.loads((Path(__file__).parent / "data" / "config-v32.json").read_text())
    hf.update(hidden_size=256, q_lora_rank=128, num_attention_heads=32, index_topk=32)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = NSAConfig.from_hf_config(tmp_path)
    save_layer_weights(random_weights(cfg, seed=9), tmp_path / "model.safetensors", layer=2)
    rc = main(["run", "--model-path", str(tmp_path), "--layer", "2", "--tp", "2", "--prompt-len", "48",
               "--decode-steps", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rc == 0 and [r["layout"] for r in rows] == ["TP1", "TP2"]
    assert rows[1]["max_rel_err"] < 1e-2 and rows[1]["heads_per_rank"] == 16
    assert main(["run", "--model-path", str(tmp_path), "--layer", "1", "--tp", "2"]) == 2  # no layer-1 tensors
    assert "'model.layers.1.self_attn.q_a_proj.weight' is missing" in capsys.readouterr().err
