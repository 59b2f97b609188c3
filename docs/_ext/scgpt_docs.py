"""This project's Sphinx extension: the pages that are generated from the code and the demo run.

- ``config-inited``: writes ``api/*.rst`` from each namespace's ``__all__`` (:mod:`api_listing`; autosummary
  then writes one page per documented name) and copies the executed reports of the demo run into
  ``tutorials/generated/`` (their set-up and parameter cells collapsed as in the HTML reports).
- ``autodoc-process-docstring``: a constant re-exported lazily (``sp.adapt.STRATEGIES``) is described by the
  ``#:`` comment where it is defined, never by the docstring of its type (``tuple``, ``str``).
- the ``scgpt-architecture`` directive: the layer table of the architecture page (:mod:`architecture`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from docutils import nodes
from docutils.parsers.rst.states import RSTState
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import api_listing
import architecture

logger = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parents[1]
#: the executed notebooks rendered as the tutorials, in their order
TUTORIALS = ("01_preprocess", "02_finetune", "03_evaluate", "04_zeroshot")
#: cells whose code the tutorials hide (their output stays), as the run's HTML reports do
COLLAPSED_TAGS = ("parameters", "injected-parameters", "setup")


def reports_dir() -> Path:
    """Where the demo run's executed reports are: ``$SCGPT_DOCS_REPORTS``, else ``runs/demo/reports``."""
    env = os.environ.get("SCGPT_DOCS_REPORTS")
    return Path(env) if env else DOCS.parent / "runs" / "demo" / "reports"


def copy_tutorials(source: Path, target: Path) -> list[Path]:
    """The executed reports as tutorial notebooks: set-up and parameter code hidden, outputs kept as they are
    (nothing is executed: ``nb_execution_mode = "off"``)."""
    missing = [s for s in TUTORIALS if not (source / f"{s}.ipynb").is_file()]
    if missing:
        msg = (f"the tutorials are the demo run's executed reports, and {source} lacks "
               f"{', '.join(m + '.ipynb' for m in missing)}: run `make demo` (or `make docs`, which runs it "
               "when they are missing), or set SCGPT_DOCS_REPORTS to a run's reports/ folder")
        raise ExtensionError(msg)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for step in TUTORIALS:
        nb = nbformat.read(source / f"{step}.ipynb", as_version=4)
        _consecutive_headings(nb)
        for cell in nb.cells:
            tags = cell.get("metadata", {}).get("tags", [])
            if cell.cell_type == "code" and set(tags) & set(COLLAPSED_TAGS) and "remove-input" not in tags:
                cell.metadata["tags"] = [*tags, "remove-input"]
        path = target / f"{step}.ipynb"
        text = nbformat.writes(nb)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def _consecutive_headings(nb) -> None:
    """Headings that never skip a level (the notebooks go from ``#`` to ``### Step 1``; a page's contents need
    each level in turn): a heading deeper than one below the previous one is raised to that."""
    previous = 0
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.splitlines()
        fence = False
        for i, line in enumerate(lines):
            fence ^= line.lstrip().startswith("```")
            match = None if fence else re.match(r"(#{1,6}) ", line)
            if match:
                level = min(len(match.group(1)), previous + 1)
                lines[i] = "#" * level + line[len(match.group(1)):]
                previous = level
        cell.source = "\n".join(lines)


def _generate(app: Sphinx, config: object = None) -> None:  # noqa: ARG001 (Sphinx's signature)
    api_listing.write_api_pages(Path(app.srcdir) / "api")
    copy_tutorials(reports_dir(), Path(app.srcdir) / "tutorials" / "generated")


def _builtin_doc(obj: object) -> str | None:
    """The docstring an instance inherits from a builtin type (``str``, ``tuple``, ``dict``), if that is all it has."""
    doc = getattr(type(obj), "__doc__", None)
    return doc if type(obj).__module__ == "builtins" and doc and getattr(obj, "__doc__", None) == doc else None


def _comment_docstring(app, what, name, obj, options, lines) -> None:  # noqa: ARG001 (Sphinx's signature)
    if what not in ("data", "attribute"):
        return
    inherited = _builtin_doc(obj)
    first = next((line.strip() for line in lines if line.strip()), "")
    if inherited is not None and (not first or first in inherited):
        module, _, attr = name.rpartition(".")
        lines[:] = _module_comment(module, attr)


#: objects already warned about (autosummary reads a docstring once for each listing of the name)
_WARNED: set[str] = set()
#: a ``:param NAME:`` napoleon wrote whose NAME is no parameter name: prose inside a Parameters section
_PROSE_PARAM = re.compile(r":param (?![\\*]*[A-Za-z_]\w*(?:, [\\*]*[A-Za-z_]\w*)*:)([^:]+):")


def _check_sections(app, what, name, obj, options, lines) -> None:  # noqa: ARG001 (Sphinx's signature)
    """Warn (an error under ``-W``) when a numpydoc Parameters section runs on into prose: numpydoc has no
    end to a section but the next header, so a paragraph after the last parameter becomes parameters named
    by its words. Such a paragraph belongs under ``Notes``."""
    for line in lines:
        match = _PROSE_PARAM.match(line)
        if match and name not in _WARNED:
            _WARNED.add(name)
            logger.warning("%s: %r is read as a parameter; prose after the Parameters belongs under a "
                           "'Notes' header", name, match.group(1)[:60], type="scgpt_docs", subtype="numpydoc")
            return


def _module_comment(module: str, attr: str) -> list[str]:
    """The ``#:`` comment above ``attr`` where it is defined (followed through lazy re-exports)."""
    from sphinx.pycode import ModuleAnalyzer, PycodeError

    where = api_listing.defining_module(module, attr) or module
    try:
        docs = ModuleAnalyzer.for_module(where).find_attr_docs()
    except PycodeError:
        return []
    return list(docs.get(("", attr), []))


class ArchitectureDirective(SphinxDirective):
    """``scgpt-architecture``: the layers, their packages and modules, as the code has them today."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(architecture.ARCHITECTURE_TEST))
        for path in sorted(architecture.PACKAGE_DIR.rglob("*.py")):
            self.env.note_dependency(str(path))
        if not isinstance(self.state, RSTState):  # MyST would read the table as Markdown, silently wrong
            raise self.error("scgpt-architecture writes reStructuredText: on a MyST page, put it in an "
                             "{eval-rst} block")
        container = nodes.container()
        text = architecture.architecture_rst()
        self.state.nested_parse(StringList(text.splitlines(), source="scgpt-architecture"),
                                self.content_offset, container)
        return container.children


def setup(app: Sphinx) -> dict[str, object]:
    # before Sphinx lists the source files (autosummary writes its pages from that list at builder-inited)
    app.connect("config-inited", _generate)
    app.connect("autodoc-process-docstring", _comment_docstring)
    app.connect("autodoc-process-docstring", _check_sections, priority=900)  # after napoleon (500)
    app.add_directive("scgpt-architecture", ArchitectureDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

