"""Figures: style and saving, metrics, training curves, embeddings, QC."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "joint_embedding": "embedding",
    "cells_for_plot": "embedding",
    "plot_embedding": "embedding",
    "compute_umap": "embedding",
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
    "plot_training_curves": "training",
})
