"""The plugin's switches, read from the environment: ``NSA_TP_SGLANG_PLUGIN`` (off switch; ``--disable-nsa-tp``
sets it), ``NSA_TP_SGLANG_BACKEND`` (forced tier) and ``NSA_TP_TOKEN_PARALLEL`` (``--nsa-token-parallel`` sets it).

Read at call time, not cached: in the launcher the flag is parsed after the plugin loaded, and the
variable it sets reaches every SGLang subprocess (they are started after parsing, with this environment).
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "ENV_BACKEND", "ENV_MODE", "MODES", "plugin_enabled", "ops_backend", "token_parallel_mode"]

ENV_VAR = "NSA_TP_SGLANG_PLUGIN"
# Which nsa_tp.ops tier the hooks ask for ("auto" picks the fastest that supports the inputs).
ENV_BACKEND = "NSA_TP_SGLANG_BACKEND"
_OFF = {"0", "off", "false", "no"}
# Token-parallel extend inside the attention TP group (docs/sglang_token_parallel.md).
ENV_MODE = "NSA_TP_TOKEN_PARALLEL"
MODES = ("auto", "on", "off", "indexer")  # on = tokens for every eligible batch; indexer = the indexer split only


def plugin_enabled() -> bool:
    """False when ``NSA_TP_SGLANG_PLUGIN`` is 0/off/false/no (any case); on by default."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def ops_backend() -> str:
    """The ``backend=`` the hooks pass to :mod:`nsa_tp.ops` (``NSA_TP_SGLANG_BACKEND``, default ``auto``)."""
    return os.environ.get(ENV_BACKEND, "auto").strip() or "auto"


def token_parallel_mode() -> str:
    """``NSA_TP_TOKEN_PARALLEL`` (``auto`` when unset); an unknown value raises ``ValueError`` naming it."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}: expected one of {', '.join(MODES)}, got {value!r}")
    return value
