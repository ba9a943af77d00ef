"""nsa-tp's SGLang plugin against the real SGLang package (0.5.23, installed without its GPU stack by
``scripts/install_sglang_cpu.sh``): the entry point, ``launch_server --help``, the layout check inside
SGLang's own server-argument resolution, and each sparse-MLA hook on the exact upstream function, called
on CPU with small tensors and compared with the reference tier.

The first group needs no SGLang (pure logic of the plugin); the rest skip with the install command.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from nsa_tp.integrations.sglang import _compat, _version, attention_hooks, layout_check, token_parallel
from nsa_tp.integrations.sglang import _log as plugin_log
from nsa_tp.integrations.sglang._log import logger as plugin_logger
from nsa_tp.integrations.sglang._switch import ENV_VAR
from nsa_tp.ops import reference
from nsa_tp.ops.kv_format import pack_fp8_kv, unpack_fp8_kv
from nsa_tp.parallel import LayoutError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_V32 = Path(__file__).parent / "data" / "config-v32.json"
INSTALL = "bash scripts/install_sglang_cpu.sh"
ATTN = "sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnBackend"
CLI_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"

try:
    from importlib.util import find_spec

    _HAVE_SGLANG = find_spec("sglang") is not None
except ValueError:  # pragma: no cover - a broken sglang install
    _HAVE_SGLANG = False
needs_sglang = pytest.mark.skipif(not _HAVE_SGLANG, reason=f"sglang is not installed (run `{INSTALL}`)")


# ---------------------------------------------------------------- pure plugin logic (no SGLang needed)


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.5.17", True),
        ("0.5.20", True),
        ("0.5.23", True),
        ("0.5.23.post2", True),
        ("0.5.17+cu130", True),
        ("0.5.16", False),
        ("0.5.24", False),
        ("0.6.0", False),
        ("1.0", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_version_range(version, ok):
    reason = _version.unsupported_reason(version)
    assert (reason is None) == ok
    if not ok:
        assert "SGLang" in reason and "\n" not in reason  # one line, no trace


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        (dict(tp_size=8, dp_size=1, enable_dp_attention=False), (8, 1, False, None)),
        (dict(tp_size=8, dp_size=4, enable_dp_attention=True), (8, 4, True, None)),
        (dict(tp_size=8, dp_size=4, enable_dp_attention=True, attn_dp_size=1), (8, 4, True, None)),
        (dict(tp_size=8, dp_size=1, enable_dp_attention=False, attn_dp_size=4), (8, 1, False, 4)),  # 0.5.23 spelling
        (dict(tp_size=8, dp_size=2, enable_dp_attention=False), (8, 2, False, None)),  # replicas
    ],
)
def test_parallel_flags(fields, want):
    flags = layout_check.parallel_flags(types.SimpleNamespace(**fields))
    assert tuple(flags.values()) == want
    assert list(flags) == ["tp_size", "dp_size", "enable_dp_attention", "attn_dp_size"]


def test_check_layout_speaks_the_spelling_given():
    new = types.SimpleNamespace(tp_size=8, dp_size=1, enable_dp_attention=False, attn_dp_size=4)
    old = types.SimpleNamespace(tp_size=8, dp_size=4, enable_dp_attention=True, attn_dp_size=1)
    assert layout_check.check_layout(new, 128, sm_major=9) == layout_check.check_layout(old, 128, sm_major=9)
    bad = types.SimpleNamespace(tp_size=8, dp_size=1, enable_dp_attention=False, attn_dp_size=3)
    with pytest.raises(LayoutError, match=r"^--attn-dp-size 3 does not divide --tp 8; use --attn-dp-size 1, 2, 4 or 8"):
        layout_check.check_layout(bad, 128, sm_major=9)
    both = types.SimpleNamespace(tp_size=8, dp_size=4, enable_dp_attention=True, attn_dp_size=2)
    with pytest.raises(LayoutError, match=r"--attn-dp-size 2 and --dp 4 --enable-dp-attention"):
        layout_check.check_layout(both, 128, sm_major=9)


def test_check_layout_raises_our_error_and_skips_context_parallel():
    sa = types.SimpleNamespace(tp_size=8, dp_size=3, enable_dp_attention=True)
    with pytest.raises(LayoutError, match=r"--dp 3 does not divide --tp 8; use --dp 1, 2, 4 or 8"):
        layout_check.check_layout(sa, 128, sm_major=9)
    lay = layout_check.check_layout(
        types.SimpleNamespace(tp_size=8, dp_size=4, enable_dp_attention=True), 128, sm_major=9
    )
    assert (lay.mode, lay.attn_tp_size, lay.heads_per_rank) == ("partial_dp_attention", 2, 64)
    cp = types.SimpleNamespace(tp_size=8, dp_size=3, enable_dp_attention=True, attn_cp_size=2)
    assert layout_check.check_layout(cp, 128, sm_major=9) is None  # upstream's CP path: not our rule


def test_cut_at_topk_length():
    idx = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    got = attention_hooks._cut_at_topk_length(idx, torch.tensor([0, 2, 4], dtype=torch.int32))
    assert got.tolist() == [[-1, -1, -1, -1], [4, 5, -1, -1], [8, 9, 10, 11]]
    assert attention_hooks._cut_at_topk_length(idx, torch.tensor([1], dtype=torch.int32)) is idx  # rows differ


def test_fallback_keeps_upstream_for_inputs_outside_our_contract():
    calls = []

    def original(*args, **kwargs):
        calls.append((args, kwargs))
        return "upstream"

    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    kv = torch.zeros(8, 1, 576, dtype=torch.bfloat16)
    pt = torch.zeros(2, 8, dtype=torch.int32)
    sink = torch.zeros(4)
    assert attention_hooks.around_flashmla_sparse(original, "self", q, kv, 512, pt, 0.1, attn_sink=sink) == "upstream"
    assert calls[-1][1]["attn_sink"] is sink and calls[-1][0][0] == "self"
    q192 = torch.zeros(2, 4, 192, dtype=torch.bfloat16)
    assert attention_hooks.around_flashmla_sparse(original, "self", q192, kv, 512, pt, 0.1) == "upstream"
    assert "attn_sink" not in calls[-1][1]  # 0.5.17's signature has no attn_sink: never pass it unasked
    v4 = types.SimpleNamespace(flashmla_kv_format="V32_NO_ROPE")
    layer = types.SimpleNamespace(tp_q_head_num=4, head_dim=576)
    kv_paged = torch.zeros(128, 1, 656, dtype=torch.uint8)
    assert attention_hooks.around_flashmla_kv(original, v4, q, kv_paged, 512, 0.1, layer, None, pt) == "upstream"
    assert calls[-1][0][:2] == (v4, q)


def test_switched_off_hooks_call_upstream(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    out = attention_hooks.around_flashmla_sparse(
        lambda *a, **k: "upstream", None, q, q[:, :1], 512, torch.zeros(2, 3, dtype=torch.int32), 0.1
    )
    assert out == "upstream"


def test_process_role_from_the_caller_of_load_plugins():
    def run_scheduler_process():  # named as SGLang's function that calls load_plugins() in a scheduler
        return plugin_log.process_role()

    def run_detokenizer_process():
        return run_scheduler_process_inner()

    def run_scheduler_process_inner():
        return plugin_log.process_role()

    assert run_scheduler_process() == "scheduler"
    assert run_detokenizer_process() == "detokenizer"  # the nearest SGLang frame up the stack names it
    assert plugin_log.process_role() == "launcher"  # pytest's own process: no parent, no SGLang frame


def test_register_is_quiet_outside_the_supported_range(monkeypatch):
    from nsa_tp.integrations.sglang import plugin

    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "0.5.30")
    lines = _Lines()
    plugin_logger.addHandler(lines)
    try:
        assert plugin.register(role="scheduler") == []
    finally:
        plugin_logger.removeHandler(lines)
    assert len(lines.lines) == 1 and "SGLang 0.5.30 is outside the range" in lines.lines[0], lines.lines


def test_entry_point_is_declared():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "nsa_tp"]
    assert len(eps) == 1, "reinstall nsa-tp (pip install -e .) so the sglang.srt.plugins entry point exists"
    assert eps[0].value == "nsa_tp.integrations.sglang:register"
    assert callable(eps[0].load())


# ---------------------------------------------------------------- against the real SGLang


def _sglang_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.sglang
@needs_sglang
def test_launch_server_help_with_plugin():
    """`python -m sglang.launch_server --help` loads the plugin through the entry point and shows our flag."""
    r = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True,
        text=True,
        env=_sglang_env(),
        timeout=240,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--disable-nsa-tp" in r.stdout and "--nsa-token-parallel" in r.stdout
    version = _version.installed_sglang_version()
    loaded = [ln for ln in r.stderr.splitlines() if "[nsa-tp pid=" in ln and f"plugin loaded: sglang {version}" in ln]
    assert len(loaded) == 1, r.stderr[-3000:]
    assert "role=launcher" in loaded[0] and "handle_model_specific_adjustments" in loaded[0]
    assert "Traceback" not in r.stderr


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def sglang_hooks():
    """Our hooks registered (as in a scheduler process) and applied by SGLang's own HookRegistry.

    Restores every patched attribute afterwards so the rest of the session sees SGLang untouched.
    """
    if not _HAVE_SGLANG:
        pytest.skip(f"sglang is not installed (run `{INSTALL}`)")
    import pkgutil

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry

    from nsa_tp.integrations.sglang import register

    saved_hooks = {k: list(v) for k, v in HookRegistry._hooks.items()}
    saved_patched = set(HookRegistry._patched)
    saved_dsa = ATTENTION_BACKENDS["dsa"]  # register() points "dsa" at nsa-tp's backend subclass
    specs = register(role="scheduler")
    originals = {}
    for spec in specs:
        owner_path, _, attr = spec.target.rpartition(".")
        owner = pkgutil.resolve_name(owner_path)
        originals[spec.target] = (
            owner,
            attr,
            owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr),
        )
    HookRegistry.apply_hooks()
    try:
        yield HookRegistry, specs, originals
    finally:
        for owner, attr, raw in originals.values():
            setattr(owner, attr, raw)
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved_hooks)
        HookRegistry._patched.clear()
        HookRegistry._patched.update(saved_patched)
        ATTENTION_BACKENDS["dsa"] = saved_dsa


@pytest.fixture
def plugin_lines(monkeypatch):
    """The plugin's log lines during one test, with its once-per-process lines reset (a fresh process)."""
    monkeypatch.setattr(plugin_log, "_once_keys", set())
    lines = _Lines()
    plugin_logger.addHandler(lines)
    yield lines.lines
    plugin_logger.removeHandler(lines)


