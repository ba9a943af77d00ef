"""benchmark/needle_sglang.py on CPU: launch commands, the request bodies, and the whole measure -> compare ->
verdict -> JSON path against fake SGLang servers (HTTP on 127.0.0.1) that answer /generate like a server of the
needle model would: an oracle of the task, and a broken one (wrong at some query positions, another greedy id)."""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from nsa_tp.needle.serving import Row, request_body, score_response, top1_from_response
from nsa_tp.needle.task import make_prompt
from nsa_tp.needle.vocab import NeedleVocab

_PATH = Path(__file__).resolve().parents[2] / "benchmark" / "needle_sglang.py"
_spec = importlib.util.spec_from_file_location("needle_sglang", _PATH)
ns = importlib.util.module_from_spec(_spec)
sys.modules["needle_sglang"] = ns
_spec.loader.exec_module(ns)

VOC = NeedleVocab()


def _oracle_next(ids: list[int], p: int, facts: dict[int, int]) -> int:
    """The needle model's answer after ids[p] given the facts before p (key -> value)."""
    kind, k, v = VOC.kind(ids[p])
    key = k if kind == "query" else (v if kind == "answer" else -1)
    return VOC.answer(facts[key]) if key in facts else VOC.filler(0)


def fake_generate(body: dict, broken: bool) -> dict:
    """What SGLang returns for the needle model, from the task's own rules (``broken``: every 3rd query wrong)."""
    ids, start = body["input_ids"], body["logprob_start_len"]
    facts: dict[int, int] = {}
    preds = []
    for p, t in enumerate(ids):
        kind, k, v = VOC.kind(t)
        if kind == "fact":
            facts[k] = v
        nxt = _oracle_next(ids, p, facts)
        if broken and VOC.kind(t)[0] == "query" and p % 3 == 0:
            nxt = VOC.answer(0) if nxt != VOC.answer(0) else VOC.answer(1)
        preds.append(nxt)
    gen, seq = [], list(ids)
    for _ in range(body["sampling_params"]["max_new_tokens"]):
        gen.append(_oracle_next(seq, len(seq) - 1, facts))
        seq.append(gen[-1])
    if broken:
        gen[-1] = VOC.filler(1)
    tops = [None if p == 0 else [[-0.01, preds[p - 1], None]] for p in range(start, len(ids))]
    toks = [[None if p == 0 else -0.5, ids[p], None] for p in range(start, len(ids))]
    return {"output_ids": gen, "meta_info": {"input_top_logprobs": tops, "input_token_logprobs": toks,
                                             "cached_tokens": 0}}


