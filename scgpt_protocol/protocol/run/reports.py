"""The executed notebooks as reports: HTML beside each ``.ipynb``, the title, an interrupted report marked
on top with the command that resumes it, a report set aside when its step reruns, and the failing cell
named when a step fails.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ...core.io import atomic_write, disk_full_error, is_disk_full
from ...core.params import STEPS


def resume_command(params_dir: Path, run_dir: Path, chosen: list[str], step: str,
                    notebooks: Path | None = None) -> str:
    rest = [s.split("_", 1)[0] for s in chosen[chosen.index(step):]]
    steps = "" if len(rest) == len(STEPS) else f" --steps {','.join(rest)}"
    own = f" --notebooks {shlex.quote(str(notebooks))}" if notebooks is not None else ""
    return f"scgpt-protocol run {shlex.quote(str(params_dir))} --run-dir {shlex.quote(str(run_dir))}{steps}{own}"


def set_report_aside(report: Path) -> str | None:
    """A report that is not a readable notebook (papermill could not finish writing it, e.g. on a full disk) must
    not look valid, nor keep the space it took: it is removed. Returns what was done, or None."""
    import nbformat

    if not report.is_file():
        return None
    try:
        nbformat.read(report, as_version=4)
        return None
    except Exception:  # truncated JSON, or not a notebook at all
        pass
    try:
        report.unlink()
    except OSError as err:
        return f"the truncated report {report} could not be removed ({err.strerror or err})"
    return f"the truncated report {report} was removed"


def mark_interrupted_report(report: Path, *, step: str, what: str, when: str, resume: str,
                             epoch_note: str) -> int | None:
    """Make an interrupted step's report say so: a note on top, the interrupted cell and the cells that did
    not run marked (papermill marks every cell it did not reach "completed"). Returns the cell's number."""
    import nbformat

    nb = nbformat.read(report, as_version=4)
    stopped = None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        status = cell.metadata.get("papermill", {}).get("status")
        errored = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
        if stopped is None and (errored or status in {"running", "failed"} or cell.get("execution_count") is None):
            stopped = i
            cell.metadata.setdefault("papermill", {})["status"] = (
                "interrupted" if (errored or status in {"running", "failed"}) else "not-run")
        elif stopped is not None:
            cell.metadata.setdefault("papermill", {})["status"] = "not-run"
    where, number = "after its last cell", None
    if stopped is not None:
        cell = nb.cells[stopped]
        number = cell.get("execution_count")
        first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
        label = f"In [{number}]" if number is not None else f"cell {stopped + 1}"
        where = (f"in cell {label} (`{first_line.strip()[:80]}`)" if cell.metadata["papermill"]["status"] ==
                 "interrupted" else f"before cell {label} (`{first_line.strip()[:80]}`)")
        nb.cells.insert(stopped + 1, nbformat.v4.new_markdown_cell(
            "**Interrupted here.** The cells below did not run.",
            metadata={"tags": ["scgpt-protocol-interrupted"]}))
    banner = (
        f"**Incomplete report: step `{step}` was interrupted ({what}) at {when}, {where}.** "
        f"The cells after it did not run: their outputs are missing and nothing in this report is a final "
        f"result.{epoch_note}\n\nResume with the same parameters and run folder:\n\n```\n{resume}\n```"
    )
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(banner, metadata={"tags": ["scgpt-protocol-interrupted"]}))
    nb.metadata["scgpt_protocol"] = {"status": "interrupted", "step": step, "signal": what, "time": when,
                                     "cell": number}
    atomic_write(report, lambda tmp: nbformat.write(nb, str(tmp)))
    return number


#: added to every HTML report: long output lines wrap between words, not mid-word, and stay on the page
_REPORT_CSS = """<style>
.jp-OutputArea-output pre, .jp-RenderedText pre { white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere; }
.jp-InputArea .highlight pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.jp-RenderedHTMLCommon table { margin-left: 0; }
</style>
"""


#: cells whose code the HTML report leaves out (their output stays): papermill's parameters and the set-up
COLLAPSED_TAGS = ("parameters", "injected-parameters", "setup")


def report_title(step: str, run_dir: Path) -> str:
    """The ``<title>`` of a report: its step and the run's name (one browser tab each)."""
    return f"{step} · {Path(run_dir).name} · scgpt-protocol"


def _export_html(report: Path, title: str | None = None) -> Path | None:
    try:
        import nbformat
        from nbconvert import HTMLExporter
        from nbconvert.preprocessors import TagRemovePreprocessor
    except ImportError:  # nbconvert comes with jupyter; without it the .ipynb report stays
        return None
    nb = nbformat.read(report, as_version=4)
    nb.metadata["title"] = title or report.stem  # nbconvert's <title>; default: "Notebook"
    exporter = HTMLExporter()
    # set-up and parameter code is hidden in the HTML (the report shows the parameters as a table)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags=set(COLLAPSED_TAGS)), enabled=True)
    body, _ = exporter.from_notebook_node(nb)
    body = body.replace("</head>", _REPORT_CSS + "</head>", 1)
    html = report.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def export_html_safely(report: Path, title: str | None = None) -> None:
    """The HTML copy of a report; a full disk raises DiskFullError and leaves no half-written .html."""
    try:
        _export_html(report, title)
    except OSError as err:
        partial = report.with_suffix(".html")
        if is_disk_full(err):
            needed = partial.stat().st_size if partial.is_file() else None
            partial.unlink(missing_ok=True)
            raise disk_full_error(partial, needed=needed, cause=err) from err
        raise


def notebook_error(err: BaseException | None) -> str | None:
    """``ename: evalue`` of the notebook error in ``err``'s chain (papermill's), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "ename", None):
            return f"{err.ename}: {getattr(err, 'evalue', '')}"
        err = err.__cause__ or err.__context__
    return None
