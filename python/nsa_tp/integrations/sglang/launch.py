"""SGLang's launch command for a layout, in both spellings, and which one the installed SGLang prefers.

SGLang 0.5.23 spells attention DP ``--attn-dp-size D`` and recommends ``sglang serve``. The 0.5.17 spelling,
``--dp D --enable-dp-attention`` with ``python -m sglang.launch_server``, still runs on 0.5.23 with two
warnings; SGLang's ``server_args.py`` removes ``--enable-dp-attention`` and its field after
:data:`OLD_FLAG_REMOVED_AFTER`.

The installed SGLang is read from its files (package metadata, the source that declares its server
arguments), never imported: importing SGLang pulls in torch and takes seconds, and ``nsa-tp plan`` needs
neither.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from importlib import metadata
from pathlib import Path

from nsa_tp.parallel import ParallelLayout, sglang_flags

__all__ = ["OLD_FLAG_REMOVED_AFTER", "InstalledSglang", "installed_sglang", "launch_commands", "describe_launch"]

# SGLang 0.5.23 server_args.py: "TODO: remove the flag and the field after 2026-12-31" (--enable-dp-attention).
OLD_FLAG_REMOVED_AFTER = "2026-12-31"
DEFAULT_MODEL = "deepseek-ai/DeepSeek-V3.2"
# Where SGLang declares its server-argument fields: 0.5.23 in arg_groups/fields/, older releases in server_args.py.
_FIELD_SOURCES = ("srt/server_args.py", "srt/arg_groups/fields/*.py")
_ATTN_DP_FIELD = re.compile(r"^\s+attn_dp_size\s*:", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class InstalledSglang:
    """What the installed SGLang accepts; ``version`` None when SGLang is not installed."""

    version: str | None
    has_attn_dp_size: bool  # declares the attn_dp_size server argument (``--attn-dp-size``)
    has_serve: bool  # ships the ``sglang serve`` command

    @property
    def prefers_new_spelling(self) -> bool | None:
        """True: ``sglang serve ... --attn-dp-size``; False: ``launch_server ... --enable-dp-attention``; None:
        no SGLang here."""
        if self.version is None:
            return None
        return self.has_attn_dp_size and self.has_serve


def _package_root() -> Path | None:
    try:
        spec = importlib.util.find_spec("sglang")  # a top-level name: located on sys.path, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_sglang(root: Path | None = None, version: str | None = None) -> InstalledSglang:
    """Read the SGLang installed for this Python (or the package folder ``root``, with its ``version``)."""
    if root is None:
        root = _package_root()
        if root is None:
            return InstalledSglang(None, False, False)
        try:
            version = metadata.version("sglang")
        except metadata.PackageNotFoundError:
            version = "unknown (no package metadata)"
    sources = [p for pattern in _FIELD_SOURCES for p in sorted(root.glob(pattern))]
    has_attn_dp = any(_ATTN_DP_FIELD.search(p.read_text(encoding="utf-8", errors="replace")) for p in sources)
    return InstalledSglang(version or "unknown", has_attn_dp, (root / "cli" / "serve.py").is_file())


def launch_commands(
    layout: ParallelLayout, model: str = DEFAULT_MODEL, extra: tuple[str, ...] = ()
) -> tuple[str, str]:
    """``(0.5.23 spelling, 0.5.17 spelling)`` of the SGLang command that serves ``layout``; ``extra`` flags are
    appended to both. The DP-attention width is SGLang's ``attn_dp_size`` either way."""
    new, old = sglang_flags(layout, new_spelling=True), sglang_flags(layout, new_spelling=False)
    tail = "".join(f" {x}" for x in extra)
    return (
        f"sglang serve --model-path {model} {new}{tail}",
        f"python -m sglang.launch_server --model-path {model} {old}{tail}",
    )


def describe_launch(layout: ParallelLayout, model: str, extra: tuple[str, ...], sglang: InstalledSglang) -> list[str]:
    """The plan's launch lines: both spellings, the installed SGLang's preference marked with ``*``."""
    new, old = launch_commands(layout, model, extra)
    prefers = sglang.prefers_new_spelling
    if prefers is None:
        head = "launch (SGLang is not installed here: the first for 0.5.23, the second for 0.5.17-0.5.22)"
    else:
        head = f"launch (installed SGLang {sglang.version} prefers the one marked *)"
    removed = f"; SGLang drops --enable-dp-attention after {OLD_FLAG_REMOVED_AFTER}" if "--enable-dp" in old else ""
    return [
        head,
        f"{'*' if prefers is True else ' '} {new}    # SGLang 0.5.23 spelling",
        f"{'*' if prefers is False else ' '} {old}    # SGLang 0.5.17 spelling{removed}",
    ]
