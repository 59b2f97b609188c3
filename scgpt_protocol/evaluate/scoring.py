"""Step 03's scoring: a :class:`~scgpt_protocol.annotate.prediction.Prediction` against the true labels
(:func:`evaluate_predictions`, :func:`evaluate_query`), the per-cell outputs kept in a store above
:data:`STORE_OUTPUTS_CELLS` cells, and the run's ``predictions.csv`` and ``metrics.json``
(:func:`write_results`). The metrics themselves are :mod:`scgpt_protocol.metrics`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from ..annotate.columns import COLUMNS, TRUE_LABEL
from ..annotate.prediction import check_prediction
from ..core.errors import format_keys
from ..core.io import json_safe
from ..core.log import DETAIL
from ..data.labels import case_matches, cell_mask, clean_labels, missing_labels, shared_types
from ..data.overlap import Overlap
from ..metrics import BASELINE_METHOD, METRIC_DESCRIPTIONS, SCGPT_METHOD, classification_metrics, confusion
from .baseline import BaselineResult

if TYPE_CHECKING:
    from anndata import AnnData

    from ..annotate.prediction import Prediction
    from ..core.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate_predictions", "prediction_store", "STORE_OUTPUTS_CELLS", "write_results",
    "evaluate_query", "like_for_like"]


# -- scGPT predictions ----------------------------------------------------------------------
@dataclass
class EvalResult:
    """Result of :func:`evaluate_predictions`."""

    metrics: dict[str, Any]  # classification_metrics, with probabilities
    confusion: pd.DataFrame  # row-normalised, rows = true labels
    predictions: pd.DataFrame  # one row per evaluated cell, index = obs_names
    method: str = SCGPT_METHOD


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
        The result of :func:`~scgpt_protocol.annotate.inference.predict`.
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
        columns ``true_label``, ``scgpt_label``, ``scgpt_label_confidence`` (calibrated when the prediction
        is; then also ``scgpt_label_confidence_raw``), ``split`` (when
        ``obs[split_key]`` exists) and ``correct`` (nullable boolean). Cells without a true label
        stay in the table (``correct`` is NA) but are left out of the metrics, with a note.
    """
    check_prediction(adata, prediction)
    if label_key not in adata.obs:
        msg = f"label_key={label_key!r} is not a column of adata.obs; columns: {format_keys(adata.obs.columns)}."
        raise KeyError(msg)
    mask = cell_mask(adata, cells)
    if not mask.any():
        raise ValueError("cells selects no cell; there is nothing to evaluate.")
    obs = adata.obs.loc[mask]
    true = obs[label_key].astype(object)
    true = true.where(true.isna(), pd.Series(clean_labels(true), index=true.index))  # 'T cell ' is 'T cell', as in 01
    labelled = ~missing_labels(true)  # NaN, and text such as 'nan' or '' (a column converted to str)
    if not labelled.any():
        msg = f"none of the {int(mask.sum())} selected cells has a label in adata.obs[{label_key!r}]."
        raise ValueError(msg)
    from ..annotate.columns import COLUMNS, CORRECT, RAW_CONFIDENCE, SPLIT, TRUE_LABEL
    from ..annotate.refinement import UNKNOWN, as_refinement, refinement_metrics

    categories = [str(c) for c in prediction.categories]
    refined = as_refinement(prediction)
    refined = refined.subset(mask) if refined is not None else None
    pred = np.asarray(prediction.labels, dtype=object)[mask].astype(str)
    label_categories = categories + ([UNKNOWN] if refined is not None and UNKNOWN not in categories else [])
    frame = pd.DataFrame(
        {
            TRUE_LABEL: true.where(true.isna(), true.astype(str)),
            COLUMNS["labels"]: pd.Categorical(pred, categories=label_categories),
            COLUMNS["confidence"]: np.asarray(prediction.confidence, dtype=np.float32)[mask],
        },
        index=obs.index,
    )
    if prediction.raw_confidence is not None:  # calibrated: the raw softmax's probability beside it
        frame[RAW_CONFIDENCE] = np.asarray(prediction.raw_confidence, dtype=np.float32)[mask]
    if split_key in obs:
        frame[SPLIT] = obs[split_key].to_numpy()
    correct = pd.array(frame[TRUE_LABEL].to_numpy() == pred, dtype="boolean")
    correct[~labelled] = pd.NA
    frame[CORRECT] = correct
    if refined is not None:  # abstention and majority voting (refine): the columns beside the call
        extra = refined.frame(index=obs.index).drop(columns=[COLUMNS["labels"], COLUMNS["confidence"]])
        extra[COLUMNS["predicted"]] = pd.Categorical(extra[COLUMNS["predicted"]].astype(str), categories=categories)
        if COLUMNS["majority_voting"] in extra:
            extra[COLUMNS["majority_voting"]] = pd.Categorical(extra[COLUMNS["majority_voting"]].astype(str),
                                                               categories=label_categories)
        frame = pd.concat([frame, extra], axis=1)

    labelled_np = np.asarray(labelled, dtype=bool)
    true_l, pred_l = true[labelled].astype(str).to_numpy(), pred[labelled_np]
    from ..data.store import take_rows

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
    single = [n for n in metrics["notes"] if n.startswith("single class")]
    if single:
        logger.warning("%s", single[0])
        warnings.warn(single[0], UserWarning, stacklevel=2)
    return EvalResult(metrics=metrics, confusion=confusion(true_l, pred_l, categories), predictions=frame)


