"""Reading AnnData files, rows of a matrix by chunks, labels and splits, colours, on-disk stores, demo data."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BackedCells": "backed",
    "read_backed": "backed",
    "cells_for_plot": "backed",
    "label_palette": "colors",
    "run_palette": "colors",
    "mark_categories": "colors",
    "load_demo": "demo",
    "make_toy_adata": "demo",
    "SPLITS": "labels",
    "iter_row_chunks": "matrix",
    "get_matrix": "matrix",
    "check_expression": "matrix",
    "value_kind": "matrix",
    "read_adata": "read",
    "open_backed": "read",
    "open_adata": "read",
    "RowWriter": "store",
    "create_store": "store",
    "open_store": "store",
    "take_rows": "store",
    "subsample": "store",
})
