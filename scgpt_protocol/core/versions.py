"""The tested dependency set: the exact versions CI ran the protocol with, and what a run on others is told.

``constraints/py<major>.<minor>.txt`` (in a clone; ``scgpt_protocol/_protocol/constraints/`` in a wheel) lists
one ``name==version`` a line: every package of the environment CI tested, written by ``make constraints``.
``make install``, ``.ci/run`` and ``environment.yml`` install with it (``pip install -c``). A run on other
versions of the packages that shape its results says so once per step, in the step's log and its report's
first output (:func:`note_untested_versions`, called by ``setup_logging``): it may well work, and if it does
not, the tested set is one ``pip install -c`` away. A Python with no tested set is said too, as information.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import re
from pathlib import Path

__all__ = ["CHECKED_PACKAGES", "constraints_file", "tested_versions", "untested_versions", "untested_note",
           "note_untested_versions", "read_constraints", "canonical_name"]

logger = logging.getLogger("scgpt_protocol")

#: the packages whose version can change what a step computes or whether it runs (the project's own
#: dependencies that compute, and the ones under scanpy's neighbour graphs, UMAP and Leiden)
CHECKED_PACKAGES = (
    "torch", "numpy", "scipy", "pandas", "anndata", "h5py", "scanpy", "scikit-learn", "umap-learn",
    "pynndescent", "numba", "igraph", "peft", "matplotlib", "papermill", "duckdb",
)
_CLONE = Path(__file__).resolve().parents[2] / "constraints"  # constraints/ beside scgpt_protocol/ in a clone
_PACKAGED = Path(__file__).resolve().parents[1] / "_protocol" / "constraints"  # in a wheel
_noted: set[str] = set()
#: what :func:`untested_versions` gives as the tested release of a package the tested set does not list
NOT_IN_SET = "not in the tested set"


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _python_tag(python: str | None) -> str:
    return python or ".".join(platform.python_version_tuple()[:2])


def constraints_file(python: str | None = None) -> Path | None:
    """The tested set for this Python (``"3.11"``; None: the running one), or None when there is none."""
    name = f"py{_python_tag(python)}.txt"
    for folder in (_CLONE, _PACKAGED):
        in_clone = folder != _CLONE or (folder.parent / "pyproject.toml").is_file()  # not site-packages/constraints
        if in_clone and (folder / name).is_file():
            return folder / name
    return None


def read_constraints(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of a constraints file's ``name==version`` lines (comments skipped)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical_name(name.split("[", 1)[0].strip())] = version.split(";", 1)[0].strip()
    return out


def tested_versions(python: str | None = None) -> dict[str, str]:
    """The tested set for this Python (:func:`constraints_file`), ``{}`` when there is none."""
    path = constraints_file(python)
    return read_constraints(path) if path is not None else {}


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build label (the CPU or a CUDA build of torch) is the same release."""
    return version.split("+", 1)[0]


def untested_versions(installed: dict[str, str] | None = None, *, tested: dict[str, str] | None = None,
                      packages: tuple[str, ...] = CHECKED_PACKAGES) -> dict[str, tuple[str, str]]:
    """``{package: (installed, tested)}`` for each of ``packages`` installed at another release than the tested set.

    ``installed`` / ``tested`` default to this environment and :func:`tested_versions`; a package the tested set
    does not list counts as untested (``tested`` is then :data:`NOT_IN_SET`).
    """
    tested = tested_versions() if tested is None else {canonical_name(k): v for k, v in tested.items()}
    if installed is None:
        installed = {}
        for name in packages:
            try:
                installed[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
    out = {}
    for name, version in installed.items():
        want = tested.get(canonical_name(name))
        if want is None or _public(version) != _public(want):
            out[name] = (version, want or NOT_IN_SET)
    return out


#: packages a user installs for their hardware, not from the tested set (a CUDA build of torch; Colab's numpy)
_OWN_BUILDS = ("torch", "numpy")


def untested_note(python: str | None = None) -> tuple[int, str] | None:
    """``(logging level, sentence)`` on what differs from the tested set, or None when nothing does.

    A Python with no tested set (Colab's, say) is said at INFO: nothing to act on. Other releases of the checked
    packages are said at WARNING, with the ``pip install -c`` that brings the tested ones back (torch and numpy
    left to the user, who installs them for the hardware).
    """
    tag = _python_tag(python)
    path = constraints_file(tag)
    if path is None:
        tested = sorted({p.name[2:-4] for folder in (_CLONE, _PACKAGED) for p in folder.glob("py*.txt")})
        return logging.INFO, (f"No tested dependency set for Python {tag}: CI tests Python "
                              f"{', '.join(tested) or '3.11'}; the versions here have not been through the "
                              "protocol's tests (they are in run_manifest.json).")
    differ = untested_versions(tested=read_constraints(path))
    if not differ:
        return None
    listed = ", ".join(f"{name} {have} (tested {want})" for name, (have, want) in sorted(differ.items()))
    fix = sorted(n for n in differ if n not in _OWN_BUILDS)
    how = [f"pip install -c {path} {' '.join(fix)}"] if fix else []
    how += [f"{n} {differ[n][1]} for your hardware" for n in _OWN_BUILDS
            if n in differ and differ[n][1] != NOT_IN_SET]
    return logging.WARNING, (f"Versions outside the tested set ({path.name}): {listed}. The protocol may well work "
                             f"with them; if a step fails, install the tested ones: {'; '.join(how)} "
                             "(make install in a clone).")


def note_untested_versions(python: str | None = None) -> str | None:
    """Log :func:`untested_note` once per process (at its level); returns the sentence."""
    found = untested_note(python)
    if found is None:
        return None
    level, note = found
    if note not in _noted:
        _noted.add(note)
        logger.log(level, note)
    return note
