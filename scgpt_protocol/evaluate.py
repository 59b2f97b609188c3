"""Metrics, a logistic-regression baseline and result files of the evaluation step (03_evaluate).

Everything here works on plain label arrays and on AnnData ``obs`` columns:

* :func:`classification_metrics` -- accuracy, macro / support-weighted F1, balanced accuracy,
  Cohen's kappa, one-vs-rest macro AUROC and a per-class table, as JSON-ready numbers;
* :func:`confusion` -- a row-normalised confusion matrix as a DataFrame;
* :func:`logistic_regression_baseline` -- a CellTypist-style baseline fitted on the same split;
* :func:`evaluate_predictions` / :func:`annotate` -- score a :class:`~scgpt_protocol.predict.Prediction`
  and write it into ``adata``;
* :func:`metrics_table` -- scGPT beside the baseline, one row per method;
* :func:`write_results` -- ``predictions.csv`` and ``metrics.json`` of a run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import format_keys
from .log import DETAIL

if TYPE_CHECKING:
    from anndata import AnnData

    from .layout import RunLayout
    from .predict import Prediction

__all__ = [
    "METRIC_DESCRIPTIONS",
    "HEADLINE_METRICS",
    "SCGPT_METHOD",
    "BASELINE_METHOD",
    "BaselineResult",
    "EvalResult",
    "classification_metrics",
    "metrics_table",
    "confusion",
    "logistic_regression_baseline",
    "evaluate_predictions",
    "annotate",
    "prediction_store",
    "STORE_OUTPUTS_CELLS",
    "write_results",
    "evaluate_query",
]

logger = logging.getLogger(__name__)

#: row name of the fine-tuned model in :func:`metrics_table`
SCGPT_METHOD = "scGPT (fine-tuned)"
#: row name of :func:`logistic_regression_baseline` in :func:`metrics_table`
BASELINE_METHOD = "logistic regression (log1p-CP10k HVG)"

#: the columns of :func:`metrics_table`, in order
HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "cohen_kappa", "macro_auroc")

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


def _plain(obj: Any) -> Any:
    """Numbers and containers as plain Python (JSON-ready); NaN and inf become ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, pd.Index, pd.Series)):
        return [_plain(v) for v in (obj.tolist() if hasattr(obj, "tolist") else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        if pd.isna(obj):
            return None
    except (TypeError, ValueError):
        pass
    return str(obj)


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
    from sklearn.metrics import f1_score, precision_recall_fscore_support, recall_score, roc_auc_score

    true = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if len(true) != len(pred):
        msg = f"y_true has {len(true)} labels but y_pred has {len(pred)}; give one prediction per cell."
        raise ValueError(msg)
    if len(true) == 0:
        raise ValueError("y_true is empty; there are no cells to evaluate.")
    labels, extra = _label_order(categories, true, pred)
    notes: list[str] = []
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

    present = [label for label in labels if label in true_set or label in pred_set]
    present_true = [label for label in labels if label in true_set]
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0
    )
    per_class = [
        {"label": label, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    ]
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

    # -- AUROC --
    if proba is None:
        notes.append("macro_auroc not computed: no predicted probabilities were given (proba=None).")
    else:
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
        cats = labels[:n_cats]
        scored = [c for c in cats if c in true_set]
        if len(true_set) < 2:
            notes.append(
                f"macro_auroc not computed: y_true holds a single class ({next(iter(true_set))!r}); "
                "one-vs-rest AUROC needs cells of at least two classes."
            )
        elif not scored:
            notes.append("macro_auroc not computed: none of the true labels is among the categories.")
        else:
            aurocs = [roc_auc_score(true == c, proba[:, cats.index(c)]) for c in scored]
            metrics["macro_auroc"] = float(np.mean(aurocs))
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
    metrics["per_class"] = per_class
    metrics["notes"] = notes
    return metrics


def metrics_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """Headline metrics of several methods side by side.

    Parameters
    ----------
    results
        Method name -> metrics dict of :func:`classification_metrics` (or any object with a
        ``.metrics`` dict, such as :class:`EvalResult` or :class:`BaselineResult`), e.g.
        ``{SCGPT_METHOD: ev.metrics, BASELINE_METHOD: baseline.metrics}``.

    Returns
    -------
    pandas.DataFrame
        One row per method (index ``method``), columns :data:`HEADLINE_METRICS` and ``n_cells``;
        a metric that is ``None`` or missing is NaN.
    """
    if not results:
        raise ValueError("results is empty; give at least one method name -> metrics dict.")
    rows = {}
    for method, value in results.items():
        metrics = getattr(value, "metrics", value)
        if not isinstance(metrics, Mapping):
            msg = f"results[{method!r}] is a {type(value).__name__}; expected a metrics dict."
            raise TypeError(msg)
        row: dict[str, Any] = {
            k: np.nan if metrics.get(k) is None else float(metrics[k]) for k in HEADLINE_METRICS
        }
        row["n_cells"] = metrics.get("n_cells")
        rows[str(method)] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    table["n_cells"] = table["n_cells"].astype("Int64")
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


# -- baseline -------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """Result of :func:`logistic_regression_baseline` on the test cells."""

    predictions: pd.Series  # predicted label per test cell, index = obs_names, categorical
    probabilities: np.ndarray  # float32 [n_test, n_categories], columns in the order of ``categories``
    categories: list[str]  # the classes seen in the train cells
    metrics: dict[str, Any]  # classification_metrics on the labelled test cells
    n_genes: int  # genes the classifier uses (HVGs of the train cells)
    genes: list[str] = field(default_factory=list)
    normalised: bool = False  # True: the input looked like raw counts and was log1p-CP10k normalised
    n_train: int = 0
    method: str = BASELINE_METHOD
    class_weight: str | None = None  # "balanced" when scGPT was trained with a class-weighted loss
    query: BaselineResult | None = None  # the same classifier on an external query, when one is given


def _log1p_cp10k(matrix: Any, *, chunk_size: int = 8192) -> Any:
    """``log1p`` of counts scaled to 10,000 per cell (scanpy's normalize_total + log1p), per cell.

    ``matrix`` (CSR) is normalised **in place**, one chunk of rows at a time in float64, and returned in
    its own float dtype (float32 stays float32: no float64 copy of the whole matrix)."""
    import scipy.sparse as sp

    out = sp.csr_matrix(matrix)
    if out.dtype not in (np.float32, np.float64):
        out = out.astype(np.float64)
    out.sum_duplicates()
    for lo in range(0, out.shape[0], chunk_size):
        hi = min(lo + chunk_size, out.shape[0])
        a, b = out.indptr[lo], out.indptr[hi]
        values = out.data[a:b].astype(np.float64)
        lengths = np.diff(out.indptr[lo : hi + 1])
        totals = np.add.reduceat(values, out.indptr[lo:hi] - a) if b > a else np.zeros(hi - lo)
        totals = np.where(lengths > 0, totals, 0.0)  # reduceat gives the next value for empty rows
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        out.data[a:b] = np.log1p(values * np.repeat(scale, lengths))
    return out


def _read_rows(matrix: Any, rows: np.ndarray, *, chunk_size: int = 8192) -> Any:
    """Rows ``rows`` (sorted) of a dense, sparse or backed matrix as one float32 CSR matrix, read chunk by chunk.

    Never densifies more than one chunk of dense input, and never holds a float64 copy of all rows.
    """
    import scipy.sparse as sp

    blocks = []
    for lo in range(0, len(rows), chunk_size):
        block = matrix[rows[lo : lo + chunk_size]]
        block = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        blocks.append(sp.csr_matrix(block, dtype=np.float32))
    if not blocks:
        return sp.csr_matrix((0, matrix.shape[1]), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)


def logistic_regression_baseline(
    adata: AnnData,
    *,
    label_key: str,
    split_key: str = "split",
    train: str = "train",
    test: str = "test",
    n_hvg: int = 2000,
    seed: int = 0,
    layer: str | None = None,
    class_weight: str | None = None,
    query: AnnData | None = None,
    query_label_key: str | None = None,
) -> BaselineResult:
    """Fit a CellTypist-style logistic regression on the train cells and predict the test cells.

    The yardstick scGPT should beat: the same split, a simple linear model on log-normalised
    highly variable genes.

    1. Expression comes from ``adata.X`` (or ``layer``). If every value is a whole number it is
       taken as raw counts and normalised per cell to 10,000 counts, then ``log1p``; otherwise it
       is taken as already log-normalised and used as is. Negative values (scaled data) are refused.
    2. ``n_hvg`` highly variable genes are selected on the **train cells only**
       (``scanpy.pp.highly_variable_genes``, flavor ``"seurat"``); all genes when there are no more
       than ``n_hvg``.
    3. Genes are scaled to unit variance with a ``StandardScaler(with_mean=False)`` fitted on the train
       cells and clipped at 10. The matrix is never densified: without centring it stays sparse, and with
       ``lbfgs`` the intercept is not penalised, so centring would give the same linear model up to the clip.
    4. ``LogisticRegression(C=1.0, max_iter=1000, random_state=seed, class_weight=class_weight)`` is
       fitted on the train cells (float32 CSR, which ``lbfgs`` takes without a float64 copy). Pass
       ``class_weight="balanced"`` when scGPT was fine-tuned with a class-weighted loss, so that both see
       the classes weighted alike.
    5. With a ``query``, the same fitted normalisation, genes (by name; a gene the query lacks is 0),
       scaler and classifier predict its cells, scored against ``query.obs[query_label_key]``.

    Test cells are not used before prediction, so their labels and expression cannot change the
    model. Cells without a label are left out of fitting and of the metrics. Only the train and test rows
    are read, chunk by chunk, into one float32 CSR matrix (works on backed AnnData); memory is that CSR
    and its HVG columns, never a dense or float64 copy.

    Parameters
    ----------
    adata
        Cells x genes with non-negative expression and ``obs[label_key]``, ``obs[split_key]``.
    label_key
        ``obs`` column with the cell-type labels.
    split_key, train, test
        ``obs`` column and its values marking the train and test cells (``"validation"`` or other
        cells are ignored).
    n_hvg
        Number of highly variable genes.
    seed
        Seed of the classifier.
    layer
        ``adata.layers`` key with the expression (None: ``X``).
    class_weight
        ``None`` or ``"balanced"`` (inverse class frequency, as ``class_weighted=True`` in 02).
    query, query_label_key
        An external labelled AnnData to predict as well (``BaselineResult.query``); its label column
        (default ``label_key``). It must hold at least half of the classifier's genes
        (:func:`~scgpt_protocol.tokenize.check_gene_overlap`).

    Returns
    -------
    BaselineResult
        Predictions, probabilities and metrics on the test cells (and ``.query`` on the query).

    Raises
    ------
    KeyError
        ``label_key`` or ``split_key`` not in ``obs``.
    ValueError
        No train or test cells, or fewer than two classes among the train cells.
    InputDataError
        Negative or NaN expression values.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from .tokenize import check_expression, check_gene_overlap, get_matrix, value_kind

    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced'; got {class_weight!r}.")
    for key, what in ((label_key, "label_key"), (split_key, "split_key")):
        if key not in adata.obs:
            msg = f"{what}={key!r} is not a column of adata.obs; columns: {format_keys(adata.obs.columns)}."
            raise KeyError(msg)
    if n_hvg < 1:
        raise ValueError(f"n_hvg must be a positive integer; got {n_hvg}.")
    split = adata.obs[split_key].astype(object)
    labels = adata.obs[label_key]
    from .preprocess import missing_labels

    is_train = (split == train).to_numpy() & ~missing_labels(labels)
    is_test = (split == test).to_numpy()
    for name, mask, value in (("train", is_train, train), ("test", is_test, test)):
        if not mask.any():
            msg = (
                f"no {name} cells: adata.obs[{split_key!r}] has no (labelled) cells equal to {value!r}; "
                f"found values {sorted(map(str, split.dropna().unique()))}. "
                f"Pass {name}=... with the right value."
            )
            raise ValueError(msg)
    train_labels = labels[is_train].astype(str).to_numpy()
    if len(set(train_labels)) < 2:
        msg = f"the train cells hold a single class ({train_labels[0]!r}); a classifier needs at least two."
        raise ValueError(msg)
    check_expression(adata, layer=layer)

    matrix = get_matrix(adata, layer)
    rows = np.flatnonzero(is_train | is_test)
    X = _read_rows(matrix, rows)  # float32 CSR of the train + test cells only (backed data: read by chunks)
    normalised = value_kind(X)[0] == "counts"
    if normalised:
        X = _log1p_cp10k(X)
        logger.info("baseline: values look like raw counts -> normalised to 10,000 per cell + log1p")
    else:
        logger.info("baseline: values are not whole numbers -> used as log-normalised expression")
    in_train = is_train[rows]
    X_train, X_test = X[in_train], X[is_test[rows]]
    del X

    genes = np.asarray(adata.var_names.astype(str))
    if n_hvg < adata.n_vars:
        hvg = sc.pp.highly_variable_genes(
            ad.AnnData(X_train, var=pd.DataFrame(index=genes)),
            flavor="seurat", n_top_genes=n_hvg, inplace=False,
        )
        keep = np.asarray(hvg["highly_variable"], dtype=bool)
    else:
        keep = np.ones(adata.n_vars, dtype=bool)
    X_train, X_test = X_train[:, keep], X_test[:, keep]

    # sparse-aware scaling: unit variance without centring (the data stay sparse; with lbfgs the intercept
    # is not penalised, so centring would only shift it), values clipped at 10
    scaler = StandardScaler(with_mean=False)

    def scaled(part: Any, fit: bool = False) -> Any:
        values = scaler.fit_transform(part) if fit else scaler.transform(part)
        values = sp.csr_matrix(values, dtype=np.float32)
        np.minimum(values.data, 10, out=values.data)
        return values

    X_train, X_test = scaled(X_train, fit=True), scaled(X_test)

    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed, class_weight=class_weight)
    clf.fit(X_train, train_labels)
    classes = [str(c) for c in clf.classes_]
    # the label column's own order when it has one (so that confusion matrices line up with scGPT's)
    if isinstance(labels.dtype, pd.CategoricalDtype):
        order = [str(c) for c in labels.cat.categories if str(c) in set(classes)]
    else:
        order = classes
    column = [classes.index(c) for c in order]

    def scored(X_part: Any, names: pd.Index, part_labels: pd.Series, what: str) -> tuple:
        proba = clf.predict_proba(X_part)[:, column].astype(np.float32)
        predicted = pd.Series(
            pd.Categorical(np.asarray(order, dtype=object)[proba.argmax(axis=1)], categories=order),
            index=names, name="baseline_label",
        )
        labelled = ~missing_labels(part_labels)
        if not labelled.any():
            msg = f"none of the {len(names)} {what} cells has a label."
            raise ValueError(msg)
        metrics = classification_metrics(
            part_labels[labelled], predicted[labelled], categories=order, proba=proba[labelled]
        )
        if not labelled.all():
            metrics["notes"].append(f"{int((~labelled).sum())} {what} cells without a label were left out.")
        return predicted, proba, metrics

    predicted, proba, metrics = scored(X_test, adata.obs_names[is_test], labels[is_test],
                                       f"test (obs[{label_key!r}])")
    logger.info(
        "baseline: %d train cells, %d genes, %d classes%s -> test accuracy %.3f, macro F1 %.3f",
        int(is_train.sum()), int(keep.sum()), len(order), ", balanced class weights" if class_weight else "",
        metrics["accuracy"], metrics["macro_f1"],
    )
    genes_used = genes[keep].tolist()
    query_result = None
    if query is not None:
        query_key = query_label_key or label_key
        if query_key not in query.obs:
            msg = f"query_label_key={query_key!r} is not a column of the query's obs; columns: {format_keys(query.obs.columns)}."
            raise KeyError(msg)
        check_expression(query, layer=layer)
        query_genes = pd.Index(np.asarray(query.var_names.astype(str)))
        check_gene_overlap(query_genes, genes_used, what="the query", against="the baseline's genes")
        Xq = _read_rows(get_matrix(query, layer), np.arange(query.n_obs))
        if value_kind(Xq)[0] == "counts":
            Xq = _log1p_cp10k(Xq)
        position = query_genes.get_indexer(genes_used)  # -1: the query lacks the gene -> zeros
        present = position >= 0
        aligned = sp.csr_matrix(Xq[:, np.where(present, position, 0)] @ sp.diags(present.astype(np.float32)))
        q_pred, q_proba, q_metrics = scored(scaled(aligned), query.obs_names, query.obs[query_key], "query")
        if not present.all():
            q_metrics["notes"].append(f"{int((~present).sum())} of the baseline's {len(genes_used)} genes are "
                                      "missing from the query and were set to 0.")
        query_result = BaselineResult(
            predictions=q_pred, probabilities=q_proba, categories=order, metrics=q_metrics, n_genes=int(keep.sum()),
            genes=genes_used, normalised=normalised, n_train=int(is_train.sum()), class_weight=class_weight,
        )
        logger.info("baseline on the query: %d cells -> accuracy %.3f, macro F1 %.3f",
                    query.n_obs, q_metrics["accuracy"], q_metrics["macro_f1"])
    return BaselineResult(
        predictions=predicted,
        probabilities=proba,
        categories=order,
        metrics=metrics,
        n_genes=int(keep.sum()),
        genes=genes_used,
        normalised=normalised,
        n_train=int(is_train.sum()),
        class_weight=class_weight,
        query=query_result,
    )


# -- scGPT predictions ----------------------------------------------------------------------
@dataclass
class EvalResult:
    """Result of :func:`evaluate_predictions`."""

    metrics: dict[str, Any]  # classification_metrics, with probabilities
    confusion: pd.DataFrame  # row-normalised, rows = true labels
    predictions: pd.DataFrame  # one row per evaluated cell, index = obs_names
    method: str = SCGPT_METHOD


def _check_prediction(adata: AnnData, prediction: Prediction) -> None:
    if len(prediction.labels) != adata.n_obs:
        msg = (
            f"the prediction holds {len(prediction.labels)} cells but adata has {adata.n_obs}; pass the "
            "same AnnData (same cells, same order) that predict() was called with."
        )
        raise ValueError(msg)


def _cell_mask(adata: AnnData, cells: Any) -> np.ndarray:
    """``cells`` (None, a boolean mask, integer positions or obs names) as a boolean mask."""
    n = adata.n_obs
    if cells is None:
        return np.ones(n, dtype=bool)
    values = cells.to_numpy() if isinstance(cells, (pd.Series, pd.Index)) else np.asarray(cells)
    if values.dtype == bool:
        if values.shape != (n,):
            msg = (
                f"cells is a boolean mask of shape {values.shape}; expected ({n},), "
                "one value per cell of adata."
            )
            raise ValueError(msg)
        return values
    mask = np.zeros(n, dtype=bool)
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < -n or values.max() >= n):
            msg = f"cells holds positions outside 0..{n - 1}; adata has {n} cells."
            raise IndexError(msg)
        mask[values] = True
        return mask
    names = pd.Index(values.astype(str))
    missing = names.difference(adata.obs_names)
    if len(missing):
        msg = f"{len(missing)} of the cells are not in adata.obs_names, e.g. {list(missing[:3])}."
        raise KeyError(msg)
    return adata.obs_names.isin(names)


def evaluate_predictions(
    adata: AnnData,
    prediction: Prediction,
    *,
    label_key: str,
    cells: Any = None,
    split_key: str = "split",
) -> EvalResult:
    """Score scGPT predictions against the true labels of ``adata``.

    Parameters
    ----------
    adata
        The AnnData ``prediction`` was made on (same cells, same order), with ``obs[label_key]``.
    prediction
        The result of :func:`~scgpt_protocol.predict.predict`.
    label_key
        ``obs`` column with the true labels.
    cells
        Which cells to evaluate: a boolean mask, integer positions or obs names (e.g.
        ``adata.obs["split"] == "test"``). None: all cells.
    split_key
        ``obs`` column copied into the predictions table when present.

    Returns
    -------
    EvalResult
        ``metrics`` (:func:`classification_metrics` with the probabilities), ``confusion`` (row-
        normalised) and ``predictions``: one row per evaluated cell, indexed by ``obs_names``, with
        columns ``true_label``, ``scgpt_label``, ``scgpt_label_confidence``, ``split`` (when
        ``obs[split_key]`` exists) and ``correct`` (nullable boolean). Cells without a true label
        stay in the table (``correct`` is NA) but are left out of the metrics, with a note.
    """
    _check_prediction(adata, prediction)
    if label_key not in adata.obs:
        msg = f"label_key={label_key!r} is not a column of adata.obs; columns: {format_keys(adata.obs.columns)}."
        raise KeyError(msg)
    mask = _cell_mask(adata, cells)
    if not mask.any():
        raise ValueError("cells selects no cell; there is nothing to evaluate.")
    obs = adata.obs.loc[mask]
    from .preprocess import missing_labels

    true = obs[label_key].astype(object)
    labelled = ~missing_labels(true)  # NaN, and text such as 'nan' or '' (a column converted to str)
    if not labelled.any():
        msg = f"none of the {int(mask.sum())} selected cells has a label in adata.obs[{label_key!r}]."
        raise ValueError(msg)
    from .refine import COLUMNS, UNKNOWN, as_refinement, refinement_metrics

    categories = [str(c) for c in prediction.categories]
    refined = as_refinement(prediction)
    refined = refined.subset(mask) if refined is not None else None
    pred = np.asarray(prediction.labels, dtype=object)[mask].astype(str)
    label_categories = categories + ([UNKNOWN] if refined is not None and UNKNOWN not in categories else [])
    frame = pd.DataFrame(
        {
            "true_label": true.where(true.isna(), true.astype(str)),
            "scgpt_label": pd.Categorical(pred, categories=label_categories),
            "scgpt_label_confidence": np.asarray(prediction.confidence, dtype=np.float32)[mask],
        },
        index=obs.index,
    )
    if split_key in obs:
        frame["split"] = obs[split_key].to_numpy()
    correct = pd.array(frame["true_label"].to_numpy() == pred, dtype="boolean")
    correct[~labelled] = pd.NA
    frame["correct"] = correct
    if refined is not None:  # abstention and majority voting (refine): the columns beside the call
        extra = refined.frame(index=obs.index).drop(columns=[COLUMNS["labels"], COLUMNS["confidence"]])
        extra[COLUMNS["predicted"]] = pd.Categorical(extra[COLUMNS["predicted"]].astype(str), categories=categories)
        if COLUMNS["majority_voting"] in extra:
            extra[COLUMNS["majority_voting"]] = pd.Categorical(extra[COLUMNS["majority_voting"]].astype(str),
                                                               categories=label_categories)
        frame = pd.concat([frame, extra], axis=1)

    labelled_np = np.asarray(labelled, dtype=bool)
    true_l, pred_l = true[labelled].astype(str).to_numpy(), pred[labelled_np]
    from .store import take_rows

    proba = take_rows(prediction.probabilities, mask)[labelled_np]  # on-disk (predict(out=...)): these rows only
    metrics = classification_metrics(true_l, pred_l, categories=categories, proba=proba,
                                     unassigned=UNKNOWN if refined is not None and refined.params.get("min_confidence")
                                     else None)
    if not labelled.all():
        metrics["notes"].append(f"{int((~labelled).sum())} cells without a label were left out.")
    if refined is not None:
        metrics["refinement"] = refinement_metrics(true_l, refined.subset(labelled_np), categories=categories,
                                                   proba=proba)
    logger.info(
        "scGPT on %d cells: accuracy %.3f, macro F1 %.3f",
        metrics["n_cells"], metrics["accuracy"], metrics["macro_f1"],
    )
    return EvalResult(metrics=metrics, confusion=confusion(true_l, pred_l, categories), predictions=frame)


#: above this many cells 03 streams probabilities and embeddings to a store (EvaluateParams.store_outputs=None)
STORE_OUTPUTS_CELLS = 200_000


def prediction_store(layout: Any, n_cells: int, store_outputs: bool | None = None) -> Path | None:
    """Where 03's :func:`~scgpt_protocol.predict.predict` writes its per-cell outputs: ``out=`` or None.

    ``store_outputs`` True: ``layout.prediction_store`` (``data/predictions.h5``): probabilities and
    embeddings are streamed there and read back by rows (evaluation, refinement, the UMAP's sample), so
    that memory holds only per-cell vectors; ``evaluated.h5ad`` then has no ``obsm["X_scgpt"]`` but
    ``uns["X_scgpt_store"]`` naming the file. False: in memory (None returned). None: True above
    :data:`STORE_OUTPUTS_CELLS` cells. The numbers are the same either way.
    """
    if store_outputs is None:
        store_outputs = n_cells > STORE_OUTPUTS_CELLS
    if not store_outputs:
        return None
    logger.info("streaming probabilities and embeddings of %d cells to %s", n_cells, layout.prediction_store)
    return layout.prediction_store


def annotate(
    adata: AnnData,
    prediction: Prediction,
    *,
    obs_key: str = "scgpt_label",
    embedding_key: str | None = "X_scgpt",
) -> None:
    """Write a prediction into ``adata`` **in place** (like scanpy's ``tl`` functions).

    Writes ``obs[obs_key]`` (categorical with the model's categories, so colours and orders stay
    stable), ``obs[obs_key + "_confidence"]`` (float32 probability of the predicted class),
    ``obs[obs_key + "_code"]`` (int64 index of the predicted class) and ``obsm[embedding_key]`` (the
    fine-tuned ``<cls>`` embeddings; skipped when ``embedding_key`` is None; a prediction made with
    ``predict(out=...)`` keeps them in its HDF5 store and ``uns[embedding_key + "_store"]`` names it).
    A prediction refined by
    :func:`~scgpt_protocol.refine.refine` also writes ``obs["scgpt_prediction"]`` (the class before
    abstention; ``obs[obs_key]`` then holds ``"Unknown"`` below ``min_confidence``),
    ``obs["scgpt_unknown"]``, ``obs["scgpt_over_clustering"]`` / ``obs["scgpt_majority_voting"]`` (with
    majority voting) and ``uns["scgpt_annotation"]`` (the parameters); with another ``obs_key`` these
    are named ``<obs_key>_predicted``, ``_unknown``, ``_over_clustering``, ``_majority_voting``.

    Parameters
    ----------
    adata
        The AnnData ``prediction`` was made on (same cells, same order).
    prediction
        The result of :func:`~scgpt_protocol.predict.predict`.
    obs_key, embedding_key
        Where to write.

    Examples
    --------
    >>> annotate(adata, predict(model, adata, categories=cats))  # doctest: +SKIP
    >>> sc.pl.umap(adata, color="scgpt_label")  # doctest: +SKIP
    """
    _check_prediction(adata, prediction)
    from .refine import COLUMNS, as_refinement, write_annotation

    categories = [str(c) for c in prediction.categories]
    refined = as_refinement(prediction)
    if refined is not None:  # abstention / majority voting: the call, the prediction, the flag, the clusters
        names = {"labels": obs_key, "confidence": f"{obs_key}_confidence"}
        if obs_key != COLUMNS["labels"]:
            names.update({k: f"{obs_key}_{k}" for k in ("predicted", "unknown", "over_clustering", "majority_voting")})
        write_annotation(adata, refined, columns=names, categories=categories)
    else:
        labels = np.asarray(prediction.labels, dtype=object).astype(str)
        adata.obs[obs_key] = pd.Categorical(labels, categories=categories)
        adata.obs[f"{obs_key}_confidence"] = np.asarray(prediction.confidence, dtype=np.float32)
    adata.obs[f"{obs_key}_code"] = np.asarray(prediction.codes, dtype=np.int64)
    if embedding_key is not None and getattr(prediction, "store", None) is not None:
        # predict(out=...): the embeddings stay in the store (all cells would not fit flat in memory)
        adata.uns[f"{embedding_key}_store"] = str(prediction.store)
    elif embedding_key is not None:
        adata.obsm[embedding_key] = np.asarray(prediction.embeddings, dtype=np.float32)


def evaluate_query(
    model: Any,
    query: AnnData,
    *,
    manifest: Mapping[str, Any],
    label_key: str | None = None,
    max_seq_len: int,
    batch_size: int = 64,
    seed: int = 0,
    baseline: BaselineResult | None = None,
    precision: str = "auto",
    min_confidence: float = 0.0,
    majority_voting: bool = False,
) -> dict[str, Any]:
    """scGPT (and the baseline, when given) on an external labelled query, as the ``query`` record.

    Parameters
    ----------
    model, manifest
        The fine-tuned model and its manifest (:func:`~scgpt_protocol.train.load_finetuned`).
    query
        A labelled AnnData; its genes must cover half the model's training genes.
    label_key
        The query's label column (None: the run's ``manifest["label_key"]``).
    baseline
        A :func:`logistic_regression_baseline` fitted with ``query=`` (its ``.query`` row is added).
    min_confidence, majority_voting
        Abstention and majority voting on the query's cells (:func:`~scgpt_protocol.refine.refine`,
        the query over-clustered on its own).

    Returns
    -------
    dict
        ``{"label_key", "n_cells", "methods": {method: metrics}, "predictions": DataFrame}``.
    """
    from .predict import predict

    key = label_key or manifest["label_key"]
    if key not in query.obs:
        msg = f"query_label_key={key!r} is not a column of the query's obs; columns: {format_keys(query.obs.columns)}."
        raise KeyError(msg)
    prediction = predict(model, query, categories=manifest["categories"], genes=manifest["genes"],
                         batch_size=batch_size, max_seq_len=max_seq_len, seed=seed, desc="query", precision=precision)
    from .refine import refine

    prediction = refine(prediction, min_confidence=min_confidence, majority_voting=majority_voting, seed=seed)
    result = evaluate_predictions(query, prediction, label_key=key)
    methods = {SCGPT_METHOD: result.metrics}
    if baseline is not None and baseline.query is not None:
        methods[BASELINE_METHOD] = baseline.query.metrics
    return {"label_key": key, "n_cells": int(query.n_obs), "methods": methods, "predictions": result.predictions}


# -- files ----------------------------------------------------------------------------------
def _metric_names(obj: Any) -> set[str]:
    """Keys of :data:`METRIC_DESCRIPTIONS` found at any depth of ``obj``."""
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if key in METRIC_DESCRIPTIONS:
                found.add(key)
            found |= _metric_names(value)
    return found


def write_results(
    layout: RunLayout, *, predictions: pd.DataFrame, metrics: Mapping[str, Any],
    query: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``predictions.csv`` and ``metrics.json`` of a run, each atomically.

    Parameters
    ----------
    layout
        The run's :class:`~scgpt_protocol.layout.RunLayout`.
    predictions
        Per-cell table (e.g. ``EvalResult.predictions``), written with its index (``obs_names``).
    metrics
        A metrics dict, or several keyed by method / data set. Numbers are written as plain JSON
        (NaN as ``null``); a ``descriptions`` entry explains each metric found.
    query
        The record of :func:`evaluate_query`: its metrics go to ``metrics.json`` under ``"query"``
        (never mixed with the test split's), its per-cell table to ``query_predictions.csv``.

    Returns
    -------
    dict
        ``{"predictions": path, "metrics": path}`` (and ``"query_predictions"``).
    """
    written = {"predictions": layout.write_csv(predictions, layout.predictions)}
    record = dict(metrics)
    if query is not None:
        record["query"] = {k: v for k, v in query.items() if k != "predictions"}
        written["query_predictions"] = layout.write_csv(query["predictions"], layout.query_predictions)
    plain = _plain(record)
    plain["descriptions"] = {k: v for k, v in METRIC_DESCRIPTIONS.items() if k in _metric_names(record)}
    written["metrics"] = layout.write_json(layout.metrics, plain)
    logger.info("wrote %s", ", ".join(str(p) for p in written.values()), extra=DETAIL)  # the notebook shows report.files_table
    return written
