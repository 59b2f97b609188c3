"""Scoring a query that holds types the model never saw: shared types, novel types, all cells, the cross-tab.

After a label map (:func:`~scgpt_protocol.data.label_map.apply_label_map`) a query's cells fall in three groups:
dropped (no label to score), **shared** types (a class of the model) and **novel** types (labels the model
does not have). :func:`split_novel` scores them apart:

* ``shared``: :func:`~scgpt_protocol.metrics.classification_metrics` on the shared-type cells only, ``Unknown``
  counted as an error (``unassigned``);
* ``novel``: for each novel type, its cells, the share called ``Unknown`` and what the others were called;
* ``all_cells``: accuracy over every labelled cell, where a novel cell counts as right only when it is
  ``Unknown`` (the best a model can do with a type it never saw).

:func:`crosstab` counts query label -> predicted label, the table a report shows for the query.
:func:`novel_record` is 03's entry for a query (every method); :func:`zeroshot_novel` and :func:`zeroshot_crosstab`
are 04's, from a :class:`~scgpt_protocol.annotate.zeroshot.ZeroShotResult`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..annotate.columns import PREDICTION_COLUMNS
from ..data.label_map import novel_types
from ..data.labels import UNKNOWN, clean_labels, missing_labels, shared_types
from ..metrics import ZEROSHOT_METHOD, classification_metrics

if TYPE_CHECKING:
    from ..annotate.zeroshot import ZeroShotResult

__all__ = ["split_novel", "crosstab", "novel_record", "zeroshot_novel", "zeroshot_crosstab"]


def _labels(values: Any, name: str) -> np.ndarray:
    array = values.to_numpy(dtype=object) if isinstance(values, (pd.Series, pd.Index)) else np.asarray(
        values, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one label per cell (one-dimensional); got shape {array.shape}.")
    return array


def split_novel(y_true: Any, y_pred: Any, model_classes: Sequence[str], unknown: str = "Unknown") -> dict[str, Any]:
    """Shared-type metrics, each novel type apart, and an "all cells" accuracy.

    Parameters
    ----------
    y_true
        The query's labels in the model's names (after a label map); NaN / missing = dropped, not scored.
    y_pred
        The calls (``Unknown`` where the model abstained).
    model_classes
        The classes the model predicts; a true label outside them is a novel type.
    unknown
        The label of an abstained cell.

    Returns
    -------
    dict
        ``shared_mask`` (bool array over the input cells: labelled cells of a shared type), ``shared``
        (classification metrics of those cells; None when there are none), ``novel`` (novel type ->
        ``{"n_cells", "unknown_rate", "called": {predicted label: cells}}``, most frequent call first),
        ``all_cells`` (``{"accuracy", "n_cells", "n_shared", "n_novel"}``) and ``n_dropped`` (cells without a
        label).
    """
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        msg = f"y_true has {len(true)} labels but y_pred has {len(pred)}; give one prediction per cell."
        raise ValueError(msg)
    labelled = ~missing_labels(true)
    if not labelled.any():
        raise ValueError(f"none of the {len(true)} cells has a label to score (all missing or dropped by the map).")
    classes = list(clean_labels(model_classes))
    if unknown in classes:
        raise ValueError(f"{unknown!r} is one of the model's classes; pass another unknown= label for abstention.")
    text = np.where(labelled, clean_labels(true), "")
    calls = np.asarray([str(v) for v in pred], dtype=object)
    shared = shared_types(true, classes)
    novel_mask = labelled & ~shared
    right = np.where(shared, text == calls, calls == unknown) & labelled
    novel: dict[str, Any] = {}
    for label in sorted(set(text[novel_mask])):
        cells = novel_mask & (text == label)
        called = pd.Series(calls[cells]).value_counts()
        novel[label] = {"n_cells": int(cells.sum()), "unknown_rate": float((calls[cells] == unknown).mean()),
                        "called": {str(k): int(v) for k, v in called.items()}}
    shared_metrics = (classification_metrics(text[shared], calls[shared], categories=classes, unassigned=unknown)
                      if shared.any() else None)
    return {
        "shared_mask": shared,
        "shared": shared_metrics,
        "novel": novel,
        "all_cells": {"accuracy": float(right[labelled].mean()), "n_cells": int(labelled.sum()),
                      "n_shared": int(shared.sum()), "n_novel": int(novel_mask.sum())},
        "n_dropped": int((~labelled).sum()),
    }


def crosstab(y_true: Any, y_pred: Any) -> pd.DataFrame:
    """Cells per query label (rows) and predicted label (columns); cells without a label are left out.

    Rows and columns are sorted, every count is an int, and the frame is named ``query label`` x ``predicted``.
    """
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        msg = f"y_true has {len(true)} labels but y_pred has {len(pred)}; give one prediction per cell."
        raise ValueError(msg)
    keep = ~missing_labels(true)
    table = pd.crosstab(pd.Series(clean_labels(true[keep]), name="query label"),
                        pd.Series([str(v) for v in pred[keep]], name="predicted"))
    return table.sort_index().sort_index(axis=1).astype(int)


def novel_record(y_true: Any, calls: Mapping[str, Any], model_classes: Sequence[str],
                 unknown: str = "Unknown") -> dict[str, Any] | None:
    """The ``novel`` entry of a query's metrics: for each method, its novel types and its "all cells" accuracy.

    ``calls``: method -> one call per cell (``Unknown`` where it abstained). None when the query holds no
    novel type (every labelled cell is of a class the model has): nothing to score apart.

    Returns
    -------
    dict
        ``{"types": [novel labels], "n_cells": novel cells, "methods": {method: {"novel": ..., "all_cells": ...}}}``
        (the entries of :func:`split_novel`).
    """
    types = novel_types(y_true, model_classes)
    if not types:
        return None
    methods = {}
    for method, pred in calls.items():
        scored = split_novel(y_true, pred, model_classes, unknown=unknown)
        methods[method] = {"novel": scored["novel"], "all_cells": scored["all_cells"]}
    first = next(iter(methods.values()))
    return {"types": types, "n_cells": int(first["all_cells"]["n_novel"]), "methods": methods}


def zeroshot_novel(result: ZeroShotResult, maps: Any = None) -> dict[str, Any] | None:
    """Score 04's novel types apart: the query labels none of the reference's classes matches.

    ``maps``: what 04's label map did (:class:`~scgpt_protocol.protocol.steps.zeroshot.ZeroshotLabelMaps`, or
    anything with its ``record()`` and ``describe()``), None without a map.

    Adds to ``result.metrics`` (when the query has metrics) ``novel``
    (:func:`~scgpt_protocol.evaluate.novel.novel_record` of the kNN vote call: for each novel type its cells, the
    share called ``Unknown`` and what the others were called; the "all cells" accuracy, where a novel cell is
    right only when ``Unknown``) and ``label_map`` (``maps.record()``); the maps' description goes to the notes.
    ``result.metrics``' ``knn_vote`` / ``knn_weighted`` already leave the novel-type cells out.

    Returns
    -------
    dict or None
        The ``novel`` record; None when every labelled query cell is of a reference class (or the query has no
        labels).
    """
    label_key = result.params.get("label_key")
    if maps is not None and maps.record() is not None:
        result.notes.append(maps.describe().replace("\n", " "))
    classes = list(result.transfer.categories)
    if label_key not in result.predictions or UNKNOWN in classes:  # no truth; or 'Unknown' is a reference class
        return None
    record = novel_record(result.predictions[label_key], {ZEROSHOT_METHOD: result.predictions[PREDICTION_COLUMNS[0]]},
                          classes, unknown=UNKNOWN)
    if result.metrics is not None:
        if record is not None:
            result.metrics["novel"] = record
        if maps is not None and maps.record() is not None:
            result.metrics["label_map"] = maps.record()
    return record


def zeroshot_crosstab(result: ZeroShotResult) -> pd.DataFrame | None:
    """Query cells per true label (rows) and kNN vote call (columns), novel types included; None without labels."""
    label_key = result.params.get("label_key")
    if label_key not in result.predictions:
        return None
    return crosstab(result.predictions[label_key], result.predictions[PREDICTION_COLUMNS[0]])
