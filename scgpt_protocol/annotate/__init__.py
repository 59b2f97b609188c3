"""Labelling cells: predictions of a fine-tuned model, refinement, kNN label transfer, zero-shot."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "TRUE_LABEL": "columns",
    "SPLIT": "columns",
    "CORRECT": "columns",
    "COLUMNS": "columns",
    "ZEROSHOT_COLUMNS": "columns",
    "PREDICTION_COLUMNS": "columns",
    "OBS_COLUMNS": "columns",
    "columns_for": "columns",
    "LabelTransfer": "knn",
    "transfer_labels": "knn",
    "annotate": "predict",
    "predict": "predict",
    "Prediction": "prediction",
    "check_prediction": "prediction",
    "UNKNOWN": "refine",
    "Refinement": "refine",
    "overclustering_resolution": "refine",
    "abstain": "refine",
    "over_cluster": "refine",
    "majority_vote": "refine",
    "refine_labels": "refine",
    "refine": "refine",
    "as_refinement": "refine",
    "refinement_metrics": "refine",
    "write_annotation": "refine",
    "ZeroShotResult": "zeroshot",
    "zeroshot_annotate": "zeroshot",
    "write_zeroshot": "zeroshot",
})
