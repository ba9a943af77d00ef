"""benchmark/bench_tp_projection.py in its CPU smoke form: it runs end to end on the reference tier, its JSON
has the promised structure, and every projected time is the sum of the pieces the docstring names.

The GPU numbers come from the lead's one H200 run; this checks the script and its arithmetic, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from nsa_tp.token_parallel import plan_index_split, plan_token_split

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
SCRIPT = os.path.join(ROOT, "benchmark", "bench_tp_projection.py")


def _module():
    spec = importlib.util.spec_from_file_location("bench_tp_projection", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("proj") / "proj.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    run = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout, run.stderr


def test_smoke_json_structure(smoke):
    data, stdout, stderr = smoke
    for key in ("card", "date", "command", "torch", "comm_model", "cases", "topk", "costs", "notes"):
        assert key in data, key
    assert "--smoke" in data["command"] and data["smoke"] is True and data["partial"] is False
    assert [(c["tokens"], c["tp"]) for c in data["cases"]] == [(t, n) for t in (64, 160) for n in (2, 4, 8)]
    assert "bench_tp_projection" in stderr and "indexer all rows" in stderr  # progress lines
    assert "tok/hd" in stdout and len(stdout.strip().splitlines()) == 2 + len(data["cases"])  # the table
    for c in data["cases"]:
        assert c["skipped"] == [] and c["heads_per_rank"] == 128 // c["tp"] and c["padded_heads"] == 64
        assert set(c["measured_ms"]) == {"heads_indexer_all_rows", "heads_sparse_padded", "indexer_index_split",
                                         "indexer_token_split", "sparse_all_heads"}
        assert all(v > 0 for v in c["measured_ms"].values())
        assert set(c["modeled_ms"]) == {"all_gather_ids", "all_to_all_q", "all_to_all_o"}
        assert c["tiers"]["heads_sparse_padded"] == {"sparse_mla_fwd": "reference"}
        assert c["policy_choice"] in ("heads", "indexer", "tokens")
        # the splits are the package's own plans for this prompt
        keys = list(range(1, c["tokens"] + 1))
        assert c["index_split"] == list(plan_index_split(keys, c["tp"]).splits)
        assert sum(c["token_split"]) == c["tokens"] and len(c["token_split"]) == c["tp"]


def test_smoke_projection_is_the_sum_of_its_pieces(smoke):
    data = smoke[0]
    comm = data["comm_model"]
    for c in data["cases"]:
        m, mod, p = c["measured_ms"], c["modeled_ms"], c["projected_ms"]
        assert p["heads"] == pytest.approx(m["heads_indexer_all_rows"] + m["heads_sparse_padded"])
        assert p["indexer"] == pytest.approx(m["indexer_index_split"] + mod["all_gather_ids"]
                                             + m["heads_sparse_padded"])
        assert p["tokens"] == pytest.approx(m["indexer_token_split"] + m["sparse_all_heads"] + mod["all_to_all_q"]
                                            + mod["all_to_all_o"])
        assert c["ratio"]["tokens_over_heads"] == pytest.approx(p["tokens"] / p["heads"])
        assert c["ratio"]["indexer_over_heads"] == pytest.approx(p["indexer"] / p["heads"])
        assert c["best"] == min(p, key=p.get)
        assert c["attention_ms_x61"]["tokens"] == pytest.approx(61 * p["tokens"])
        for name, b in c["modeled_bytes"].items():
            lat, bw = ((comm["gather_latency_us"], comm["gather_gbytes_per_s"]) if name == "all_gather_ids"
                       else (comm["a2a_latency_us"], comm["a2a_gbytes_per_s"]))
            assert mod[name] == pytest.approx(lat / 1e3 + b / (bw * 1e9) * 1e3)


def test_comm_model_from_the_committed_run():
    """The default bandwidth is what the committed 4xH200 all-to-all implies (slope and intercept)."""
    mod = _module()
    comm = mod.comm_from_json(mod.DEFAULT_COMM_JSON)
    assert comm["a2a_gbytes_per_s"] == pytest.approx(220.7, abs=0.1)
    assert comm["a2a_latency_us"] == pytest.approx(234.5, abs=0.1)
    assert "token_parallel_h200x4_20261127.json" in comm["source"]


def test_collective_bytes_by_hand():
    mod = _module()
    # 10 rows over 2 ranks as 7 + 3: rank 0 receives 7 rows of the other rank's heads, rank 1 sends 3 and
    # receives 3; the most any rank moves is 7 rows x h x d x 2 bytes
    assert mod.a2a_bytes((7, 3), 4, 576) == 7 * 4 * 576 * 2
    assert mod.a2a_bytes((5, 5, 5, 5), 2, 512) == 15 * 2 * 512 * 2  # even: (N-1)/N of T, sent and received
    assert mod.gather_bytes((7, 3), 16) == 1 * 7 * 16 * 4
    split = plan_token_split(100, 4)
    assert mod.a2a_bytes(split.splits, 32, 576) == 75 * 32 * 576 * 2


def test_a_piece_that_cannot_run_is_named_and_the_run_finishes(tmp_path):
    """One run on the card, no second chance: a failing piece is recorded, the others still run and the JSON is
    written (here the FlashMLA tier, which cannot run on CPU, forced for the sparse core)."""
    out = tmp_path / "fail.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    cmd = [sys.executable, SCRIPT, "--smoke", "--tp", "2", "--tokens", "48", "--sparse-backend", "flashmla",
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["projected_ms"] is None and case["skipped"] and all("failed" in x for x in case["skipped"])
    assert isinstance(case["measured_ms"]["heads_indexer_all_rows"], float)  # the indexer still ran
    assert "FAILED" in run.stderr and "skipped" in run.stdout
