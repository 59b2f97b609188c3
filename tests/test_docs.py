"""The documentation (issue 28): the API pages cover every public name, the architecture page every module, the
README stays short and its links lead to pages that exist. No Sphinx build here (``make docs`` does that, in CI).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import scgpt_protocol

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 8192
sys.path.insert(0, str(DOCS / "_ext"))

import api_listing  # noqa: E402  (docs/_ext: no Sphinx import)
import architecture  # noqa: E402

#: the namespaces the API reference must have a page for, whatever else the walk finds
REQUIRED = ("", "pp", "tl", "pl", "metrics", "protocol", "model", "data", "annotate", "evaluate", "adapt", "core")


def _public_namespaces() -> dict[str, object]:
    """Every importable public package of scgpt_protocol (and top-level module) that defines ``__all__``,
    found independently of the generator."""
    found = {"": scgpt_protocol}
    for info in pkgutil.walk_packages(scgpt_protocol.__path__, prefix="scgpt_protocol."):
        short = info.name.removeprefix("scgpt_protocol.")
        if any(p.startswith("_") for p in short.split(".")) or not (info.ispkg or "." not in short):
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            found[short] = module
    return found


@pytest.fixture(scope="module")
def api_pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("api")
    api_listing.write_api_pages(out)
    return {p.stem: p.read_text() for p in out.glob("*.rst")}


def _resolve(dotted: str) -> object:
    """The object at a dotted name of the package, through its lazy exports."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


def test_api_reference_lists_every_public_name(api_pages):
    spaces = _public_namespaces()
    assert set(REQUIRED) <= set(spaces)
    index = api_pages["index"]
    for short, module in spaces.items():
        page = api_pages.get(module.__name__)
        assert page is not None, f"no API page for {module.__name__}"
        assert f"   {module.__name__}\n" in index, f"{module.__name__} is not in the API index's toctree"
        rows = re.findall(r"^   ~(\S+)$", page, flags=re.M)
        links = re.findall(r"^- :doc:`(\S+)`", page, flags=re.M)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type(scgpt_protocol)):
                assert obj.__name__ in links, f"{module.__name__}: namespace {name} is not linked"
                continue
            homes = [r for r in rows if r.rsplit(".", 1)[1] == name and _resolve(r) is obj]
            assert len(homes) == 1, f"{module.__name__}.{name} is listed {len(homes)} times on its page"
        assert len(rows) == len([n for n in module.__all__ if not isinstance(getattr(module, n), type(sys))])


def test_a_name_is_documented_once_where_it_is_exported(api_pages):
    """Each object has one home, a namespace that exports it, and every listing of it links there."""
    homes: dict[tuple[str, int], set[str]] = {}  # by name and object (small ints are one object)
    for module in _public_namespaces().values():
        for name in module.__all__:
            obj = getattr(module, name)
            if not isinstance(obj, type(sys)):
                homes.setdefault((name, id(obj)), set())
    rows = {r for page in api_pages.values() for r in re.findall(r"^   ~(\S+)$", page, flags=re.M)}
    for row in rows:
        homes.setdefault((row.rsplit(".", 1)[1], id(_resolve(row))), set()).add(row)
    assert all(len(h) == 1 for h in homes.values()), [h for h in homes.values() if len(h) != 1]
    tl = next(ns for ns in api_listing.namespaces() if ns.short == "tl")
    assert all(e.home.startswith("scgpt_protocol.tl.") for e in tl.entries)  # scanpy's names where scanpy has them


def test_architecture_page_names_every_module():
    text = architecture.architecture_rst()
    order = architecture.layers()
    for layer in order:  # the line at the top is the test's LAYERS, packages that exist
        for name in layer:
            if not name.startswith("_"):
                assert name in text
    for path in sorted((ROOT / "scgpt_protocol").rglob("*.py")):
        rel = path.relative_to(ROOT / "scgpt_protocol")
        if rel.parts[0].startswith("_") or rel.name in ("__init__.py",) and len(rel.parts) == 1:
            continue
        if len(rel.parts) == 1:  # a top-level module: a row of its own
            assert f"``{rel.name}``" in text, rel
            continue
        below = rel.relative_to(rel.parts[0]).with_suffix("")
        dotted = ".".join(below.parent.parts) + "/" if below.name == "__init__" else ".".join(below.parts)
        if dotted == "/":  # the package's own __init__: its row
            assert f"``{rel.parts[0]}/``" in text, rel
            continue
        assert f"``{dotted}``" in text, rel