def like_for_like(baseline: BaselineResult, scgpt: EvalResult) -> dict[str, Any]:
    """The baseline's metrics under the rule scGPT's calls were scored with, on the same cells.

    The baseline's confidence is the probability of its predicted class; cells below scGPT's
    ``min_confidence`` become ``Unknown`` (and count as wrong in the headline), and where scGPT has
    majority voting the baseline's calls are voted over **the same over-clusters** (so the two
    differ only in the per-cell classifier). The result has the shape of ``scgpt.metrics``: the
    headline metrics, and under ``"refinement"`` the argmax, assigned-cells and majority-voting
    metrics (:func:`~scgpt_protocol.annotate.refinement.refinement_metrics`). Without a refinement
    on scGPT's side the baseline's metrics are returned as they are.

    Parameters
    ----------
    baseline
        :func:`~scgpt_protocol.evaluate.baseline.logistic_regression_baseline` (or its ``.query``).
    scgpt
        :func:`evaluate_predictions` of the same cells (its ``predictions`` hold the true labels and,
        with majority voting, the over-clusters).
    """
    from ..annotate.columns import COLUMNS, TRUE_LABEL
    from ..annotate.refinement import UNKNOWN, majority_vote, refine_labels, refinement_metrics
    refined = scgpt.metrics.get("refinement")
    if not refined:
        return baseline.metrics
    names = baseline.predictions.index
    frame = scgpt.predictions
    if not frame.index.equals(names):
        if not set(names).issubset(frame.index) or frame.index.has_duplicates:
            msg = (f"the baseline predicted {len(names):,} cells that are not the {len(frame):,} cells scGPT was "
                   "scored on; give both the same cells (the test split, or the same query).")
            raise ValueError(msg)
        frame = frame.loc[names]
    threshold = float(refined.get("min_confidence") or 0.0)
    proba = np.asarray(baseline.probabilities, dtype=np.float32)
    confidence = proba.max(axis=1) if proba.size else np.zeros(len(names))
    calls = refine_labels(baseline.predictions.astype(str).to_numpy(), confidence, min_confidence=threshold,
                          categories=baseline.categories)
    clusters = frame.get(COLUMNS["over_clustering"])
    if clusters is not None:  # scGPT's over-clusters: the vote differs only by the per-cell calls
        calls.over_clustering = clusters.astype(str).to_numpy(dtype=object)
        calls.majority_voting = majority_vote(calls.labels, calls.over_clustering, confidence)
        calls.params.update({"majority_voting": True, "over_clusters": "scGPT's"})
    truth = frame[TRUE_LABEL]
    labelled = ~np.asarray(missing_labels(truth), dtype=bool)
    true = truth[labelled].astype(str).to_numpy()
    metrics = classification_metrics(true, calls.labels[labelled], categories=baseline.categories,
                                     proba=proba[labelled], unassigned=UNKNOWN if threshold else None)
    metrics["refinement"] = refinement_metrics(true, calls.subset(labelled), categories=baseline.categories,
                                               proba=proba[labelled])
    return metrics


#: above this many cells 03 streams probabilities and embeddings to a store (EvaluateParams.store_outputs=None)
STORE_OUTPUTS_CELLS = 200_000


