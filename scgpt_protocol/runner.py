"""Run the protocol notebooks headless with papermill, leaving executed reports.

``scgpt-protocol run params/demo --run-dir runs/demo`` executes ``notebooks/01..04`` in order with
the YAML files of a scenario folder (``params/<scenario>/<notebook-stem>.yaml``), writes each
executed notebook to ``run_dir/reports/`` (and HTML beside it), records a run manifest
(parameters, versions, checksums, timings) and prints the headline metrics.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .download import KNOWN_CHECKPOINTS
from .layout import RunLayout
from .params import STEPS, ParamsError, load_params_file
from .protocol import notebooks_dir, resolve_notebooks, resolve_scenario

__all__ = ["run_protocol", "RunFailed", "RunDirInUse", "notebooks_dir"]

logger = logging.getLogger(__name__)

#: parameters whose values are paths to resolve against the caller's working directory
_PATH_PARAMS = ("adata_path", "query_path", "reference_path", "checkpoint")
_VERSIONS = ("scgpt-protocol", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn", "peft", "papermill")


class RunFailed(RuntimeError):
    """A notebook raised; the message names the report and the cell."""


class RunDirInUse(FileExistsError):
    """``run_dir`` holds a finished run or files of something else."""


@dataclass
class StepOutcome:
    step: str
    report: Path
    seconds: float
    status: str = "finished"
    error: str | None = None


@dataclass
class RunResult:
    run_dir: Path
    steps: list[StepOutcome] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _select_steps(steps: Sequence[str] | None) -> list[str]:
    names = list(STEPS)
    if not steps:
        return names
    chosen = []
    for s in steps:
        match = [n for n in names if n == s or n.split("_", 1)[0] == s.zfill(2) or n.split("_", 1)[1] == s]
        if not match:
            msg = f"unknown step {s!r}; steps: {names} (also '01' or 'preprocess' style)."
            raise ParamsError(msg)
        chosen.extend(m for m in match if m not in chosen)
    return [n for n in names if n in chosen]


def _load_overrides(params_dir: Path, steps: list[str], run_dir: Path, cwd: Path) -> dict[str, dict[str, Any]]:
    """Read and check every step's YAML before anything runs (an unknown key fails here)."""
    if not params_dir.is_dir():
        msg = f"parameter folder {params_dir} does not exist; built-in scenarios: demo, ci, retina-example."
        raise FileNotFoundError(msg)
    out = {}
    for step in steps:
        path = params_dir / f"{step}.yaml"
        values = load_params_file(path, STEPS[step]) if path.is_file() else {}
        for key in _PATH_PARAMS:
            value = values.get(key)
            if isinstance(value, str) and value not in {"demo", *KNOWN_CHECKPOINTS}:
                values[key] = str((cwd / Path(value).expanduser()).resolve())
        values["run_dir"] = str(run_dir)
        STEPS[step].from_mapping(values, source=str(path))  # values checked before any notebook runs
        out[step] = values
    return out


