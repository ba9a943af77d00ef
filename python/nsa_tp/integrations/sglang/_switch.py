"""The plugin's off switch: ``NSA_TP_SGLANG_PLUGIN=0`` (or ``--nsa-tp-plugin off``, which sets it).

Read at call time, not cached: in the launcher the flag is parsed after the plugin loaded, and the
variable it sets reaches every SGLang subprocess (they are started after parsing, with this environment).
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "ENV_BACKEND", "plugin_enabled", "ops_backend"]

ENV_VAR = "NSA_TP_SGLANG_PLUGIN"
# Which nsa_tp.ops tier the hooks ask for ("auto" picks the fastest that supports the inputs).
ENV_BACKEND = "NSA_TP_SGLANG_BACKEND"
_OFF = {"0", "off", "false", "no"}


def plugin_enabled() -> bool:
    """False when ``NSA_TP_SGLANG_PLUGIN`` is 0/off/false/no (any case); on by default."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def ops_backend() -> str:
    """The ``backend=`` the hooks pass to :mod:`nsa_tp.ops` (``NSA_TP_SGLANG_BACKEND``, default ``auto``)."""
    return os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
