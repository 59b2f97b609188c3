"""Step 01: inspect, filter, normalise, select genes and split the cells (in memory or streamed)."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "read_adata": ".data.read",
    "open_lazy": ".data.read",
    "seurat_hvg": "hvg",
    "PreparedData": "in_memory",
    "prepare": "in_memory",
    "Inspection": "inspect",
    "inspect_adata": "inspect",
    "write_inspection": "inspect",
    "mt_gene_count": "inspect",
    "MIN_MT_GENES": "inspect",
    "open_prepared_cells": "io",
    "resolve_checkpoint": "io",
    "read_checkpoint_record": "io",
    "write_prepared": "io",
    "read_prepared": "io",
    "read_labels": "io",
    "prepare_file": "stream",
    "choose_chunked": "stream",
    "stored_matrix_bytes": "stream",
    "available_memory": "stream",
})
