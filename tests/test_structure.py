"""The package's structure: no import cycles, and the wings that serve every method name none."""

from __future__ import annotations

import ast
from pathlib import Path

import headavatar

ROOT = Path(headavatar.__file__).parent
# what asks only the Avatar protocol (headavatar/methods/avatar.py)
METHOD_BLIND = ["export", "viewer", "report.py", "demo.py", "methods/evaluate.py", "methods/render.py"]
BUILTIN_METHODS = ("flashavatar", "flare")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every headavatar module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headavatar"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("headavatar")}
    return out


def test_no_import_cycles():
    graph = {_module(p): _imports(p) for p in ROOT.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_shared_wings_name_no_method():
    for rel in METHOD_BLIND:
        files = sorted((ROOT / rel).rglob("*.py")) if (ROOT / rel).is_dir() else [ROOT / rel]
        for f in files:
            bad = [d for d in _imports(f) if any(d.startswith(f"headavatar.methods.{m}") for m in BUILTIN_METHODS)]
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}: ask the Avatar protocol instead"
            src = f.read_text()
            assert not any(f'method == "{m}"' in src or f'method != "{m}"' in src for m in BUILTIN_METHODS), f"{f.relative_to(ROOT)} names a method"