@pytest.fixture
def forced_reference(monkeypatch):
    """Route every hooked call to nsa-tp's reference tier (a CPU has no FlashMLA for upstream's path)."""
    from nsa_tp.integrations.sglang import routing

    monkeypatch.setenv("NSA_TP_SGLANG_BACKEND", "reference")
    routing.clear_cache()
    yield
    routing.clear_cache()


def _raw_function(obj):
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj


@pytest.mark.sglang
def test_each_hook_sits_on_the_function_it_claims(sglang_hooks):
    registry, specs, originals = sglang_hooks
    from sglang.srt.plugins.hook_registry import HookType

    layout_target = next(s.target for s in specs if s.hook is layout_check.around_model_specific_adjustments)
    # 0.5.23 moved the step out of ServerArgs into arg_groups.model_hook; 0.5.17 still has the method.
    known = {"0.5.23": _compat.LAYOUT_TARGETS[0], "0.5.17": _compat.LAYOUT_TARGETS[1]}
    assert layout_target == known.get(_version.installed_sglang_version(), layout_target)
    want = {
        f"{ATTN}._forward_flashmla_sparse": (HookType.AROUND, attention_hooks.around_flashmla_sparse),
        f"{ATTN}._forward_flashmla_kv": (HookType.AROUND, attention_hooks.around_flashmla_kv),
        layout_target: (HookType.AROUND, layout_check.around_model_specific_adjustments),
        CLI_TARGET: (HookType.AFTER, None),
        token_parallel.INDEXER_TARGET: (HookType.AROUND, token_parallel.around_get_topk_ragged),
    }
    assert {s.target for s in specs} == set(want)
    for target, (hook_type, hook) in want.items():
        entries = registry._hooks[target]
        assert len(entries) == 1 and entries[0][0] == hook_type, entries
        if hook is not None:
            assert entries[0][1] is hook
        assert entries[0][2] is None or entries[0][2].plugin_name  # source recorded when loaded by SGLang
        owner, attr, raw = originals[target]
        patched = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        assert _raw_function(patched).__wrapped__ is _raw_function(raw), target  # wraps exactly upstream's
        assert target in registry._patched


