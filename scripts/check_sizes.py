"""List modules over 450 lines and functions over 80 lines under python/nsa_tp (issue 22's size rule).

    python scripts/check_sizes.py            # prints each violation, exit 1 if any
    python scripts/check_sizes.py --all      # also functions over 60 lines (what is close)

A function's length counts its lines from ``def`` (decorators excluded) to its last line, nested functions
included; a module's counts every line. ``test/srt/test_sizes.py`` runs the same check in CI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

__all__ = ["MAX_MODULE_LINES", "MAX_FUNCTION_LINES", "violations"]

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
ROOT = Path(__file__).resolve().parent.parent / "python" / "nsa_tp"


def violations(root: Path = ROOT, max_module: int = MAX_MODULE_LINES,
               max_function: int = MAX_FUNCTION_LINES) -> list[str]:
    """One line per module over ``max_module`` lines and per function over ``max_function``, sorted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root.parent)
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines > max_module:
            found.append(f"{rel}: module has {lines} lines (> {max_module})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > max_function:
                    found.append(f"{rel}:{node.lineno}: function {node.name} has {n} lines (> {max_function})")
    return found


def main(argv: list[str]) -> int:
    strict = violations()  # what fails; --all also lists functions over 60 lines (the ones to watch)
    found = violations(max_function=60) if "--all" in argv else strict
    print("\n".join(found) or "no module over 450 lines, no function over 80")
    return 1 if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
