"""The package's import rules: the architecture as the imports show it.

Read statically from the source (every import statement, lazy ones inside functions included, except
those under `if TYPE_CHECKING:`), so a rule cannot pass because a module happened not to be loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"streamvlm": ROOT / "streamvlm", "streamvlm.routers": ROOT / "routers", "streamvlm.train": ROOT / "train"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(name.startswith(other + ".") or name == other for other in PACKAGES if other != package
                   and other.startswith(package + ".")):
                continue  # streamvlm/ has no routers/ or train/ folder, but be safe
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ours that `path` imports (resolved to the longest known module name)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = None


def graph() -> dict[str, set[str]]:
    global GRAPH
    if GRAPH is None:
        modules = _modules()
        GRAPH = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    return GRAPH


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            # A package's __init__ importing its own submodule is how a package exposes it, not a loop.
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    g = {v: {w for w in ws if not (w == "streamvlm")} for v, ws in graph().items()}  # the package face
    assert _cycles(g) == []


def test_the_checker_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _importers(prefix: str) -> dict[str, set[str]]:
    return {v: {w for w in ws if w == prefix or w.startswith(prefix + ".")} for v, ws in graph().items()}


def test_routers_import_nothing_from_train_serve_or_a_family_adapter():
    bad = {v: ws for v, ws in graph().items() if v.startswith("streamvlm.routers")
           for ws in [{w for w in ws if w.startswith(("streamvlm.train", "streamvlm.serve", "streamvlm.models",
                                                       "streamvlm.cli", "streamvlm.bench"))}] if ws}
    assert bad == {}


def test_sources_never_import_the_world_or_the_runtime():
    bad = {v: ws for v, ws in graph().items() if v.startswith("streamvlm.video")
           for ws in [{w for w in ws if w.startswith(("streamvlm.world", "streamvlm.session", "streamvlm.runtime",
                                                       "streamvlm.bench", "streamvlm.serve"))}] if ws}
    assert bad == {}


def test_the_runtime_never_imports_train():
    bad = {v: ws for v, ws in graph().items() if not v.startswith(("streamvlm.train", "streamvlm.cli"))
           for ws in [{w for w in ws if w.startswith("streamvlm.train")}] if ws}
    assert bad == {}


def test_the_runtime_loads_no_lightning():
    code = ("import sys, streamvlm, streamvlm.runtime, streamvlm.session, streamvlm.cli, streamvlm.serve.app, "
            "streamvlm.routers, streamvlm.live, streamvlm.caption\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
