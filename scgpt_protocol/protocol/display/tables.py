"""The tables of the reports: every method under the same rule side by side, per class, what a step wrote.

Every table is a pandas ``Styler`` (``.data`` is the DataFrame) whose text -- cell-type names, gene names,
parameter values such as ``<cls>`` -- is HTML-escaped, so a label ``B & T <naive>`` shows as written.

* :func:`comparison_display` -- the headline: every method under the same rules, side by side: every cell
  labelled (argmax), ``Unknown`` below ``min_confidence`` counted wrong, the assigned cells with their
  coverage, and majority voting;
* :func:`metrics_display` -- headline metrics of several methods, 3 decimals, readable headers;
* :func:`per_class_table` -- per class: each method's F1 (on the assigned cells when abstaining) and the
  share of the class's cells left ``Unknown``, sorted by support;
* :func:`refinement_table` -- one method's rules side by side;
* :func:`files_table` -- what a step wrote.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ...data.labels import by_count
from ...metrics import HEADERS, HEADLINE_METRICS, METHODS, metrics_table

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

    from ...core.layout import RunLayout

__all__ = ["styled", "comparison_table", "comparison_display", "metrics_display", "per_class_frame",
    "per_class_table", "rule_metrics", "refinement_table", "files_table", "fmt_value", "FEW_CELLS", "DECIMALS"]

#: classes with fewer test cells than this are flagged in :func:`per_class_table`
FEW_CELLS = 5
DECIMALS = 3


def fmt_value(value: Any) -> str:
    """One number as a report writes it in text: ``n/a`` when missing, counts with thousands separators,
    others to :data:`DECIMALS` decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{DECIMALS}f}"


def _metrics(value: Any) -> Mapping[str, Any]:
    metrics = getattr(value, "metrics", value)
    if not isinstance(metrics, Mapping):
        msg = f"expected a metrics dict (or an object with .metrics); got {type(value).__name__}."
        raise TypeError(msg)
    return metrics


def refinement_table(metrics: Mapping[str, Any], refined: Mapping[str, Any] | None = None,
                     *, method: str = "scGPT") -> pd.DataFrame:
    """Headline metrics of the per-cell call, the assigned cells and the majority vote, side by side.

    Parameters
    ----------
    metrics
        :func:`~scgpt_protocol.metrics.classification_metrics` of the per-cell calls on all cells
        (``EvalResult.metrics``), holding the record of :func:`refinement_metrics` under
        ``"refinement"`` unless ``refined`` is given.
    method
        Name at the start of each row.

    Returns
    -------
    pandas.DataFrame
        :func:`~scgpt_protocol.metrics.metrics_table` with a ``coverage`` column.
    """
    refined = refined if refined is not None else metrics.get("refinement")
    if not refined:
        msg = "these metrics hold no refinement; evaluate a prediction made with refine(...) first."
        raise ValueError(msg)
    t = refined["min_confidence"]
    rows: dict[str, Any] = {}
    coverage: dict[str, Any] = {}
    name = f"{method} per cell" + (f", all (Unknown<{t:g} wrong)" if t else "")
    rows[name], coverage[name] = metrics, refined["coverage"]
    if t and refined["assigned"] is not None:
        name = f"{method} per cell, assigned only"
        rows[name], coverage[name] = refined["assigned"], refined["coverage"]
    if refined["majority_voting"] is not None:
        name = f"{method} majority vote ({refined['majority_voting'].get('n_clusters')} clusters)"
        rows[name], coverage[name] = refined["majority_voting"], refined["majority_voting"].get("coverage")
    table = metrics_table(rows)
    table["coverage"] = [coverage[m] for m in table.index]
    return table


def styled(frame: pd.DataFrame, *, caption: str | None = None, integer: Sequence[str] = (),
           text: Sequence[str] = ()) -> Styler:
    """A report table: 3 decimals, ``n/a`` for missing values, left-aligned text, and every value, index
    label and column name HTML-escaped (a cell type ``B & T <naive>`` or the token ``<cls>`` shows as written)."""
    numeric = [c for c in frame.columns if c not in integer and pd.api.types.is_float_dtype(frame[c])]
    styler = frame.style.format(escape="html", na_rep="n/a")
    styler = styler.format(precision=DECIMALS, na_rep="n/a", subset=numeric)
    if integer:
        styler = styler.format(lambda v: "n/a" if pd.isna(v) else f"{int(v):,}", subset=list(integer))
    styler = styler.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    styler = styler.set_table_styles(
        [{"selector": "th", "props": "text-align:left; padding:2px 8px"},
         {"selector": "td", "props": "padding:2px 8px"},
         {"selector": "caption", "props": "caption-side:top; text-align:left; font-weight:bold"}]
    )
    text = [c for c in text if c in frame.columns]
    if text:
        styler = styler.set_properties(subset=text, **{"text-align": "left", "white-space": "nowrap"})
    styler = styler.set_table_styles([{"selector": "th.row_heading", "props": "text-align:left"}], overwrite=False)
    if caption:
        styler = styler.set_caption(html.escape(caption))
    return styler


