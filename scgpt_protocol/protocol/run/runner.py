"""Run the protocol notebooks headless with papermill, leaving executed reports.

``scgpt-protocol run params/demo --run-dir runs/demo`` executes ``notebooks/01..04`` in order with
the YAML files of a scenario folder (``params/<scenario>/<notebook-stem>.yaml``), writes each
executed notebook to ``run_dir/reports/`` (and HTML beside it), records a run manifest
(parameters, versions, checksums, timings) and prints the headline metrics.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...core.errors import DiskFullError, RunDirInUse
from ...core.io import package_versions, read_json, short_record, utc_now, utc_stamp
from ...core.layout import RunLayout
from ...core.lock import LOCK_FILE, RunLock, hold_run_dir, inherit_env, shared_fds
from ...core.params import STEPS, ParamsError, load_params_file, resolve_run_dir
from ...model.download import KNOWN_CHECKPOINTS
from .failures import remove_leftovers, what_failed
from .index import write_index_safely
from .kernel import kernel_environment, kernel_manager_for
from .manifest import (
    checkpoint_checksum,
    effective_params,
    headline_metrics,
    input_checksums,
    inputs_of_step,
    read_last_finished_epoch,
    set_stale,
    what_changed,
)
from .reports import (
    export_html_safely,
    mark_interrupted_report,
    notebook_error,
    report_title,
    resume_command,
    set_report_aside,
)
from .workspace import resolve_notebooks, resolve_scenario, scenario_files, step_file

logger = logging.getLogger(__name__)

__all__ = ["run_protocol", "RunFailed", "RunDirInUse", "RunInterrupted"]

#: parameters whose values are paths to resolve against the caller's working directory
_PATH_PARAMS = ("adata_path", "query_path", "reference_path", "reference_index", "checkpoint")


class RunFailed(RuntimeError):
    """A notebook raised; the message names the report and the cell."""

    #: the name of the error the notebook raised (e.g. ``"DiskFullError"``, ``"InputDataError"``)
    ename: str | None = None


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C / SIGINT, SIGTERM) during a step.

    The manifest says ``"interrupted"`` with the step (and for 02 the last finished epoch); ``resume``
    is the command that continues the run. A ``KeyboardInterrupt``, so ``except Exception`` does not
    swallow it.
    """

    def __init__(self, message: str, *, step: str, signal_name: str, resume: str) -> None:
        super().__init__(message)
        self.step, self.signal_name, self.resume = step, signal_name, resume

    def __str__(self) -> str:
        return str(self.args[0])


class _Terminated(KeyboardInterrupt):
    """Raised by the runner's SIGTERM handler: a batch scheduler (or ``kill``) stopped the run."""


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
    #: steps whose files were set aside because a step they depend on re-ran with other parameters or inputs
    stale: list[str] = field(default_factory=list)


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


def _load_overrides(params_dir: Path, steps: list[str], run_dir: Path, cwd: Path) -> tuple[dict[str, dict[str, Any]],
                                                                                          list[str], list[str]]:
    """Read and check every step's YAML before anything runs (an unknown key fails here); also return the step
    files whose own ``run_dir`` the runner's run folder overrides, and warnings about the defaults they keep."""
    if not params_dir.is_dir():
        msg = f"parameter folder {params_dir} does not exist; built-in scenarios: demo, ci, retina-example."
        raise FileNotFoundError(msg)
    out, overridden, notes = {}, [], []
    files = {step: step_file(params_dir, step) for step in steps}
    for step in steps:
        path = files[step]
        if path is None:
            continue
        values = load_params_file(path, STEPS[step])
        notes.extend(_default_warnings(step, path, values))
        for key in _PATH_PARAMS:
            value = values.get(key)
            if isinstance(value, str) and value not in {"demo", *KNOWN_CHECKPOINTS}:
                values[key] = str((cwd / Path(value).expanduser()).resolve())
        own = values.get("run_dir")
        if isinstance(own, str) and resolve_run_dir(own, cwd) != run_dir:
            overridden.append(f"{own!r} in {path.name}")
        values["run_dir"] = str(run_dir)
        STEPS[step].from_mapping(values, source=str(path))  # values checked before any notebook runs
        out[step] = values
    scenario_files(params_dir, steps)  # a missing file is an error, never "all defaults" (the demo data)
    return out, overridden, notes


