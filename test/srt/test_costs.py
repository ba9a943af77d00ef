"""The one Costs record per card: where it is read from, the one collective model, the committed NCCL run's
numbers it cites, and (GPU) the command that writes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nsa_tp.bench.costs import DEFAULT_COMM_JSON, collectives_from_nccl_run
from nsa_tp.token_parallel import costs as costs_mod
from nsa_tp.token_parallel import plan_token_split
from nsa_tp.token_parallel.costs import Costs, a2a_bytes, costs_path, gather_bytes, load_costs

ROOT = Path(__file__).resolve().parents[2]
REC = Costs(card="Card A", date="2026-12-06", command="nsa-tp bench --costs", indexer_ns_per_row_key=0.05,
            sparse_ns_per_token=((16, 500.0), (128, 900.0)), decode_indexer_ns_per_key=0.01,
            decode_indexer_fixed_us=20.0, merge_us=30.0, a2a_latency_us=242.5, a2a_gbytes_per_s=220.7,
            gather_latency_us=242.5, gather_gbytes_per_s=220.7, collectives_source="test",
            kernels=(("indexer_ns_per_row_key", "fp8_mqa_logits [deep_gemm]"),))


def test_collective_bytes_by_hand():
    # 10 rows over 2 ranks as 7 + 3: rank 0 receives 7 rows of the other rank's heads
    assert a2a_bytes((7, 3), 4, 576) == 7 * 4 * 576 * 2
    assert a2a_bytes((5, 5, 5, 5), 2, 512) == 15 * 2 * 512 * 2  # even: (N-1)/N of T, sent and received
    assert a2a_bytes((9,), 4, 576) == 0  # one rank moves nothing
    assert gather_bytes((7, 3), 16 * 4) == 1 * 7 * 16 * 4
    assert a2a_bytes(plan_token_split(100, 4).splits, 32, 576) == 75 * 32 * 576 * 2


def test_collectives_are_the_small_all_to_all_of_the_committed_run():
    comm = collectives_from_nccl_run(ROOT / DEFAULT_COMM_JSON)
    assert comm["a2a_latency_us"] == pytest.approx(242.5, abs=0.1)  # its 1.8 MB all-to-all, not an intercept
    assert comm["a2a_gbytes_per_s"] == pytest.approx(220.7, abs=0.1)
    assert comm["gather_latency_us"] == comm["a2a_latency_us"] and "not timed" in comm["collectives_source"]
    assert "token_parallel_h200x4_20261127.json" in comm["collectives_source"]


def test_load_costs_reads_the_cards_committed_record(tmp_path, monkeypatch):
    monkeypatch.delenv(costs_mod.ENV_COSTS, raising=False)
    monkeypatch.setattr(costs_mod, "MEASURED_DIR", tmp_path)
    assert load_costs("Card A")[0] is None and "no measured costs for Card A" in load_costs("Card A")[1]
    assert load_costs(None)[0] is None
    costs_path("Card A").write_text(json.dumps({"costs": REC.to_dict()}))
    assert costs_path("Card A") == tmp_path / "costs_card-a.json"
    got, why = load_costs("Card A")
    assert got == REC and "Card A" in why
    assert load_costs("Card B")[0] is None  # another card's name: its own file, absent
    # the override names a file of the same format; a record of another card is refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps(REC.to_dict()))
    monkeypatch.setenv(costs_mod.ENV_COSTS, str(other))
    assert load_costs("Card A")[0] == REC
    got, why = load_costs("Card B")
    assert got is None and "measured on 'Card A'" in why


@pytest.mark.gpu
def test_costs_command_writes_the_record(tmp_path):
    """``nsa-tp bench --costs`` on this card: a record with every kernel field and the tiers behind it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    from nsa_tp.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["bench", "--costs", "--measured-dir", str(tmp_path)]) == 0
    finally:
        os.chdir(cwd)
    card = torch.cuda.get_device_name()
    rec = Costs.from_dict(json.loads(costs_path(card, tmp_path).read_text())["costs"])
    assert rec.card == card and rec.indexer_ns_per_row_key > 0 and len(rec.sparse_ns_per_token) == 4
    assert all(dict(rec.kernels).get(f) for f in ("indexer_ns_per_row_key", "sparse_ns_per_token", "merge_us"))


def test_measure_costs_on_cpu_names_every_kernel(monkeypatch):
    """The costs command's measurement at tiny sizes on CPU (reference tier, counter timer): every field is
    filled from a timed piece, and the record names the tier behind each one."""
    from nsa_tp.bench import costs as bench_costs
    from nsa_tp.bench import kernels

    monkeypatch.setattr(bench_costs, "_T", 16)
    monkeypatch.setattr(bench_costs, "_N", 256)
    monkeypatch.setattr(bench_costs, "_K", 32)
    monkeypatch.setattr(bench_costs, "_DECODE_CTX", (128, 512))
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_kw: (fn(), float(next(ticks)))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    rec = bench_costs.measure_costs(torch.device("cpu"), "cpu", "2026-12-06", "nsa-tp bench --costs",
                                    str(ROOT / DEFAULT_COMM_JSON))
    assert rec.indexer_ns_per_row_key > 0 and [h for h, _ in rec.sparse_ns_per_token] == [16, 32, 64, 128]
    assert rec.merge_us > 0 and rec.decode_indexer_ns_per_key >= 0 and rec.a2a_latency_us == pytest.approx(242.5, 0.01)
    kinds = dict(rec.kernels)
    assert "[reference]" in kinds["indexer_ns_per_row_key"] and "h128 [reference]" in kinds["sparse_ns_per_token"]
    assert Costs.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_serving_refuses_a_record_with_borrowed_collectives(tmp_path, monkeypatch):
    """A live server (and `nsa-tp plan`, which describes one) acts only on collectives measured on the card."""
    import dataclasses

    from nsa_tp.parallel import resolve_layout
    from nsa_tp.token_parallel.policy import describe_policy

    f = tmp_path / "costs.json"
    monkeypatch.setenv(costs_mod.ENV_COSTS, str(f))
    f.write_text(json.dumps({"costs": REC.to_dict()}))  # collectives_card not recorded: borrowed
    assert not REC.collectives_measured_here
    assert load_costs("Card A")[0] == REC  # a projection may use it
    got, why = load_costs("Card A", serving=True)
    assert got is None and "borrows its collectives" in why
    assert "borrows its collectives" in describe_policy(resolve_layout(8, sm_major=9), card="Card A")
    own = dataclasses.replace(REC, collectives_card="Card A")
    f.write_text(json.dumps({"costs": own.to_dict()}))
    assert own.collectives_measured_here and load_costs("Card A", serving=True)[0] == own