def _check_run_dir(layout: RunLayout, force: bool, params_dir: Path) -> dict[str, Any] | None:
    """Refuse a run_dir with a finished run or foreign files; return an unfinished run's manifest."""
    if not layout.run_dir.exists() or not any(layout.run_dir.iterdir()):
        return None
    if not layout.manifest.is_file():
        if force:
            return None
        msg = (
            f"run_dir {layout.run_dir} is not empty and holds no run manifest (another run or other files). "
            "Choose a new --run-dir, or pass --force to write into it anyway."
        )
        raise RunDirInUse(msg)
    manifest = json.loads(layout.manifest.read_text())
    if manifest.get("status") == "finished" and not force:
        msg = (
            f"run_dir {layout.run_dir} holds a finished run (params {manifest.get('params_dir')}, finished "
            f"{manifest.get('finished')}). Choose a new --run-dir, or pass --force to run again into it "
            "(fine-tuning then resumes or restarts as its parameters say)."
        )
        raise RunDirInUse(msg)
    if manifest.get("params_dir") != str(params_dir) and not force:
        msg = (
            f"run_dir {layout.run_dir} holds an unfinished run of {manifest.get('params_dir')}, not {params_dir}. "
            "Choose a new --run-dir, or pass --force."
        )
        raise RunDirInUse(msg)
    return manifest


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for name in _VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _input_checksums(overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """sha256 of the run's input files (hashed once: inputs do not change during a run)."""
    from .download import sha256_file

    sums: dict[str, Any] = {}
    for values in overrides.values():
        for key in ("adata_path", "query_path", "reference_path"):
            value = values.get(key)
            if value and Path(value).is_file():
                sums[value] = sha256_file(value)
            elif value == "demo":
                sums["demo"] = f"scanpy.datasets.pbmc68k_reduced (scanpy {importlib.metadata.version('scanpy')})"
    return sums


def _checkpoint_checksum(layout: RunLayout) -> dict[str, Any] | None:
    """The pretrained checkpoint 01 recorded (its sha256 was taken there)."""
    if not layout.checkpoint_record.is_file():
        return None
    record = json.loads(layout.checkpoint_record.read_text())
    return {"path": record.get("checkpoint"), "kind": record.get("kind"), "sha256": record.get("sha256")}


#: added to every HTML report: long output lines wrap between words, not mid-word, and stay on the page
_REPORT_CSS = """<style>
.jp-OutputArea-output pre, .jp-RenderedText pre { white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere; }
.jp-InputArea .highlight pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.jp-RenderedHTMLCommon table { margin-left: 0; }
</style>
"""


def report_title(step: str, run_dir: Path) -> str:
    """The ``<title>`` of a report: its step and the run's name (one browser tab each)."""
    return f"{step} · {Path(run_dir).name} · scgpt-protocol"


def _export_html(report: Path, title: str | None = None) -> Path | None:
    try:
        import nbformat
        from nbconvert import HTMLExporter
    except ImportError:  # nbconvert comes with jupyter; without it the .ipynb report stays
        return None
    nb = nbformat.read(report, as_version=4)
    nb.metadata["title"] = title or report.stem  # nbconvert's <title>; default: "Notebook"
    body, _ = HTMLExporter().from_notebook_node(nb)
    body = body.replace("</head>", _REPORT_CSS + "</head>", 1)
    html = report.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def _failure_message(err: Exception, report: Path) -> str:
    cell = getattr(err, "exec_count", None) or getattr(err, "cell_index", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell {cell} of " if cell is not None else ""
    return f"{ename}: {evalue} (in {where}{report})"


def _headline(layout: RunLayout) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if layout.metrics.is_file():
        metrics = json.loads(layout.metrics.read_text())
        for method, values in (metrics.get("methods") or {}).items():
            summary[method] = {k: values.get(k) for k in ("accuracy", "macro_f1", "weighted_f1") if k in values}
    if layout.zeroshot_metrics.is_file():
        zs = json.loads(layout.zeroshot_metrics.read_text())
        if zs.get("majority"):
            summary["zero-shot kNN (majority)"] = {k: zs["majority"].get(k) for k in ("accuracy", "macro_f1", "weighted_f1")}
    return summary


def run_protocol(
    params_dir: str | Path,
    run_dir: str | Path,
    *,
    steps: Sequence[str] | None = None,
    force: bool = False,
    kernel_name: str | None = None,
    html: bool = True,
    notebooks: str | Path | None = None,
) -> RunResult:
    """Execute the protocol notebooks with papermill.

    Parameters
    ----------
    params_dir
        A scenario folder, e.g. ``params/demo``: ``<notebook-stem>.yaml`` override files; or the name
        of a built-in scenario (``demo``, ``ci``, ``retina-example``) when no such folder exists.
    run_dir
        Where everything goes; reports in ``run_dir/reports``.
    steps
        A subset such as ``["01", "02"]`` (default: all four in order).
    force
        Run into a ``run_dir`` that holds a finished run or other files.
    notebooks
        A folder of the step notebooks to run (a user's edited copies from ``scgpt-protocol init``);
        default: the notebooks shipped with the package.

    Raises
    ------
    RunDirInUse, ParamsError, RunFailed
    """
    import papermill

    cwd = Path.cwd()
    params_dir = resolve_scenario(params_dir)
    layout = RunLayout(Path(run_dir).resolve())
    chosen = _select_steps(steps)
    notebook_dir = resolve_notebooks(notebooks, chosen)
    overrides = _load_overrides(params_dir, chosen, layout.run_dir, cwd)
    previous = _check_run_dir(layout, force, params_dir)
    layout.make_dirs()
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "params_dir": str(params_dir),
        "notebooks_dir": str(notebook_dir),
        "run_dir": str(layout.run_dir),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "versions": package_versions(),
        "steps": (previous or {}).get("steps", {}),
    }
    layout.write_json(layout.manifest, manifest)
    result = RunResult(run_dir=layout.run_dir)
    inputs = _input_checksums(overrides)
    env_before = os.environ.get("SCGPT_PROTOCOL_PROGRESS")
    os.environ["SCGPT_PROTOCOL_PROGRESS"] = "text"  # widget bars render badly in executed reports
    try:
        for step in chosen:
            notebook = notebook_dir / f"{step}.ipynb"
            report = layout.reports_dir / notebook.name
            logger.info("running %s -> %s", notebook.name, report)
            t0 = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(notebook), str(report), parameters=overrides[step], kernel_name=kernel_name,
                    cwd=str(cwd), progress_bar=False, log_output=False,
                )
            except Exception as err:  # papermill wraps every notebook error; report where it failed
                outcome = StepOutcome(step, report, round(time.perf_counter() - t0, 1), "failed", _failure_message(err, report))
                result.steps.append(outcome)
                manifest["steps"][step] = outcome.__dict__ | {"report": str(report)}
                manifest["status"] = "failed"
                layout.write_json(layout.manifest, manifest)
                if html and report.is_file():
                    _export_html(report, report_title(step, layout.run_dir))
                msg = f"step {step} failed: {outcome.error}"
                raise RunFailed(msg) from None
            seconds = round(time.perf_counter() - t0, 1)
            if html:
                _export_html(report, report_title(step, layout.run_dir))
            result.steps.append(StepOutcome(step, report, seconds))
            manifest["steps"][step] = {"report": str(report), "seconds": seconds, "status": "finished",
                                       "params": overrides[step]}
            manifest["checksums"] = {**inputs, "checkpoint": _checkpoint_checksum(layout)}
            layout.write_json(layout.manifest, manifest)
            logger.info("%s finished in %.1f s", step, seconds)
    finally:
        if env_before is None:
            os.environ.pop("SCGPT_PROTOCOL_PROGRESS", None)
        else:
            os.environ["SCGPT_PROTOCOL_PROGRESS"] = env_before
    all_done = all(manifest["steps"].get(s, {}).get("status") == "finished" for s in STEPS)
    manifest["status"] = "finished" if all_done else "partial"
    manifest["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest["headline"] = result.summary = _headline(layout)
    layout.write_json(layout.manifest, manifest)
    return result
