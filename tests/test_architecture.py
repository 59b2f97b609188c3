"""The package's import structure: layers that import one way only, no circles, no private names across
modules, and size limits that keep every module and function readable.

The layer order is written once, here, and drawn on the documentation's architecture page
(docs/user-guide/architecture.md, generated from ``LAYERS`` when the site is built).
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scgpt_protocol"
NAME = PACKAGE.name

#: lowest first; a module may import from its own package and from packages of lower layers only.
#: Packages that share a layer (pp, adapt, annotate) do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("data",),
    ("metrics",),
    ("model",),
    ("pp", "adapt", "annotate"),
    ("evaluate",),
    ("pl",),
    ("tl",),  # the scanpy-style namespace (re-exports) and the in-process API (tl.annotation)
    ("protocol",),
    ("__init__", "__main__"),  # the package's namespace and entry point: they only re-export and call
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

MAX_MODULE_LINES = 600
#: what a reader holds of a function: its statements (a docstring is not one; ruff's PLR0915 counts the same way)
MAX_STATEMENTS = 60
#: parameters passed by position (keyword-only ones are named at every call), as ruff's PLR0917 counts them
MAX_POSITIONAL = 8
#: parameters of a private helper in all: more means it takes an object's fields one by one (pass the object)
MAX_PRIVATE_PARAMETERS = 8


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_protocol" in path.relative_to(PACKAGE).parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """The top-level part below the package: 'scgpt_protocol.pp.stream' -> 'pp'; the root -> '__init__'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(target module, imported name or '', line) for every import of this package in module, at any depth
    (inside functions and TYPE_CHECKING blocks too: they are dependencies all the same)."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == NAME]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != NAME:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (source, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unknown = sorted({_package(m) for m in MODULES} - set(RANK))
    assert not unknown, f"packages missing from LAYERS: {unknown}"


def test_no_import_circles():
    assert _cycles(_graph()) == []


def _upward(imports: dict[str, list[tuple[str, str, int]]]) -> list[str]:
    """Imports of a package of the same or a higher layer (a sibling, or upward)."""
    found = []
    for module, targets in imports.items():
        here = _package(module)
        for target, name, line in targets:
            there = _package(target)
            if there != here and RANK[there] >= RANK[here]:
                found.append(f"{module}:{line} imports {target} {name}".rstrip())
    return found


def _private(imports: dict[str, list[tuple[str, str, int]]]) -> list[str]:
    """Private names imported from another module, and private modules imported from another package."""
    found = []
    for module, targets in imports.items():
        for target, name, line in targets:
            if name.startswith("_") and not name.startswith("__") and target != module:
                found.append(f"{module}:{line} imports {target}.{name}")
            private_module = any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:])
            if private_module and _package(target) != _package(module):
                found.append(f"{module}:{line} imports the private module {target}")
    return found


IMPORTS = {m: _imports(m) for m in MODULES}


def test_imports_run_downward_only():
    assert _upward(IMPORTS) == []


def test_no_private_names_across_modules():
    assert _private(IMPORTS) == []


def _statements(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Statements in a function's body, nested ones included, its docstring and nested functions' own not."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    count = 0
    stack = list(body)
    while stack:
        stmt = stack.pop()
        count += 1
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # measured on its own
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                stack.append(child)
            elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                stack.extend(child.body)
    return count


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    """(parameters passed by position, parameters in all), ``self`` / ``cls`` not counted."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    if positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional), len(positional) + len(args.kwonlyargs)


def test_modules_and_functions_stay_readable():
    too_big = []
    for module, path in MODULES.items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = f"{module}.{node.name}"
            statements = _statements(node)
            positional, total = _parameters(node)
            private = node.name.startswith("_") and not node.name.endswith("__")
            if statements > MAX_STATEMENTS:
                too_big.append(f"{name}: {statements} statements")
            if positional > MAX_POSITIONAL:
                too_big.append(f"{name}: {positional} positional parameters")
            if private and total > MAX_PRIVATE_PARAMETERS:
                too_big.append(f"{name}: a private helper with {total} parameters")
    assert too_big == []


def test_statement_count_skips_docstrings():
    tree = ast.parse('''
def f(a, b, *, c):
    """A docstring of many lines
    is not a statement."""
    if a:
        return b
    return c
''')
    node = tree.body[0]
    assert _statements(node) == 3
    assert _parameters(node) == (2, 3)


def _line_length() -> int:
    """``[tool.ruff] line-length`` of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    import re

    found = re.search(r"^line-length\s*=\s*(\d+)", (PACKAGE.parent / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "pyproject.toml sets no [tool.ruff] line-length"
    return int(found.group(1))


def test_lines_fit_the_configured_length():
    """The line length of pyproject.toml (ruff's E501 is on there) holds for the package, tests and benchmarks."""
    limit = _line_length()
    long_lines = []
    for folder in ("scgpt_protocol", "tests", "benchmarks"):
        for path in sorted((PACKAGE.parent / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if len(line) > limit:
                    long_lines.append(f"{path.relative_to(PACKAGE.parent)}:{number} ({len(line)})")
    assert long_lines == [], f"{len(long_lines)} lines over {limit} columns"


def test_no_package_exports_a_name_of_its_own_modules():
    """A module named like a function its package exports (pp/prepare.py and pp.prepare) would shadow the
    function as soon as the module is imported: ``scgpt_protocol.pp.prepare`` would then be the module."""
    import importlib

    clashes = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(module)
        submodules = {p.stem for p in path.parent.glob("*.py")}
        submodules |= {p.parent.name for p in path.parent.glob("*/__init__.py")}
        for name in set(getattr(package, "__all__", [])) & submodules:
            # what the package's lazy export gives for the name, whether or not the module was imported
            value = package.__getattr__(name) if hasattr(package, "__getattr__") else getattr(package, name)
            if not isinstance(value, types.ModuleType):  # a subpackage exported as such (sp.pp) is fine
                clashes.append(f"{module}.{name}")
    assert clashes == []


def test_every_exported_name_resolves():
    """Each package re-exports its public names lazily; every one of them (and the top-level ones) imports."""
    import importlib

    missing = []
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            package = importlib.import_module(module)
            missing += [f"{module}.{n}" for n in getattr(package, "__all__", []) if not hasattr(package, n)]
    assert missing == []


@pytest.mark.parametrize("rule", ["cycle", "upward", "private"])
def test_the_checks_catch_what_they_are_for(rule):
    """The rules above fail on made-up imports that break them (so a passing run means something)."""
    p = NAME
    if rule == "cycle":
        assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    elif rule == "upward":
        made_up = {
            f"{p}.core.io": [(f"{p}.model.scgpt", "ScGPT", 3), (f"{p}.core.errors", "DiskFullError", 4)],
            f"{p}.pp.stream": [(f"{p}.adapt.train", "finetune", 5), (f"{p}.data.read", "open_lazy", 6)],
        }
        assert _upward(made_up) == [f"{p}.core.io:3 imports {p}.model.scgpt ScGPT",
                                    f"{p}.pp.stream:5 imports {p}.adapt.train finetune"]
    else:
        made_up = {f"{p}.pp.stream": [(f"{p}.pp.stages", "_warn", 7), (f"{p}.pp.stages", "warn_user", 8),
                                      (f"{p}.data._h5", "read", 9)]}
        assert _private(made_up) == [f"{p}.pp.stream:7 imports {p}.pp.stages._warn",
                                     f"{p}.pp.stream:9 imports the private module {p}.data._h5"]
