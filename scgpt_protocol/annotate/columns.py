"""Names of the per-cell columns the package writes: ``obs`` of an annotated AnnData, ``predictions.csv``,
04's ``zeroshot/predictions.csv`` and table ``obs`` of ``export/obs.duckdb``. Every writer takes its names
from here."""

from __future__ import annotations

__all__ = ["TRUE_LABEL", "SPLIT", "CORRECT", "RAW_CONFIDENCE", "COLUMNS", "ZEROSHOT_COLUMNS", "PREDICTION_COLUMNS",
           "OBS_COLUMNS", "columns_for"]

#: the known label of a scored cell, its split, and whether the call was right
TRUE_LABEL, SPLIT, CORRECT = "true_label", "split", "correct"

#: column of each per-cell field of a refinement (abstention, majority voting) in obs and tables (03)
COLUMNS = {
    "labels": "scgpt_label", "predicted": "scgpt_prediction", "confidence": "scgpt_label_confidence",
    "unknown": "scgpt_unknown", "over_clustering": "scgpt_over_clustering", "majority_voting": "scgpt_majority_voting",
}
#: the raw (uncalibrated) softmax probability of scGPT's predicted class, beside the calibrated confidence
RAW_CONFIDENCE = "scgpt_label_confidence_raw"
#: the same for 04's zero-shot calls (over-clustering and majority vote keep their names)
ZEROSHOT_COLUMNS = {
    **COLUMNS, "labels": "scgpt_zeroshot_label", "predicted": "scgpt_zeroshot_prediction",
    "confidence": "scgpt_zeroshot_confidence", "unknown": "scgpt_zeroshot_unknown",
}
#: the columns of a zero-shot result's predictions (the true label, when known, is added as ``label_key``)
PREDICTION_COLUMNS = (
    ZEROSHOT_COLUMNS["labels"],
    ZEROSHOT_COLUMNS["confidence"],
    f"{ZEROSHOT_COLUMNS['labels']}_weighted",
    f"{ZEROSHOT_COLUMNS['confidence']}_weighted",
)
#: the columns of table ``obs`` of ``obs.duckdb``, in order
OBS_COLUMNS = ("cell", "row", SPLIT, TRUE_LABEL, *COLUMNS.values(), RAW_CONFIDENCE, CORRECT, "umap_1", "umap_2")


def columns_for(obs_key: str) -> dict[str, str]:
    """The obs columns of :func:`~scgpt_protocol.annotate.inference.annotate` for ``obs_key``: :data:`COLUMNS`'s
    names for the default key, else ``<obs_key>``, ``<obs_key>_confidence`` and ``<obs_key>_<field>``."""
    names = {"labels": obs_key, "confidence": f"{obs_key}_confidence"}
    if obs_key != COLUMNS["labels"]:
        names.update({k: f"{obs_key}_{k}" for k in ("predicted", "unknown", "over_clustering", "majority_voting")})
    return names
