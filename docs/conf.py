"""Sphinx configuration of the scgpt-protocol documentation (``make docs``; offline, warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

from scgpt_protocol.core.version import REPOSITORY, __version__  # noqa: E402

project = "scgpt-protocol"
author = "the scgpt-protocol authors"
copyright = "the scgpt-protocol authors"  # noqa: A001 (Sphinx's name)
release = __version__
version = __version__

extensions = [
    "myst_nb",  # MyST Markdown pages and the executed notebooks (it loads myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_copybutton",
    "scgpt_docs",  # docs/_ext: the API pages from __all__, the tutorials from the demo run, the architecture
]

# --- sources ----------------------------------------------------------------------------------------------
exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorials/generated/*.html"]
templates_path = ["_templates"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# --- notebooks: rendered as executed by the demo run, never executed here -----------------------------------
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"

# --- API: numpydoc docstrings through napoleon ---------------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

# --- HTML ------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"scgpt-protocol {__version__}"
html_theme_options = {
    "repository_url": f"https://github.com/{REPOSITORY}",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
}
html_static_path: list[str] = []
html_show_sourcelink = False
