"""`nsa-tp` command line: `plan` (the layout rule), `run` (the main job), `bench` (kernel benchmarks).

Flags follow SGLang's names (`--tp`, `--attn-dp-size` or `--dp --enable-dp-attention`, `--kv-cache-dtype`,
...), so a command line can be copied between `nsa-tp` and `sglang serve` / `python -m sglang.launch_server`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from nsa_tp.config import ConfigError, NSAConfig
from nsa_tp.parallel import TOKEN_PARALLEL_MODES, LayoutError, ParallelLayout, resolve_layout, sglang_flags

__all__ = ["main", "build_parser", "add_layout_args", "layout_from_args", "int_at_least", "UsageError"]


class UsageError(ValueError):
    """A flag value that cannot work (the message names the flag and the fix); the CLI exits 2 with it."""


def int_at_least(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= low``: a bad value is a one-line usage error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{why}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nsa-tp run: error: argument --topk: must be >= 1, got 0 (see
    nsa-tp run --help)`` and exit 2, instead of the usage block (the message already names the flag)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

# Subcommands implemented in their own modules: name -> (module, help). Each module defines
# `add_arguments(parser)` and `main(args) -> int`.
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nsa_tp.run_cmd", "run the sharded DeepSeek-V3.2 attention layer in every layout and compare"),
    "bench": ("nsa_tp.bench_cmd", "benchmark every kernel tier and write JSON + plots"),
    "needle": ("nsa_tp.needle.cmd", "write the needle checkpoint (constructed DeepSeek-V3.2 recall model)"),
}


def add_layout_args(p: argparse.ArgumentParser, *, tp_default: int | None = 1) -> None:
    """SGLang's layout flags, shared by `plan`, `run` and `bench`."""
    p.add_argument("--tp", "--tp-size", dest="tp", type=int_at_least(1), default=tp_default,
                   help="tensor parallel size")
    p.add_argument("--dp", "--dp-size", dest="dp", type=int_at_least(1), default=1, help="data parallel size")
    p.add_argument("--attn-dp-size", "--attention-data-parallel-size", dest="attn_dp_size", type=int_at_least(1),
                   default=None, help="D attention DP groups of tp/D ranks (SGLang 0.5.23's spelling of "
                   "--dp D --enable-dp-attention)")
    p.add_argument("--enable-dp-attention", action="store_true",
                   help="with --dp D: attention DP groups of tp/D ranks (SGLang 0.5.17-0.5.22; deprecated in 0.5.23)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8_e4m3 | bfloat16")
    p.add_argument("--page-size", type=int_at_least(1), default=64, help="KV cache page size (NSA: 64)")
    p.add_argument("--sm", type=int, choices=(80, 90, 100), default=None,
                   help="GPU generation to plan for (default: this machine's GPU, else 90)")
    p.add_argument("--nsa-token-parallel", choices=TOKEN_PARALLEL_MODES, default="auto",
                   help="all-to-all heads <-> tokens inside the attention TP group")


def layout_from_args(args: argparse.Namespace, num_attention_heads: int = 128) -> ParallelLayout:
    return resolve_layout(
        args.tp,
        args.dp,
        args.enable_dp_attention,
        num_attention_heads=num_attention_heads,
        sm_major=None if args.sm is None else args.sm // 10,
        kv_cache_dtype=args.kv_cache_dtype,
        page_size=args.page_size,
        token_parallel=args.nsa_token_parallel,
        attn_dp_size=args.attn_dp_size,
    )


def _sglang_extra_flags(args: argparse.Namespace, layout: ParallelLayout) -> tuple[str, ...]:
    """The flags besides the layout that SGLang takes as given here (defaults left out)."""
    extra = () if args.kv_cache_dtype == "auto" else ("--kv-cache-dtype", layout.kv_cache_dtype)
    return extra + (() if args.nsa_token_parallel == "auto" else ("--nsa-token-parallel", args.nsa_token_parallel))


