"""`nsa-tp plan`'s SGLang launch command: both spellings, and which one the installed SGLang prefers.

The installed SGLang is read from its files; here fake package trees stand for 0.5.17 (no ``attn_dp_size``
field, no ``sglang serve``) and 0.5.23 (both), so no SGLang is needed. The real 0.5.23 is checked in
``test_sglang_plugin.py`` (marked ``sglang``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsa_tp.cli import main
from nsa_tp.integrations.sglang import launch
from nsa_tp.integrations.sglang.launch import InstalledSglang, installed_sglang, launch_commands
from nsa_tp.parallel import resolve_layout

M = "deepseek-ai/DeepSeek-V3.2"


def _tree(root: Path, *, attn_dp_field: bool, serve: bool, fields_dir: bool) -> Path:
    """A minimal SGLang package folder: where it declares server arguments, and its CLI."""
    (root / "srt" / "arg_groups" / "fields").mkdir(parents=True)
    decl = "    attn_dp_size: A[int, 'groups'] = 1\n" if attn_dp_field else "    # attn_dp_size: not a field\n"
    text = f"class ParallelArgs:\n    tp_size: int = 1\n    dp_size: int = 1\n{decl}"
    if fields_dir:
        (root / "srt" / "arg_groups" / "fields" / "parallel.py").write_text(text)
        (root / "srt" / "server_args.py").write_text("class ServerArgs:\n    pass\n")
    else:
        (root / "srt" / "server_args.py").write_text(text.replace("ParallelArgs", "ServerArgs"))
    if serve:
        (root / "cli").mkdir()
        (root / "cli" / "serve.py").write_text("def serve(args, extra_argv):\n    pass\n")
    return root


@pytest.mark.parametrize(
    ("attn_dp_field", "serve", "fields_dir", "prefers"),
    [
        (True, True, True, True),  # 0.5.23: fields in arg_groups/fields/
        (True, True, False, True),  # a release that declares it in server_args.py
        (False, False, False, False),  # 0.5.17-like
        (False, True, True, False),  # sglang serve but no --attn-dp-size: the old spelling
        (True, False, True, False),
    ],
)
def test_installed_sglang_from_files(tmp_path, attn_dp_field, serve, fields_dir, prefers):
    root = _tree(tmp_path / "sglang", attn_dp_field=attn_dp_field, serve=serve, fields_dir=fields_dir)
    found = installed_sglang(root, "0.5.x")
    assert (found.has_attn_dp_size, found.has_serve) == (attn_dp_field, serve)
    assert found.prefers_new_spelling is prefers


def test_not_installed_prefers_nothing():
    assert InstalledSglang(None, False, False).prefers_new_spelling is None


@pytest.mark.parametrize(
    ("layout", "new", "old"),
    [
        (dict(tp_size=8), "--tp 8", "--tp 8"),
        (dict(tp_size=8, attn_dp_size=4), "--tp 8 --attn-dp-size 4", "--tp 8 --dp 4 --enable-dp-attention"),
        (dict(tp_size=8, dp_size=4, enable_dp_attention=True), "--tp 8 --attn-dp-size 4",
         "--tp 8 --dp 4 --enable-dp-attention"),
        (dict(tp_size=8, dp_size=8, enable_dp_attention=True), "--tp 8 --attn-dp-size 8",
         "--tp 8 --dp 8 --enable-dp-attention"),
        (dict(tp_size=8, dp_size=2), "--tp 8 --dp 2", "--tp 8 --dp 2"),  # replicas: --dp in both releases
        (dict(tp_size=8, dp_size=1, enable_dp_attention=True), "--tp 8", "--tp 8"),  # a no-op flag is left out
    ],
)
def test_launch_commands_both_spellings(layout, new, old):
    got = launch_commands(resolve_layout(**layout, sm_major=9), M, ("--kv-cache-dtype", "fp8_e4m3"))
    assert got == (
        f"sglang serve --model-path {M} {new} --kv-cache-dtype fp8_e4m3",
        f"python -m sglang.launch_server --model-path {M} {old} --kv-cache-dtype fp8_e4m3",
    )


def _plan(capsys, monkeypatch, found: InstalledSglang, *argv: str) -> str:
    monkeypatch.setattr(launch, "installed_sglang", lambda: found)
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.parametrize(
    ("found", "mark_new", "mark_old", "head"),
    [
        (InstalledSglang("0.5.23", True, True), "*", " ", "installed SGLang 0.5.23 prefers the one marked *"),
        (InstalledSglang("0.5.17", False, False), " ", "*", "installed SGLang 0.5.17 prefers the one marked *"),
        (InstalledSglang(None, False, False), " ", " ", "SGLang is not installed here"),
    ],
)
def test_plan_marks_the_installed_preference(capsys, monkeypatch, found, mark_new, mark_old, head):
    out = _plan(capsys, monkeypatch, found, "--tp", "8", "--attn-dp-size", "4", "--sm", "90")
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("launch ("))
    assert head in lines[at]
    assert lines[at + 1] == f"{mark_new} sglang serve --model-path {M} --tp 8 --attn-dp-size 4    # SGLang 0.5.23 " \
        "spelling"
    assert lines[at + 2] == (
        f"{mark_old} python -m sglang.launch_server --model-path {M} --tp 8 --dp 4 --enable-dp-attention    "
        "# SGLang 0.5.17 spelling; SGLang drops --enable-dp-attention after 2026-12-31"
    )


def test_plan_json_carries_the_launch_commands(capsys, monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text((Path(__file__).parent / "data" / "config-v32.json").read_text())
    found = InstalledSglang("0.5.23", True, True)
    out = _plan(capsys, monkeypatch, found, "--tp", "8", "--dp", "4", "--enable-dp-attention", "--json",
                "--model-path", str(tmp_path / "config.json"), "--nsa-token-parallel", "off")
    data = json.loads(out)
    assert data["heads_per_rank"] == 64 and data["mode"] == "partial_dp_attention"
    tail = "--nsa-token-parallel off"
    assert data["launch"] == {
        "sglang_serve": f"sglang serve --model-path {tmp_path} --tp 8 --attn-dp-size 4 {tail}",
        "launch_server": f"python -m sglang.launch_server --model-path {tmp_path} --tp 8 --dp 4 --enable-dp-attention "
                         f"{tail}",
        "preferred": "sglang_serve",
        "installed_sglang": "0.5.23",
    }
