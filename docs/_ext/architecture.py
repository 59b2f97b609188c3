"""The architecture page's tables, read from the code when the documentation is built.

The layer order is the one ``tests/test_architecture.py`` enforces (its ``LAYERS``, read from the source, not
imported); each layer's packages and modules are found on disk, each described by the first sentence of its
docstring. Nothing is imported, so a module's heavy dependencies play no part.

No Sphinx import here: ``tests/test_docs.py`` calls it without Sphinx.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "scgpt_protocol"
ARCHITECTURE_TEST = ROOT / "tests" / "test_architecture.py"


def layers(test_file: Path = ARCHITECTURE_TEST) -> list[tuple[str, ...]]:
    """``LAYERS`` of the architecture test, lowest first."""
    tree = ast.parse(test_file.read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "LAYERS":
            return [tuple(layer) for layer in ast.literal_eval(node.value)]
    msg = f"no LAYERS in {test_file}"
    raise LookupError(msg)


def first_sentence(doc: str | None) -> str:
    """The docstring's first sentence (up to the first '. ' or ': ' that ends it, or its first paragraph)."""
    if not doc:
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    masked = re.sub(r"`[^`]*`", lambda m: "x" * len(m.group()), para)  # never end inside ``code`` or a role
    match = re.search(r"(?<![ .][a-z])\.(\s|$)", masked)
    return para[: match.start() + 1] if match else para


def _doc(path: Path) -> str | None:
    return ast.get_docstring(ast.parse(path.read_text()))


@dataclass
class Part:
    """A package (or a top-level module) of the package, with the modules below it."""

    name: str  # 'pp', 'metrics', 'protocol'
    path: Path
    summary: str
    modules: list[tuple[str, str]] = field(default_factory=list)  # (dotted name below the part, summary)
    lines: int = 0

    @property
    def is_package(self) -> bool:
        return self.path.is_dir()


def parts(package_dir: Path = PACKAGE_DIR) -> dict[str, Part]:
    """Every public package and top-level module of the package, by name."""
    found = {}
    for path in sorted(package_dir.iterdir()):
        name = path.stem
        if name.startswith("_"):
            continue
        if path.is_dir() and (path / "__init__.py").is_file():
            part = Part(name, path, first_sentence(_doc(path / "__init__.py")))
            for module in sorted(path.rglob("*.py")):
                rel = module.relative_to(path).with_suffix("")
                if any(p.startswith("_") for p in rel.parts[:-1]):
                    continue
                part.lines += len(module.read_text().splitlines())
                if rel.name == "__init__":
                    if rel.parent.parts:  # a subpackage: described by its __init__
                        part.modules.append((".".join(rel.parent.parts) + "/", first_sentence(_doc(module))))
                    continue
                part.modules.append((".".join(rel.parts), first_sentence(_doc(module))))
            found[name] = part
        elif path.suffix == ".py" and path.is_file():
            found[name] = Part(name, path, first_sentence(_doc(path)), lines=len(path.read_text().splitlines()))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def layer_diagram(order: list[tuple[str, ...]]) -> str:
    """``core < data < ... < protocol``: a layer of several packages joined with ``|``."""
    return " < ".join(" | ".join(layer) for layer in order)


def architecture_rst(order: list[tuple[str, ...]] | None = None, found: dict[str, Part] | None = None) -> str:
    """reStructuredText for the architecture page: the layer line, then one table row per layer's package
    (lowest first) with its docstring and modules, then anything the layers do not name."""
    order = layers() if order is None else order
    found = parts() if found is None else found
    packages = [name for layer in order for name in layer if name in found]
    lines = ["::", "", "   " + layer_diagram([tuple(n for n in layer if n in found) for layer in order
                                               if any(n in found for n in layer)]), ""]
    lines += [".. list-table::", "   :header-rows: 1", "   :widths: 12 6 32 50", "",
              "   * - layer", "     - lines", "     - what it holds", "     - modules"]
    for name in packages:
        part = found[name]
        rank = next(i for i, layer in enumerate(order) if name in layer)
        label = f"``{name}/``" if part.is_package else f"``{name}.py``"
        lines += [f"   * - {label} ({rank})", f"     - {part.lines:,}", f"     - {_cell(part.summary)}"]
        if part.modules:
            for i, (module, summary) in enumerate(part.modules):
                lines += [("     - - " if i == 0 else "       - ") + f"``{module}``: {_cell(summary)}"]
        else:
            lines += ["     - (one module)"]
    unplaced = sorted(set(found) - set(packages))
    if unplaced:  # the architecture test fails on these too; listed so that the page is never silently short
        lines += ["", "Not in any layer (the architecture test fails on these): "
                  + ", ".join(f"``{n}``" for n in unplaced)]
    return "\n".join(lines) + "\n"
