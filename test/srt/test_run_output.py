"""`nsa-tp run`'s warm-up, its PASS/FAIL line and its footer (issue 15)."""

from __future__ import annotations

import argparse

import pytest

from nsa_tp import run_cmd
from nsa_tp.cli import main
from nsa_tp.config import NSAConfig
from nsa_tp.model.attention import NSAAttention
from nsa_tp.model.runner import Request, RunCase, run_case

SMALL = NSAConfig(hidden_size=128, q_lora_rank=64, num_attention_heads=8, index_topk=8)


@pytest.mark.parametrize("warmup", [False, True])
def test_warmup_runs_the_batch_once_before_timing(monkeypatch, warmup):
    """With warm-up, every forward of the batch (prefix fill, prefill, a decode step) runs once untimed first;
    the timed figures then come from the second, fresh set of caches, and the outputs are the same."""
    calls: list[int] = []
    real = NSAAttention.forward

    def counting(self, x, *a, **k):  # noqa: ANN001
        calls.append(x.shape[0])
        return real(self, x, *a, **k)

    monkeypatch.setattr(NSAAttention, "__call__", counting)  # the runner calls layer(x, ...)
    case = RunCase(tp=1, cfg=SMALL, requests=(Request(4, 6), Request(0, 5)), decode_steps=2, warmup=warmup)
    res = run_case(None, case)
    timed = [4, 6 + 5, 2, 2]  # prefix fill (request 0's 4 cached tokens), prefill, two decode steps
    warm = [4, 11, 2] if warmup else []  # one decode step compiles the decode path
    assert calls == warm + timed
    cold = run_case(None, RunCase(tp=1, cfg=SMALL, requests=case.requests, decode_steps=2, warmup=False))
    for i in res.prefill:
        assert (res.prefill[i] == cold.prefill[i]).all()


def _row(layout: str, err: float) -> dict:
    return {"layout": layout, "max_rel_err": err, "ok": err < run_cmd.TOLERANCE}


def test_verdict_pass_names_the_worst_layout():
    line = run_cmd.verdict([_row("TP1", 0.0), _row("TP2", 3e-6), _row("DP4", 1.3e-3), _row("TP4", 2e-4)])
    assert line == "PASS: 4 layouts match one rank holding everything; worst DP4 at 1.3e-03 (tolerance 1e-02)"


def test_verdict_fail_lists_the_failures():
    line = run_cmd.verdict([_row("TP1", 0.0), _row("TP2", 0.5), _row("DP2", float("inf"))])
    assert line.startswith("FAIL: 2 of 3 layouts miss the tolerance (TP2, DP2); worst DP2 at inf")


def test_run_end_to_end_one_rank(capsys):
    """The whole command in-process (one layout, one rank): table, footer, and the PASS line last."""
    rc = main(["run", "--tp", "1", "--heads", "8", "--hidden-size", "128", "--prompt-len", "8", "--topk", "8",
               "--decode-steps", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("PASS: 2 layouts match one rank holding everything; worst TP1 at 0.0e+00")
    assert any(ln.startswith("DP pad rows: dummy token rows") for ln in lines)
    assert "after a warm-up run" in out


def test_run_dp_without_dp_attention_runs_one_replica(capsys):
    """`--tp 2 --dp 2` is 2 replicas of 2 GPUs: one replica runs (2 ranks, not 4) and the footer says so."""
    p = argparse.ArgumentParser()
    run_cmd.add_arguments(p)
    args = p.parse_args(["--tp", "2", "--dp", "2"])
    _, _, cases, _ = run_cmd._plan(args, gpus=0)
    assert [(c.tp, c.dp, c.enable_dp_attention, c.layout().world_size) for c in cases] == [(2, 1, False, 2)]
    assert all(c.warmup for c in cases)
    footer = run_cmd._footer({"peak_memory": "x", "replica_gpus": 2}, replicas=2)
    assert "--dp 2 without --enable-dp-attention = 2 replicas of this layout" in footer
    assert "2 x 2 GPUs" in footer


def test_runner_keeps_warmup_off_by_default():
    """Tests and benchmarks that build RunCase themselves pay no warm-up unless they ask for it."""
    assert RunCase(tp=1).warmup is False
