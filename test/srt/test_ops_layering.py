"""``nsa_tp.ops`` is the ground floor: no module under ``python/nsa_tp/ops`` imports from a layer above it.

Walks the AST of every ``ops/**.py`` (module-level and function-local imports, absolute and relative), so a
lazy import inside a function is caught as well as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

OPS_DIR = Path(__file__).resolve().parents[2] / "python" / "nsa_tp" / "ops"
FORBIDDEN = ("nsa_tp.parallel", "nsa_tp.model", "nsa_tp.attention", "nsa_tp.token_parallel", "nsa_tp.integrations")


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names, resolved to an absolute dotted name (``root``
    is the folder holding the ``nsa_tp`` package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from nsa_tp import parallel` names the subpackage as an imported name.
            found += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
            found.append((node.lineno, mod))
    return found


def _upward_imports(path: Path, root: Path = OPS_DIR.parent.parent) -> list[str]:
    bad = []
    for line, mod in _imported_modules(path, root):
        if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
            bad.append(f"{path.relative_to(root).as_posix()}:{line} imports {mod}")
    return bad


def test_ops_imports_nothing_above_it():
    files = sorted(OPS_DIR.rglob("*.py"))
    assert len(files) > 10, f"expected the ops package under {OPS_DIR}"
    bad = [b for f in files for b in _upward_imports(f)]
    assert not bad, "ops must not import upward:\n" + "\n".join(bad)


def test_the_walker_catches_every_import_form(tmp_path):
    """The check can fail: absolute, from-, relative and function-local upward imports are all reported."""
    fake_ops = tmp_path / "nsa_tp" / "ops"
    (fake_ops / "sub").mkdir(parents=True)
    (fake_ops / "a.py").write_text("import nsa_tp.parallel.layout\n")
    (fake_ops / "b.py").write_text("def f():\n    from nsa_tp.model import attention\n")
    (fake_ops / "sub" / "c.py").write_text("from ...attention import indexer\n")
    (fake_ops / "d.py").write_text("from nsa_tp import integrations\n")
    (fake_ops / "e.py").write_text("from nsa_tp.ops import heads\nfrom . import kv_format\nimport torch\n")
    assert _upward_imports(fake_ops / "a.py", tmp_path) == ["nsa_tp/ops/a.py:1 imports nsa_tp.parallel.layout"]
    assert _upward_imports(fake_ops / "b.py", tmp_path)
    assert _upward_imports(fake_ops / "sub" / "c.py", tmp_path) == [
        "nsa_tp/ops/sub/c.py:1 imports nsa_tp.attention.indexer",
        "nsa_tp/ops/sub/c.py:1 imports nsa_tp.attention",
    ]
    assert _upward_imports(fake_ops / "d.py", tmp_path) == ["nsa_tp/ops/d.py:1 imports nsa_tp.integrations"]
    assert _upward_imports(fake_ops / "e.py", tmp_path) == []


def test_the_checker_is_public():
    from nsa_tp.ops import check

    assert set(check.__all__) >= {"check_tensor", "check_same_device", "host_ints"}
    assert not (OPS_DIR / "_check.py").exists()