def _sparse_case(T, H, N, K, *, fp8, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 576, generator=g).to(torch.bfloat16)
    kv = torch.randn(N, 1, 576, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    idx[:, K // 2 :: 3] = -1  # holes
    idx[0] = -1  # a row with no valid index
    if T > 2:
        idx[2, -1] = N + 5  # >= N means "no token"
    if fp8:
        kv = pack_fp8_kv(kv)
    return q, kv, idx


@pytest.mark.sglang
@pytest.mark.parametrize(
    ("T", "H", "N", "K", "fp8"),
    [(5, 16, 40, 70, False), (3, 3, 17, 33, False), (4, 64, 64, 64, True), (2, 16, 9, 128, False)],
)
def test_flashmla_sparse_hook_matches_reference(sglang_hooks, plugin_lines, forced_reference, T, H, N, K, fp8):
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend

    q, kv, idx = _sparse_case(T, H, N, K, fp8=fp8, seed=T * 100 + H)
    topk_length = torch.full((T,), K, dtype=torch.int32)
    topk_length[-1] = K // 3  # FlashMLA reads only the first topk_length ids of a row
    backend = types.SimpleNamespace(device_sm_major=9)  # our path never touches upstream's backend state
    out = DeepseekSparseAttnBackend._forward_flashmla_sparse(
        backend, q_all=q, kv_cache=kv, v_head_dim=512, page_table_1=idx, sm_scale=0.07, topk_length=topk_length
    )
    assert out.shape == (T, H, 512) and out.dtype == torch.bfloat16
    (path,) = [ln for ln in plugin_lines if "_forward_flashmla_sparse h" in ln]  # the server log's proof
    assert f"runs nsa-tp tier reference ({H} heads, no padding)" in path, path
    cut = idx.clone()
    cut[-1, K // 3 :] = -1
    kv_ref = unpack_fp8_kv(kv[:, 0])[:, None].to(torch.float32) if fp8 else kv.float()
    want, _, _ = reference.sparse_mla_fwd(q.float(), kv_ref, cut.unsqueeze(1), 0.07, 512)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the empty row
    err = (out.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"relative error {err:.3e}"


@pytest.mark.sglang
@pytest.mark.parametrize(
    ("B", "H", "pages", "K", "fp8"), [(3, 16, 3, 64, True), (2, 5, 2, 40, False), (4, 64, 4, 128, True)]
)
def test_flashmla_kv_hook_matches_reference(sglang_hooks, plugin_lines, forced_reference, B, H, pages, K, fp8):
    from sglang.srt.layers.attention.dsa_backend import DeepseekSparseAttnBackend

    N = pages * 64
    q, kv, idx = _sparse_case(B, H, N, K, fp8=fp8, seed=B * 10 + H)
    layer = types.SimpleNamespace(tp_q_head_num=H, head_dim=576)
    backend = types.SimpleNamespace(flashmla_kv_format="V32", physical_page_size=64, real_page_size=64)
    out = DeepseekSparseAttnBackend._forward_flashmla_kv(
        backend, q_all=q, kv_cache=kv, v_head_dim=512, sm_scale=0.05, layer=layer, metadata=None, page_table_1=idx
    )
    assert out.shape == (B, 1, H, 512) and out.dtype == torch.bfloat16  # upstream's [B, s_q=1, H, d_v]
    (path,) = [ln for ln in plugin_lines if "_forward_flashmla_kv h" in ln]
    assert f"runs nsa-tp tier reference ({H} heads, no padding)" in path, path
    kv_ref = unpack_fp8_kv(kv[:, 0])[:, None] if fp8 else kv.float()
    want, _, _ = reference.sparse_mla_fwd(q.float(), kv_ref, idx.unsqueeze(1), 0.05, 512)
    assert not torch.isnan(out).any()
    err = (out[:, 0].float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"relative error {err:.3e}"


@pytest.fixture
def v32_model(tmp_path):
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    return str(tmp_path)


@pytest.fixture
def resolve(sglang_hooks, monkeypatch):
    """Build and resolve ServerArgs exactly as `launch_server` does, on CPU (``--device cpu``; upstream's
    DSA branch reads the GPU's SM, so it is told Hopper)."""
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(plugin_log, "_once_keys", set())  # each resolution as in a fresh launcher process
    lines = _Lines()
    plugin_logger.addHandler(lines)

    def run(model_path, *flags):
        sa = prepare_server_args(["--model-path", model_path, "--device", "cpu", "--skip-tokenizer-init", *flags])
        getattr(sa, "resolve_once", lambda: None)()  # 0.5.23 resolves here; 0.5.17 did in __init__
        return sa, lines.lines

    yield run
    plugin_logger.removeHandler(lines)


@pytest.mark.sglang
def test_server_args_tp8_goes_through_our_rule(resolve, v32_model):
    sa, lines = resolve(v32_model, "--tp", "8")
    assert any("layout: mode=pure_tp tp=8 dp=1 attn_tp_size=8 heads_per_rank=16" in ln for ln in lines), lines
    assert any("NSA TP mode is active" in ln and "4.0x" in ln for ln in lines), lines


@pytest.mark.sglang
def test_server_args_tp8_dp4_goes_through_our_rule(resolve, v32_model):
    sa, lines = resolve(v32_model, "--tp", "8", "--dp", "4", "--enable-dp-attention")
    assert any("layout: mode=partial_dp_attention tp=8 dp=4 attn_tp_size=2 heads_per_rank=64" in ln for ln in lines), (
        lines
    )


@pytest.mark.sglang
def test_server_args_bad_dp_fails_with_our_message(resolve, v32_model):
    with pytest.raises(LayoutError, match=r"--dp 3 does not divide --tp 8; use --dp 1, 2, 4 or 8"):
        resolve(v32_model, "--tp", "8", "--dp", "3", "--enable-dp-attention")


@pytest.mark.sglang
def test_disable_flag_leaves_upstream_alone(resolve, v32_model, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")  # restored by monkeypatch after the flag rewrites it
    # Upstream's own check fires instead (a bare assertion in 0.5.17 and 0.5.23), later in resolution.
    with pytest.raises(AssertionError):
        resolve(v32_model, "--tp", "8", "--dp", "3", "--enable-dp-attention", "--disable-nsa-tp")
    assert os.environ[ENV_VAR] == "0"


# ---------------------------------------------------------------- SGLang 0.5.23: --attn-dp-size, sglang serve


@pytest.fixture
def resolved_layouts(monkeypatch):
    """Every layout our rule resolves inside SGLang's resolution (a spy on the plugin's call)."""
    seen = []
    real = layout_check.resolve_layout

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(layout_check, "resolve_layout", spy)
    return seen


@pytest.fixture
def new_spelling():
    """SGLang 0.5.23 or newer: --attn-dp-size and `sglang serve` exist (read from its files)."""
    from nsa_tp.integrations.sglang.launch import installed_sglang

    found = installed_sglang()
    if not (found.has_attn_dp_size and found.has_serve):
        pytest.skip(f"SGLang {found.version} has no --attn-dp-size / sglang serve (0.5.23 added them)")
    return found


@pytest.mark.sglang
def test_server_args_attn_dp_size_is_the_old_spelling(new_spelling, resolve, v32_model, resolved_layouts):
    _, lines = resolve(v32_model, "--tp", "8", "--attn-dp-size", "4")
    new_lines = list(lines)
    lines.clear()
    resolve(v32_model, "--tp", "8", "--dp", "4", "--enable-dp-attention")
    new, old = resolved_layouts
    assert new == old  # every field, warnings included
    assert (new.mode, new.attn_tp_size, new.attn_dp_size, new.heads_per_rank) == ("partial_dp_attention", 2, 4, 64)
    want = "layout: mode=partial_dp_attention tp=8 dp=4 attn_tp_size=2 heads_per_rank=64"
    assert any(want in ln for ln in new_lines) and any(want in ln for ln in lines), (new_lines, lines)


@pytest.mark.sglang
def test_server_args_bad_attn_dp_size_fails_with_our_one_line_message(new_spelling, resolve, v32_model):
    message = "--attn-dp-size 3 does not divide --tp 8; use --attn-dp-size 1, 2, 4 or 8"
    lines = _Lines()
    plugin_logger.addHandler(lines)
    try:
        with pytest.raises(LayoutError) as info:
            resolve(v32_model, "--tp", "8", "--attn-dp-size", "3")
    finally:
        plugin_logger.removeHandler(lines)
    assert str(info.value) == message
    assert lines.lines == [f"invalid parallel layout for this DSA/NSA model: {message}"]


def _cli(entry: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *entry, *flags], capture_output=True, text=True, env=_sglang_env(),
                          timeout=300, cwd=ROOT)


# `sglang serve` is the console script sglang.cli.main:main; -c runs the same function without the script's
# shebang (a copied virtual environment's script may name another Python).
SGLANG_SERVE = ["-c", "import sys; from sglang.cli.main import main; sys.argv[0] = 'sglang'; main()", "serve"]
LAUNCH_SERVER = ["-m", "sglang.launch_server"]


@pytest.mark.sglang
def test_sglang_serve_loads_the_plugin_as_launch_server_does(new_spelling, v32_model):
    """The real CLIs, up to our layout check: a bad --attn-dp-size stops both with our line, before any GPU work."""
    message = "--attn-dp-size 3 does not divide --tp 8; use --attn-dp-size 1, 2, 4 or 8"
    flags = ("--model-path", v32_model, "--device", "cpu", "--skip-tokenizer-init", "--tp", "8", "--attn-dp-size", "3")
    for entry in (SGLANG_SERVE, LAUNCH_SERVER):
        r = _cli(entry, *flags)
        ours = [ln for ln in r.stderr.splitlines() if "[nsa-tp pid=" in ln]
        assert r.returncode != 0, r.stderr[-3000:]
        assert any(f"plugin loaded: sglang {new_spelling.version}, role=launcher" in ln for ln in ours), ours
        assert any(ln.endswith(f"invalid parallel layout for this DSA/NSA model: {message}") for ln in ours), (
            entry, r.stderr[-3000:])
        assert f"LayoutError: {message}" in r.stderr  # the exception SGLang's launcher ends on is ours


@pytest.mark.sglang
def test_installed_sglang_is_read_from_its_files(new_spelling):
    """0.5.23 as installed: both new spellings, and the removal date our docs and plan quote is SGLang's own."""
    from nsa_tp.integrations.sglang.launch import OLD_FLAG_REMOVED_AFTER, _package_root

    assert new_spelling.version == _version.installed_sglang_version()
    source = (_package_root() / "srt" / "server_args.py").read_text()
    at = source.index('"--enable-dp-attention"')
    assert f"after {OLD_FLAG_REMOVED_AFTER}" in source[at - 300 : at]


@pytest.mark.sglang
def test_both_spellings_same_width_warns_then_sglang_refuses(new_spelling, resolve, v32_model):
    """Our warning says SGLang 0.5.23 refuses `--dp-size D` beside `--attn-dp-size D`: SGLang's own check says so."""
    with pytest.raises(ValueError, match=r"--dp-size 4 with --attn-dp-size 4") as info:
        resolve(v32_model, "--tp", "8", "--dp", "4", "--enable-dp-attention", "--attn-dp-size", "4")
    assert not isinstance(info.value, LayoutError)  # our rule let it through (with the warning), SGLang did not
