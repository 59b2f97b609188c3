"""Reading AnnData files, rows of a matrix by chunks, labels and splits, colours, on-disk stores, demo data."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BackedCells": "backed",
    "open_cells": "backed",
    "label_palette": "colors",
    "run_palette": "colors",
    "mark_categories": "colors",
    "load_demo": "demo",
    "make_toy_adata": "demo",
    "SPLITS": "labels",
    "disk_matrix": "matrix",
    "iter_row_chunks": "matrix",
    "read_rows": "matrix",
    "log1p_cp10k": "matrix",
    "get_matrix": "matrix",
    "check_expression": "matrix",
    "value_kind": "matrix",
    "opened_backed": "read",
    "read_adata": "read",
    "open_backed": "read",
    "open_lazy": "read",
    "CSRWriter": "store",
    "begin_h5ad": "store",
    "write_elem": "store",
    "RowWriter": "store",
    "create_store": "store",
    "open_store": "store",
    "take_rows": "store",
    "embedding_rows": "store",
    "subsample": "store",
})
