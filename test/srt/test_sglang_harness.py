"""benchmark/sglang_launch.py (with its client and summary) on CPU: the one-GPU shared-card mode (spec parsing,
launch commands, a named round, log facts, merging rounds) and the multi-GPU mode's --smoke listings per GPU
count, in both SGLang flag spellings. Nothing here needs SGLang or a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmark" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


e2e = _load("sglang_launch")  # imports sglang_client and sglang_summary from benchmark/
client = sys.modules["sglang_client"]
summary = sys.modules["sglang_summary"]


def test_specs_and_commands():
    s = e2e.parse_spec("16-bf16-verify")
    assert s == {"name": "16-bf16-verify", "heads": 16, "kv": "bf16", "mode": "verify"}
    cmd, env = e2e.server_command(s, 31005, 0.2)
    assert "--kv-cache-dtype" in cmd and cmd[cmd.index("--kv-cache-dtype") + 1] == "bfloat16"
    assert "--disable-cuda-graph" in cmd and env == {"NSA_TP_SGLANG_PLUGIN": "1", "NSA_TP_SGLANG_VERIFY": "1"}
    cmd, env = e2e.server_command(e2e.parse_spec("128-fp8-off"), 31000, 0.2)
    # SGLang's defaults for fp8 except the cache dtype itself: no backend or graph flags.
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert not any(f.startswith("--dsa") or f == "--disable-cuda-graph" for f in cmd)
    assert env["NSA_TP_SGLANG_PLUGIN"] == "0"
    # Servers share the card: the KV pool is capped, so the fraction only has to cover the weights.
    assert cmd[cmd.index("--max-total-tokens") + 1] == str(e2e.MAX_TOTAL_TOKENS)
    assert cmd[cmd.index("--mem-fraction-static") + 1] == "0.200"
    with pytest.raises(SystemExit, match="bad server spec"):
        e2e.parse_spec("16-fp16-on")


def test_dry_run_prints_every_default_server(capsys):
    assert e2e.main(["--gpus", "1", "start", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in e2e.DEFAULT_SPECS:
        assert f"{name}: NSA_TP_SGLANG_PLUGIN=" in out


def test_log_facts(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "[2026-11-29 16:00:00] [nsa-tp pid=7] plugin loaded: sglang 0.5.17, role=scheduler, hooks: x\n"
        "[2026-11-29 16:00:01] [nsa-tp pid=7] _forward_flashmla_kv h16/fp8/b<=64 runs nsa-tp tier triton "
        "(16 heads, no padding): measured on NVIDIA H200: triton 0.3 ms, flashmla 0.5 ms\n"
        "[2026-11-29 16:00:02] [nsa-tp pid=7] verify _forward_flashmla_kv h16/fp8/b<=64: call 1 rel err 3.00e-03 "
        "(triton vs upstream), worst so far 3.00e-03\n"
        "[2026-11-29 16:00:03] [nsa-tp pid=7] verify _forward_flashmla_kv h16/fp8/b<=64: call 2 rel err 1.00e-03 "
        "(triton vs upstream), worst so far 3.00e-03\n"
        "[2026-11-29 16:00:04] [nsa-tp pid=7] verify _forward_flashmla_sparse h16/bf16: skipped during CUDA graph "
        "capture (run with --disable-cuda-graph to verify these calls)\n"
        "Traceback (most recent call last):\n"
    )
    facts = summary.log_facts(str(log))
    assert facts["plugin_lines"] == 5 and facts["tracebacks"] == 1
    assert facts["routes"] == ["_forward_flashmla_kv h16/fp8/b<=64 runs nsa-tp tier triton (16 heads, no padding): "
                               "measured on NVIDIA H200: triton 0.3 ms, flashmla 0.5 ms"]
    assert facts["verify_worst"] == {"_forward_flashmla_kv h16/fp8/b<=64": 3e-3}
    assert facts["verify_calls_logged"] == {"_forward_flashmla_kv h16/fp8/b<=64": 2}
    assert facts["skipped_under_capture"] == ["_forward_flashmla_sparse h16/bf16"]


def test_measure_writes_a_named_round(tmp_path, monkeypatch):
    """`measure --name X` writes e2e_1gpu_X.json and its log archive, even when no server came up."""
    state = tmp_path / "state"
    state.mkdir()
    log = state / "server_16-bf16-off.log"
    log.write_text("no plugin line\n")
    servers = [{"name": "16-bf16-off", "heads": 16, "kv": "bf16", "mode": "off", "port": 1, "pid": 2**22 + 7,
                "log": str(log)}]
    (state / "servers.json").write_text(__import__("json").dumps(servers))
    monkeypatch.setattr(e2e, "STATE", state)
    monkeypatch.setattr(e2e, "_alive", lambda pid: False)
    monkeypatch.setattr(e2e.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "NVIDIA H200\n"})())
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert e2e.measure(timeout=0.1, name="bf16") == 1  # the server is not up: a failing exit code
    data = __import__("json").loads((tmp_path / "out" / "e2e_1gpu_bf16.json").read_text())
    assert data["command"].endswith("measure --name bf16") and data["logs"]["16-bf16-off"]["up"] is False
    assert (tmp_path / "out" / "e2e_1gpu_bf16_logs.tgz").is_file()


def _round(off_s: float, on_s: float, name: str) -> dict:
    raw = {n: {"ttft_s": {str(L): [[v] * 3, [v] * 3] for L in client.PAIR_LENS}, "greedy32_s": [[v], [v]],
               "concurrent16_s": [[v], [v]], "greedy_ids": [[1, 2]]} for n, v in (("a-off", off_s), ("a-on", on_s))}
    return {"card": "NVIDIA H200", "date": name, "command": f"measure --name {name}", "servers": [],
            "pairs": {"a": {"servers": ["a-off", "a-on"], "raw": raw, "greedy_ids_match": True}}, "logs": {}}


def test_merge_pools_rounds_and_judges_each_row(tmp_path):
    """Pooled medians, round-to-round noise, and the issue's bar (<= 3% and within the noise)."""
    import json

    paths = []
    for i, (off, on) in enumerate([(1.00, 1.02), (1.10, 1.03), (1.00, 1.01)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(_round(off, on, f"r{i}")))
    merged = summary.merge(paths, tmp_path / "m.json")
    row = merged["pairs"]["a"]["metrics"]["greedy32"]
    assert row["a-off"]["median_s"] == 1.00 and row["a-on"]["median_s"] == 1.02
    assert abs(row["noise"] - 0.10) < 1e-9 and abs(row["on_over_off"] - 1.02) < 1e-9 and row["ok"]
    assert row["a-off"]["samples"] == 6 and merged["pairs"]["a"]["greedy_ids_match"]
    # 5% slower with 2% noise fails the bar, and the command's exit code says so.
    for i, path in enumerate(paths):
        path.write_text(json.dumps(_round(1.00, 1.05 + 0.01 * (i == 1), f"r{i}")))
    assert not summary.merge(paths, None)["pairs"]["a"]["metrics"]["ttft_8192"]["ok"]
    assert summary.main(["merge", *map(str, paths)]) == 1


# ------------------------------------------------------------------------- several GPUs: --smoke, summary


def _smoke(ngpus: str, *runs: str, version: str = "0.5.17", **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("MODELS", "LENS", "COSTS", "SGL_FLAGS", "E2E_LENS",
                                                           "SGL_CONTEXT", "NSA_TP_TOKEN_PARALLEL")}
    e.update(OUT="/tmp/smoke-out", **env)
    cmd = [sys.executable, str(ROOT / "benchmark" / "sglang_launch.py"), "--gpus", ngpus, "run", "--smoke",
           "--sglang-version", version, *runs]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=60)


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
        assert "LENS=8192,32768,65536" in ln and "--context-length 69632" in ln
        tp, dp = e2e.parse_layout(ln.split()[1].split(":")[1])
        par = f"--tp {tp}" + (f" --dp {dp} --enable-dp-attention" if dp > 1 else "")
        assert f"--load-format dummy {par} --skip-tokenizer-init" in ln  # SGLang 0.5.17's spelling
        assert "--dsa-prefill-backend flashmla_sparse" in ln and "--disable-radix-cache" not in ln
    if ngpus == "8":
        assert all("SGL_CONFIG=/tmp/config-v32-61layer.json" in ln for ln in lines.values())
    assert f"SUMMARY python3 benchmark/sglang_summary.py multi /tmp/smoke-out --gpus {ngpus}" in r.stdout
    assert "costs=card-record" in lines[f"auto:{lay}"]  # auto reads the card's committed Costs record


