"""No two ctxforge modules import each other, directly or around a longer circle, at module level or inside a
function: a circle means two modules share one job (the fix is one owner, not a lazy import). Read from the
source with ast, over every package pyproject.toml installs."""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module_files() -> dict[str, pathlib.Path]:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup.get("package-dir", {})
    files = {}
    for package in setup["packages"]:
        parent = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len, default=None)
        folder = (ROOT / dirs[parent] / package[len(parent) + 1:].replace(".", "/") if parent
                  else ROOT / package.replace(".", "/"))
        for f in sorted(folder.glob("*.py")):
            files[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return files


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The ctxforge modules `name` imports anywhere in its file (`from pkg import mod` counts as mod)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph (Tarjan)."""
    files = _module_files()
    graph = {name: _imports(name, path, files) for name, path in files.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_finder_sees_a_circle(tmp_path, monkeypatch):
    """Negative control: two modules that import each other inside functions are found."""
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from ctxforge.demo import b\n")
    (pkg / "b.py").write_text("from ctxforge.demo.a import f\n")
    (pkg / "c.py").write_text("from ctxforge.demo import a\n")
    files = {f"ctxforge.demo.{p.stem}": p for p in pkg.glob("*.py")}
    monkeypatch.setattr(__import__(__name__), "_module_files", lambda: files)
    assert import_cycles() == [["ctxforge.demo.a", "ctxforge.demo.b"]]


def test_no_import_cycles_outside_the_synthesis_pipeline():
    cycles = [c for c in import_cycles() if not all(m.startswith("ctxforge.pipeline.") for m in c)]
    assert cycles == []


def test_no_import_cycles_in_the_synthesis_pipeline():
    assert import_cycles() == []
