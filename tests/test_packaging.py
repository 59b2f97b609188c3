"""The protocol travels with the package: packaged notebooks and scenarios, init, run by name, --notebooks.

The end-to-end check from a fresh virtual environment (wheel installed, not editable; init and run ci
from outside the clone) is ``.ci/wheel_smoke``, which CI runs.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from scgpt_protocol.core.params import STEPS
from scgpt_protocol.core.version import __version__
from scgpt_protocol.protocol.run.cli import main
from scgpt_protocol.protocol.run.workspace import (
    BUILTIN_SCENARIOS,
    COLAB_INSTALL,
    WorkspaceExists,
    init_workspace,
    notebooks_dir,
    params_root,
    protocol_root,
    resolve_notebooks,
    resolve_scenario,
)

ROOT = Path(__file__).resolve().parent.parent


def _protocol_files(*, constraints: bool = False) -> list[str]:
    """Every notebook and scenario file, as paths relative to the repository (what init copies); with
    ``constraints`` also the tested dependency sets (the wheel carries them too)."""
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb")]
    for name in BUILTIN_SCENARIOS:
        files += [p.relative_to(ROOT).as_posix() for p in (ROOT / "params" / name).glob("*.yaml")]
    if constraints:
        files += [p.relative_to(ROOT).as_posix() for p in (ROOT / "constraints").glob("py*.txt")]
    return sorted(files)


def test_a_clone_reads_the_protocol_in_place():
    root = protocol_root()
    assert root.kind == "source tree" and root.path == ROOT
    assert notebooks_dir() == ROOT / "notebooks" and params_root() == ROOT / "params"


def test_pyproject_maps_notebooks_and_every_scenario_into_the_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"scgpt_protocol._protocol.notebooks": "notebooks",
                                     "scgpt_protocol._protocol.params": "params",
                                     "scgpt_protocol._protocol.constraints": "constraints"}
    assert config["package-data"]["scgpt_protocol._protocol.constraints"] == ["py*.txt"]
    assert config["package-data"]["scgpt_protocol._protocol.notebooks"] == ["*.ipynb"]
    assert sorted(config["package-data"]["scgpt_protocol._protocol.params"]) == sorted(
        f"{name}/*.yaml" for name in BUILTIN_SCENARIOS)
    # a new scenario folder must be added to BUILTIN_SCENARIOS (and so to the wheel)
    assert sorted(p.name for p in (ROOT / "params").iterdir() if p.is_dir()) == sorted(BUILTIN_SCENARIOS)


def test_pyproject_lists_every_subpackage_for_the_wheel():
    """setuptools takes the packages as listed: a subpackage missing there would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "scgpt_protocol").rglob("__init__.py")}
    assert found - listed == set()
    assert {p for p in listed if not p.startswith("scgpt_protocol._protocol")} == found


def test_console_script_points_at_the_cli():
    tomllib = pytest.importorskip("tomllib")
    import importlib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["scgpt-protocol"]
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_init_copies_byte_for_byte_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "my-run"
    written = init_workspace(dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == _protocol_files()
    for rel in _protocol_files():
        assert (dest / rel).read_bytes() == (ROOT / rel).read_bytes(), rel

    edited = dest / "params" / "demo" / "02_finetune.yaml"
    edited.write_text("epochs: 1\n")
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceExists, match="already holds notebooks/01_preprocess.ipynb.*--force"):
        init_workspace(dest)
    assert edited.read_text() == "epochs: 1\n"  # nothing was touched

    init_workspace(dest, force=True)
    assert edited.read_bytes() == (ROOT / "params" / "demo" / "02_finetune.yaml").read_bytes()
    assert (dest / "notes.txt").read_text() == "mine"  # files that are not the protocol's stay


