"""Labelling cells: predictions of a fine-tuned model, refinement, kNN label transfer, zero-shot."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "annotate": "classify",
    "predict": "classify",
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
    "Prediction": "prediction",
    "check_prediction": "prediction",
    "UNKNOWN": "refinement",
    "Refinement": "refinement",
    "overclustering_resolution": "refinement",
    "abstain": "refinement",
    "over_cluster": "refinement",
    "majority_vote": "refinement",
    "refine_labels": "refinement",
    "refine": "refinement",
    "as_refinement": "refinement",
    "refinement_metrics": "refinement",
    "write_annotation": "refinement",
    "ZeroShotResult": "zeroshot",
    "zeroshot_annotate": "zeroshot",
    "write_zeroshot": "zeroshot",
})