def _default_warnings(step: str, path: Path, values: dict[str, Any]) -> list[str]:
    """What to say before anything runs about the defaults a step file leaves in place where they change what
    runs (logged after the run's first line)."""
    out = [f"{path} is empty: step {step} runs with all its defaults."] if not values else []
    if step == "01_preprocess":
        for key, what in (("adata_path", "the built-in demo data (scanpy's pbmc68k_reduced), not yours"),
                          ("checkpoint", "a tiny random checkpoint (the demo one), not a pretrained model")):
            if key not in values:
                out.append(f"{path} does not set {key}: step 01 uses {what}. Set {key} in that file ({key}: demo to "
                           "mean it).")
    return out


def _check_run_dir(layout: RunLayout, force: bool, params_dir: Path) -> dict[str, Any] | None:
    """Refuse a run_dir with a finished run or foreign files; return an unfinished run's manifest."""
    if not layout.run_dir.exists() or all(p.name.startswith(LOCK_FILE) for p in layout.run_dir.iterdir()):
        return None
    if not layout.run_manifest.is_file():
        if force:
            return None
        msg = (
            f"run_dir {layout.run_dir} is not empty and holds no run manifest (another run or other files). "
            "Choose a new --run-dir, or pass --force to write into it anyway."
        )
        raise RunDirInUse(msg)
    manifest = read_json(layout.run_manifest)
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

    A step that re-runs with other parameters or input files than the manifest recorded for it makes
    the steps that depend on it stale (02 and 04 depend on 01; 03 on 01 and 02): their files move to
    ``run_dir/stale/<step>-<UTC time>/`` (nothing is deleted), the manifest marks them ``"stale"`` with
    the reason, and the run is ``"partial"`` until they run again. A re-run with the same parameters
    and inputs (resuming an interrupted run) changes nothing.

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
    RunDirInUse, ParamsError
        Before anything runs.
    RunFailed
        A notebook raised (the message names the error, the cell and the report; a full disk inside a
        step reads ``DiskFullError: no space left to write <path> ...``). The manifest says ``"failed"``.
    DiskFullError
        The runner itself could not write a report (the truncated report is renamed ``*.ipynb.incomplete``).
    RunInterrupted
        Ctrl-C (SIGINT) or SIGTERM during a step. The manifest says ``"interrupted"`` with the step, the
        time and (02) the last finished epoch; the report says so on top; the message gives the command
        that resumes the run.
    """
    import papermill  # noqa: F401  (missing: fail before anything is checked or written)

    run = _start_run(params_dir, run_dir, steps, force, kernel_name=kernel_name, html=html, notebooks=notebooks)
    try:
        _run_steps(run)
        return _finish_run(run)
    finally:
        run.lock.release()  # also when a step failed or was interrupted (the OS would at exit anyway)


def _run_steps(run: _Run) -> None:
    """Each chosen step in order; a failure, a full disk or an interruption is recorded, then raised."""
    # the kernels: text progress bars (widgets render badly in executed reports), the runner's lock, a Python
    # stack in the kernel's log if it crashes
    env = {"SCGPT_PROTOCOL_PROGRESS": "text", "PYTHONFAULTHANDLER": "1", **inherit_env(run.lock)}
    sigterm_before = _install_sigterm_handler()
    run.step, run.t0 = run.chosen[0], time.perf_counter()
    try:
        with kernel_environment(env):
            for step in run.chosen:
                _run_step(run, step)
    except KeyboardInterrupt as err:
        _interrupted(run, err)
    except DiskFullError as err:  # the runner's own writes (HTML copy, manifest) after the notebook ran
        manifest, step = run.manifest, run.step
        if manifest["steps"].get(step, {}).get("status") != "failed":
            manifest["steps"][step] = {**manifest["steps"].get(step, {}), "status": "failed", "error": str(err),
                                       "error_type": "DiskFullError"}
            manifest["status"] = "failed"
            remove_leftovers(run.layout, step, manifest)
            _write_manifest_best_effort(run.layout, manifest)
        raise
    finally:
        _restore_sigterm_handler(sigterm_before)


@dataclass
class _Run:
    """One :func:`run_protocol` call: what it runs, where, its manifest and result, and the step in progress."""

    layout: RunLayout
    params_dir: Path
    notebook_dir: Path
    chosen: list[str]
    overrides: dict[str, dict[str, Any]]
    inputs: dict[str, Any]
    manifest: dict[str, Any]
    result: RunResult
    cwd: Path
    kernel_name: str | None
    html: bool
    lock: RunLock | None = None  # the run folder's lock, held until the run ends
    own_notebooks: Path | None = None  # the user's notebook folder (run_protocol(notebooks=...)), None: packaged
    step: str = ""  # the step running (or about to)
    t0: float = 0.0  # when it started (perf_counter)


def _start_run(params_dir: str | Path, run_dir: str | Path, steps: Sequence[str] | None, force: bool, *,
               kernel_name: str | None, html: bool, notebooks: str | Path | None) -> _Run:
    """Check the scenario, the steps, the notebooks and the run folder; write the manifest ("running")."""
    cwd = Path.cwd()
    params_dir = resolve_scenario(params_dir)
    layout = RunLayout(resolve_run_dir(run_dir, cwd))  # as a notebook resolves it
    chosen = _select_steps(steps)
    notebook_dir = resolve_notebooks(notebooks, chosen)
    overrides, overridden, notes = _load_overrides(params_dir, chosen, layout.run_dir, cwd)
    wins = f" (it wins over run_dir {', '.join(overridden)})" if overridden else ""
    (logger.warning if wins else logger.info)("scenario %s; notebooks %s; run folder %s%s", params_dir,
                                              notebooks or "(packaged)", layout.run_dir, wins)
    for note in notes:
        logger.warning("%s", note)
    lock = hold_run_dir(layout.run_dir, step=chosen[0], holder="scgpt-protocol run")  # one writer per run folder
    try:
        return _open_run(layout, lock, params_dir, notebook_dir, chosen, overrides, force=force, cwd=cwd,
                         kernel_name=kernel_name, html=html, own_notebooks=notebook_dir if notebooks else None)
    except BaseException:
        lock.release()
        raise


def _open_run(layout: RunLayout, lock: RunLock, params_dir: Path, notebook_dir: Path, chosen: list[str],
              overrides: dict[str, dict[str, Any]], *, force: bool, cwd: Path, **options: Any) -> _Run:
    """With the run folder held: check what it holds, hash the inputs, write the manifest ("running")."""
    previous = _check_run_dir(layout, force, params_dir)
    hashes: dict[str, Any] = {}
    inputs = {step: inputs_of_step(overrides[step], hashes) for step in chosen}  # before the manifest says "running"
    layout.make_dirs()
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "params_dir": str(params_dir),
        "notebooks_dir": str(notebook_dir),
        "run_dir": str(layout.run_dir),
        "started": _now(),
        "status": "running",
        "versions": package_versions(),
        "steps": (previous or {}).get("steps", {}),
    }
    for step in chosen:  # what failed or killed runs of these steps left half-written
        remove_leftovers(layout, step, manifest)
    layout.write_json(layout.run_manifest, manifest)
    return _Run(layout=layout, params_dir=params_dir, notebook_dir=notebook_dir, chosen=chosen, overrides=overrides,
                inputs=inputs, manifest=manifest, result=RunResult(run_dir=layout.run_dir), cwd=cwd, lock=lock,
                **options)


def _run_step(run: _Run, step: str) -> None:
    """Run one step's notebook: mark what it makes stale, record it in the manifest, execute, record the end."""
    import papermill

    layout, manifest, result = run.layout, run.manifest, run.result
    run.step = step
    run.lock.update(step=step)
    notebook = run.notebook_dir / f"{step}.ipynb"
    report = layout.step_report(step)
    if step == "02_finetune":
        _check_unknown_class(run)
    changes = what_changed(step, manifest["steps"].get(step), short_record(run.overrides[step]), run.inputs[step])
    if changes:
        marked = set_stale(layout, manifest, step, changes)
        result.stale.extend(s for s in marked if s not in result.stale)
    record = {"report": str(report), "status": "running", "started": _now(),
              "params": short_record(run.overrides[step]), "inputs": run.inputs[step]}
    previous = _set_previous_aside(layout, step)
    if previous is not None:
        record["previous_results"] = str(previous.relative_to(layout.run_dir))
    manifest["steps"][step] = record
    layout.write_json(layout.run_manifest, manifest)
    logger.info("running %s -> %s", notebook.name, report)
    run.t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook), str(report), parameters=run.overrides[step], kernel_name=run.kernel_name,
            cwd=str(run.cwd), progress_bar=False, log_output=False,
            kernel_manager_class=kernel_manager_for(layout.kernel_log(step.split("_", 1)[1]), shared_fds(run.lock)),
        )
    except KeyboardInterrupt:
        raise
    except Exception as err:  # papermill wraps every notebook error; report where it failed
        if getattr(err, "ename", None) == "KeyboardInterrupt":  # the kernel itself was interrupted
            raise KeyboardInterrupt from err
        _step_failed(run, err, record)
    seconds = round(time.perf_counter() - run.t0, 1)
    if previous is not None:  # the new results replace them, as a plain overwrite would have
        shutil.rmtree(previous, ignore_errors=True)
        record.pop("previous_results", None)
        if layout.stale_dir.is_dir() and not any(layout.stale_dir.iterdir()):
            layout.stale_dir.rmdir()  # no stale/ left behind when nothing in it is stale
    if run.html:
        export_html_safely(report, report_title(step, layout.run_dir))
    result.steps.append(StepOutcome(step, report, seconds))
    manifest["steps"][step] = {**record, "seconds": seconds, "status": "finished",
                               "finished": _now(), "effective_params": short_record(effective_params(layout, step))}
    manifest["checksums"] = {**input_checksums(run.inputs), "checkpoint": checkpoint_checksum(layout)}
    layout.write_json(layout.run_manifest, manifest)
    write_index_safely(layout, manifest)
    logger.info("%s finished in %.1f s", step, seconds)