def test_architecture_summaries_are_first_sentences():
    assert architecture.first_sentence("One thing. Then more.\n\nOther") == "One thing."
    assert architecture.first_sentence("Files: ``a.b`` and e.g. this.") == "Files: ``a.b`` and e.g. this."
    assert architecture.first_sentence("See :func:`~a.b. c` here. More.") == "See :func:`~a.b. c` here."
    assert architecture.first_sentence(None) == ""


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes (at most {README_MAX_BYTES:,}): move text to docs/"


def _slug(heading: str) -> str:
    """The anchor GitHub and MyST (``myst_heading_anchors``) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _local_links(page: Path) -> list[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    out = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        out.append((target, anchor))
    return out


def test_readme_links_lead_to_existing_pages():
    links = _local_links(README)
    assert links, "the README links to the documentation pages"
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path), f"README links to {target}#{anchor}: no such heading"


def test_every_user_guide_page_is_linked_from_the_readme_and_the_index():
    """What left the README has a page, and the README (and the site's index) lead to each."""
    readme_targets = {t for t, _ in _local_links(README)}
    index = (DOCS / "index.md").read_text()
    for page in sorted((DOCS / "user-guide").glob("*.md")):
        assert page.relative_to(ROOT).as_posix() in readme_targets, f"the README does not link to {page.name}"
        assert f"user-guide/{page.stem}\n" in index, f"{page.name} is in no toctree of docs/index.md"


def test_links_between_pages_lead_somewhere():
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts or "generated" in page.parts:
            continue
        for target, anchor in _local_links(page):
            if target.startswith("../api/") or target.startswith("api/"):  # generated by the build
                continue
            path = (page.parent / target) if target else page
            assert path.is_file() or path.with_suffix(".md").is_file(), f"{page.relative_to(ROOT)}: {target}"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{page.relative_to(ROOT)}: {target}#{anchor}"


def test_docs_packages_are_in_the_tested_set():
    """``make install`` installs the docs extra from constraints/py3.11.txt: every package of it is pinned there,
    in its range."""
    from packaging.requirements import Requirement

    from scgpt_protocol.core.versions import canonical_name, read_constraints

    tomllib = pytest.importorskip("tomllib")
    tested = read_constraints(ROOT / "constraints" / "py3.11.txt")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["docs"]
    for requirement in map(Requirement, extras["docs"]):
        name = canonical_name(requirement.name)
        assert name in tested, name
        assert requirement.specifier.contains(tested[name]), (name, tested[name], str(requirement.specifier))


def test_tutorial_copies_hide_set_up_code_and_keep_headings_in_order(tmp_path):
    pytest.importorskip("sphinx")
    import nbformat
    import scgpt_docs

    source = tmp_path / "reports"
    source.mkdir()
    for step in scgpt_docs.TUTORIALS:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {step}"),
                    nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_markdown_cell("### Step 1\n```\n### not a heading\n```"),
                    nbformat.v4.new_markdown_cell("## Next")]
        nbformat.write(nb, source / f"{step}.ipynb")
    written = scgpt_docs.copy_tutorials(source, tmp_path / "out")
    nb = nbformat.read(written[0], as_version=4)
    assert nb.cells[1].metadata["tags"] == ["parameters", "remove-input"]
    assert nb.cells[2].source == "## Step 1\n```\n### not a heading\n```"
    assert nb.cells[3].source == "## Next"
    (source / "04_zeroshot.ipynb").unlink()
    with pytest.raises(Exception, match="make demo"):
        scgpt_docs.copy_tutorials(source, tmp_path / "out")


def _pages() -> list[Path]:
    return [README, *(p for p in sorted(DOCS.rglob("*.md")) if not {"_build", "generated"} & set(p.parts))]


def test_names_and_paths_the_pages_mention_exist():
    """A module moved or renamed leaves no stale ``scgpt_protocol.x.y`` or ``scgpt_protocol/x/`` in the prose."""
    for page in _pages():
        text = page.read_text()
        for dotted in set(re.findall(r"(?<![\w/])scgpt_protocol(?:\.[A-Za-z_]\w*)+", text)):
            try:
                _resolve(dotted)
            except (AttributeError, ImportError) as err:
                pytest.fail(f"{page.relative_to(ROOT)} names {dotted}, which does not exist ({err})")
        for path in set(re.findall(r"(?<![\w/.~])scgpt_protocol/[\w./]*", text)):
            if "/_protocol/" in path:  # the wheel's copy of notebooks/ and params/, made at build time
                continue
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}, which does not exist"
