"""benchmark/bench_tp_projection.py in its CPU smoke form, run in-process with stand-in upstream tiers: its JSON
has the promised structure, every projected time is the sum of the pieces the docstring names, the heads pieces
record upstream's tiers, and a heads piece that ran another tier fails the run with no JSON written.

The GPU numbers come from the lead's run (benchmark/gpu_costs.sh); this checks the script, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import os

import _fake_tiers
import pytest

from nsa_tp.ops.tuning import UPSTREAM
from nsa_tp.token_parallel import plan_index_split
from nsa_tp.token_parallel.costs import collective_ms

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
SCRIPT = os.path.join(ROOT, "benchmark", "bench_tp_projection.py")


def _module():
    spec = importlib.util.spec_from_file_location("bench_tp_projection", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    _fake_tiers.install(mp)
    out = tmp_path_factory.mktemp("proj") / "proj.json"
    try:
        assert _module().main(["--smoke", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return json.loads(out.read_text())


def test_smoke_json_structure(smoke):
    data = smoke
    for key in ("card", "date", "command", "torch", "comm_model", "cases", "topk", "cost_record", "notes",
                "heads_tiers"):
        assert key in data, key
    assert data["smoke"] is True and data["cost_record"].startswith("none")  # no card on CPU: no record
    assert [(c["tokens"], c["tp"]) for c in data["cases"]] == [(t, n) for t in (64, 160) for n in (2, 4, 8)]
    for c in data["cases"]:
        assert c["skipped"] == [] and c["heads_per_rank"] == 128 // c["tp"] and c["padded_heads"] == 64
        assert set(c["measured_ms"]) == {"heads_indexer_all_rows", "heads_sparse_padded", "indexer_index_split",
                                         "indexer_token_split", "sparse_all_heads"}
        assert all(v > 0 for v in c["measured_ms"].values())
        assert set(c["modeled_ms"]) == {"all_gather_ids", "all_to_all_q", "all_to_all_o"}
        # heads = upstream's tiers (stand-ins here), the token-parallel pieces what --backend ran
        assert c["tiers"]["heads_sparse_padded"] == {"sparse_mla_fwd": UPSTREAM["sparse_mla_fwd"]}
        assert c["tiers"]["heads_indexer_all_rows"] == {"fp8_mqa_logits": "deep_gemm",
                                                        "topk_transform_ragged": "sgl_kernel"}
        assert c["tiers"]["sparse_all_heads"] == {"sparse_mla_fwd": "reference"}
        assert "policy_choice" not in c  # no Costs record: the decider is not asked
        keys = list(range(1, c["tokens"] + 1))
        assert c["index_split"] == list(plan_index_split(keys, c["tp"]).splits)
        assert sum(c["token_split"]) == c["tokens"] and len(c["token_split"]) == c["tp"]


def test_smoke_projection_is_the_sum_of_its_pieces(smoke):
    comm = smoke["comm_model"]
    for c in smoke["cases"]:
        m, mod, p = c["measured_ms"], c["modeled_ms"], c["projected_ms"]
        assert p["heads"] == pytest.approx(m["heads_indexer_all_rows"] + m["heads_sparse_padded"])
        assert p["indexer"] == pytest.approx(m["indexer_index_split"] + mod["all_gather_ids"]
                                             + m["heads_sparse_padded"])
        assert p["tokens"] == pytest.approx(m["indexer_token_split"] + m["sparse_all_heads"] + mod["all_to_all_q"]
                                            + mod["all_to_all_o"])
        assert c["ratio"]["tokens_over_heads"] == pytest.approx(p["tokens"] / p["heads"])
        assert c["best"] == min(p, key=p.get)
        assert c["attention_ms_x61"]["tokens"] == pytest.approx(61 * p["tokens"])
        for name, b in c["modeled_bytes"].items():
            lat, bw = ((comm["gather_latency_us"], comm["gather_gbytes_per_s"]) if name == "all_gather_ids"
                       else (comm["a2a_latency_us"], comm["a2a_gbytes_per_s"]))
            assert mod[name] == pytest.approx(collective_ms(b, lat, bw))


def test_comm_model_is_the_small_all_to_all_of_the_committed_run(smoke):
    """Latency = the committed 4xH200 run's small all-to-all (not the intercept of two large ones)."""
    comm = smoke["comm_model"]
    assert comm["a2a_latency_us"] == pytest.approx(242.5, abs=0.1)
    assert comm["a2a_gbytes_per_s"] == pytest.approx(220.7, abs=0.1)
    assert "token_parallel_h200x4_20261127.json" in comm["source"]


@pytest.mark.parametrize("fallback_to", ["reference", "triton"])
def test_a_heads_piece_that_ran_another_tier_fails_with_no_json(tmp_path, monkeypatch, fallback_to):
    """Stand-in upstream tiers that hand the call to another tier (a silent fallback): the run must fail and
    write nothing. (Handing to Triton fails on CPU: the piece then did not run at all, which fails the same.)"""
    _fake_tiers.install(monkeypatch, honest=False, fallback_to=fallback_to)
    out = tmp_path / "proj.json"
    rc = _module().main(["--smoke", "--tp", "2", "--tokens", "48", "--out", str(out)])
    assert rc == 1 and not out.exists() and not list(tmp_path.iterdir())


def test_without_upstream_tiers_the_run_fails_with_no_json(tmp_path, capsys):
    """On CPU without stand-ins, upstream's kernels cannot run: no baseline, so no projection is written, and the
    error names each heads piece that did not run (never timed on another tier)."""
    out = tmp_path / "fail.json"
    assert _module().main(["--smoke", "--tp", "2", "--tokens", "48", "--out", str(out)]) == 1
    assert not out.exists()
    err = capsys.readouterr()
    text = err.out + err.err
    assert "heads_indexer_all_rows: upstream's kernel did not run" in text
    assert "heads_sparse_padded: upstream's kernel did not run" in text