def _check_unknown_class(run: _Run) -> None:
    """Before training: a class named like the abstention label while 03 will abstain is refused now, not
    after 02 has trained (03 would refuse it then)."""
    from ...annotate.refinement import UNKNOWN

    layout = run.layout
    evaluate = run.overrides.get("03_evaluate")
    if evaluate is None or not evaluate.get("min_confidence") or not layout.labels.is_file():
        return
    categories = read_json(layout.labels).get("categories") or []
    if UNKNOWN not in categories:
        return
    msg = (f"the training labels (data/labels.json of step 01) have a class named {UNKNOWN!r}, and 03_evaluate "
           f"has min_confidence={evaluate['min_confidence']}: abstention calls unsure cells {UNKNOWN!r}, so 03 "
           "would refuse the model after 02 had trained it. Rename that class in the input (or set it to NaN if "
           "it means 'no label') and run 01 again, or set min_confidence: 0 in the 03 file.")
    run.manifest["status"] = "failed"
    run.manifest["error"] = msg
    _write_manifest_best_effort(layout, run.manifest)
    raise ParamsError(msg)


#: steps whose earlier results are set aside while they run again, so that a failure leaves none looking current
_REPLACED_ON_RERUN = ("03_evaluate", "04_zeroshot")


def _set_previous_aside(layout: RunLayout, step: str) -> Path | None:
    """Move an earlier run's results of 03 / 04 to ``stale/<step>-previous-<time>/`` before the step runs again.

    When the step finishes they are deleted (its new files replace them); when it fails they stay there, and
    no ``metrics.json``, ``predictions.csv`` or ``zeroshot/*`` of the earlier run sits beside the new parameters.
    """
    if step not in _REPLACED_ON_RERUN:
        return None
    stamp = "previous-" + utc_stamp()
    folder, moved = layout.set_aside(step, stamp)
    if not moved:
        return None
    logger.info("%s ran here before: its earlier results are set aside in %s while it runs again", step, folder)
    return folder


