"""benchmark/sglang_multi_gpu.sh (issue 14's one command) on CPU: its --smoke form prints every server it would
start, per GPU count; its summary reads the run tree; its client's concurrent batch has the promised shape.
Nothing here needs SGLang or a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"nsa_tp_{name}", ROOT / "benchmark" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


client = _load("sglang_multi_gpu_client")
summary = _load("sglang_multi_gpu_summary")
SCRIPT = ROOT / "benchmark" / "sglang_multi_gpu.sh"


def _smoke(ngpus: str, *runs: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("RUNS", "MODELS", "LENS", "COSTS", "SGL_FLAGS")}
    e.update(NGPUS=ngpus, OUT="/tmp/smoke-out", **env)
    return subprocess.run(["bash", str(SCRIPT), "--smoke", *runs], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=60)


def _runs(stdout: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^RUN (\S+)", stdout, re.M)]


@pytest.mark.parametrize(("ngpus", "models", "layouts"), [
    ("2", ["1layer", "4layer"], ["tp2"]),
    ("4", ["1layer", "4layer"], ["tp4", "tp4dp2"]),
    ("8", ["full"], ["tp8", "tp8dp4"]),
])
def test_smoke_lists_every_server(ngpus, models, layouts):
    r = _smoke(ngpus)
    assert r.returncode == 0, r.stderr
    want = []
    for lay in layouts:
        states = ["off", "auto", "tokens", "verify"] if "dp" in lay else ["off", "cp", "auto", "tokens", "verify"]
        want += [f"{s}:{lay}" for s in states]
    assert _runs(r.stdout) == want * len(models)
    assert [m.group(1) for m in re.finditer(r"^=== model (\S+)", r.stdout, re.M)] == models
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("RUN ")}
    lay = layouts[0]
    assert "NSA_TP_SGLANG_PLUGIN=0" in lines[f"off:{lay}"] and "--enable-prefill-cp" not in lines[f"off:{lay}"]
    assert "NSA_TP_SGLANG_PLUGIN=0" in lines[f"cp:{lay}"]
    assert "--enable-prefill-cp --cp-strategy interleave" in lines[f"cp:{lay}"]
    assert "NSA_TP_SGLANG_PLUGIN=1 NSA_TP_TOKEN_PARALLEL=auto NSA_TP_SGLANG_VERIFY=0" in lines[f"auto:{lay}"]
    assert "NSA_TP_TOKEN_PARALLEL=on NSA_TP_SGLANG_VERIFY=0" in lines[f"tokens:{lay}"]
    assert "NSA_TP_TOKEN_PARALLEL=on NSA_TP_SGLANG_VERIFY=1" in lines[f"verify:{lay}"]
    for ln in lines.values():
        assert "E2E_LENS=8192,32768,65536" in ln and "SGL_CONTEXT=69632" in ln
        assert "client=sglang_multi_gpu_client.py" in ln and f"device.sh run {ln.split()[1].split(':')[1]}" in ln
        assert "--dsa-prefill-backend flashmla_sparse" in ln and "--disable-radix-cache" not in ln
    if ngpus == "8":
        assert all("SGL_CONFIG=/tmp/config-v32-61layer.json" in ln for ln in lines.values())
    assert f"SUMMARY python3 benchmark/sglang_multi_gpu_summary.py /tmp/smoke-out --gpus {ngpus}" in r.stdout
    # auto reads the card's committed Costs record (no override by default)
    assert "costs=card-record" in lines[f"auto:{lay}"]


def test_smoke_takes_explicit_runs_and_lengths():
    r = _smoke("4", "off:tp4", "tokens:tp4dp2", LENS="8192,131072", MODELS="4layer")
    assert r.returncode == 0, r.stderr
    assert _runs(r.stdout) == ["off:tp4", "tokens:tp4dp2"]
    assert "SGL_CONTEXT=135168" in r.stdout and "E2E_LENS=8192,131072" in r.stdout
    r = _smoke("2", "auto:tp2", COSTS="/tmp/costs_x.json")
    assert "costs=/tmp/costs_x.json" in r.stdout


def test_refuses_other_gpu_counts():
    r = _smoke("3")
    assert r.returncode == 2 and "needs 2, 4 or 8 GPUs" in r.stderr


def test_concurrent_batch_shape():
    batch = client.concurrent_batch()
    assert len(batch) == client.CONCURRENT == 16 and batch == client.concurrent_batch()  # same in every server
    assert len({len(b) for b in batch}) > 3  # mixed lengths
    shared = [b[: client.PREFIX_LEN] for b in batch[::2]]
    assert len({tuple(s) for s in shared}) == 2  # the even requests sit behind one of two cached prefixes
    assert all(len(b) < 24576 + client.PREFIX_LEN + 1 for b in batch)


def _write_run(root: Path, model: str, state: str, layout: str, ttft: dict, ids: list[int], log: str) -> None:
    d = root / model / state
    d.mkdir(parents=True)
    res = {"label": layout, "up": True,
           "ttft": [{"prompt": n, "ttft_s_median": t} for n, t in ttft.items()],
           "greedy": {"prompt": 32768, "out_ids": ids}, "concurrent": {"wall_s": 3.0, "errors": 0, "requests": []}}
    (d / f"e2e_{layout}.json").write_text(json.dumps(res))
    (d / f"server_{layout}.log").write_text(log)


def test_summary_ratios_strategies_and_verify(tmp_path):
    _write_run(tmp_path, "1layer", "off", "tp4", {32768: 2.0}, [1, 2], "")
    _write_run(tmp_path, "1layer", "cp", "tp4", {32768: 1.6}, [1, 2], "[x] Enabled DSA context parallel: ...\n")
    _write_run(tmp_path, "1layer", "tokens", "tp4", {32768: 1.2}, [1, 2],
               "[t] [nsa-tp pid=1] token-parallel extend: strategy=tokens (forced (on)), attn_tp=4, rows ...\n"
               "[t] [nsa-tp pid=1] token-parallel sparse core active: _forward_flashmla_sparse -> ...\n")
    _write_run(tmp_path, "1layer", "verify", "tp4", {32768: 3.0}, [1, 3],
               "[t] [nsa-tp pid=1] verify token-parallel _forward_flashmla_sparse: call 1 rel err 1.00e-03 (T=9 h=4)"
               ", worst so far 1.00e-03\n"
               "[t] [nsa-tp pid=1] verify token-parallel _forward_flashmla_sparse: call 4 rel err 2.00e-03 (T=9 h=4)"
               ", worst so far 3.10e-03\n"
               "[t] [nsa-tp pid=2] verify token-parallel Indexer._get_topk_ragged: call 1 rel err 0.00e+00 (tokens, "
               "rows with another top-k set), worst so far 0.00e+00\n"
               "[t] upstream line mentioning verify worst so far 9.9 is not ours\n")
    out = tmp_path / "s.json"
    assert summary.main([str(tmp_path), "--gpus", "4", "--out", str(out), "--card", "NVIDIA H200"]) == 0
    s = json.loads(out.read_text())
    assert s["card"] == "NVIDIA H200" and s["gpus"] == 4
    by = {(r["state"], r["prompt"]): r for r in s["ratios"]}
    assert by[("tokens", 32768)]["vs_upstream_tp"] == 0.6 and by[("tokens", 32768)]["vs_upstream_cp"] == 0.75
    assert by[("tokens", 32768)]["greedy_matches_upstream"] is True
    assert by[("verify", 32768)]["greedy_matches_upstream"] is False
    runs = {r["state"]: r for r in s["runs"]}
    assert runs["tokens"]["log"]["strategies"] == {"tokens": 1}
    assert runs["tokens"]["log"]["paths_active"] == ["sparse core"]
    assert runs["verify"]["log"]["verify_worst"] == pytest.approx(3.1e-3) and runs["verify"]["log"]["verify_lines"] == 3
    assert runs["cp"]["log"]["cp_active"] and not runs["off"]["log"]["cp_active"]