def _format_layout(layout: ParallelLayout, model: str, new_spelling: bool = False) -> str:
    mult = layout.flashmla_head_multiple
    padding = (
        "none (no FlashMLA sparse kernel below SM90)"
        if mult is None
        else f"{layout.heads_per_rank} -> {layout.flashmla_padded_heads} heads "
        f"({layout.flashmla_flops_factor:.1f}x FLOPs, {layout.flashmla_waste_fraction:.0%} wasted)"
        if layout.flashmla_padded_heads != layout.heads_per_rank
        else f"none ({layout.heads_per_rank} is a multiple of {mult})"
    )
    rows = [
        ("model", model),
        ("mode", layout.mode),
        ("ranks", f"{layout.world_size} GPU(s): {sglang_flags(layout, new_spelling)}"
                  + (f" = {layout.num_replicas} replicas of {layout.tp_size} GPUs (--dp without "
                     "--enable-dp-attention: independent copies of the model)" if layout.num_replicas > 1 else "")),
        ("attention groups", f"{layout.attn_dp_size} x {layout.attn_tp_size} ranks (attn_dp x attn_tp)"),
        ("heads per rank", f"{layout.heads_per_rank} of {layout.num_attention_heads}"),
        (f"FlashMLA padding (SM{layout.sm_major}0)", padding),
        ("token-parallel", _token_parallel_text(layout)),
        ("KV cache dtype", layout.kv_cache_dtype),
        ("page size", str(layout.page_size)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in layout.warnings]
    return "\n".join(lines)


def _token_parallel_text(layout: ParallelLayout) -> str:
    """The per-batch policy of ``--nsa-token-parallel`` (nsa_tp.token_parallel.policy, issue 7)."""
    from nsa_tp.token_parallel.policy import describe_policy

    return describe_policy(layout)


def _plan_main(args: argparse.Namespace) -> int:
    from nsa_tp.integrations.sglang.launch import DEFAULT_MODEL, describe_launch, installed_sglang, launch_commands

    heads, model = 128, "DeepSeek-V3.2 (default dims)"
    if args.model_path:
        cfg = NSAConfig.from_hf_config(args.model_path)
        heads, model = cfg.num_attention_heads, str(args.model_path)
    layout = layout_from_args(args, heads)
    sglang, extra = installed_sglang(), _sglang_extra_flags(args, layout)
    model_path = str(args.model_path or DEFAULT_MODEL).removesuffix("/config.json")  # SGLang takes the folder
    if args.json:
        new, old = launch_commands(layout, model_path, extra)
        launch = {"sglang_serve": new, "launch_server": old, "preferred": {True: "sglang_serve", False:
                  "launch_server", None: None}[sglang.prefers_new_spelling], "installed_sglang": sglang.version}
        print(json.dumps({**layout.to_dict(), "launch": launch}, indent=2))
    else:
        print(_format_layout(layout, model, new_spelling=args.attn_dp_size is not None))
        print("\n".join(describe_launch(layout, model_path, extra, sglang)))
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Only ``command``'s module is imported (all of them when None): `run` and `bench`
    pull in torch and the kernels, which `nsa-tp plan` does not need."""
    parser = _Parser(prog="nsa-tp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="resolve and print the NSA parallel layout for SGLang's flags")
    add_layout_args(plan)
    plan.add_argument("--model-path", default=None, help="a HuggingFace config.json or its folder")
    plan.add_argument("--json", action="store_true", help="print the layout as JSON")
    plan.set_defaults(func=_plan_main)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if command is not None and command != name:
            continue  # listed in --help; its arguments are only needed when it is the one chosen
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in _SUBCOMMANDS or chosen == "plan" else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line): a return code
        return e.code if isinstance(e.code, int) else 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (LayoutError, ConfigError, UsageError) as e:
        print(f"nsa-tp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