def _finish_run(run: _Run) -> RunResult:
    """The run's status ("finished" or "partial") and headline in the manifest; a warning about stale steps."""
    layout, manifest = run.layout, run.manifest
    all_done = all(manifest["steps"].get(s, {}).get("status") == "finished" for s in STEPS)
    manifest["status"] = "finished" if all_done else "partial"
    manifest["finished"] = _now()
    manifest["headline"] = run.result.summary = headline_metrics(layout, manifest["steps"])
    layout.write_json(layout.run_manifest, manifest)
    write_index_safely(layout, manifest)
    stale = [s for s in STEPS if manifest["steps"].get(s, {}).get("status") == "stale"]
    if stale:
        logger.warning("stale (a step they depend on re-ran with other parameters or inputs; run them again): %s; "
                       "their old files are under %s", ", ".join(stale), layout.stale_dir)
    return run.result


def _now() -> str:
    return utc_now()


def _install_sigterm_handler() -> Any:
    """SIGTERM (a scheduler's stop, ``kill``) interrupts the run like Ctrl-C, so it is recorded."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated("SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _restore_sigterm_handler(before: Any) -> None:
    if before is not None:
        signal.signal(signal.SIGTERM, before)


def _write_manifest_best_effort(layout: RunLayout, manifest: dict[str, Any]) -> str | None:
    """Write the manifest; if even that fails (a full disk), log it and say so instead of raising."""
    try:
        layout.write_json(layout.run_manifest, manifest)
        return None
    except OSError as err:
        logger.error("could not update %s either: %s", layout.run_manifest, err)
        return f"run_manifest.json could not be updated ({type(err).__name__}); it still says what it said before"


def _seconds(run: _Run) -> float:
    """How long the step in progress has run."""
    return round(time.perf_counter() - run.t0, 1)


def _step_failed(run: _Run, err: Exception, record: dict[str, Any]) -> None:
    """Record the failed step (manifest "failed", ``record``: its entry so far), leave no report that looks
    valid and no half-written file, raise the typed error."""
    layout, manifest, step, seconds = run.layout, run.manifest, run.step, _seconds(run)
    report = layout.step_report(step)
    error, full, ename, aside = what_failed(layout, step, err, manifest)
    if record.get("previous_results"):
        error += f" (the results of its earlier run were set aside in {record['previous_results']})"
    outcome = StepOutcome(step, report, seconds, "failed", error)
    run.result.steps.append(outcome)
    manifest["steps"][step] = {**record, "seconds": seconds, "status": "failed", "error": error, "error_type": ename}
    manifest["status"] = "failed"
    manifest_note = _write_manifest_best_effort(layout, manifest)
    if run.html and report.is_file() and not aside:
        try:
            export_html_safely(report, report_title(step, layout.run_dir))
        except OSError as html_err:
            logger.error("no HTML copy of %s: %s", report, html_err)
    write_index_safely(layout, manifest)  # after the HTML copy, which it links to
    if full is not None:
        first = notebook_error(err)  # a cell had failed before papermill could not save the report
        note = "; ".join(n for n in (f"a cell had failed first: {first}" if first else None, aside, manifest_note)
                         if n)
        note = " ".join(n for n in (full.note, f"Step {step} failed{': ' + note if note else ''}.") if n)
        raise DiskFullError(full.path, needed=full.needed, free=full.free, cause=err, note=note) from err
    msg = f"step {step} failed: {error}" + (f"; {manifest_note}" if manifest_note else "")
    failed = RunFailed(msg)
    failed.ename = ename
    raise failed from None


def _interrupted(run: _Run, err: BaseException) -> None:
    """Record the interrupted step (manifest "interrupted"), mark its report, say how to resume, raise."""
    layout, manifest, step, seconds = run.layout, run.manifest, run.step, _seconds(run)
    what = "SIGTERM" if isinstance(err, _Terminated) else (
        "KeyboardInterrupt in the notebook" if isinstance(err.__cause__, Exception) else "SIGINT / Ctrl-C")
    when = _now()
    resume = resume_command(run.params_dir, layout.run_dir, run.chosen, step, run.own_notebooks)
    epoch_note, info = "", {"step": step, "time": when, "signal": what, "resume": resume}
    if step == "02_finetune":
        epoch = read_last_finished_epoch(layout)
        params = STEPS[step].from_mapping(run.overrides[step])
        total, keeps = params.epochs, params.resume
        info["last_finished_epoch"] = None if params.strategies else epoch
        if params.strategies:  # a comparison keeps each finished strategy; the one in progress starts over
            folder = layout.train_dir / "comparison" / "strategies"
            done = sorted(d.name for d in folder.glob("*") if (d / "outcome.json").is_file())
            info["strategies_finished"] = done
            epoch_note = (f" Strategies already trained ({', '.join(done) or 'none'}) are reused when it resumes; "
                          "the others train from epoch 1.")
        elif epoch is None:
            epoch_note = " No fine-tuning epoch had finished; fine-tuning starts from epoch 1 again."
        elif keeps:
            epoch_note = (f" Fine-tuning had finished epoch {epoch} of {total}; it resumes after epoch {epoch} "
                          "(train/last_state.pt).")
        else:
            epoch_note = f" Fine-tuning had finished epoch {epoch} of {total}; with resume: false it starts over."
    report = layout.step_report(step)
    aside = set_report_aside(report)
    cell = None
    if report.is_file() and not aside:
        try:
            cell = mark_interrupted_report(report, step=step, what=what, when=when, resume=resume,
                                            epoch_note=epoch_note)
            if run.html:
                export_html_safely(report, report_title(step, layout.run_dir))
        except Exception as mark_err:  # the record below matters more than the report's banner
            logger.error("could not mark %s as interrupted: %s", report, mark_err)
    info["cell"] = cell
    record = manifest["steps"].get(step, {})
    manifest["steps"][step] = {**record, "status": "interrupted", "seconds": seconds, "interrupted": info}
    manifest["status"] = "interrupted"
    manifest["interrupted"] = info
    run.result.steps.append(StepOutcome(step, report, seconds, "interrupted", f"interrupted ({what})"))
    manifest_note = _write_manifest_best_effort(layout, manifest)
    msg = (f"step {step} was interrupted ({what}) at {when}"
           f"{f', in cell In [{cell}] of {report}' if cell is not None else ''}.{epoch_note} "
           f"Resume with: {resume}" + (f" ({aside})" if aside else "")
           + (f"; {manifest_note}" if manifest_note else ""))
    logger.error("%s", msg)
    raise RunInterrupted(msg, step=step, signal_name=what, resume=resume) from err
