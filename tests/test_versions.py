"""The tested dependency set (issue 27): constraints/py*.txt, and the note a run on other versions gets."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from pathlib import Path

import pytest

from scgpt_protocol.core import versions
from scgpt_protocol.core.versions import (
    CHECKED_PACKAGES,
    canonical_name,
    read_constraints,
    untested_note,
    untested_versions,
)

ROOT = Path(__file__).resolve().parent.parent


def test_constraints_are_read_by_canonical_name(tmp_path):
    path = tmp_path / "py3.99.txt"
    path.write_text("# a comment\nScikit_Learn==1.9.1\numap.learn==0.5.12  # note\ntorch==2.13.0\n\n")
    assert read_constraints(path) == {"scikit-learn": "1.9.1", "umap-learn": "0.5.12", "torch": "2.13.0"}
    assert canonical_name("Py_NN.Descent") == "py-nn-descent"


def test_untested_versions_compare_releases_not_builds():
    tested = {"torch": "2.13.0", "pynndescent": "0.7.0", "scanpy": "1.11.5"}
    installed = {"torch": "2.13.0+cpu", "pynndescent": "0.7.1", "scanpy": "1.11.5", "numba": "0.68.1"}
    assert untested_versions(installed, tested=tested) == {
        "pynndescent": ("0.7.1", "0.7.0"), "numba": ("0.68.1", "not in the tested set")}
    assert untested_versions({"torch": "2.13.0+cu126"}, tested=tested) == {}  # a CUDA build of the same release


def test_a_python_without_a_tested_set_is_said_as_information():
    level, note = untested_note("2.7")
    assert level == logging.INFO and "No tested dependency set for Python 2.7: CI tests Python 3.11" in note


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture()
def off_the_set(tmp_path, monkeypatch):
    """A tested set that this environment's scipy and torch are not on."""
    tag = ".".join(platform.python_version_tuple()[:2])
    folder = tmp_path / "constraints"
    folder.mkdir()
    here = {name: importlib.metadata.version(name) for name in CHECKED_PACKAGES if _installed(name)}
    here.update(scipy="0.0.1", torch="0.0.1")
    (folder / f"py{tag}.txt").write_text("".join(f"{name}=={version}\n" for name, version in here.items()))
    (tmp_path / "pyproject.toml").write_text("")  # a clone's constraints/ sits beside its pyproject.toml
    monkeypatch.setattr(versions, "_CLONE", folder)
    monkeypatch.setattr(versions, "_noted", set())
    return folder / f"py{tag}.txt"


def test_versions_outside_the_set_are_said_once_in_the_log(tmp_path, off_the_set, caplog):
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.core.log import setup_logging

    layout = RunLayout(tmp_path / "run")
    package = logging.getLogger("scgpt_protocol")
    try:
        with caplog.at_level(logging.WARNING, logger="scgpt_protocol"):
            setup_logging(layout, "preprocess")
            setup_logging(layout, "preprocess")  # the set-up cell run again
        log_text = layout.step_log("preprocess").read_text()
    finally:  # leave no file handler on tmp_path
        for handler in list(package.handlers):
            if isinstance(handler, logging.FileHandler):
                package.removeHandler(handler)
                handler.close()
    said = [r.getMessage() for r in caplog.records if "outside the tested set" in r.getMessage()]
    assert len(said) == 1
    import scipy
    import torch

    assert said[0].count("(tested ") == 2  # the two that differ, nothing else
    assert f"scipy {scipy.__version__} (tested 0.0.1)" in said[0] and f"torch {torch.__version__}" in said[0]
    # the fix names the packages to reinstall, but torch is installed for the hardware, never from the set
    assert f"pip install -c {off_the_set} scipy;" in said[0] and "torch 0.0.1 for your hardware" in said[0]
    assert "outside the tested set" in log_text


def test_the_repository_has_a_tested_set_for_the_ci_python():
    """CI's Python (3.11) has its set, which pins every package that shapes a step and every dependency."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    tested = read_constraints(ROOT / "constraints" / "py3.11.txt")
    assert {canonical_name(p) for p in CHECKED_PACKAGES} <= set(tested)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"] + project["optional-dependencies"]["dev"]):
        name = canonical_name(requirement.name)
        assert name in tested, name
        assert requirement.specifier.contains(tested[name]), (name, tested[name], str(requirement.specifier))
    assert "+" not in "".join(tested.values())  # no local build label: the CPU and CUDA builds of torch both match
    assert not {"scgpt-protocol", "pip", "setuptools"} & set(tested)
