"""The multi-GPU benchmark scripts on a CPU machine: they refuse a real run with one line (exit 2) instead of
running real dims on CPU ranks for hours, and their smoke runs write outside ``benchmark/results/`` (issue 15)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmark" / "results"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"nsa_tp_{name}", ROOT / "benchmark" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without CUDA GPUs")


@no_gpu
@pytest.mark.parametrize("argv", [["--world", "2"], []])
def test_token_parallel_refuses_without_gpus(capsys, argv):
    rc = _load("bench_token_parallel").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "needs 2 CUDA GPUs" in err[0] and "--quick" in err[0]


@no_gpu
@pytest.mark.parametrize("argv", [["--world", "2"], []])
def test_layer_modes_refuses_without_gpus(capsys, argv):
    rc = _load("bench_layer_modes").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "CUDA GPUs" in err[0] and "--smoke" in err[0]


def _fake_time_cases(fn, world, args, **kw):  # noqa: ANN001 - stands in for launch(time_cases, ...)
    cases = args[0]
    assert args[3] is True  # progress lines on
    return [[{"median_ms": 1.0 + k, "times_ms": [1.0 + k], "num_tokens": 8, "num_padded": 8, "peak_mem_mb": 0.0}
             for k in range(len(cases))] for _ in range(world)]


def test_layer_modes_smoke_writes_to_a_temp_folder(capsys, monkeypatch):
    mod = _load("bench_layer_modes")
    monkeypatch.setattr(mod, "launch", _fake_time_cases)
    before = set(RESULTS.glob("*")) if RESULTS.is_dir() else set()
    assert mod.main(["--smoke", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    wrote = Path(out.split("wrote ")[-1].split(" and ")[0].strip())
    assert wrote.is_file() and RESULTS not in wrote.parents, wrote
    assert json.loads(wrote.read_text())["card"] == "cpu-smoke"
    assert (set(RESULTS.glob("*")) if RESULTS.is_dir() else set()) == before


def test_layer_modes_smoke_honours_out(capsys, monkeypatch, tmp_path):
    mod = _load("bench_layer_modes")
    monkeypatch.setattr(mod, "launch", _fake_time_cases)
    assert mod.main(["--smoke", "--tokens", "64", "--out", str(tmp_path)]) == 0
    assert [p.suffix for p in tmp_path.glob("layer_modes_cpu_smoke_x2_*")][:1] == [".json"]
