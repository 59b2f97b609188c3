"""The API reference, read from the package at build time: one page per public namespace, listing its ``__all__``.

Nothing here names a function or a module of the package by hand: the namespaces are the subpackages (and
top-level modules) that define ``__all__``, found by walking ``scgpt_protocol``; each page lists that ``__all__``
in its order. A name exported by several namespaces (``sp.embed`` is ``sp.tl.embed``) is documented once, at its
*home*: the first namespace of :data:`HOME_ORDER` that exports the same object; every other listing links there.

No Sphinx import at module level: ``tests/test_docs.py`` runs :func:`write_api_pages` without Sphinx.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import types
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "scgpt_protocol"

#: the namespaces shown first, in this order (scanpy's pp / tl / pl, then the run and the model); any other
#: namespace follows in the order of the walk
PAGE_ORDER = ("", "pp", "tl", "pl", "metrics", "protocol", "model", "data", "annotate", "evaluate", "adapt", "core")
#: where a name exported by several namespaces is documented: the first of these that exports it (the
#: scanpy-style namespaces first, then the layers from the top down, the package's top level last)
HOME_ORDER = ("pp", "tl", "pl", "metrics", "protocol", "model", "data", "annotate", "evaluate", "adapt", "core", "")

#: how each known namespace is titled ("sp" is ``import scgpt_protocol as sp``)
TITLES = {
    "": "Top level",
    "pp": "Preprocessing",
    "tl": "Tools",
    "pl": "Plotting",
    "metrics": "Metrics",
    "protocol": "The run",
    "model": "The model",
    "data": "Data",
    "annotate": "Annotation",
    "evaluate": "Evaluation",
    "adapt": "Adaptation (fine-tuning)",
    "core": "Core",
}


@dataclass
class Entry:
    """One name of a namespace's ``__all__``."""

    name: str
    kind: str  # "module", "class", "function", "data"
    home: str = ""  # full dotted name where it is documented


@dataclass
class Namespace:
    """A public namespace: its module name, its ``__all__`` and the docstring of its ``__init__``."""

    module: str
    doc: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def short(self) -> str:
        """'' for the package itself, 'pp', 'protocol.run', ..."""
        return self.module[len(PACKAGE) + 1:] if self.module != PACKAGE else ""

    @property
    def alias(self) -> str:
        return "sp" if not self.short else f"sp.{self.short}"

    @property
    def heading(self) -> str:
        """'Tools: ``sp.tl``'; a namespace without a title in :data:`TITLES`: its name alone."""
        title = TITLES.get(self.short)
        return f"{title}: ``{self.alias}``" if title else f"``{self.alias}``"

    @property
    def page(self) -> str:
        return self.module


