"""The plugin's log: its own stderr handler, so its lines reach the server log in every SGLang process.

SGLang's launcher loads plugins before it configures logging, and its subprocesses configure logging
after loading them; a handler of our own makes the "plugin loaded" line appear in each process anyway.
Every line starts with ``[nsa-tp pid=<pid>]`` so one grep proves which processes loaded the plugin.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading

from nsa_tp.integrations.sglang._compat import ROLE_FUNCTIONS

__all__ = ["logger", "first_time", "log_once", "process_role", "ROLE_FUNCTIONS"]

logger = logging.getLogger("nsa_tp.integrations.sglang")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[%(asctime)s] [nsa-tp pid=%(process)d] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # SGLang's root handler would print each line twice

_once_lock = threading.Lock()
_once_keys: set[str] = set()


def first_time(key: str) -> bool:
    """True exactly once per ``key`` in this process (thread-safe)."""
    with _once_lock:
        if key in _once_keys:
            return False
        _once_keys.add(key)
        return True


def log_once(key: str, msg: str, *args: object, level: int = logging.INFO) -> bool:
    """Log ``msg`` the first time ``key`` is seen in this process; True if it was logged now."""
    if not first_time(key):
        return False
    logger.log(level, msg, *args)
    return True


def process_role() -> str:
    """What this SGLang process is: scheduler (runs the model), dp_controller, detokenizer, launcher, or
    ``subprocess`` for a child we do not recognize (treated like a scheduler: it may run the model).

    Read from the call stack of ``load_plugins()``: SGLang names no role before it sets the process title.
    """
    frame = sys._getframe(1)
    while frame is not None:
        role = ROLE_FUNCTIONS.get(frame.f_code.co_name)
        if role is not None:
            return role
        frame = frame.f_back
    return "launcher" if multiprocessing.parent_process() is None else "subprocess"