def _serve(broken: bool) -> tuple[http.server.HTTPServer, int]:
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _reply(self, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /health
            self._reply({})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._reply(fake_generate(body, broken) if "logprob_start_len" in body else {"output_ids": [2]})

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def test_launch_commands_and_smoke(capsys):
    a = argparse.Namespace(tp=2, dp=2, enable_dp_attention=True, nsa_token_parallel="on", mem_fraction=0.5)
    cmd, env = ns.server_command({"name": "bf16-verify", "kv": "bf16", "mode": "verify"}, 31000, Path("/m"), a)
    assert cmd[cmd.index("--dp") + 1] == "2" and "--enable-dp-attention" in cmd and "--disable-cuda-graph" in cmd
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "bfloat16" and cmd[cmd.index("--nsa-token-parallel") + 1] == "on"
    assert "--load-format" not in cmd and env == {"NSA_TP_SGLANG_PLUGIN": "1", "NSA_TP_SGLANG_VERIFY": "1"}
    cmd, env = ns.server_command({"name": "fp8-off", "kv": "fp8", "mode": "off"}, 31000, Path("/m"), a)
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8_e4m3" and "--nsa-token-parallel" not in cmd
    assert env["NSA_TP_SGLANG_PLUGIN"] == "0" and not any(f.startswith("--dsa") for f in cmd)
    with pytest.raises(SystemExit, match="bad server spec"):
        ns.parse_servers("fp16-on")
    assert ns.main(["--smoke", "--lens", "4096", "--servers", "fp8-off,fp8-on"]) == 0
    out = capsys.readouterr().out
    assert "row len4096: 4096 tokens" in out and "fp8-on: NSA_TP_SGLANG_PLUGIN=1" in out and "conc15_prefix" in out


def test_request_body_and_response_alignment():
    pr = make_prompt(VOC, 2048, seed=3, min_query_pos=512)
    row = Row("r", pr, 512, topk=1024)
    body = request_body(pr, 512)
    assert body["logprob_start_len"] == 512 and body["top_logprobs_num"] == 1 and body["return_logprob"]
    assert body["sampling_params"]["max_new_tokens"] == len(pr.chain) and body["input_ids"] == list(pr.ids)
    good = score_response(row, fake_generate(body, broken=False))
    assert good["ok"] and good["accuracy"] == 1.0 and good["greedy_correct"] == 4 and good["total"] > 50
    bad = score_response(row, fake_generate(body, broken=True))
    assert not bad["ok"] and 0.5 < bad["accuracy"] < 0.8 and bad["greedy_correct"] == 3
    assert "rows wrong whether or not they need the selection" in bad["diagnosis"]
    assert good["diagnosis"] == "" and good["rows_within_topk"][1] > 0 and good["rows_needing_selection"][1] > 0
    resp = fake_generate(body, broken=False)
    resp["meta_info"]["input_top_logprobs"].pop()
    with pytest.raises(ValueError, match="entries, expected"):
        top1_from_response(resp, 512, len(pr), pr.ids)
    resp = fake_generate(body, broken=False)  # entries one position off: the alignment check must see it
    toks = resp["meta_info"]["input_token_logprobs"]
    resp["meta_info"]["input_token_logprobs"] = toks[1:] + [[-0.5, 0, None]]
    with pytest.raises(ValueError, match="other tokens"):
        top1_from_response(resp, 512, len(pr), pr.ids)
    with pytest.raises(ValueError, match="input_top_logprobs"):
        score_response(row, {"output_ids": [1]})


@pytest.mark.parametrize("broken", [False, True])
def test_measure_against_fake_servers(tmp_path, monkeypatch, broken):
    """Two 'servers' (off and on); the on one broken in the second case: rows fail and on != off, exit 1."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(ns, "card", lambda: "fake card")
    (srv_off, port_off), (srv_on, port_on) = _serve(False), _serve(broken)
    servers = ns.parse_servers("bf16-off,bf16-on")
    for s, port in zip(servers, (port_off, port_on), strict=True):
        log = tmp_path / f"server_{s['name']}.log"
        log.write_text("[nsa-tp pid=1 role=scheduler] plugin loaded\n")
        s.update(port=port, pid=os.getpid(), log=str(log), cmd=["fake"], env={})
    a = argparse.Namespace(timeout=30, name="t", seed=0)
    rows = ns.plan_rows(VOC, [4096], 2048)
    prefix, conc = ns.concurrent_rows(VOC, 2048)
    try:
        rc = ns.measure(servers, rows, prefix, conc, a, ["--name", "t"])
    finally:
        srv_off.shutdown()
        srv_on.shutdown()
    res = json.loads((tmp_path / "needle_sglang_t.json").read_text())
    assert res["card"] == "fake card" and (tmp_path / "needle_sglang_t_logs.tgz").is_file()
    assert set(res["rows"]["bf16-off"]) == {"len4096", "concurrent16"}
    assert res["upstream_alone"]["bf16-off"] == {"len4096": 1.0, "concurrent16": 1.0}
    conc16 = res["rows"]["bf16-on"]["concurrent16"]
    assert len(conc16["requests"]) == 16 and conc16["total"] > 1000
    if not broken:
        assert rc == 0 and res["ok"] and res["compare"]["bf16-on vs bf16-off"]["equal"]
    else:
        assert rc == 1 and not res["ok"] and conc16["accuracy"] < 0.99
        assert not res["compare"]["bf16-on vs bf16-off"]["equal"]
        assert any("bf16-on len4096: accuracy" in f for f in res["failures"])
        assert any("requests differ" in f for f in res["failures"])


def test_an_off_server_that_routed_fails_and_what_on_ran_is_recorded():
    """The off server is the upstream baseline: a route line of ours there fails the run; per server the JSON says
    which call classes really ran an nsa-tp tier (none: plugin on ran upstream's path everywhere)."""
    ours = "_forward_flashmla_kv h16/fp8/b<=1 runs nsa-tp tier triton (16 heads, no padding): measured"
    theirs = "_forward_flashmla_kv h16/fp8/b<=64 runs upstream's FlashMLA path (pads 16 heads to a multiple of 64): x"
    logs = {"fp8-off": {"routes": []}, "fp8-on": {"routes": [ours, theirs]}}
    servers = [{"name": "fp8-off"}, {"name": "fp8-on"}]
    assert ns.verdict(servers, {"fp8-off", "fp8-on"}, {}, {}, logs) == []
    assert ns.ours_routed(logs) == {"fp8-off": [], "fp8-on": [ours]}
    logs["fp8-off"]["routes"] = [theirs]
    (why,) = ns.verdict(servers, {"fp8-off", "fp8-on"}, {}, {}, logs)
    assert "fp8-off: labelled upstream (plugin off) but logged 1 plugin routes" in why
