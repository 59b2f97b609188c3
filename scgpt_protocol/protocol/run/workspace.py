"""Where the protocol's notebooks and scenarios are, in a clone and in an installed wheel.

One source of truth: the repository's ``notebooks/`` and ``params/``. A wheel carries them byte for
byte as ``scgpt_protocol/_protocol/{notebooks,params}`` (``pyproject.toml`` maps the two folders into
the package at build time); a clone or an editable install reads them in place. :func:`init_workspace`
copies them into a folder for a user to open and edit (``scgpt-protocol init DIR``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import format_keys
from ...core.params import STEPS
from ...core.version import REPOSITORY, __version__

__all__ = ["BUILTIN_SCENARIOS", "COLAB_INSTALL", "ProtocolNotFound", "WorkspaceExists", "protocol_root",
    "notebooks_dir", "params_root", "resolve_scenario", "resolve_notebooks", "scenario_summary",
    "step_summary", "init_workspace", "step_file", "scenario_files"]

#: the scenarios shipped with the package (``scgpt-protocol run NAME``)
BUILTIN_SCENARIOS = ("demo", "ci", "retina-example")
#: what the notebooks' Colab set-up cell installs: the release these notebooks belong to, with faiss for
#: 04's reference indexes (the atlas extra)
COLAB_INSTALL = f"scgpt-protocol[atlas] @ git+https://github.com/{REPOSITORY}@v{__version__}"

_PACKAGED = Path(__file__).resolve().parents[2] / "_protocol"  # scgpt_protocol/_protocol in a wheel
_SOURCE_TREE = Path(__file__).resolve().parents[3]  # the clone, in an editable install


class ProtocolNotFound(FileNotFoundError):
    """Neither the packaged protocol nor a source tree's ``notebooks/`` and ``params/`` is there."""


class WorkspaceExists(FileExistsError):
    """``init`` would overwrite files a user may have edited."""


@dataclass(frozen=True)
class _Root:
    path: Path
    kind: str  # "package" (an installed wheel) or "source tree" (a clone, an editable install)


def _has_protocol(root: Path) -> bool:
    return (root / "notebooks").is_dir() and (root / "params").is_dir()


def protocol_root() -> _Root:
    """The folder holding ``notebooks/`` and ``params/``: the packaged copy, else the source tree."""
    if _has_protocol(_PACKAGED):
        return _Root(_PACKAGED, "package")
    if _has_protocol(_SOURCE_TREE) and (_SOURCE_TREE / "pyproject.toml").is_file():
        return _Root(_SOURCE_TREE, "source tree")
    msg = (
        f"the protocol notebooks are neither in the package ({_PACKAGED}) nor in a source tree "
        f"({_SOURCE_TREE / 'notebooks'}); this install of scgpt-protocol is incomplete. Reinstall it "
        "(pip install --force-reinstall scgpt-protocol) or install from a clone (pip install -e .)."
    )
    raise ProtocolNotFound(msg)


def notebooks_dir() -> Path:
    """The protocol notebooks shipped with this install (``01_preprocess.ipynb`` ... ``04_zeroshot.ipynb``)."""
    return protocol_root().path / "notebooks"


def params_root() -> Path:
    """The folder of the built-in scenarios (``demo``, ``ci``, ``retina-example``)."""
    return protocol_root().path / "params"


def resolve_scenario(scenario: str | Path) -> Path:
    """A scenario folder: an existing folder as given, else a built-in scenario's name."""
    path = Path(scenario).expanduser()
    if path.is_dir():
        return path.resolve()
    name = str(scenario)
    if name in BUILTIN_SCENARIOS:
        return params_root() / name
    msg = (
        f"parameter folder {path.resolve()} does not exist, and {name!r} is not a built-in scenario. Pass a "
        f"folder of <notebook-stem>.yaml files (e.g. params/demo of `scgpt-protocol init`) or one of "
        f"{', '.join(BUILTIN_SCENARIOS)} (`scgpt-protocol list` shows them)."
    )
    raise FileNotFoundError(msg)


def _step_file_names(step: str) -> list[str]:
    """The names a step's file may have: ``01_preprocess.yaml`` (a scenario), ``preprocess.yaml`` (a run's
    ``params/``), each also with ``.yml``."""
    short = step.split("_", 1)[1]
    return [f"{step}.yaml", f"{step}.yml", f"{short}.yaml", f"{short}.yml"]