def test_smoke_takes_explicit_runs_and_lengths():
    r = _smoke("4", "off:tp4", "tokens:tp4dp2", LENS="8192,131072", MODELS="4layer")
    assert r.returncode == 0, r.stderr
    assert _runs(r.stdout) == ["off:tp4", "tokens:tp4dp2"]
    assert "--context-length 135168" in r.stdout and "LENS=8192,131072" in r.stdout
    r = _smoke("2", "auto:tp2", COSTS="/tmp/costs_x.json")
    assert "costs=/tmp/costs_x.json" in r.stdout


def test_refuses_other_gpu_counts():
    r = _smoke("3")
    assert r.returncode == 2 and "needs 1 (shared card), 2, 4 or 8 GPUs" in r.stderr


def test_dp_attention_spelled_for_the_installed_sglang():
    """0.5.23 prefers --attn-dp-size (and deprecates --enable-dp-attention); 0.5.17 knows only --dp/--enable."""
    assert e2e.parallel_flags(4, 2, False) == ["--tp", "4", "--dp", "2", "--enable-dp-attention"]
    assert e2e.parallel_flags(4, 2, True) == ["--tp", "4", "--attn-dp-size", "2"]
    assert e2e.parallel_flags(8, 1, True) == ["--tp", "8"]
    assert e2e.attn_dp_spelling("0.5.17")[0] is False and e2e.attn_dp_spelling("0.5.23.post1")[0] is True
    from importlib.util import find_spec

    if find_spec("sglang") is not None:  # the CPU install is 0.5.23: read from its files, not its version
        assert e2e.attn_dp_spelling()[0] is True
    r = _smoke("4", "tokens:tp4dp2", version="0.5.23", MODELS="1layer")
    assert "--tp 4 --attn-dp-size 2 --skip-tokenizer-init" in r.stdout and "--enable-dp-attention" not in r.stdout


