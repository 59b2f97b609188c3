"""Labelling cells: predictions of a fine-tuned model, refinement, kNN label transfer, zero-shot."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "LabelTransfer": "knn",
    "transfer_labels": "knn",
    "PREDICTION_COLUMNS": "knn",
    "predict": "predict",
    "Prediction": "prediction",
    "UNKNOWN": "refine",
    "COLUMNS": "refine",
    "ZEROSHOT_COLUMNS": "refine",
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
    "joint_embedding": "zeroshot",
    "write_zeroshot": "zeroshot",
})