def step_file(params_dir: Path, step: str) -> Path | None:
    """The parameter file of ``step`` in a scenario folder (or a finished run's ``params/``), None if absent.

    Two files for one step (``01_preprocess.yaml`` and ``preprocess.yaml``) are refused: which one counts
    would be a guess.
    """
    from ...core.params import ParamsError

    found = [params_dir / n for n in _step_file_names(step) if (params_dir / n).is_file()]
    if len(found) > 1:
        msg = (f"{params_dir} holds {len(found)} files for step {step}: {', '.join(f.name for f in found)}; "
               "keep one of them (delete or rename the others).")
        raise ParamsError(msg)
    return found[0] if found else None


def scenario_files(params_dir: Path, steps: list[str]) -> dict[str, Path]:
    """Every step's parameter file; a clear error naming those missing (a missing file is never read as
    "all defaults": with no 01 file, the run would prepare the built-in demo data)."""
    files = {step: step_file(params_dir, step) for step in steps}
    missing = [step for step, path in files.items() if path is None]
    if missing:
        others = sorted(p.name for p in params_dir.iterdir() if p.is_file()) if params_dir.is_dir() else []
        msg = (
            f"scenario folder {params_dir} has no parameter file for step(s) {', '.join(missing)}: expected "
            f"{' or '.join(_step_file_names(missing[0])[:1] + _step_file_names(missing[0])[2:3])} (.yml also "
            f"works) for {missing[0]}, one file per step to run. Files there: {format_keys(others)}. Add the "
            "missing file(s) (an empty one runs the step with its defaults), or pass --steps to run fewer steps."
        )
        raise FileNotFoundError(msg)
    return {step: path for step, path in files.items() if path is not None}


def resolve_notebooks(notebooks: str | Path | None, steps: list[str] | tuple[str, ...] = tuple(STEPS)) -> Path:
    """The folder of notebooks to run: a user's copies when given, else the packaged ones.

    Every step to run must have its notebook there (``<step>.ipynb``).
    """
    folder = notebooks_dir() if notebooks is None else Path(notebooks).expanduser().resolve()
    if not folder.is_dir():
        msg = f"notebook folder {folder} does not exist; pass the notebooks/ folder that `scgpt-protocol init` made."
        raise FileNotFoundError(msg)
    missing = [f"{s}.ipynb" for s in steps if not (folder / f"{s}.ipynb").is_file()]
    if missing:
        msg = (
            f"notebook folder {folder} lacks {', '.join(missing)}; it needs one notebook per step to run, "
            f"named as `scgpt-protocol init` copies them ({', '.join(f'{s}.ipynb' for s in STEPS)})."
        )
        raise FileNotFoundError(msg)
    return folder


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def scenario_summary() -> dict[str, str]:
    """Built-in scenario name -> the first comment line of its first YAML file."""
    root = params_root()
    return {name: _first_comment(root / name / f"{next(iter(STEPS))}.yaml") for name in BUILTIN_SCENARIOS}


def step_summary() -> dict[str, str]:
    """Step -> the title of its notebook (the first markdown heading)."""
    out = {}
    for step in STEPS:
        cells = json.loads((notebooks_dir() / f"{step}.ipynb").read_text(encoding="utf-8"))["cells"]
        first = "".join(cells[0]["source"]).splitlines()[0] if cells and cells[0]["source"] else ""
        out[step] = first.lstrip("# ").strip()
    return out


def _protocol_files() -> list[tuple[Path, Path]]:
    """(source, path relative to a workspace) for every notebook and every built-in scenario file."""
    root = protocol_root().path
    files = [(root / "notebooks" / f"{s}.ipynb", Path("notebooks") / f"{s}.ipynb") for s in STEPS]
    for name in BUILTIN_SCENARIOS:
        for src in sorted((root / "params" / name).glob("*.yaml")):
            files.append((src, Path("params") / name / src.name))
    return files


def init_workspace(dest: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the notebooks and the built-in scenarios into ``dest`` (``notebooks/``, ``params/<scenario>/``).

    Refuses to overwrite an existing file unless ``force``; other files in ``dest`` are left alone.
    Returns the files written.
    """
    dest = Path(dest).expanduser().resolve()
    files = _protocol_files()
    if dest.exists() and not dest.is_dir():
        msg = f"{dest} is a file, not a folder; choose another folder for the protocol."
        raise WorkspaceExists(msg)
    existing = [rel for _, rel in files if (dest / rel).exists()]
    if existing and not force:
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        shown = ", ".join(str(p) for p in existing[:4]) + more
        msg = (
            f"{dest} already holds {shown}; they may be your edits. Choose another folder, "
            "or pass --force to overwrite them with the protocol of this release."
        )
        raise WorkspaceExists(msg)
    written = []
    for src, rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        written.append(target)
    return written
