"""Bad input to `nsa-tp plan | run | bench` is one line on stderr naming the flag and the fix, exit 2, no traceback.

Each case of issue 15 is here. Most go through ``nsa_tp.cli.main`` in-process (argparse's exit is caught); one
goes through a real subprocess, so the console entry point is covered too. None of them starts a rank: every
check runs before the layer is built.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_tp import bench_cmd
from nsa_tp.cli import main

CONFIG_V32 = Path(__file__).parent / "data" / "config-v32.json"
ROOT = Path(__file__).resolve().parents[2]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one line on stderr, that line holds every needle (the flag, the fix)."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def v32() -> dict:
    return json.loads(CONFIG_V32.read_text())


# ------------------------------------------------------------------ config.json (plan and run read it alike)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[1, 2, 3]", "expected a JSON object"),
        (b"null", "got null"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
        (b"{not json", "not valid JSON"),
    ],
    ids=["list", "null", "non-utf8", "broken-json"],
)
def test_config_that_is_not_an_object(capsys, tmp_path, content, needle):
    (tmp_path / "config.json").write_bytes(content)
    rc, _, err = cli(capsys, "plan", "--model-path", str(tmp_path))
    assert_usage_error(rc, err, needle, "config.json")


@pytest.mark.parametrize(
    ("rope_scaling", "needle"),
    [
        ("yarn", "'rope_scaling' must be an object"),
        ({"type": "yarn", "factor": "forty"}, "'rope_scaling.factor' must be a number, got 'forty'"),
        ({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096.5},
         "'rope_scaling.original_max_position_embeddings' must be a positive integer"),
        ({"type": "yarn", "factor": True}, "'rope_scaling.factor' must be a number, got True"),
    ],
    ids=["string", "factor-text", "orig-max-float", "factor-bool"],
)
def test_bad_rope_scaling(capsys, tmp_path, rope_scaling, needle):
    hf = v32()
    hf["rope_scaling"] = rope_scaling
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rc, _, err = cli(capsys, "plan", "--model-path", str(tmp_path))
    assert_usage_error(rc, err, needle)


def test_architectures_not_a_list(capsys, tmp_path):
    hf = v32()
    hf["architectures"] = "DeepseekV32ForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rc, _, err = cli(capsys, "plan", "--model-path", str(tmp_path))
    assert_usage_error(rc, err, "'architectures' must be a list")


def test_good_config_still_plans(capsys, tmp_path):
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    rc, out, err = cli(capsys, "plan", "--model-path", str(tmp_path / "config.json"), "--tp", "8")
    assert rc == 0, err
    assert "16 of 128" in out


def test_plan_replicas_are_spelled_out(capsys):
    rc, out, _ = cli(capsys, "plan", "--tp", "8", "--dp", "2")
    assert rc == 0
    assert "16 GPU(s): --tp 8 --dp 2 = 2 replicas of 8 GPUs" in out


# ------------------------------------------------------------------ nsa-tp run: --model-path


def test_run_model_path_config_file_asks_for_the_folder(capsys, tmp_path):
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path / "config.json"))
    assert_usage_error(rc, err, "--model-path", "checkpoint folder", f"--model-path {tmp_path}")


def test_run_model_path_without_safetensors_package(capsys, tmp_path, monkeypatch):
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now raises ImportError
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path))
    assert_usage_error(rc, err, "--model-path", "pip install safetensors")


def test_run_model_path_folder_without_weights(capsys, tmp_path):
    pytest.importorskip("safetensors")
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path))
    assert_usage_error(rc, err, "--model-path", "no *.safetensors")


def test_run_model_path_missing(capsys, tmp_path):
    pytest.importorskip("safetensors")
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path / "nope"))
    assert_usage_error(rc, err, "--model-path", "no such file or folder")


def test_run_model_path_corrupt_safetensors(capsys, tmp_path):
    pytest.importorskip("safetensors")
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length no file can have
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path), "--tp", "1")
    assert_usage_error(rc, err, "--model-path", "not a readable safetensors checkpoint")


def test_run_model_path_layer_without_weights(capsys, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    st.save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path), "--layer", "3")
    assert_usage_error(rc, err, "--layer 3", "'model.layers.3.self_attn.q_a_proj.weight' is missing",
                       "pick another --layer")


def test_run_model_path_with_dims_flags(capsys, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    shutil.copy(CONFIG_V32, tmp_path / "config.json")
    st.save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    rc, _, err = cli(capsys, "run", "--model-path", str(tmp_path), "--hidden-size", "512")
    assert_usage_error(rc, err, "--hidden-size", "drop them")


# ------------------------------------------------------------------ nsa-tp run: --backend, --core


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tiers can run on a CUDA machine")
@pytest.mark.parametrize("tier", ["flashmla", "triton"])
def test_run_gpu_backend_on_cpu(capsys, tier):
    rc, _, err = cli(capsys, "run", "--backend", tier)
    assert_usage_error(rc, err, f"--backend {tier}", "cannot run on this machine", "--backend auto")


def test_run_unknown_backend(capsys):
    rc, _, err = cli(capsys, "run", "--backend", "bogus")
    assert_usage_error(rc, err, "--backend 'bogus'", "unknown kernel tier", "reference")


def test_run_unknown_core(capsys):
    rc, _, err = cli(capsys, "run", "--core", "bogus")
    assert_usage_error(rc, err, "--core 'bogus'", "unknown attention core", "heads")


# ------------------------------------------------------------------ range-checked numbers


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--prompt-len", "0"], "argument --prompt-len: must be >= 4"),
        (["run", "--prompt-len", "3"], "argument --prompt-len: must be >= 4"),
        (["run", "--topk", "0"], "argument --topk: must be >= 1, got 0"),
        (["run", "--max-ranks", "0"], "argument --max-ranks: must be >= 1, got 0"),
        (["run", "--hidden-size", "7"], "argument --hidden-size: must be >= 128, got 7"),
        (["run", "--hidden-size", "200"], "argument --hidden-size: must be a multiple of 128"),
        (["run", "--decode-steps", "-1"], "argument --decode-steps: must be >= 0"),
        (["run", "--heads", "0"], "argument --heads: must be >= 1"),
        (["run", "--layer", "-1"], "argument --layer: must be >= 0"),
        (["run", "--seed", "-3"], "argument --seed: must be >= 0"),
        (["run", "--tp", "0"], "argument --tp/--tp-size: must be >= 1"),
        (["run", "--topk", "many"], "argument --topk: expected an integer, got 'many'"),
        (["plan", "--dp", "0"], "argument --dp/--dp-size: must be >= 1"),
        (["plan", "--page-size", "0"], "argument --page-size: must be >= 1"),
        (["bench", "--tokens", "0"], "argument --tokens: must be >= 1"),
        (["bench", "--heads", "0,16"], "argument --heads: expected comma-separated integers >= 1"),
        (["bench", "--context", "-5"], "argument --context: must be >= 1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_numeric_flags_are_range_checked(capsys, argv, needle):
    rc, _, err = cli(capsys, *argv)
    assert_usage_error(rc, err, needle, "--help")


def test_run_max_ranks_with_tp_is_refused(capsys):
    rc, _, err = cli(capsys, "run", "--tp", "2", "--max-ranks", "4")
    assert_usage_error(rc, err, "--max-ranks", "drop one")


def test_run_layout_error_is_one_line(capsys):
    rc, _, err = cli(capsys, "run", "--tp", "8", "--dp", "3", "--enable-dp-attention")
    assert_usage_error(rc, err, "--dp 3 does not divide --tp 8")


# ------------------------------------------------------------------ --attn-dp-size (SGLang 0.5.23's spelling)


@pytest.mark.parametrize("command", ["plan", "run"])
def test_attn_dp_size_error_names_the_new_flag(capsys, command):
    rc, _, err = cli(capsys, command, "--tp", "8", "--attn-dp-size", "3")
    assert_usage_error(rc, err, "--attn-dp-size 3 does not divide --tp 8; use --attn-dp-size 1, 2, 4 or 8")
    assert "--enable-dp-attention" not in err and "--dp " not in err


@pytest.mark.parametrize("command", ["plan", "run"])
def test_both_spellings_with_two_widths_is_an_error_naming_both(capsys, command):
    rc, _, err = cli(capsys, command, "--tp", "8", "--dp", "4", "--enable-dp-attention", "--attn-dp-size", "2")
    assert_usage_error(rc, err, "--attn-dp-size 2", "--dp 4 --enable-dp-attention", "give one")


def test_attn_dp_size_range_checked(capsys):
    rc, _, err = cli(capsys, "plan", "--attn-dp-size", "0")
    assert_usage_error(rc, err, "argument --attn-dp-size/--attention-data-parallel-size: must be >= 1")


def test_plan_shows_the_layout_in_the_spelling_typed(capsys):
    rc, new, _ = cli(capsys, "plan", "--tp", "8", "--attn-dp-size", "4", "--sm", "90")
    assert rc == 0 and "8 GPU(s): --tp 8 --attn-dp-size 4\n" in new
    rc, old, _ = cli(capsys, "plan", "--tp", "8", "--dp", "4", "--enable-dp-attention", "--sm", "90")
    assert rc == 0 and "8 GPU(s): --tp 8 --dp 4 --enable-dp-attention\n" in old
    rest = [ln for ln in new.splitlines() if not ln.startswith("ranks")]
    assert rest == [ln for ln in old.splitlines() if not ln.startswith("ranks")]  # the same layout and commands


def test_run_accepts_attn_dp_size():
    """`nsa-tp run --tp 2 --attn-dp-size 2` plans the layout `--tp 2 --dp 2 --enable-dp-attention` names."""
    from nsa_tp import run_cmd
    from nsa_tp.cli import build_parser

    planned = {}
    for flags in (["--attn-dp-size", "2"], ["--dp", "2", "--enable-dp-attention"]):
        args = build_parser("run").parse_args(["run", "--tp", "2", *flags, "--prompt-len", "8"])
        _, _, cases, ref = run_cmd._plan(args, 0)  # the cases it would run; no rank starts
        planned[" ".join(flags)] = [(c.tp, c.dp, c.enable_dp_attention, c.kv_cache_dtype) for c in cases]
        assert (ref.tp, ref.dp, ref.enable_dp_attention) == (1, 1, False)
    assert planned["--attn-dp-size 2"] == planned["--dp 2 --enable-dp-attention"] == [(2, 2, True, "bfloat16")]


# ------------------------------------------------------------------ nsa-tp bench --plot-from


def _results(path: Path) -> Path:
    path.write_text(json.dumps({"card": "test card", "rows": [
        {"op": "sparse_mla_fwd", "tier": "triton", "shape": {"H": 16, "kv": "bf16"}, "ms": 1.0},
    ]}))
    return path


def test_plot_from_missing_file(capsys, tmp_path):
    rc, _, err = cli(capsys, "bench", "--plot-from", str(tmp_path / "nope.json"))
    assert_usage_error(rc, err, "--plot-from", "no such file")


def test_plot_from_not_results(capsys, tmp_path):
    (tmp_path / "x.json").write_text("[]")
    rc, _, err = cli(capsys, "bench", "--plot-from", str(tmp_path / "x.json"))
    assert_usage_error(rc, err, "--plot-from", "no 'rows' list")


def test_plot_from_without_matplotlib_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cmd, "_have_matplotlib", lambda: False)
    rc, out, err = cli(capsys, "bench", "--plot-from", str(_results(tmp_path / "r.json")))
    assert rc == 1
    assert "needs matplotlib" in err and "pip install" in err, err
    assert "Traceback" not in err and out == ""


def test_plot_from_writes_into_out(capsys, tmp_path, monkeypatch):
    """--out is where the PNGs go (the JSON's folder only when --out is not given)."""
    calls: list[str] = []

    def fake_plot(results, out_dir, stem):  # records where it was told to write
        calls.append(out_dir)
        return [str(Path(out_dir) / f"{stem}_x.png")]

    import nsa_tp.bench.plots as plots

    monkeypatch.setattr(bench_cmd, "_have_matplotlib", lambda: True)
    monkeypatch.setattr(plots, "plot_results", fake_plot)
    src = _results(tmp_path / "r.json")
    rc, out, _ = cli(capsys, "bench", "--plot-from", str(src), "--out", str(tmp_path / "pngs"))
    assert rc == 0 and calls == [str(tmp_path / "pngs")] and (tmp_path / "pngs").is_dir()
    assert f"wrote {tmp_path / 'pngs' / 'r_x.png'}" in out
    rc, _, _ = cli(capsys, "bench", "--plot-from", str(src))
    assert rc == 0 and calls[-1] == str(tmp_path)


def test_plot_from_real_matplotlib(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rc, out, err = cli(capsys, "bench", "--plot-from", str(_results(tmp_path / "r.json")), "--out",
                       str(tmp_path / "o"))
    assert rc == 0, err
    pngs = list((tmp_path / "o").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)


# ------------------------------------------------------------------ the real console path


def test_subprocess_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "nsa_tp", "run", "--topk", "0"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "nsa-tp run: error: argument --topk: must be >= 1, got 0 (see nsa-tp run --help)"
    ], r.stderr
