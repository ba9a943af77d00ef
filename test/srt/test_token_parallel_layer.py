"""The whole sharded layer with the token-parallel core equals the single-rank layer (gloo, 2 and 4 ranks).

Through the issue-6 runner: a ragged batch with cached prefixes, then decode steps, under TP2, TP4 and
DP2 x TP2 (partial DP attention: padded rows, one group decoding a single request). ``token_parallel_on``
forces the split at these CPU sizes, so every strategy runs: tokens (prefill; decode with >= attn_tp
requests) and keys (decode with fewer requests than attn_tp ranks); ``token_parallel_indexer`` forces the
indexer split on the extend batch (each rank scores its share of the rows, the ids all-gathered). Each is
compared with the single-rank layer and with the ``heads`` core (pure TP) at the same layout.
"""

from __future__ import annotations

import pytest

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, compare_results, run_case, run_layouts
from nsa_tp.token_parallel.policy import BatchShape, choose

CFG = NSAConfig(hidden_size=256, q_lora_rank=128, num_attention_heads=32, index_topk=48)
REQS = (Request(0, 90), Request(70, 23), Request(5, 40))
TOL = 1e-2  # bf16 tolerance, per request


def _case(tp: int, dp: int = 1, dpa: bool = False, core: str = "token_parallel_on", **kw) -> RunCase:
    return RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, cfg=CFG, requests=REQS, decode_steps=2, seed=5,
                   core=core, **kw)


@pytest.fixture(scope="module")
def reference():
    return {dt: run_case(None, RunCase(tp=1, cfg=CFG, requests=REQS, decode_steps=2, seed=5, kv_cache_dtype=dt))
            for dt in ("bfloat16", "fp8_e4m3")}


def _check(case: RunCase, results, reference) -> None:
    err = compare_results(reference[case.kv_cache_dtype], results[0])
    assert err["max"] < TOL, (case.name, err)


def test_layer_token_parallel_two_ranks(reference):
    cases = [_case(2, name="TP2 tokens"), _case(2, name="TP2 tokens fp8", kv_cache_dtype="fp8_e4m3"),
             _case(2, name="TP2 indexer", core="token_parallel_indexer"), _case(2, name="TP2 heads", core="heads")]
    lay = cases[0].layout()
    # 3 decode requests >= 2 ranks
    assert choose(BatchShape.of(lay, 3, 100, is_decode=True), None, "on").strategy == "tokens"
    results = run_layouts(cases, 2)
    for case, res in zip(cases, results, strict=True):
        _check(case, res, reference)
    heads = results[3][0]
    for i in (0, 2):  # tokens and indexer against pure TP at the same layout
        err = compare_results(heads, results[i][0])
        assert err["max"] < TOL, (cases[i].name, err)


def test_layer_token_parallel_four_ranks(reference):
    cases = [_case(4, name="TP4 keys-decode"), _case(4, 2, True, name="DP2xTP2"),
             _case(4, name="TP4 indexer", core="token_parallel_indexer"),
             _case(4, 2, True, name="DP2xTP2 indexer", core="token_parallel_indexer")]
    assert choose(BatchShape.of(cases[0].layout(), 3, 100, is_decode=True), None, "on").strategy == "keys"  # 3 < 4
    for case, res in zip(cases, run_layouts(cases, 4), strict=True):
        _check(case, res, reference)
        if case.enable_dp_attention:  # requests 0, 2 on group 0 and 1 on group 1: group 1 pads
            assert sum(r.pad_rows for r in res) > 0


def test_nsa_tp_run_shows_the_split_column():
    """`nsa-tp run --nsa-token-parallel on` runs the token-parallel core and reports what it split."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "nsa_tp", "run", "--heads", "32", "--hidden-size", "256", "--prompt-len", "40",
           "--decode-steps", "1", "--tp", "2", "--nsa-token-parallel", "on"]  # = --core token_parallel_on
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert [(r["layout"], r["core"], r["split"]) for r in rows] == [
        ("TP1", "heads", "heads/heads"), ("TP2", "token_parallel_on", "tokens/tokens")]
    assert rows[1]["ok"] and rows[1]["max_rel_err"] < TOL
