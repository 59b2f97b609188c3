"""TODO docstring: data.matrix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

from typing import TYPE_CHECKING

from ..core.errors import InputDataError, format_keys

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["iter_row_chunks", "get_matrix", "check_expression", "value_kind"]


def read_row_chunks(matrix: Any, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """``(start, chunk)``: float32 CSR rows with duplicates summed and explicit zeros dropped (as prepare)."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_size):
        block = matrix[start:min(start + chunk_size, n)]
        x = sp.csr_matrix(block, dtype=np.float32)
        if x is block:
            x = x.copy()
        x.sum_duplicates()
        x.eliminate_zeros()
        yield start, x


def select_rows(x: sp.csr_matrix, mask: np.ndarray) -> sp.csr_matrix:
    return x if mask.all() else x[np.flatnonzero(mask)]


def select_cols(x: sp.csr_matrix, cols: np.ndarray | None) -> sp.csr_matrix:
    return x if cols is None else x[:, cols]


#: above this, non-integer values are not taken for log-normalised ones
LOG_MAX = 50.0


# -- matrices -------------------------------------------------------------------------------
class BackedRows:
    """The rows of a backed AnnData view, read from the file only when indexed.

    ``view.X`` of a backed view (``adata[rows]`` of ``read_h5ad(..., backed="r")``) reads all its rows
    into memory at once; this reader keeps the file open and reads the rows asked for
    (``reader[start:stop]``, an index array or a boolean mask), so chunked code stays chunked.
    """

    def __init__(self, adata: AnnData) -> None:
        from anndata.io import sparse_dataset

        parent = adata._adata_ref  # the backed AnnData the view was taken from
        source = parent.file["X"]
        self.source = sparse_dataset(source) if hasattr(source, "keys") else source
        self.rows = np.arange(parent.n_obs)[adata._oidx]
        cols = np.arange(parent.n_vars)[adata._vidx]
        self.cols = None if len(cols) == parent.n_vars and np.array_equal(cols, np.arange(parent.n_vars)) else cols
        self.shape = (len(self.rows), len(cols))
        self.dtype = self.source.dtype
        self.ndim = 2

    def __getitem__(self, key: Any) -> Any:
        cols = None
        if isinstance(key, tuple):
            key, cols = key
        rows = self.rows[key]
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.source[unique]
        if len(unique) != len(rows) or not np.array_equal(unique, rows):
            block = block[inverse]
        if self.cols is not None:
            block = block[:, self.cols]
        return block if cols is None else block[:, cols]


def get_matrix(adata: AnnData, layer: str | None = None) -> Any:
    """``adata.X`` or ``adata.layers[layer]`` with a clear error for an unknown layer.

    For a view of a backed AnnData, ``X`` is a :class:`BackedRows` reader (rows are read when indexed),
    not the whole view loaded at once.
    """
    if layer is None:
        if adata.is_view and adata.isbacked:
            return BackedRows(adata)
        if adata.X is None:
            raise InputDataError("adata.X is empty; pass layer= with the layer that holds expression values.")
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not in adata.layers; available: {format_keys(adata.layers.keys())}."
        raise KeyError(msg)
    return adata.layers[layer]


def iter_row_chunks(matrix: Any, chunk_size: int = 2048) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, csr_chunk)`` for consecutive row blocks of a dense, sparse or backed matrix.

    Only one chunk is in memory at a time (dense input is converted chunk by chunk).
    """
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, chunk_size):
        block = matrix[start : min(start + chunk_size, n_rows)]
        if not sp.issparse(block):
            block = sp.csr_matrix(np.asarray(block))
        yield start, sp.csr_matrix(block)


def check_expression(adata: AnnData, *, layer: str | None = None, chunk_size: int = 4096) -> None:
    """Fail clearly when the expression values are negative, NaN or infinite (scaled data, a wrong layer).

    Raises
    ------
    InputDataError
        With the number of bad values and cells, the first cell and gene, and how to fix it.
    """
    matrix = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    n_nan = n_neg = n_inf = 0
    bad_cells: set[int] = set()
    first: tuple[int, int, float] | None = None
    for start, chunk in iter_row_chunks(matrix, chunk_size):
        data = chunk.data
        bad = ~np.isfinite(data) | (data < 0)
        if not bad.any():
            continue
        n_nan += int(np.isnan(data).sum())
        n_inf += int(np.isinf(data).sum())
        n_neg += int((data < 0).sum() - np.isneginf(data).sum())
        rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[bad]
        bad_cells.update((rows + start).tolist())
        if first is None:
            k = int(np.flatnonzero(bad)[0])
            first = (int(rows[0]) + start, int(chunk.indices[k]), float(data[k]))
    if first is None:
        return
    cell, gene, value = first
    kinds = ", ".join(s for s in (f"{n_neg:,} negative" if n_neg else "", f"{n_nan:,} NaN" if n_nan else "",
                                  f"{n_inf:,} infinite" if n_inf else "") if s)
    msg = (
        f"{where} holds {kinds} values in {len(bad_cells):,} cells (first: cell {adata.obs_names[cell]!r}, "
        f"gene {adata.var_names[gene]!r} = {value}). scGPT expects non-negative expression: raw counts or "
        "log1p-normalised values. If X was scaled (sc.pp.scale), use adata.raw.to_adata() or a counts "
        "layer (layer=...); replace NaN and infinite values (a failed normalisation, a division by zero) first."
    )
    raise InputDataError(msg)


def value_kind(matrix: Any, n_rows: int = 2000) -> tuple[str, float]:
    """``("counts" | "log-normalised" | "other", max of the sampled values)`` from a sample of ``n_rows`` rows.

    The one counts-vs-log-normalised check of the package (01's inspection and normalisation, the
    baseline's normalisation): whole numbers are counts; other values below :data:`LOG_MAX` are taken
    for log1p-normalised ones.
    """
    n = matrix.shape[0]
    if n > n_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, n_rows, replace=False))
        block = matrix[rows]
    else:
        block = matrix[:]
    data = block.data if sp.issparse(block) else np.asarray(block).ravel()
    data = data[data != 0]
    if data.size == 0:
        return "other", 0.0
    vmax = float(np.max(data))
    if np.all(np.mod(data, 1) == 0):
        return "counts", vmax
    if vmax < LOG_MAX:
        return "log-normalised", vmax
    return "other", vmax