def test_init_refuses_a_file_as_destination(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(WorkspaceExists, match="is a file, not a folder"):
        init_workspace(tmp_path / "taken")


def test_scenarios_by_name_or_by_folder(tmp_path, monkeypatch):
    for name in BUILTIN_SCENARIOS:
        assert resolve_scenario(name) == ROOT / "params" / name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert resolve_scenario("demo") == tmp_path / "demo"  # an existing folder wins over the name
    assert resolve_scenario(ROOT / "params" / "ci") == ROOT / "params" / "ci"
    with pytest.raises(FileNotFoundError, match="'dmeo' is not a built-in scenario.*demo, ci, retina-example"):
        resolve_scenario("dmeo")


def test_notebook_folder_must_hold_the_steps_to_run(tmp_path):
    assert resolve_notebooks(None) == ROOT / "notebooks"
    (tmp_path / "01_preprocess.ipynb").write_bytes((ROOT / "notebooks" / "01_preprocess.ipynb").read_bytes())
    assert resolve_notebooks(tmp_path, ["01_preprocess"]) == tmp_path
    with pytest.raises(FileNotFoundError, match="lacks 02_finetune.ipynb, 03_evaluate.ipynb, 04_zeroshot.ipynb"):
        resolve_notebooks(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_notebooks(tmp_path / "nope")


def test_cli_version_list_and_init(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="scgpt_protocol")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"scgpt-protocol {__version__}"

    assert main(["list"]) == 0
    for name in (*STEPS, *BUILTIN_SCENARIOS, "source tree"):
        assert name in caplog.text, name
    caplog.clear()

    assert main(["init", str(tmp_path / "my-run")]) == 0
    assert "scgpt-protocol run params/demo --notebooks notebooks" in caplog.text
    assert (tmp_path / "my-run" / "notebooks" / "04_zeroshot.ipynb").is_file()
    assert main(["init", str(tmp_path / "my-run")]) == 2
    assert "pass --force" in caplog.text
    assert main(["init", str(tmp_path / "my-run"), "--force"]) == 0


def test_cli_run_with_missing_notebooks_is_bad_input(tmp_path, caplog):
    (tmp_path / "nb").mkdir()
    assert main(["run", "ci", "--notebooks", str(tmp_path / "nb"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "lacks 01_preprocess.ipynb" in caplog.text
    assert not (tmp_path / "run").exists()


def test_run_by_name_executes_the_users_edited_notebooks(tmp_path, monkeypatch):
    """`scgpt-protocol run ci --notebooks notebooks` runs the user's copy, not the packaged one."""
    init_workspace(tmp_path / "ws")
    copy = tmp_path / "ws" / "notebooks" / "01_preprocess.ipynb"
    nb = nbformat.read(copy, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('print("my edited copy ran")'))
    nbformat.write(nb, copy)
    monkeypatch.chdir(tmp_path / "ws")

    assert main(["run", "ci", "--notebooks", "notebooks", "--steps", "01", "--no-html"]) == 0
    run_dir = tmp_path / "ws" / "runs" / "ci"  # the default run folder is named after the scenario
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["notebooks_dir"] == str(tmp_path / "ws" / "notebooks")
    assert manifest["params_dir"] == str(ROOT / "params" / "ci")
    assert manifest["steps"]["01_preprocess"]["status"] == "finished"
    report = nbformat.read(run_dir / "reports" / "01_preprocess.ipynb", as_version=4)
    outputs = [o.get("text", "") for c in report.cells if c.cell_type == "code" for o in c.outputs]
    assert any("my edited copy ran" in text for text in outputs)


@pytest.mark.parametrize("step", STEPS)
def test_colab_cell_installs_this_release_with_literals_only(step):
    nb = nbformat.read(ROOT / "notebooks" / f"{step}.ipynb", as_version=4)
    setup = [c for c in nb.cells if c.cell_type == "code"][1].source
    calls = [n for n in ast.walk(ast.parse(setup))
             if isinstance(n, ast.Call) and ast.unparse(n.func) == "subprocess.check_call"]
    assert len(calls) == 1
    args = calls[0].args[0]
    assert isinstance(args, ast.List)
    assert ast.unparse(args.elts[0]) == "sys.executable"
    literals = [e.value for e in args.elts[1:] if isinstance(e, ast.Constant)]
    assert len(literals) == len(args.elts) - 1, "the install command is made of literals only"
    assert literals[-1] == COLAB_INSTALL, (
        f"the Colab cell installs {literals[-1]!r}; this release is {COLAB_INSTALL!r}: update the cell "
        "in every notebook when the version changes"
    )
    assert f"@v{__version__}" in COLAB_INSTALL
    # Colab's torch and numpy are kept: pinned to what is installed, in the constraints file the install reads
    assert literals[literals.index("-c") + 1] == "/tmp/colab-keep.txt"
    assert "keep.write(f\"torch=={version('torch')}\\nnumpy=={version('numpy')}\\n\")" in setup


def test_readme_shows_both_quick_starts():
    readme = (ROOT / "README.md").read_text()
    for text in ("make demo", "make test", "pip install", "scgpt-protocol init my-run", "scgpt-protocol run demo",
                 COLAB_INSTALL):
        assert text in readme, text


@pytest.mark.slow
def test_wheel_carries_the_protocol_byte_for_byte(tmp_path):
    """Build sdist and wheel (wheel from the sdist) and compare the packaged files with the repository's."""
    pytest.importorskip("build")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = tmp_path.glob("scgpt_protocol-*.whl")
    prefix = "scgpt_protocol/_protocol/"
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n[len(prefix) :]: zf.read(n) for n in zf.namelist() if n.startswith(prefix)}
        modules = {n for n in zf.namelist() if n.startswith("scgpt_protocol/") and n.endswith(".py")}
    assert sorted(packaged) == _protocol_files(constraints=True)
    for rel, data in packaged.items():
        assert data == (ROOT / rel).read_bytes(), f"{rel} in the wheel differs from the repository"
    # every module of every subpackage, nothing else
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "scgpt_protocol").rglob("*.py")} == modules
