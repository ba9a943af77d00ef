"""The plugin's two launch flags on SGLang's own parser (AFTER hook on ``ServerArgs.add_cli_args``):

- ``--disable-nsa-tp`` sets ``NSA_TP_SGLANG_PLUGIN=0``;
- ``--nsa-token-parallel auto|on|off|indexer`` sets ``NSA_TP_TOKEN_PARALLEL``.

Each sets its variable while the launcher parses its arguments: the launcher's hooks read it at call time,
and every SGLang subprocess (started after parsing) inherits it. Neither is a ``ServerArgs`` field
(``default=SUPPRESS``), so ``ServerArgs.from_cli_args`` never sees them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nsa_tp.integrations.sglang._switch import ENV_MODE, ENV_VAR, MODES
from nsa_tp.token_parallel.costs import ENV_COSTS

__all__ = ["FLAG", "TOKEN_PARALLEL_FLAG", "add_cli_flags", "add_token_parallel_flag",
           "after_add_cli_args"]

FLAG = "--disable-nsa-tp"
TOKEN_PARALLEL_FLAG = "--nsa-token-parallel"


class _SetEnv(argparse.Action):
    """Sets ``env`` to ``value`` (or to the flag's argument when ``value`` is None)."""

    def __init__(self, option_strings: list[str], dest: str, *, env: str, value: str | None = None,
                 **kwargs: Any) -> None:
        self.env, self.value = env, value
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        os.environ[self.env] = self.value if self.value is not None else str(values)


def _add_once(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """``parser.add_argument(flag, ...)`` unless the parser has it (``add_cli_args`` may run twice on one
    parser): the parser's own conflict error says so, no private table is read."""
    try:
        parser.add_argument(flag, **kwargs)
    except argparse.ArgumentError as e:
        if "conflicting option string" not in str(e):
            raise


def add_token_parallel_flag(parser: argparse.ArgumentParser) -> None:
    """``--nsa-token-parallel`` (once per parser)."""
    _add_once(
        parser, TOKEN_PARALLEL_FLAG, action=_SetEnv, env=ENV_MODE, choices=MODES,
        help=f"nsa-tp token-parallel DSA prefill inside the attention TP group (sets {ENV_MODE}): auto = only "
             f"where measured faster on this card ({ENV_COSTS}), else upstream; on = always tokens; "
             "indexer = split only the indexer rows; off = upstream.",
    )


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Both flags (once per parser)."""
    add_token_parallel_flag(parser)
    _add_once(
        parser, FLAG, action=_SetEnv, env=ENV_VAR, value="0", nargs=0,
        help=f"Switch the nsa-tp plugin off (same as {ENV_VAR}=0): SGLang's own DSA/NSA paths run unchanged.",
    )


def after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on ``ServerArgs.add_cli_args(parser)``: add both flags (once per parser)."""
    add_cli_flags(parser)
    return None
