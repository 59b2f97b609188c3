"""The run summary ``reports/index.html``: one page a reader opens first.

Rewritten by the runner after every step (finished, failed or interrupted), and by 03 and 04 when they run
interactively: each step's status with a link to its report, the headline table of every finished step (all
methods under the same rules on the same cells), the verdict, the main figures and what to do next. It reads
only the files the steps wrote, so it is never ahead of or behind the run folder.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from ...core.io import atomic_write, read_json, utc_now
from ...core.params import STEPS
from ...metrics import BASELINE_METHOD, HEADERS, SCGPT_METHOD, ZEROSHOT, ZEROSHOT_METHOD
from ..display.banners import checkpoint_banner, next_steps
from ..display.summary import run_summary
from ..display.tables import comparison_display

if TYPE_CHECKING:
    from ...core.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = ["INDEX_NAME", "MAIN_FIGURES", "write_run_index", "write_index_safely", "run_index_html"]

INDEX_NAME = "index.html"
#: the figures the summary shows, in order, with a caption: (file stem in figures/, caption)
MAIN_FIGURES = (
    ("overview_umap", "01: the input, coloured by label"),
    ("training_curves", "02: training curves"),
    ("call_umaps", "03: predicted label, majority voting and confidence on the test cells"),
    ("confusion", "03: confusion matrix (scGPT, test split)"),
    ("per_class_f1", "03: F1 per cell type"),
    ("marker_dotplot", "03: marker genes of each type on the test cells, grouped by prediction"),
    ("confidence_by_type", "03: confidence per predicted type"),
    ("reliability", "03: accuracy against confidence, raw and calibrated (reliability diagram)"),
    ("coverage_curve", "03: coverage against accuracy over min_confidence"),
    ("zeroshot_umap", "04: reference and query in one embedding"),
)
_STATUS_COLOR = {"finished": "#2e7d32", "failed": "#c62828", "interrupted": "#c62828", "stale": "#b26a00",
                 "running": "#1565c0"}


def _read(path: Path) -> Any:
    """A run's JSON record; None when missing or unreadable (the summary never fails a step)."""
    return read_json(path, default=None, lenient=True)


def _record(manifest: Mapping[str, Any], step: str) -> Mapping[str, Any]:
    """The manifest's record of ``step`` (empty when the step has none)."""
    return (manifest.get("steps") or {}).get(step) or {}


def _report_link(layout: RunLayout, step: str) -> str:
    """The step's name, linked to its report: the HTML copy, else the executed notebook (e.g. of a failed step
    whose HTML could not be made), else plain text."""
    for name in (f"{step}.html", f"{step}.ipynb"):
        if (layout.reports_dir / name).is_file():
            return f"<a href='{html.escape(name)}'>{html.escape(step)}</a>"
    return html.escape(step)


def _steps_table(layout: RunLayout, manifest: Mapping[str, Any]) -> str:
    rows = []
    for step in STEPS:
        record = _record(manifest, step)
        status = str(record.get("status") or "not run")
        seconds = f"{float(record['seconds']):.0f} s" if record.get("seconds") is not None else ""
        color = _STATUS_COLOR.get(status, "#555")
        rows.append(f"<tr><td>{_report_link(layout, step)}</td>"
                    f"<td style='color:{color};font-weight:bold'>{html.escape(status)}</td>"
                    f"<td>{seconds}</td><td>{html.escape(str(record.get('finished') or ''))}</td></tr>")
        if status == "failed" and record.get("error"):
            rows.append(f"<tr><td></td><td colspan='3' style='color:{color}'><code>"
                        f"{html.escape(_shorten(str(record['error'])))}</code></td></tr>")
    return ("<table><tr><th>Step</th><th>Status</th><th>Time</th><th>Finished (UTC)</th></tr>"
            + "".join(rows) + "</table>")


