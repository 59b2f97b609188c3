"""Classification metrics and the tables built from them, below every step that scores cells.

:func:`classification_metrics` (accuracy, macro / weighted F1, balanced accuracy, Cohen's kappa, macro AUROC,
per class, with a reason for every n/a), :func:`confusion`, :func:`coverage_curve` (accuracy against the share
of cells assigned, for abstention), :func:`metrics_table` (the headline metrics of several methods side by
side) and the method names every table, file and figure uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:

    pass

__all__ = ["Method", "METHODS", "SCGPT", "BASELINE", "ZEROSHOT", "METRIC_DESCRIPTIONS", "HEADLINE_METRICS",
    "SUMMARY_METRICS", "HEADERS", "SCGPT_METHOD", "BASELINE_METHOD", "ZEROSHOT_METHOD", "headline_values",
    "missing_reason", "classification_metrics", "metrics_table", "confusion", "coverage_curve"]

@dataclass(frozen=True)
class Method:
    """A method the package scores, named once for every file, table and figure.

    ``name``: its name in ``metrics.json``, the run manifest, DuckDB and :func:`metrics_table`; ``label``: how
    a report's summary names it; ``short``: column prefixes (``"scGPT F1"``) and figure legends; ``color``:
    its colour in every figure (names that start with ``short`` get it too).
    """

    name: str
    label: str
    short: str
    color: str


SCGPT = Method("scGPT (fine-tuned)", "scGPT fine-tuned", "scGPT", "#08306b")
BASELINE = Method("logistic regression (log1p-CP10k HVG)", "logistic-regression baseline", "baseline", "#a63603")
ZEROSHOT = Method("zero-shot kNN vote", "zero-shot kNN on pretrained scGPT", "zero-shot", "#7a0177")
METHODS = (SCGPT, BASELINE, ZEROSHOT)
#: row name of the fine-tuned model in :func:`metrics_table`
SCGPT_METHOD = SCGPT.name
#: row name of :func:`logistic_regression_baseline` in :func:`metrics_table`
BASELINE_METHOD = BASELINE.name
#: name of zero-shot kNN (the vote of the k nearest reference cells) in the run manifest's headline
ZEROSHOT_METHOD = ZEROSHOT.name

#: the columns of :func:`metrics_table`, in order
HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "cohen_kappa", "macro_auroc")
#: the three metrics of a report's summary and of the run manifest's headline
SUMMARY_METRICS = ("accuracy", "macro_f1", "weighted_f1")
#: readable column headers of report tables
HEADERS: dict[str, str] = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro-F1",
    "weighted_f1": "Weighted-F1",
    "balanced_accuracy": "Balanced accuracy",
    "cohen_kappa": "Cohen's kappa",
    "macro_auroc": "Macro AUROC",
    "n_cells": "n cells",
}

METRIC_DESCRIPTIONS: dict[str, str] = {
    "accuracy": "accuracy: share of cells whose predicted label equals the true label",
    "macro_f1": "macro_f1: unweighted mean of per-class F1 - every class counts the same, rare ones included",
    "weighted_f1": "weighted_f1: mean of per-class F1 weighted by the number of true cells (support) - "
                   "dominated by large classes",
    "balanced_accuracy": "balanced_accuracy: unweighted mean of per-class recall over the classes present "
                         "in the true labels",
    "cohen_kappa": "cohen_kappa: agreement between true and predicted labels corrected for chance "
                   "(1 perfect, 0 chance level)",
    "macro_auroc": "macro_auroc: unweighted mean over true classes of the one-vs-rest area under the ROC "
                   "curve of the predicted probabilities (null when it cannot be computed; see notes)",
    "n_cells": "n_cells: number of labelled cells the metrics are computed on",
    "per_class": "per_class: precision, recall, F1 and support (number of true cells) of each label",
    "notes": "notes: why a metric is missing or which labels were handled specially",
}


# -- helpers --------------------------------------------------------------------------------
def _as_labels(values: Any, name: str) -> np.ndarray:
    """Labels as an object array of ``str``; missing values are an error."""
    array = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values, dtype=object)
    series = pd.Series(array, dtype=object)
    missing = int(series.isna().sum())
    if missing:
        msg = (
            f"{name} holds {missing} missing labels (NaN/None) out of {len(series)}; metrics need a label "
            "for every cell. Drop the unlabelled cells first (e.g. adata[adata.obs[label_key].notna()])."
        )
        raise ValueError(msg)
    return series.astype(str).to_numpy(dtype=object)


def _label_order(categories: Sequence[str] | None, *arrays: Any) -> tuple[list[str], list[str]]:
    """All labels to report: ``categories`` first (in order), then any other label found, sorted.

    Returns ``(labels, extra)`` where ``extra`` are the labels outside ``categories``.
    """
    seen = sorted(set().union(*(set(a.tolist()) for a in arrays)))
    if categories is None:
        return seen, []
    cats = [str(c) for c in categories]
    if len(set(cats)) != len(cats):
        msg = (
            f"categories holds duplicates ({len(cats)} names, {len(set(cats))} unique); "
            "give each class once."
        )
        raise ValueError(msg)
    known = set(cats)
    extra = [label for label in seen if label not in known]
    return cats + extra, extra


def _count_matrix(true: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Cell counts, rows = true labels, columns = predicted labels, in the order of ``labels``.

    (sklearn's ``confusion_matrix`` warns when there is a single label, even with ``labels=``.)
    """
    index = {label: i for i, label in enumerate(labels)}
    rows = np.fromiter((index[t] for t in true), dtype=np.int64, count=len(true))
    cols = np.fromiter((index[p] for p in pred), dtype=np.int64, count=len(pred))
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return counts


