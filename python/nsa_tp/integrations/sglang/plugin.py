"""Registration: what the ``sglang.srt.plugins`` entry point runs in every SGLang process.

SGLang's ``load_plugins()`` (launcher, ``sglang serve``, ``Engine``, every scheduler process; in 0.5.23 also
the DP controller and detokenizer) calls :func:`register` with no arguments, then
``HookRegistry.apply_hooks()`` patches each registered target. So this module only *registers*:

- everywhere: the layout check (AROUND SGLang's model-specific server-args step) and ``--disable-nsa-tp``;
- in processes that run the model (schedulers, or a child we do not recognize): the two sparse-MLA hooks.
  The launcher, DP controller and detokenizer never run attention, and skipping them keeps
  ``launch_server --help`` from importing the attention backend.

Nothing here raises: an unsupported SGLang or a missing target gives one log line and that hook is skipped
(SGLang would otherwise print a stack trace for a plugin that fails).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

from nsa_tp.integrations.sglang import _compat, attention_hooks, cli_flag, layout_check
from nsa_tp.integrations.sglang._log import logger, process_role
from nsa_tp.integrations.sglang._switch import ENV_VAR, plugin_enabled
from nsa_tp.integrations.sglang._version import installed_sglang_version, unsupported_reason
from nsa_tp.integrations.sglang.token_parallel import backend as token_parallel

__all__ = ["HookSpec", "MODEL_ROLES", "hook_specs", "register"]

# Roles whose process runs attention (see _log.process_role).
MODEL_ROLES = ("scheduler", "subprocess")


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """One hook: SGLang's fully qualified target, our function and SGLang's ``HookType`` name."""

    target: str
    hook: Callable[..., Any]
    hook_type: str  # "AROUND" | "AFTER"


def _resolves(target: str) -> str | None:
    """None if ``target`` names an attribute SGLang has here, else why not (one line, no trace)."""
    owner, _, attr = target.rpartition(".")
    parts = owner.split(".")
    # Import the longest module prefix first: pkgutil.resolve_name would hide a failing import behind
    # "module has no attribute", and the real error is what the log line must say.
    for i in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:i]):  # the module exists but one of its imports is missing
                return f"cannot import {'.'.join(parts[:i])}: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot hook here"; say which
            return f"cannot import {'.'.join(parts[:i])}: {type(e).__name__}: {e}"
    try:
        obj = pkgutil.resolve_name(owner)
    except Exception as e:  # noqa: BLE001
        return f"cannot resolve {owner}: {type(e).__name__}: {e}"
    if not hasattr(obj, attr):
        return f"{owner} has no attribute {attr}"
    return None


def hook_specs(role: str) -> tuple[list[HookSpec], list[str]]:
    """The hooks for a process of this role, and one line per hook that cannot be placed here."""
    specs: list[HookSpec] = []
    skipped: list[str] = []
    specs.append(HookSpec(_compat.ADD_CLI_ARGS, cli_flag.after_add_cli_args, "AFTER"))
    reasons = []
    for target in _compat.LAYOUT_TARGETS:
        reason = _resolves(target)
        if reason is None:
            specs.append(HookSpec(target, layout_check.around_model_specific_adjustments, "AROUND"))
            break
        reasons.append(f"{target}: {reason}")
    else:
        skipped.append("layout check: " + "; ".join(reasons))
    if role in MODEL_ROLES:
        for target, hook in (
            (_compat.FLASHMLA_SPARSE, attention_hooks.around_flashmla_sparse),
            (_compat.FLASHMLA_KV, attention_hooks.around_flashmla_kv),
        ):
            reason = _resolves(target)
            if reason is None:
                specs.append(HookSpec(target, hook, "AROUND"))
            else:
                skipped.append(f"{target}: {reason}")
    return specs, skipped


def register(role: str | None = None) -> list[HookSpec]:
    """The entry point: register our hooks with SGLang's ``HookRegistry`` for this process.

    ``role`` is read from the call stack when None (tests pass it). Returns the hooks registered.
    """
    role = role or process_role()
    version = installed_sglang_version()
    reason = unsupported_reason(version)
    if reason is not None:
        logger.error("plugin not loaded (role=%s): %s", role, reason)
        return []
    if not plugin_enabled():
        logger.info(
            "plugin loaded but switched off by %s=%s (role=%s, sglang %s): SGLang runs unchanged",
            ENV_VAR,
            os.environ.get(ENV_VAR),
            role,
            version,
        )
        # Keep --disable-nsa-tp a known flag even when the environment already switched the plugin off.
        specs = [s for s in hook_specs("launcher")[0] if s.hook is cli_flag.after_add_cli_args]
    else:
        specs, skipped = hook_specs(role)
        if role in MODEL_ROLES:  # token-parallel extend: its backend and its one hook (token_parallel.HOOKS)
            for target, hook, kind in token_parallel.register_in_model_process():
                reason = _resolves(target)
                if reason is None:
                    specs.append(HookSpec(target, hook, kind))
                else:
                    skipped.append(f"{target}: {reason}")
        for line in skipped:
            logger.warning("hook not placed: %s", line)

    hook_registry = _compat.resolve(_compat.HOOK_REGISTRY)
    HookRegistry, HookType = hook_registry.HookRegistry, hook_registry.HookType

    for spec in specs:
        HookRegistry.register(spec.target, spec.hook, HookType[spec.hook_type])
    if plugin_enabled():
        logger.info(
            "plugin loaded: sglang %s, role=%s, hooks: %s",
            version,
            role,
            ", ".join(s.target.rsplit(".", 2)[-2] + "." + s.target.rsplit(".", 1)[-1] for s in specs),
        )
    return specs