def _shorten(text: str, limit: int = 1_000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _failed_step(manifest: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The step the run stopped at, with its record (None when no step failed)."""
    return next(((step, _record(manifest, step)) for step in STEPS
                 if _record(manifest, step).get("status") == "failed"), None)


def _failure_html(layout: RunLayout, manifest: Mapping[str, Any]) -> str:
    failed = _failed_step(manifest)
    if failed is None:
        return ""
    step, record = failed
    return (f"<p style='color:{_STATUS_COLOR['failed']}'><b>{html.escape(step)} failed</b>: "
            f"<code>{html.escape(_shorten(str(record.get('error') or 'no message recorded')))}</code></p>"
            f"<p>Open its report ({_report_link(layout, step)}) at the failed cell and "
            f"<code>logs/{html.escape(layout.step_log(STEPS[step].STEP).name)}</code>; fix the cause and run the "
            "step again "
            "with the same run_dir.</p>")


def _leftovers_html(manifest: Mapping[str, Any]) -> str:
    """The temporary files of failed writes the runner could not remove (``leftovers`` of the manifest)."""
    kept = [line for lines in (manifest.get("leftovers") or {}).values() for line in lines]
    if not kept:
        return ""
    items = "".join(f"<li><code>{html.escape(_shorten(str(line)))}</code></li>" for line in kept)
    return (f"<p style='color:{_STATUS_COLOR['failed']}'><b>Half-written files left behind</b> (they could not be "
            f"removed; delete them to give their space back):</p><ul>{items}</ul>")


def _headline(layout: RunLayout) -> str:
    """Every finished step's headline: 03's methods (and 04's kNN vote when it scored the same cells)."""
    parts = []
    methods = dict(((_read(layout.metrics) or {}).get("methods")) or {})
    zs = _read(layout.zeroshot_metrics) or {}
    summary = run_summary(layout)
    # the summary puts zero-shot's numbers in its row only when 04 scored 03's test cells
    row = summary.table.loc[ZEROSHOT.label] if ZEROSHOT.label in summary.table.index else None
    same_cells = row is not None and pd.notna(row[HEADERS["macro_f1"]])
    if zs.get("knn_vote"):
        knn = {**zs["knn_vote"], "refinement": zs.get("refinement")}
        if methods and same_cells:
            methods[ZEROSHOT_METHOD] = knn
        else:
            parts.append(comparison_display({ZEROSHOT_METHOD: knn}, caption="04: zero-shot on its query cells")
                         .to_html())
    if methods:
        ordered = {m: methods[m] for m in (SCGPT_METHOD, BASELINE_METHOD, ZEROSHOT_METHOD) if m in methods}
        caption = f"the {methods[SCGPT_METHOD]['n_cells']:,} test cells" if SCGPT_METHOD in methods else "test cells"
        parts.insert(0, comparison_display(ordered, caption=f"Every method under the same rules, on {caption}")
                     .to_html())
    if methods or zs:
        parts.append(summary._repr_html_())
    return "".join(parts) or "<p>No step has scored cells yet: run 03_evaluate (and 04_zeroshot).</p>"


def _figures(layout: RunLayout) -> str:
    cells = []
    for stem, caption in MAIN_FIGURES:
        path = layout.figure(stem)
        if path.is_file():
            rel = f"../{path.parent.name}/{path.name}"
            cells.append(f"<figure style='display:inline-block;margin:6px;vertical-align:top;max-width:46%'>"
                         f"<a href='{html.escape(rel)}'><img src='{html.escape(rel)}' style='max-width:100%'></a>"
                         f"<figcaption style='font-size:13px'>{html.escape(caption)}</figcaption></figure>")
    return "".join(cells) or "<p>No figures yet.</p>"


def run_index_html(layout: RunLayout, manifest: Mapping[str, Any] | None = None) -> str:
    """The HTML of the run summary (see the module's description)."""
    manifest = manifest if manifest is not None else (_read(layout.run_manifest) or {})
    record = _read(layout.checkpoint_record)
    banner = checkpoint_banner(record)._repr_html_() if record else ""
    done = [s for s in STEPS if _record(manifest, s).get("status") == "finished"]
    nxt = _failure_html(layout, manifest) or (
        next_steps(layout, done[-1], summary_page=True)._repr_html_() if done else "")
    now = utc_now()
    title = f"Run summary: {Path(layout.run_dir).name}"
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:20px auto;padding:0 16px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 10px;text-align:left;"
             "border-bottom:1px solid #e0e0e0}h2{margin-top:28px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Run folder <code>{html.escape(str(layout.run_dir))}</code>; written {now}. "
            f"Status of the run: <b>{html.escape(str(manifest.get('status', 'interactive')))}</b>.</p>{banner}"
            f"<h2>1. Steps</h2>{_steps_table(layout, manifest)}{_leftovers_html(manifest)}"
            f"<h2>2. Headline</h2>{_headline(layout)}"
            f"<h2>3. Main figures</h2>{_figures(layout)}"
            f"<h2>4. Next</h2>{nxt or '<p>Run 01_preprocess.</p>'}</body></html>")


def write_run_index(layout: RunLayout, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``reports/index.html`` atomically (see the module's description) and return its path."""
    path = layout.reports_dir / INDEX_NAME
    text = run_index_html(layout, manifest)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.debug("wrote the run summary %s", path)
    return path


def write_index_safely(layout: RunLayout, manifest: Mapping[str, Any] | None = None) -> Path | None:
    """:func:`write_run_index`, logging (not raising) a failure: the summary never fails a step or a run."""
    try:
        return write_run_index(layout, manifest)
    except Exception as err:  # a summary that cannot be written must not hide the step's own outcome
        logger.warning("could not write the run summary %s: %s", layout.reports_dir / INDEX_NAME, err)
        return None
