"""Figures: style and saving, metrics, training curves, embeddings, QC."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "plot_reliability": "calibration",
    "joint_embedding": "embedding",
    "cells_for_plot": "embedding",
    "plot_embedding": "embedding",
    "compute_umap": "embedding",
    "plot_marker_dotplot": "evidence",
    "plot_confidence_by_type": "evidence",
    "plot_call_umaps": "evidence",
    "dotplot_table": "evidence",
    "SavedFigure": "figure",
    "set_style": "figure",
    "save_figure": "figure",
    "short_label": "figure",
    "LABEL_WIDTH": "figure",
    "METHOD_COLORS": "metrics",
    "plot_confusion": "metrics",
    "plot_per_class_f1": "metrics",
    "plot_coverage_curve": "metrics",
    "plot_qc": "qc",
    "plot_class_counts": "qc",
    "plot_overview_umap": "qc",
    "plot_training_curves": "training",
})
