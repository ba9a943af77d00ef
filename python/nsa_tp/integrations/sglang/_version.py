"""Which SGLang releases the plugin was written and tested against, and how to read the installed one."""

from __future__ import annotations

import re
from importlib import metadata

__all__ = ["MIN_VERSION", "MAX_VERSION", "installed_sglang_version", "unsupported_reason"]

# 0.5.17: the newest release pinned to torch 2.11 (our GPU machines), run for real there.
# 0.5.23: the current release; the CPU tests run against it. Both keep the hooked functions' names.
MIN_VERSION = "0.5.17"
MAX_VERSION = "0.5.23"


def installed_sglang_version() -> str | None:
    """The installed SGLang's version string, or None when SGLang is not installed."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        pass
    try:  # an unpacked tree without dist-info (sys.path only) still carries sglang.version
        from nsa_tp.integrations.sglang._compat import VERSION_MODULE, resolve

        return str(resolve(f"{VERSION_MODULE}.__version__"))
    except (ImportError, AttributeError):
        return None


def unsupported_reason(version: str | None) -> str | None:
    """None when ``version`` is inside ``MIN_VERSION..MAX_VERSION`` (inclusive), else one sentence why not.

    Pre-release and local tags (``0.5.23rc1``, ``0.5.17+cu130``) compare by their release numbers.
    """
    if version is None:
        return "SGLang is not installed"
    release = _release(version)
    if release is None:
        return f"SGLang reports version {version!r}, which is not a version number"
    lo, hi = _release(MIN_VERSION), _release(MAX_VERSION)
    if lo <= release <= hi:
        return None
    return (
        f"SGLang {version} is outside the range nsa-tp's plugin supports ({MIN_VERSION} to {MAX_VERSION}); "
        "the plugin stays off and SGLang runs unchanged"
    )


def _release(version: str) -> tuple[int, int, int] | None:
    """``"0.5.17.post1"`` -> ``(0, 5, 17)``; a missing micro counts as 0; None for a non-version."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
