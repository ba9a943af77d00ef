"""Nightly accuracy of DeepSeek-V3.2 served by SGLang with nsa-tp's plugin, in the mission's two layouts:
``--tp 8`` (pure TP, 16 heads a rank) and ``--tp 8 --dp 4 --enable-dp-attention`` (partial DP attention).
Thresholds as upstream's DeepSeek-V3.2 tests: GSM8K > 0.935 (no thinking), GPQA-diamond >= 0.79 (mean of repeats,
thinking mode through the chat template, temperature 0.6).

Needs 8 GPUs and local files, named by environment variables (nothing is downloaded):
    NSA_TP_V32_MODEL   DeepSeek-V3.2 checkpoint directory (config.json + weights)
    NSA_TP_GSM8K       GSM8K test set, JSON lines (question, answer)
    NSA_TP_GPQA        GPQA-diamond CSV
Optional: NSA_TP_GSM8K_LIMIT (questions, default all 1319), NSA_TP_GPQA_REPEATS (default 4),
NSA_TP_EVAL_CONCURRENCY (default 128), NSA_TP_SERVER_TIMEOUT (seconds to come up, default 3600),
NSA_TP_EVAL_LOG_DIR (server logs; default a temporary folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import eval_client as ev
import pytest

pytestmark = pytest.mark.nightly

MODEL = os.environ.get("NSA_TP_V32_MODEL", "")
GSM8K = os.environ.get("NSA_TP_GSM8K", "")
GPQA = os.environ.get("NSA_TP_GPQA", "")
LAYOUTS = {
    "tp8": ["--tp", "8"],
    "tp8_dp4": ["--tp", "8", "--dp", "4", "--enable-dp-attention"],
}
PORT = 31800


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def _why_skip() -> str | None:
    if _gpu_count() < 8:
        return f"needs 8 CUDA GPUs ({_gpu_count()} visible)"
    if not MODEL or not (Path(MODEL) / "config.json").is_file():
        return "set NSA_TP_V32_MODEL to a local DeepSeek-V3.2 checkpoint directory"
    try:
        import sglang  # noqa: F401
    except ImportError:
        return "sglang is not installed"
    return None


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    """One SGLang server with the plugin for the layout, on 127.0.0.1; stopped after the module's tests."""
    reason = _why_skip()
    if reason:
        pytest.skip(reason)
    name = request.param
    log_dir = Path(os.environ.get("NSA_TP_EVAL_LOG_DIR") or tempfile.mkdtemp(prefix="nsa_tp_nightly_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server_{name}.log"
    port = PORT + list(LAYOUTS).index(name)
    env = dict(os.environ)
    env.pop("NSA_TP_SGLANG_PLUGIN", None)  # the plugin on
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        MODEL,
        *LAYOUTS[name],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--trust-remote-code",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = ev.ChatClient(f"http://127.0.0.1:{port}")
    deadline = time.time() + float(os.environ.get("NSA_TP_SERVER_TIMEOUT", "3600"))
    try:
        while not client.healthy():
            if proc.poll() is not None:
                pytest.fail(f"server {name} exited with {proc.returncode}; log: {log_path}")
            if time.time() > deadline:
                pytest.fail(f"server {name} not healthy in time; log: {log_path}")
            time.sleep(10)
        yield name, client, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_plugin_ran_in_every_scheduler(server):
    name, client, log_path = server
    client.chat([{"role": "user", "content": "1+1="}], max_tokens=8)  # make sure prefill and decode ran
    text = log_path.read_text(errors="replace")
    schedulers = [ln for ln in text.splitlines() if "[nsa-tp pid=" in ln and "role=scheduler" in ln]
    assert len(schedulers) == 8, f"expected the plugin in 8 scheduler processes, got {len(schedulers)}: {log_path}"
    assert "sparse-MLA path active" in text, f"nsa-tp's sparse-MLA path never ran: {log_path}"


def test_gsm8k(server):
    if not GSM8K:
        pytest.skip("set NSA_TP_GSM8K to the GSM8K test set (JSON lines)")
    name, client, _ = server
    items = ev.load_gsm8k(GSM8K, int(os.environ.get("NSA_TP_GSM8K_LIMIT", "0")) or None)
    outputs = ev.run_batch(
        lambda i: client.chat(ev.gsm8k_messages(items[i][0]), max_tokens=2048),
        len(items),
        concurrency=int(os.environ.get("NSA_TP_EVAL_CONCURRENCY", "128")),
    )
    acc = ev.accuracy([ev.extract_gsm8k_answer(o) for o in outputs], [ref for _, ref in items])
    print(f"GSM8K {name}: {acc:.4f} over {len(items)} questions")
    assert acc > 0.935, f"GSM8K accuracy {acc:.4f} <= 0.935 ({name})"


def test_gpqa_diamond(server):
    if not GPQA:
        pytest.skip("set NSA_TP_GPQA to the GPQA-diamond CSV")
    name, client, _ = server
    items = ev.load_gpqa(GPQA)
    scores = []
    for rep in range(int(os.environ.get("NSA_TP_GPQA_REPEATS", "4"))):
        shuffled = [ev.gpqa_shuffle(item, seed=rep * 100_003 + i) for i, item in enumerate(items)]

        def ask(i: int, rep: int = rep, shuffled: list = shuffled) -> str:
            return client.chat(
                ev.gpqa_messages(items[i], shuffled[i][0]),
                max_tokens=32768,
                temperature=0.6,
                seed=rep * 7919 + i,
                extra={"top_p": 0.95, "chat_template_kwargs": {"thinking": True}},
            )

        outputs = ev.run_batch(ask, len(items), concurrency=int(os.environ.get("NSA_TP_EVAL_CONCURRENCY", "128")))
        scores.append(ev.accuracy([ev.extract_choice(o) for o in outputs], [s[1] for s in shuffled]))
    mean = ev.mean_of_repeats(scores)
    print(f"GPQA-diamond {name}: mean {mean:.4f} over {len(scores)} repeats {scores}")
    assert mean >= 0.79, f"GPQA-diamond mean {mean:.4f} < 0.79 ({name}; repeats {scores})"