def test_e2e_workload_keeps_the_two_gpu_defaults():
    """The fixed-prompt workload (sglang_e2e.sh's): on/off at tp2 and dp2, device.sh's easy flags, e2e summary."""
    r = _smoke("2", "--workload", "e2e", MODELS="1layer")
    assert r.returncode == 0, r.stderr
    assert _runs(r.stdout) == ["on:tp2", "off:tp2", "on:dp2", "off:dp2"]
    assert "--disable-radix-cache" in r.stdout and "LENS=2048,8192,32768" in r.stdout
    assert "SUMMARY python3 benchmark/sglang_summary.py e2e /tmp/smoke-out/1layer" in r.stdout
    assert "NSA_TP_TOKEN_PARALLEL=off" in r.stdout  # plain "on" = the kernels-only plugin


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
    assert summary.main(["multi", str(tmp_path), "--gpus", "4", "--out", str(out), "--card", "NVIDIA H200"]) == 0
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


_FAKE_SERVER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
print("[t] [nsa-tp pid=1] plugin loaded: sglang 0.5.17, role=scheduler, hooks: x", flush=True)
print("[t] [nsa-tp pid=1] token-parallel extend: strategy=tokens (forced (on)), attn_tp=2, rows (3, 3)", flush=True)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self._send({})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        new = req["sampling_params"]["max_new_tokens"]
        self._send({"output_ids": [len(req["input_ids"]) % 97 + i for i in range(new)]})
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_run_against_a_stand_in_server(tmp_path, monkeypatch):
    """The multi-GPU loop end to end on CPU: a stand-in for ``sglang.launch_server`` (an HTTP server answering
    /health and /generate, logging two plugin lines) per STATE:LAYOUT; results, proof lines, the summary."""
    fake = tmp_path / "fake" / "sglang"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "launch_server.py").write_text(_FAKE_SERVER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config-v32-1layer.json").write_text("{}")
    monkeypatch.setattr(e2e, "BIN", bin_dir)
    monkeypatch.setattr(e2e, "SITE", tmp_path / "site")
    monkeypatch.setattr(e2e, "install_plugin", lambda probe=False: "entry point: x | gpu Stand-in GPU\n")
    monkeypatch.setattr(client, "GREEDY_LEN", 256)
    monkeypatch.setattr(client, "PREFIX_LEN", 64)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MODELS", "1layer")
    monkeypatch.setenv("LENS", "64,128")
    monkeypatch.setenv("E2E_TIMEOUT", "60")
    monkeypatch.setenv("PORT_BASE", str(34000 + os.getpid() % 1000))
    monkeypatch.setenv("COSTS", "")
    assert e2e.run_servers(2, ["off:tp2", "tokens:tp2"], "multi", False, "0.5.17") == 0
    out = tmp_path / "out"
    res = json.loads((out / "1layer" / "tokens" / "e2e_tp2.json").read_text())
    assert res["up"] and [r["prompt"] for r in res["ttft"]] == [64, 128] and res["concurrent"]["errors"] == 0
    assert "strategy=tokens" in (out / "1layer" / "tokens" / "proof_tp2.txt").read_text()
    s = json.loads((out / "summary_2gpu.json").read_text())
    assert s["card"] == "Stand-in GPU" and {r["state"] for r in s["runs"]} == {"off", "tokens"}
    (row,) = [r for r in s["ratios"] if r["prompt"] == 128]
    assert row["greedy_matches_upstream"] is True and row["vs_upstream_tp"] is not None


def test_e2e_workload_against_a_stand_in_server(tmp_path, monkeypatch):
    """The fixed-prompt workload end to end: on/off servers, then the e2e summary of ``$OUT/<model>``."""
    fake = tmp_path / "fake" / "sglang"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "launch_server.py").write_text(_FAKE_SERVER)
    (fake / "cli").mkdir()  # SGLang 0.5.23's `sglang serve` entry, standing in front of the same fake server
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "main.py").write_text("def main():\n    import runpy\n"
                                          "    runpy.run_module('sglang.launch_server', run_name='__main__')\n")
    monkeypatch.setattr(e2e, "BIN", tmp_path)
    (tmp_path / "config-v32-1layer.json").write_text("{}")
    monkeypatch.setattr(e2e, "install_plugin", lambda probe=False: "entry point: x | gpu Stand-in GPU\n")
    for k, v in {"PYTHONPATH": str(tmp_path / "fake"), "OUT": str(tmp_path / "out"), "MODELS": "1layer",
                 "LENS": "64", "E2E_TIMEOUT": "60", "PORT_BASE": str(35000 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    assert e2e.run_servers(2, ["on:tp2", "off:tp2"], "e2e", False, "0.5.23") == 0
    s = json.loads((tmp_path / "out" / "summary_2gpu.json").read_text())
    (row,) = s["modes"]["tp2"]["lengths"]
    assert row["tokens_match"] is True and s["modes"]["tp2"]["plugin_on"]["schedulers_loaded"] == 1


def test_servers_start_through_sglang_serve_where_shipped(tmp_path):
    """0.5.23 on: `sglang serve` (its console-script function) with --attn-dp-size; 0.5.17: launch_server + --dp."""
    new, _ = e2e.run_command("off:tp4dp2", 30001, attn_dp_size=True, flags="", context=1024, model_dir=tmp_path)
    assert new[1:4] == ["-c", "from sglang.cli.main import main; main()", "serve"], new
    assert "--attn-dp-size" in new and "--enable-dp-attention" not in new
    old, _ = e2e.run_command("off:tp4dp2", 30001, attn_dp_size=False, flags="", context=1024, model_dir=tmp_path)
    assert old[1:3] == ["-m", "sglang.launch_server"] and "--enable-dp-attention" in old
