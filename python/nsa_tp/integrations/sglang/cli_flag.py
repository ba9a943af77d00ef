"""``--disable-nsa-tp``: SGLang's own parser learns one flag that switches the plugin off.

The flag sets ``NSA_TP_SGLANG_PLUGIN=0`` while the launcher parses its arguments: the launcher's hooks
read it at call time, and every SGLang subprocess (started after parsing) inherits it and loads nothing.
It is not a ``ServerArgs`` field, so ``ServerArgs.from_cli_args`` never sees it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nsa_tp.integrations.sglang._switch import ENV_VAR

__all__ = ["FLAG", "after_add_cli_args"]

FLAG = "--disable-nsa-tp"


class _DisableAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        os.environ[ENV_VAR] = "0"


def after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on ``ServerArgs.add_cli_args(parser)``: add :data:`FLAG` (once per parser)."""
    from nsa_tp.integrations.sglang.token_parallel import add_cli_flag

    add_cli_flag(parser)  # --nsa-token-parallel auto|on|off|indexer
    if FLAG in parser._option_string_actions:  # add_cli_args called twice on one parser
        return None
    parser.add_argument(
        FLAG,
        action=_DisableAction,
        help=f"Switch the nsa-tp plugin off (same as {ENV_VAR}=0): SGLang's own DSA/NSA paths run unchanged.",
    )
    return None