def metrics_table_frame(results: Mapping[str, Any], *, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rounded headline metrics of several methods with readable headers (see :func:`metrics_display`)."""
    return metrics_table(results, columns or HEADLINE_METRICS, decimals=DECIMALS, readable=True, notes=True)


def metrics_display(results: Mapping[str, Any], *, caption: str | None = None) -> Styler:
    """Headline metrics of several methods side by side, for a report.

    Parameters
    ----------
    results
        Method name -> metrics dict of :func:`~scgpt_protocol.metrics.classification_metrics`
        (or an object with ``.metrics``).
    caption
        Table caption (e.g. which cells).

    Returns
    -------
    pandas.io.formats.style.Styler
        3 decimals, readable headers (:data:`HEADERS`), ``n/a`` for a missing value and a ``Note``
        column giving the reason (e.g. why the macro AUROC could not be computed). ``.data`` is the
        rounded DataFrame.
    """
    return styled(metrics_table_frame(results), caption=caption, integer=["n cells"], text=["Note"])


def _short(method: str) -> str:
    """``scGPT`` / ``baseline`` / ``zero-shot`` for the package's method names, else the name itself."""
    return {m.name: m.short for m in METHODS}.get(str(method), str(method))


def _per_class(metrics: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {str(r["label"]): r for r in (metrics or {}).get("per_class") or []}


def per_class_frame(results: Mapping[str, Any], *, few: int = FEW_CELLS, cells: str = "test") -> pd.DataFrame:
    """Per-class F1 of each method side by side, with support; see :func:`per_class_table`."""
    if not results:
        raise ValueError("results is empty; give at least one method name -> metrics dict.")
    support_name = f"Support ({cells} cells)"
    support: dict[str, int] = {}
    columns: dict[str, dict[str, float]] = {}
    for method, value in results.items():
        metrics = _metrics(value)
        if metrics.get("per_class") is None:
            msg = f"metrics of {method!r} have no 'per_class' entry; pass the dicts of classification_metrics()."
            raise ValueError(msg)
        rows = _per_class(metrics)
        for label, r in rows.items():
            support[label] = max(support.get(label, 0), int(r["support"]))
        refined = metrics.get("refinement") or {}
        short = _short(method)
        if refined.get("min_confidence"):  # abstained apart from misclassified
            assigned = _per_class(refined.get("assigned"))
            unknown = refined.get("unknown_by_class") or {}
            columns[f"{short} F1 (assigned cells)"] = {
                label: float(assigned[label]["f1"]) if label in assigned else np.nan for label in rows}
            columns[f"{short} share Unknown"] = {
                label: unknown.get(label, 0) / r["support"] if r["support"] else np.nan for label, r in rows.items()}
        else:
            columns[f"{short} F1"] = {label: float(r["f1"]) for label, r in rows.items()}
    frame = pd.DataFrame(columns).round(DECIMALS)
    frame[support_name] = pd.Series(support)
    frame = frame[frame[support_name] > 0]
    frame = frame.loc[by_count(frame[support_name])]  # the one class order: largest first, ties by name
    frame["Flag"] = np.where(frame[support_name] < few, f"fewer than {few} cells", "")
    frame.index.name = "Cell type"
    return frame


#: the rules of :func:`comparison_table`, in order: (key, row name)
RULES = (
    ("argmax", "every cell labelled (argmax)"),
    ("abstention", "Unknown below {t:g} counted wrong"),
    ("assigned", "assigned cells only"),
    ("majority_voting", "majority voting over over-clusters"),
)
COMPARISON_METRICS = ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy")


def _rule_rows(metrics: Mapping[str, Any]) -> dict[str, tuple[Mapping[str, Any], float | None]]:
    """``{rule key: (metrics, coverage)}`` of one method (only its headline without a refinement)."""
    refined = metrics.get("refinement")
    if not refined:
        return {"argmax": (metrics, 1.0)}
    t = float(refined.get("min_confidence") or 0.0)
    rows = {"argmax": (refined.get("argmax") or metrics, 1.0)}
    if t:
        rows["abstention"] = (metrics, refined["coverage"])
        if refined.get("assigned"):
            rows["assigned"] = (refined["assigned"], refined["coverage"])
    if refined.get("majority_voting"):
        rows["majority_voting"] = (refined["majority_voting"], refined["majority_voting"].get("coverage"))
    return rows


def rule_metrics(results: Mapping[str, Any], rule: str = "argmax") -> dict[str, Mapping[str, Any]]:
    """Each method's metrics under one rule of :data:`RULES` (``"argmax"``, ``"abstention"``, ``"assigned"``,
    ``"majority_voting"``); a method without that rule is left out (e.g. for the per-class figure)."""
    keys = [k for k, _ in RULES]
    if rule not in keys:
        raise ValueError(f"rule={rule!r} is not one of {keys}.")
    out = {}
    for method, value in results.items():
        rows = _rule_rows(_metrics(value))
        if rule in rows:
            out[str(method)] = rows[rule][0]
    return out


def comparison_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """Every method under the same rules, side by side (the headline of 03 and 04).

    Parameters
    ----------
    results
        Method name -> metrics of :func:`~scgpt_protocol.evaluate.scoring.evaluate_predictions` (scGPT) or
        :func:`~scgpt_protocol.evaluate.scoring.like_for_like` (the baseline under scGPT's rule): the
        headline metrics with, under ``"refinement"``, the argmax, assigned and majority-voting ones.

    Returns
    -------
    pandas.DataFrame
        Index (``Rule``, ``Method``), grouped by rule so that the methods under one rule sit together:
        every cell labelled (argmax), ``Unknown`` below ``min_confidence`` counted wrong, the assigned cells
        only, majority voting; columns accuracy, macro-F1, weighted-F1, balanced accuracy, macro AUROC
        (argmax rows: it ranks the probabilities and does not depend on a rule), coverage, n cells.
    """
    if not results:
        raise ValueError("results is empty; give at least one method name -> metrics dict.")
    per_method = {str(m): _rule_rows(_metrics(v)) for m, v in results.items()}
    thresholds = {float((_metrics(v).get("refinement") or {}).get("min_confidence") or 0.0)
                  for v in results.values()}
    t = max(thresholds)
    records = []
    for key, name in RULES:
        for method, rows in per_method.items():
            if key not in rows:
                continue
            metrics, coverage = rows[key]
            values = {HEADERS.get(k, k): metrics.get(k) for k in COMPARISON_METRICS}
            values[HEADERS["macro_auroc"]] = metrics.get("macro_auroc") if key == "argmax" else None
            values["Coverage"] = coverage
            values[HEADERS["n_cells"]] = (metrics.get("n_cells") if key != "assigned"
                                          else rows["abstention"][0].get("n_cells"))
            records.append({"Rule": name.format(t=t), "Method": method, **values})
    frame = pd.DataFrame.from_records(records).set_index(["Rule", "Method"])
    numeric = [c for c in frame.columns if c != HEADERS["n_cells"]]
    frame[numeric] = frame[numeric].astype(float).round(DECIMALS)
    frame[HEADERS["n_cells"]] = frame[HEADERS["n_cells"]].astype("Int64")
    return frame


def comparison_display(results: Mapping[str, Any], *, caption: str | None = None) -> Styler:
    """:func:`comparison_table` for a report (``.data`` is the DataFrame); the rules' rows alternate shading."""
    frame = comparison_table(results)
    styler = styled(frame, caption=caption, integer=[HEADERS["n_cells"]])
    rules = list(dict.fromkeys(frame.index.get_level_values(0)))

    def shade(row: pd.Series) -> list[str]:
        return ["background:#f4f6f8" if rules.index(row.name[0]) % 2 else "" for _ in row]

    return styler.apply(shade, axis=1)


def per_class_table(results: Mapping[str, Any], *, few: int = FEW_CELLS, cells: str = "test") -> Styler:
    """Per class: the F1 of each method (e.g. scGPT and the baseline) and the support, for a report.

    Parameters
    ----------
    results
        Method name -> metrics dict with ``per_class`` (:func:`~scgpt_protocol.metrics.classification_metrics`).
        With abstention (``refinement.min_confidence > 0``) a method gets two columns: its F1 on the
        assigned cells and the share of the class's cells left ``Unknown``, so that abstained cells are told
        apart from misclassified ones; otherwise its F1.
    few
        Classes with fewer true cells are flagged (their F1 rests on a handful of cells).
    cells
        Which cells the support counts (``"test"``, ``"query"``).

    Returns
    -------
    pandas.io.formats.style.Styler
        One row per class with true cells, sorted by support (largest first); columns
        ``<method> F1`` (or ``<method> F1 (assigned cells)`` and ``<method> share Unknown``),
        ``Support (<cells> cells)`` and ``Flag``; flagged rows in grey italics. ``.data`` is the DataFrame.
    """
    frame = per_class_frame(results, few=few, cells=cells)
    styler = styled(frame, integer=[f"Support ({cells} cells)"], text=["Flag"])

    def grey(row: pd.Series) -> list[str]:
        return ["color:#777;font-style:italic" if row["Flag"] else "" for _ in row]

    return styler.apply(grey, axis=1)


def files_table(written: Mapping[str, Any], layout: RunLayout | None = None) -> Styler:
    """What a step wrote, one row per file, paths relative to ``run_dir`` when inside it (``.data``: the DataFrame)."""
    from pathlib import Path

    rows = {}
    for name, path in written.items():
        path = Path(path)
        if layout is not None:
            try:
                path = path.resolve().relative_to(Path(layout.run_dir).resolve())
            except ValueError:
                pass
        rows[str(name)] = str(path)
    where = f"File (in {layout.run_dir})" if layout is not None else "File"
    frame = pd.DataFrame({where: pd.Series(rows)})
    frame.index.name = "Written"
    return styled(frame, text=[where])