def _kind(obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _walk() -> list[str]:
    """Dotted short names of the package, its top-level modules and every (sub)package below it."""
    root = importlib.import_module(PACKAGE)
    found = [""]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{PACKAGE}."):
        short = info.name[len(PACKAGE) + 1:]
        if any(part.startswith("_") for part in short.split(".")):
            continue
        if info.ispkg or "." not in short:  # packages at any depth; plain modules only at the top
            found.append(short)
    return found


def namespaces() -> list[Namespace]:
    """Every public namespace (one that defines ``__all__``), in page order, with its entries and their homes."""
    spaces = {}
    for short in _walk():
        module = importlib.import_module(f"{PACKAGE}.{short}" if short else PACKAGE)
        names = getattr(module, "__all__", None)
        if names is None:
            continue
        spaces[short] = Namespace(module.__name__, inspect.getdoc(module) or "")
        for name in names:
            spaces[short].entries.append(Entry(name, _kind(getattr(module, name))))

    def rank(short: str, order: tuple[str, ...]) -> tuple[int, str]:
        top = short.split(".")[0] if short else ""
        return (order.index(top) if top in order else len(order), short)

    ordered = [spaces[s] for s in sorted(spaces, key=lambda s: rank(s, PAGE_ORDER))]
    homes: dict[tuple[str, int], str] = {}
    for ns in sorted(ordered, key=lambda n: rank(n.short, HOME_ORDER)):
        module = importlib.import_module(ns.module)
        for entry in ns.entries:
            if entry.kind == "module":
                entry.home = getattr(module, entry.name).__name__
                continue
            key = (entry.name, id(getattr(module, entry.name)))
            entry.home = homes.setdefault(key, f"{ns.module}.{entry.name}")
    return ordered


def _underline(text: str, char: str) -> list[str]:
    return [text, char * len(text)]


def namespace_page(ns: Namespace) -> str:
    """The reStructuredText of one namespace's page: its docstring, then one autosummary row per ``__all__`` name
    (a module: a link to its page; anything else: a row linked to the page of its home)."""
    lines = [f".. _api-{ns.short or 'top'}:", ""]
    lines += _underline(ns.heading, "=")
    lines += [""]
    if ns.doc:
        lines += [ns.doc, ""]
    modules = [e for e in ns.entries if e.kind == "module"]
    if modules:
        lines += ["Namespaces:", ""]
        lines += [f"- :doc:`{m.home}` (``{ns.alias}.{m.name}``)" for m in modules] + [""]
    others = [e for e in ns.entries if e.kind != "module"]
    elsewhere = [e for e in others if e.home != f"{ns.module}.{e.name}"]
    if elsewhere:
        lines += [f"{len(elsewhere)} of the {len(others)} names below are documented where they are also "
                  "exported; their rows link there.", ""]
    if others:
        lines += [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
        lines += [f"   ~{e.home}" for e in others] + [""]
    return "\n".join(lines)


def index_page(spaces: list[Namespace]) -> str:
    lines = _underline("API reference", "=")
    lines += ["", "Generated from the package when the documentation is built: one page per public namespace, "
              "each listing that namespace's ``__all__`` (``import scgpt_protocol as sp``). A name exported "
              "by several namespaces is documented once and listed in each.", ""]
    lines += [".. list-table::", "   :header-rows: 1", "", "   * - namespace", "     - names", "     - what it holds"]
    for ns in spaces:
        first = ns.doc.split("\n\n")[0].replace("\n", " ")
        lines += [f"   * - :doc:`{ns.alias} <{ns.page}>`", f"     - {len(ns.entries)}", f"     - {first}"]
    lines += ["", ".. toctree::", "   :hidden:", ""] + [f"   {ns.page}" for ns in spaces] + [""]
    return "\n".join(lines)


def write_api_pages(outdir: Path) -> list[Namespace]:
    """Write ``index.rst`` and one ``<module>.rst`` per namespace into ``outdir`` (files that would not change
    are left alone, so that Sphinx rebuilds nothing it need not); returns the namespaces."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    spaces = namespaces()
    pages = {"index.rst": index_page(spaces)}
    pages.update({f"{ns.page}.rst": namespace_page(ns) for ns in spaces})
    for stale in outdir.glob("*.rst"):
        if stale.name not in pages:
            stale.unlink()
    for name, text in pages.items():
        path = outdir / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return spaces


# --- where a lazily exported constant is defined (for its ``#:`` comment) ---------------------------------------

def _lazy_map(module: str) -> dict[str, str]:
    """name -> defining module, read from the ``lazy_exports(__name__, {...})`` call of a package's ``__init__``
    (a dict literal, or a module-level name bound to one)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
        return {}
    tree = ast.parse(Path(spec.origin).read_text())
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) > 1:
            arg = node.args[1]
            arg = assigned.get(arg.id, arg) if isinstance(arg, ast.Name) else arg
            if isinstance(arg, ast.Dict):
                mapping = ast.literal_eval(arg)
                return {k: importlib.util.resolve_name(f".{v}", module) for k, v in mapping.items()}
    return {}


def defining_module(module: str, name: str) -> str | None:
    """The module that defines ``module.name`` when ``module`` re-exports it lazily (followed through
    re-exports of re-exports); None when ``module`` defines it itself."""
    seen = set()
    target = None
    while module not in seen:
        seen.add(module)
        nxt = _lazy_map(module).get(name)
        if nxt is None:
            break
        target = module = nxt
    return target