def prediction_store(layout: Any, n_cells: int, store_outputs: bool | None = None) -> Path | None:
    """Where 03's :func:`~scgpt_protocol.annotate.inference.predict` writes its per-cell outputs: ``out=`` or None.

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
    overlap: Overlap | None = None,
    temperature: float | str | None = "auto",
    label_map: Any = None,
) -> dict[str, Any]:
    """scGPT (and the baseline, when given) on an external labelled query, as the ``query`` record.

    Parameters
    ----------
    model, manifest
        The fine-tuned model and its manifest (:func:`~scgpt_protocol.adapt.saved.load_finetuned`).
    query
        A labelled AnnData; its genes must cover half the model's training genes.
    label_key
        The query's label column (None: the run's ``manifest["label_key"]``).
    baseline
        A :func:`logistic_regression_baseline` fitted with ``query=`` (its ``.query`` row is added).
    min_confidence, majority_voting
        Abstention and majority voting on the query's cells (:func:`~scgpt_protocol.annotate.refinement.refine`,
        the query over-clustered on its own).
    overlap
        Which query cells trained the model (:func:`~scgpt_protocol.data.overlap.find_overlap` against the
        run's train and validation cells): when any, a warning, and ``"overlap"`` in the record with the
        metrics of the seen and the unseen cells apart.
    temperature
        Calibration (:func:`~scgpt_protocol.annotate.inference.predict`): ``"auto"`` the model's, a number, None.
    label_map
        What :func:`~scgpt_protocol.data.label_map.map_obs_labels` did to the query's labels (its result), kept
        in the record. Query labels that are none of the model's classes are **novel types**: ``methods`` then
        holds the shared-type metrics, and ``"novel"`` (:func:`~scgpt_protocol.evaluate.novel.novel_record`)
        each novel type's cells, share ``Unknown`` and calls, with every method's "all cells" accuracy.

    Returns
    -------
    dict
        ``{"label_key", "n_cells", "methods": {method: metrics}, "predictions": DataFrame, "crosstab": DataFrame}``
        (cells per query label -- as given, before a map -- and scGPT's call), with ``"novel"``, ``"label_map"``,
        ``"overlap"`` and ``"warnings"`` when there is something to say.
    """
    from ..annotate.inference import predict

    key = label_key or manifest["label_key"]
    if key not in query.obs:
        msg = f"query_label_key={key!r} is not a column of the query's obs; columns: {format_keys(query.obs.columns)}."
        raise KeyError(msg)
    prediction = predict(model, query, categories=manifest["categories"], genes=manifest["genes"],
                         batch_size=batch_size, max_seq_len=max_seq_len, seed=seed, desc="query", precision=precision,
                         temperature=temperature)
    from ..annotate.refinement import refine

    prediction = refine(prediction, min_confidence=min_confidence, majority_voting=majority_voting, seed=seed)
    result = evaluate_predictions(query, prediction, label_key=key)
    shared = _shared_types(result.predictions[TRUE_LABEL], manifest["categories"])
    scored = result if shared is None else evaluate_predictions(query, prediction, label_key=key, cells=shared)
    base = baseline.query if baseline is not None else None
    methods = {SCGPT_METHOD: scored.metrics}
    if base is not None:
        methods[BASELINE_METHOD] = like_for_like(base if shared is None else _baseline_cells(base, shared, scored),
                                                 scored)
    record = {"label_key": key, "n_cells": int(query.n_obs), "methods": methods, "predictions": result.predictions,
              "warnings": _label_case_warnings(result.predictions[TRUE_LABEL], manifest["categories"])}
    record.update(_novel_entries(query, key, result, base, manifest["categories"], min_confidence, label_map))
    if overlap:
        overlap.warn()
        record["warnings"].append(overlap.message())
        record["overlap"] = {**overlap.to_dict(), "methods": _overlap_methods(result.predictions, baseline, overlap,
                                                                              min_confidence)}
    return record


def _shared_types(truth: pd.Series, categories: Any) -> np.ndarray | None:
    """Mask of the query cells whose label is one of the model's classes; None when no labelled cell is novel."""
    labelled = ~np.asarray(missing_labels(truth), dtype=bool)
    shared = shared_types(truth, categories)
    if (shared == labelled).all():
        return None
    if not shared.any():
        msg = (f"no query cell has a label the model knows: query labels {format_keys(sorted(set(truth[labelled])))}, "
               f"model classes {format_keys(categories)}. Map the query's labels to the model's names "
               "(query_label_map: a CSV 'query label,model label' or an inline mapping).")
        raise ValueError(msg)
    return shared


def _baseline_cells(result: BaselineResult, mask: np.ndarray, scgpt: EvalResult) -> BaselineResult:
    """The baseline's result on the cells ``mask`` (in order) only, its metrics scored on them (``scgpt``: the
    evaluation of the same cells, for their labels)."""
    import dataclasses

    raw = result.raw_confidence[mask] if result.raw_confidence is not None else None
    predictions, proba = result.predictions[mask], np.asarray(result.probabilities)[mask]
    truth = scgpt.predictions[TRUE_LABEL].astype(str).to_numpy()
    metrics = classification_metrics(truth, predictions.astype(str).to_numpy(), categories=result.categories,
                                     proba=proba)
    return dataclasses.replace(result, predictions=predictions, probabilities=proba, raw_confidence=raw,
                               metrics=metrics)


def _novel_entries(query: AnnData, key: str, result: EvalResult, baseline: BaselineResult | None, categories: Any,
                   min_confidence: float, label_map: Any) -> dict[str, Any]:
    """The query record's ``crosstab`` (labels as given -> scGPT's call), ``novel`` and ``label_map`` entries."""
    from ..annotate.refinement import refine_labels
    from .novel import crosstab, novel_record

    frame = result.predictions
    calls = {SCGPT_METHOD: frame[COLUMNS["labels"]].astype(str).to_numpy()}
    if baseline is not None and len(baseline.predictions) == len(frame):
        confidence = np.asarray(baseline.probabilities).max(axis=1)
        calls[BASELINE_METHOD] = refine_labels(baseline.predictions.astype(str).to_numpy(), confidence,
                                               min_confidence=min_confidence, categories=baseline.categories).labels
    as_given = label_map is not None and f"{key}_original" in query.obs
    given = query.obs[f"{key}_original"] if as_given else frame[TRUE_LABEL]
    entries: dict[str, Any] = {"crosstab": crosstab(np.asarray(given, dtype=object), calls[SCGPT_METHOD])}
    novel = novel_record(frame[TRUE_LABEL], calls, categories)
    if novel is not None:
        entries["novel"] = novel
    if label_map is not None:
        from ..data.label_map import label_map_record

        entries["label_map"] = label_map_record(label_map)
    return entries


def _label_case_warnings(truth: pd.Series, categories: Any) -> list[str]:
    """A warning for query labels that are training classes written in another case (they score 0)."""
    pairs = case_matches(truth[~missing_labels(truth)], categories)
    if not pairs:
        return []
    listed = ", ".join(f"{q!r} ~ {c!r}" for q, c in list(pairs.items())[:5])
    msg = (f"query labels that are training classes only when case is ignored: {listed}; they count as errors. "
           "Write them as the training labels are written (or map them) to score them.")
    logger.warning("%s", msg)
    warnings.warn(msg, UserWarning, stacklevel=3)
    return [msg]


def _overlap_methods(frame: pd.DataFrame, baseline: BaselineResult | None, overlap: Overlap,
                     min_confidence: float) -> dict[str, Any]:
    """scGPT's (and the baseline's) query metrics on the seen and on the unseen cells, apart."""
    from ..annotate.refinement import UNKNOWN
    from ..data.overlap import scored_apart

    truth = frame[TRUE_LABEL]
    labelled = ~missing_labels(truth)
    preds = {SCGPT_METHOD: frame[COLUMNS["labels"]].astype(str).to_numpy()}
    if baseline is not None and baseline.query is not None:
        base = baseline.query.predictions
        if len(base) == len(frame):  # one per query cell, in order (names may repeat in a query)
            preds[BASELINE_METHOD] = base.astype(str).to_numpy()

    def score(mask: np.ndarray) -> dict[str, Any] | None:
        cells = mask & labelled
        if not cells.any():
            return None
        unassigned = UNKNOWN if min_confidence else None
        return {method: classification_metrics(truth[cells].astype(str).to_numpy(), pred[cells],
                                               unassigned=unassigned if method == SCGPT_METHOD else None)
                for method, pred in preds.items()}

    return scored_apart(score, overlap)


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
        The run's :class:`~scgpt_protocol.core.layout.RunLayout`.
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
        ``{"predictions": path, "metrics": path}`` (and ``"query_predictions"``, ``"query_crosstab"``).
    """
    written = {"predictions": layout.write_csv(predictions, layout.predictions)}
    record = dict(metrics)
    if query is not None:
        record["query"] = {k: v for k, v in query.items() if k not in ("predictions", "crosstab")}
        written["query_predictions"] = layout.write_csv(query["predictions"], layout.query_predictions)
        if query.get("crosstab") is not None:  # query label x call
            written["query_crosstab"] = layout.write_csv(query["crosstab"], layout.query_crosstab)
    plain = json_safe(record)
    plain["descriptions"] = {k: v for k, v in METRIC_DESCRIPTIONS.items() if k in _metric_names(record)}
    written["metrics"] = layout.write_json(layout.metrics, plain)
    # the notebook shows them in its files table
    logger.info("wrote %s", ", ".join(str(p) for p in written.values()), extra=DETAIL)
    return written
