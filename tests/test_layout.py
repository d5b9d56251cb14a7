"""The package layout rules (docs/design.md): stage packages, no import circles, in-package
imports at the top of each file, no module over 400 lines, nothing heavy imported by `--help`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "idle_export"
PLUGINS = ROOT / "plugins"  # installed as idle_export.plugins
MAX_LINES = 400
# A module that imports one of these at its top is heavy: others may import it inside a function
# (or name it with idle_export.lazy.lazy_module), as they do the libraries themselves.
HEAVY_LIBS = {"torch", "triton", "timm", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx"}


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((PACKAGE, "idle_export"), (PLUGINS, "idle_export.plugins")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = f
    return mods


MODULES = _modules()


def _target(name: str, imported: str | None = None) -> str | None:
    """The module an import of `name` (or `from name import imported`) loads from the package."""
    if imported and f"{name}.{imported}" in MODULES:
        return f"{name}.{imported}"
    return name if name in MODULES else None


def _imports(module: str, path: Path) -> list[tuple[str, int, str]]:
    """(imported module, line, kind) for every in-package import; kind is "top" (module level),
    "inner" (inside a function or class) or "lazy" (a module-level lazy_module("…") call)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        names: list[str | None] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [_target(base, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [_target(a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [_target(node.args[0].value)]
        kind = "lazy" if isinstance(node, ast.Call) else "top" if id(node) in top else "inner"
        out += [(name, node.lineno, kind) for name in names if name and name != module]
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _is_heavy(path: Path) -> bool:
    for node in ast.parse(path.read_text()).body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n.split(".")[0] in HEAVY_LIBS for n in names):
            return True
    return False


HEAVY = {m for m, p in MODULES.items() if _is_heavy(p)}


def test_no_import_circle():
    edges = {m: {t for t, _, _ in imps} for m, imps in GRAPH.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in edges:
        if m not in index:
            visit(m)
    assert not cycles, f"import circles: {cycles}"


def test_in_package_imports_are_at_the_top():
    inner = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
             for m, imps in GRAPH.items() for t, line, kind in imps if kind == "inner" and t not in HEAVY]
    assert not inner, "in-package imports inside functions:\n" + "\n".join(inner)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (limit {MAX_LINES}): split it by step"


def test_help_imports_no_heavy_module():
    """What `idle-export --help` imports (cli and everything it imports at top level) is light."""
    seen, todo = set(), ["idle_export.cli"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t, _, kind in GRAPH.get(m, []) if kind == "top"]
    assert not seen & HEAVY, f"the CLI imports heavy modules at start-up: {sorted(seen & HEAVY)}"


def test_the_stage_packages_exist():
    for stage in ("model", "onnx", "runtime", "trt", "quantize", "bench", "serve", "cli", "parity",
                  "data"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    assert (PLUGINS / "__init__.py").is_file()


def test_pyproject_installs_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert folders == listed, f"pyproject.toml packages differ: {sorted(folders ^ listed)}"


def test_the_layout_checker_sees_circles_and_inner_imports(tmp_path):
    """The checker itself: a planted circle and a planted function-level import are found."""
    a = tmp_path / "a.py"
    a.write_text("from idle_export.errors import BadInputError\n\n"
                 "def f():\n    from idle_export import fileio\n")
    found = _imports("idle_export.x", a)
    assert ("idle_export.errors", 1, "top") in found
    assert ("idle_export.fileio", 4, "inner") in found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _documented_order() -> list[str]:
    """The top-level entries of docs/design.md's layout tree, in the order the doc lists them."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    top = [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line[2] != " "]
    return [name.removesuffix("/").removesuffix(".py") for name in top if name.endswith(("/", ".py"))]


def test_imports_follow_the_documented_stage_order():
    """docs/design.md's promise: a module imports only its own stage and the entries above it."""
    order = _documented_order()
    rank = {name: i for i, name in enumerate(order)}
    rank["plugins"], rank["__main__"] = -1, len(order)
    missing = sorted({_stage(m) for m in MODULES} - set(rank))
    assert not missing, f"docs/design.md's layout does not list {missing}"
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} ({_stage(t)} is listed below {_stage(m)})"
              for m, imps in GRAPH.items() for t, line, _ in imps
              if _stage(t) != _stage(m) and rank[_stage(t)] > rank[_stage(m)]]
    assert not upward, "imports against the stage order of docs/design.md:\n" + "\n".join(upward)


def test_the_stage_order_check_reads_the_doc_and_sees_an_upward_import(tmp_path):
    order = _documented_order()
    assert order[:2] == ["__init__", "errors"] and order[-1] == "cli"
    assert order.index("trt") < order.index("runtime") < order.index("parity") < order.index("serve")
    planted = tmp_path / "x.py"
    planted.write_text("from idle_export.runtime import base\n")
    (target, _, _), = _imports("idle_export.trt.x", planted)
    assert _stage(target) == "runtime" and order.index("runtime") > order.index("trt")
