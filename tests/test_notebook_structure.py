"""The notebooks are thin, parameterised the same way as the dataclasses and the YAML files, and clean."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from scgpt_protocol.core.params import STEPS, parameters_cell
from scgpt_protocol.core.version import REPOSITORY

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(p.name for p in (ROOT / "params").iterdir() if p.is_dir())


def _nb(step: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{step}.ipynb", as_version=4)


def _code(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_step_has_a_notebook_and_nothing_else_is_there():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(STEPS)
    assert SCENARIOS == ["ci", "demo", "retina-example"]


@pytest.mark.parametrize("step", STEPS)
def test_one_parameters_cell_first_matching_the_dataclass(step):
    nb = _nb(step)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is _code(nb)[0]
    assert tagged[0].source == parameters_cell(STEPS[step])
    inspected = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{step}.ipynb"))
    assert sorted(inspected) == sorted(STEPS[step].field_names())
    for name, info in inspected.items():
        assert info["help"], f"{name} has no help text"


@pytest.mark.parametrize("step", STEPS)
def test_committed_without_outputs(step):
    for cell in _code(_nb(step)):
        assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("step", STEPS)
def test_code_cells_are_thin(step):
    forbidden = re.compile(r"^\s*(def |class |async def |!|%run|%%|os\.chdir)|warnings\.filterwarnings|import \*", re.M)
    for cell in _code(_nb(step))[1:]:
        assert not forbidden.search(cell.source), cell.source
        assert "for epoch" not in cell.source and "for batch" not in cell.source
        assert len(cell.source.splitlines()) <= 16, cell.source


@pytest.mark.parametrize("step", STEPS)
def test_anatomy_badge_setup_and_troubleshooting(step):
    nb = _nb(step)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{step}.ipynb" in first.source
    setup = _code(nb)[1].source
    assert '"google.colab" in sys.modules' in setup and f"git+https://github.com/{REPOSITORY}" in setup
    assert last.cell_type == "markdown" and last.source.startswith("## Troubleshooting")
    assert f"{STEPS[step].__name__}.from_namespace(globals())" in _code(nb)[2].source


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("step", STEPS)
def test_yaml_keys_are_parameters_and_values_are_valid(scenario, step):
    path = ROOT / "params" / scenario / f"{step}.yaml"
    values = yaml.safe_load(path.read_text()) or {}
    assert set(values) <= set(STEPS[step].field_names()), set(values) - set(STEPS[step].field_names())
    STEPS[step].from_mapping(values)  # types, ranges and choices


def test_readme_has_the_colab_badges():
    readme = (ROOT / "README.md").read_text()
    for step in STEPS:
        assert f"colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{step}.ipynb" in readme


@pytest.mark.parametrize("step", STEPS)
def test_opening_in_jupyterlab_changes_nothing(step):
    """JupyterLab writes the kernel's kernelspec and language_info into a notebook it opens; when they differ from
    what is saved, the notebook is marked modified before anyone touched it (seen in headless Chromium)."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    nb = _nb(step)
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert nb.metadata.kernelspec == {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
    expected = {k: v for k, v in IPythonKernel.language_info.items() if k != "version"}
    assert {k: v for k, v in nb.metadata.language_info.items() if k != "version"} == expected
    assert nb.nbformat == 4 and nb.nbformat_minor == 5 and all(c.get("id") for c in nb.cells)  # ids: no upgrade
    assert set(nb.metadata) == {"kernelspec", "language_info"}  # no widget state, no signature


@pytest.mark.parametrize("step", STEPS)
def test_setup_cell_fits_the_page(step):
    assert all(len(line) <= 100 for line in _code(_nb(step))[1].source.splitlines())