def _kappa(cm: np.ndarray) -> float | None:
    """Cohen's kappa from a confusion matrix; ``None`` where chance agreement is 1 (undefined)."""
    n = cm.sum()
    observed = np.trace(cm) / n
    expected = float((cm.sum(axis=1) * cm.sum(axis=0)).sum()) / float(n) ** 2
    if math.isclose(expected, 1.0):
        return None
    return float((observed - expected) / (1.0 - expected))


# -- metrics --------------------------------------------------------------------------------
def classification_metrics(
    y_true: Any,
    y_pred: Any,
    *,
    categories: Sequence[str] | None = None,
    proba: np.ndarray | None = None,
    unassigned: str | None = None,
) -> dict[str, Any]:
    """Classification metrics of predicted against true labels, as JSON-ready numbers.

    Parameters
    ----------
    y_true, y_pred
        One label per cell (anything array-like; compared as strings). ``y_true`` must not have
        missing values.
    categories
        The classes the model can predict, in the order of the columns of ``proba`` (for scGPT:
        ``Prediction.categories``). Labels of ``y_true`` or ``y_pred`` outside ``categories`` are
        still scored (the union of all labels is used) and listed in ``notes``; a true label the
        model does not know always counts as an error. ``None``: the sorted labels found.
    proba
        Predicted probabilities, ``[n_cells, len(categories)]``; needs ``categories``. Only used
        for ``macro_auroc``.
    unassigned
        A predicted label that means "no call" (``"Unknown"`` after abstention): such cells count as
        errors, but the label is not a class -- it is left out of the F1 averages and of
        ``per_class``, and ``n_unassigned`` counts its cells. It must not occur in ``y_true``.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``weighted_f1`` (F1 weighted by support), ``balanced_accuracy``,
        ``cohen_kappa``, ``macro_auroc``, ``n_cells``, ``n_classes`` (distinct true labels),
        ``per_class`` (a list of ``{label, precision, recall, f1, support}`` for every category and
        every other label found, ``zero_division=0``) and ``notes`` (a list of strings). See
        :data:`METRIC_DESCRIPTIONS`.

    Notes
    -----
    Averages follow scikit-learn's defaults: ``macro_f1`` and ``weighted_f1`` average over the
    labels that occur in ``y_true`` or ``y_pred`` -- a category with no true cells that is never
    predicted is not counted as F1 = 0; one that is predicted but absent from ``y_true`` counts
    with F1 = 0. ``balanced_accuracy`` is the mean recall over the labels present in ``y_true``.

    ``macro_auroc`` is the unweighted mean of one-vs-rest AUROCs over the categories present in
    ``y_true``: categories without true cells have no positives and are left out (listed in
    ``notes``), as are true labels outside ``categories`` (no probability column). It is ``None``,
    with a note saying why, when ``proba`` is not given, when ``y_true`` holds fewer than two
    classes, or when no category has true cells. ``cohen_kappa`` is ``None`` (with a note) when it
    is undefined (both label sets are the same single class).

    Examples
    --------
    >>> m = classification_metrics(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    >>> m["accuracy"], m["n_cells"]
    (0.75, 4)
    """
    from sklearn.metrics import f1_score, precision_recall_fscore_support, recall_score

    true, pred = _true_and_predicted(y_true, y_pred)
    notes: list[str] = []
    labels, extra_true, pred_set, n_unassigned = _scored_labels(true, pred, categories, unassigned, notes)
    true_set = set(true.tolist())
    present = [label for label in labels if label in true_set or label in pred_set]
    present_true = [label for label in labels if label in true_set]
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0
    )
    per_class = [
        {"label": label, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    ]
    if len(true_set) == 1:
        notes.append(
            f"single class: every scored cell is {next(iter(true_set))!r}, so accuracy and F1 only say how often "
            "that class was predicted, not whether cell types are told apart. Score on cells of several classes "
            "(with 01: more cells per class, or a lower min_cells_per_class)."
        )
    cm = _count_matrix(true, pred, labels + ([unassigned] if n_unassigned else []))
    kappa = _kappa(cm)
    if kappa is None:
        notes.append(
            "cohen_kappa is undefined: true and predicted labels are all the same single class "
            "(chance agreement is 1)."
        )
    metrics: dict[str, Any] = {
        "accuracy": float(np.mean(true == pred)),
        "macro_f1": float(f1_score(true, pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(true, pred, labels=present, average="weighted", zero_division=0)),
        "balanced_accuracy": float(
            recall_score(true, pred, labels=present_true, average="macro", zero_division=0)
        ),
        "cohen_kappa": kappa,
        "macro_auroc": None,
        "n_cells": int(len(true)),
        "n_classes": int(len(present_true)),
    }
    if unassigned is not None:
        metrics["n_unassigned"] = n_unassigned
    metrics["macro_auroc"] = _macro_auroc(true, proba, categories, labels, extra_true, notes)
    metrics["per_class"] = per_class
    metrics["notes"] = notes
    return metrics


def _true_and_predicted(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """The labels as string arrays, one prediction per cell, at least one cell."""
    true = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if len(true) != len(pred):
        msg = f"y_true has {len(true)} labels but y_pred has {len(pred)}; give one prediction per cell."
        raise ValueError(msg)
    if len(true) == 0:
        raise ValueError("y_true is empty; there are no cells to evaluate.")
    return true, pred


def _scored_labels(true: np.ndarray, pred: np.ndarray, categories: Sequence[str] | None, unassigned: str | None,
                   notes: list[str]) -> tuple[list[str], list[str], set, int]:
    """``(labels, true labels outside the categories, predicted classes, unassigned cells)`` of
    :func:`classification_metrics`; the remarks on them go to ``notes``."""
    labels, extra = _label_order(categories, true, pred)
    true_set, pred_set = set(true.tolist()), set(pred.tolist())
    n_unassigned = 0
    if unassigned is not None:
        if unassigned in true_set:
            msg = (
                f"{unassigned!r} is a true label of {int((true == unassigned).sum())} cells but also the label of "
                "cells left unassigned; rename that class so that the two can be told apart."
            )
            raise ValueError(msg)
        n_unassigned = int((pred == unassigned).sum())
        if n_unassigned:
            notes.append(f"{n_unassigned} cells are {unassigned!r} (no call); they count as errors.")
        labels = [label for label in labels if label != unassigned]
        extra = [label for label in extra if label != unassigned]
        pred_set.discard(unassigned)
    extra_true = [label for label in extra if label in true_set]
    extra_pred = [label for label in extra if label in pred_set]
    if extra_true:
        n = int(np.isin(true, extra_true).sum())
        notes.append(
            f"{len(extra_true)} true label(s) are not among the model's categories: {extra_true} "
            f"({n} cells); the model cannot predict them, so these cells always count as errors."
        )
    if extra_pred:
        notes.append(f"{len(extra_pred)} predicted label(s) are not among the categories: {extra_pred}.")
    return labels, extra_true, pred_set, n_unassigned


def _macro_auroc(true: np.ndarray, proba: np.ndarray | None, categories: Sequence[str] | None, labels: list[str],
                 extra_true: list[str], notes: list[str]) -> float | None:
    """The ``macro_auroc`` of :func:`classification_metrics` (None, with a note saying why, when not computed)."""
    from sklearn.metrics import roc_auc_score

    if proba is None:
        notes.append("macro_auroc not computed: no predicted probabilities were given (proba=None).")
        return None
    if categories is None:
        msg = "proba needs categories: the label of each of its columns, in order."
        raise ValueError(msg)
    proba = np.asarray(proba, dtype=np.float64)
    n_cats = len(categories)
    if proba.shape != (len(true), n_cats):
        msg = (
            f"proba has shape {proba.shape}; expected ({len(true)}, {n_cats}): one row per cell and "
            "one column per category."
        )
        raise ValueError(msg)
    if not np.isfinite(proba).all():
        n_bad = int((~np.isfinite(proba)).sum())
        msg = f"proba holds {n_bad} NaN or infinite values; expected probabilities."
        raise ValueError(msg)
    true_set = set(true.tolist())
    cats = labels[:n_cats]
    scored = [c for c in cats if c in true_set]
    if len(true_set) < 2:
        notes.append(
            f"macro_auroc not computed: y_true holds a single class ({next(iter(true_set))!r}); "
            "one-vs-rest AUROC needs cells of at least two classes."
        )
        return None
    if not scored:
        notes.append("macro_auroc not computed: none of the true labels is among the categories.")
        return None
    aurocs = [roc_auc_score(true == c, proba[:, cats.index(c)]) for c in scored]
    absent = [c for c in cats if c not in true_set]
    if absent:
        notes.append(
            f"macro_auroc averages the {len(scored)} categories present in y_true; {len(absent)} "
            f"without true cells are left out: {absent}."
        )
    if extra_true:
        notes.append(
            f"macro_auroc leaves out true labels without a probability column: {extra_true}."
        )
    return float(np.mean(aurocs))


def headline_values(metrics: Mapping[str, Any], keys: Sequence[str] = HEADLINE_METRICS, *,
                    decimals: int | None = None, missing: Any = np.nan) -> dict[str, Any]:
    """One method's headline numbers as floats (rounded with Python's ``round`` to ``decimals``, per value),
    ``missing`` for a metric that is None or absent."""

    def one(key: str) -> Any:
        value = metrics.get(key)
        if value is None:
            return missing
        return float(value) if decimals is None else round(float(value), decimals)

    return {k: one(k) for k in keys}


def missing_reason(metrics: Mapping[str, Any], key: str) -> str | None:
    """The note that explains why ``key`` is missing (from the metrics' ``notes``), shortened for a table."""
    if metrics.get(key) is not None:
        return None
    for note in metrics.get("notes") or []:
        if note.startswith(key):
            reason = note.split(":", 1)[1].strip() if ":" in note else note
            if "no predicted probabilities" in reason:
                reason = "this method gives no class probabilities"
            return f"{HEADERS.get(key, key)} n/a: {reason.rstrip('.')}"
    return None


def metrics_table(results: Mapping[str, Any], keys: Sequence[str] = HEADLINE_METRICS, *,
                  decimals: int | None = None, readable: bool = False, notes: bool = False) -> pd.DataFrame:
    """Headline metrics of several methods side by side: the one headline table (reports, summaries and
    refinement tables are built on it).

    Parameters
    ----------
    results
        Method name -> metrics dict of :func:`classification_metrics` (or any object with a
        ``.metrics`` dict, such as :class:`EvalResult` or :class:`BaselineResult`), e.g.
        ``{SCGPT_METHOD: ev.metrics, BASELINE_METHOD: baseline.metrics}``.
    keys
        The metrics, in order (default :data:`HEADLINE_METRICS`).
    decimals
        Round each value (Python's ``round``) for a report; None keeps them as they are.
    readable
        Index ``Method`` and the :data:`HEADERS` column names (``"Macro-F1"``, ``"n cells"``) instead of
        ``method`` and the metric keys.
    notes
        Add a ``Note`` column with the reason a metric is missing (only when some metric is).

    Returns
    -------
    pandas.DataFrame
        One row per method, the metric columns and ``n_cells`` (Int64); a metric that is ``None`` or
        missing is NaN.
    """
    if not results:
        raise ValueError("results is empty; give at least one method name -> metrics dict.")
    n_cells = HEADERS["n_cells"] if readable else "n_cells"
    rows, reasons = {}, {}
    for method, value in results.items():
        metrics = getattr(value, "metrics", value)
        if not isinstance(metrics, Mapping):
            msg = (f"results[{method!r}] is a {type(value).__name__}; expected a metrics dict (or an object with "
                   ".metrics).")
            raise TypeError(msg)
        row = headline_values(metrics, keys, decimals=decimals)
        if readable:
            row = {HEADERS.get(k, k): v for k, v in row.items()}
        row[n_cells] = metrics.get("n_cells")
        rows[str(method)] = row
        reasons[str(method)] = "; ".join(r for k in keys if (r := missing_reason(metrics, k)))
    table = pd.DataFrame.from_dict(rows, orient="index")
    table[n_cells] = table[n_cells].astype("Int64")
    if notes and any(reasons.values()):
        table["Note"] = pd.Series(reasons)
    table.index.name = "Method" if readable else "method"
    return table


def confusion(
    y_true: Any,
    y_pred: Any,
    categories: Sequence[str] | None,
    normalize: str | None = "true",
) -> pd.DataFrame:
    """Confusion matrix with rows = true labels and columns = predicted labels.

    Parameters
    ----------
    y_true, y_pred
        One label per cell.
    categories
        Row and column order (the model's classes); any other label found is appended (sorted).
        ``None``: the sorted labels found.
    normalize
        ``"true"`` (default): each row divided by its number of cells, so a row sums to 1 and the
        diagonal is the recall. ``"pred"``: columns sum to 1. ``"all"``: the matrix sums to 1.
        ``None``: cell counts.

    Returns
    -------
    pandas.DataFrame
        Square, labels in the same order on both axes. With ``normalize="true"`` the row of a
        label without true cells is NaN (there is nothing to divide), so that it is not mistaken
        for a class that is never recognised. ``attrs["support"]`` maps each label to its number of
        true cells and ``attrs["normalize"]`` records ``normalize``.
    """
    if normalize not in ("true", "pred", "all", None):
        msg = f"normalize={normalize!r} is not supported; use 'true', 'pred', 'all' or None."
        raise ValueError(msg)
    true = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if len(true) != len(pred):
        msg = f"y_true has {len(true)} labels but y_pred has {len(pred)}; give one prediction per cell."
        raise ValueError(msg)
    labels, _ = _label_order(categories, true, pred)
    counts = _count_matrix(true, pred, labels).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            values = counts / counts.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            values = counts / counts.sum(axis=0, keepdims=True)
        elif normalize == "all":
            values = counts / counts.sum()
        else:
            values = counts.astype(np.int64)
    frame = pd.DataFrame(
        values, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted")
    )
    frame.attrs["support"] = {label: int(n) for label, n in zip(labels, counts.sum(axis=1))}
    frame.attrs["normalize"] = normalize
    return frame


# -- measuring it ---------------------------------------------------------------------------
def coverage_curve(
    y_true: Any, predicted: Any, confidence: Any, thresholds: Sequence[float] | None = None
) -> pd.DataFrame:
    """Coverage and accuracy of abstention over a range of ``min_confidence`` thresholds.

    Parameters
    ----------
    y_true, predicted, confidence
        True label, the classifier's label (before abstention) and its confidence, per cell.
    thresholds
        Values of ``min_confidence``; None: 0, 0.05, ..., 1.

    Returns
    -------
    pandas.DataFrame
        One row per threshold: ``threshold``, ``coverage`` (share of cells assigned),
        ``n_assigned``, ``accuracy_assigned`` and ``macro_f1_assigned`` (on the assigned cells; NaN
        when none is) and ``accuracy_all`` (on all cells, ``Unknown`` counted as an error).

    Examples
    --------
    >>> curve = coverage_curve(["a", "a", "b", "b"], ["a", "b", "b", "b"], [0.9, 0.4, 0.8, 0.6], [0.0, 0.5])
    >>> curve[["threshold", "coverage", "accuracy_assigned", "accuracy_all"]].to_numpy().tolist()
    [[0.0, 1.0, 0.75, 0.75], [0.5, 0.75, 1.0, 0.75]]
    """
    from sklearn.metrics import f1_score

    true = np.asarray(y_true, dtype=object).astype(str)
    pred = np.asarray(predicted, dtype=object).astype(str)
    conf = np.asarray(confidence, dtype=np.float64)
    if not (len(true) == len(pred) == len(conf)) or len(true) == 0:
        msg = (f"y_true, predicted and confidence need the same, non-zero length; got {len(true)}, {len(pred)}, "
               f"{len(conf)}.")
        raise ValueError(msg)
    correct = true == pred
    rows = []
    for t in DEFAULT_THRESHOLDS if thresholds is None else thresholds:
        assigned = conf >= float(t)
        n_assigned = int(assigned.sum())
        rows.append({
            "threshold": float(t),
            "coverage": n_assigned / len(true),
            "n_assigned": n_assigned,
            "accuracy_assigned": float(correct[assigned].mean()) if n_assigned else np.nan,
            "macro_f1_assigned": float(f1_score(true[assigned], pred[assigned], average="macro", zero_division=0))
            if n_assigned else np.nan,
            "accuracy_all": float((correct & assigned).sum() / len(true)),
        })
    return pd.DataFrame(rows)


#: thresholds of :func:`coverage_curve` when none are given
DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.05))
