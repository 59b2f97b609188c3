"""The expression matrix of an AnnData, wherever it lives (in memory, sparse, on disk, a backed view).

:func:`get_matrix` picks ``X`` or a layer (a row reader for a backed view), :func:`iter_row_chunks` reads
its rows a chunk at a time, :func:`check_expression` and :func:`value_kind` say what the values are
(counts or log-normalised). :class:`BackedRows` is the one place that relies on anndata's private view
attributes."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import scipy.sparse as sp

from ..core.errors import InputDataError, format_keys

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["disk_matrix", "iter_row_chunks", "read_rows", "log1p_cp10k", "get_matrix", "check_expression", "value_kind",
           "sample_rows"]


def log1p_cp10k(matrix: Any, *, copy: bool = False, chunk_size: int = 8192) -> sp.csr_matrix:
    """scanpy's ``normalize_total(target_sum=1e4)`` + ``log1p`` of a matrix, a chunk of rows at a time.

    The one log1p-CP10k of the package (step 01 in memory and streamed, the baseline of step 03). Both
    operations work row by row, so the result has the same bits as scanpy on the whole matrix, while memory
    holds one chunk beside the matrix. Returns CSR in the input's float dtype (other dtypes become float32,
    as in scanpy) with duplicates summed; ``copy=False`` normalises the CSR's values in place. scanpy's
    warnings are silenced: callers report what matters (cells with zero counts, in step 01).
    """
    import anndata
    import scanpy as sc

    out = sp.csr_matrix(matrix, copy=copy)
    if out.dtype not in (np.float32, np.float64):
        out = out.astype(np.float32)
    out.sum_duplicates()
    for lo in range(0, out.shape[0], chunk_size):
        hi = min(lo + chunk_size, out.shape[0])
        part = anndata.AnnData(out[lo:hi])  # a slice is a copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.normalize_total(part, target_sum=1e4)
            sc.pp.log1p(part)
        values = sp.csr_matrix(part.X)
        a, b = out.indptr[lo], out.indptr[hi]
        if values.nnz != b - a:  # scanpy keeps the sparsity structure; a change would misplace values
            msg = "normalize_total/log1p changed the sparsity structure of a chunk"
            raise RuntimeError(msg)
        out.data[a:b] = values.data
    return out


def select_rows(x: sp.csr_matrix, mask: np.ndarray) -> sp.csr_matrix:
    return x if mask.all() else x[np.flatnonzero(mask)]


def select_cols(x: sp.csr_matrix, cols: np.ndarray | None) -> sp.csr_matrix:
    return x if cols is None else x[:, cols]


#: above this, non-integer values are not taken for log-normalised ones
LOG_MAX = 50.0


def disk_matrix(elem: Any) -> Any:
    """An HDF5 matrix element read lazily: anndata's sparse dataset for a CSR / CSC group, the h5py dataset
    itself when dense (rows are read when indexed)."""
    import h5py
    from anndata.io import sparse_dataset

    return sparse_dataset(elem) if isinstance(elem, h5py.Group) else elem


# -- matrices -------------------------------------------------------------------------------
class BackedRows:
    """The rows of a backed AnnData view, read from the file only when indexed.

    ``view.X`` of a backed view (``adata[rows]`` of ``read_h5ad(..., backed="r")``) reads all its rows
    into memory at once; this reader keeps the file open and reads the rows asked for
    (``reader[start:stop]``, an index array or a boolean mask), so chunked code stays chunked.
    """

    def __init__(self, adata: AnnData) -> None:
        parent = adata._adata_ref  # the backed AnnData the view was taken from
        self.source = disk_matrix(parent.file["X"])
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


#: dtype kinds of expression values: booleans, signed and unsigned integers, floats
_NUMERIC_KINDS = "biuf"


def dense_block(block: Any) -> np.ndarray:
    """A dense block of rows as an array scipy can store: float16 (which scipy.sparse refuses) becomes float32,
    which holds every float16 value exactly."""
    block = np.asarray(block)
    return block.astype(np.float32) if block.dtype == np.float16 else block


def check_dtype(matrix: Any, where: str = "adata.X") -> None:
    """Fail clearly when the expression values are not real numbers (complex, text, objects, dates).

    Booleans, integers and floats are read as float32 (float16 exactly; the others as scanpy reads them)."""
    dtype = getattr(matrix, "dtype", None)
    if dtype is None or np.dtype(dtype).kind in _NUMERIC_KINDS:
        return
    msg = (f"{where} holds values of dtype {np.dtype(dtype)}; expected real numbers (raw counts or log1p-normalised "
           "expression: float32, float64, float16 or integers). Convert it first, e.g. "
           f"adata.X = adata.X.real.astype('float32') for complex values with no imaginary part, or point "
           "layer= to the layer that holds expression values.")
    raise InputDataError(msg)


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


def iter_row_chunks(
    matrix: Any,
    chunk_size: int = 2048,
    *,
    rows: Any = None,
    dtype: Any = None,
    canonical: bool = False,
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, csr_chunk)`` for consecutive row blocks of a dense, sparse or backed matrix.

    The one chunked reader of expression rows: only one chunk is in memory at a time (dense input is
    converted chunk by chunk).

    Parameters
    ----------
    matrix
        Dense, scipy sparse, an on-disk sparse dataset or a :class:`BackedRows` reader.
    chunk_size
        Rows read at a time.
    rows
        None: every row, read by slices. A boolean mask or ascending positions: only those rows,
        ``chunk_size`` of them per read; ``start`` then counts the selected rows.
    dtype
        The chunks' dtype (None: as stored).
    canonical
        Sum duplicate entries and drop explicit zeros (what step 01 stores). Each chunk is a fresh copy
        (a slice or fancy index never returns the caller's arrays), so this never changes the input.
    """
    if chunk_size < 1:
        msg = f"chunk_size must be a positive integer; got {chunk_size!r}."
        raise ValueError(msg)
    n_rows = matrix.shape[0]
    index = _row_positions(rows, n_rows)
    total = n_rows if index is None else len(index)
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        block = matrix[start:stop] if index is None else matrix[index[start:stop]]
        if not sp.issparse(block):
            block = dense_block(block)
        x = sp.csr_matrix(block, dtype=dtype)
        if canonical:
            x.sum_duplicates()
            x.eliminate_zeros()
        yield start, x


def _row_positions(rows: Any, n_rows: int) -> np.ndarray | None:
    """None, or a boolean mask / ascending unique positions as int64 positions (checked)."""
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_rows,):
            msg = f"rows is a boolean mask of shape {rows.shape}; expected ({n_rows},)."
            raise ValueError(msg)
        return np.flatnonzero(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        msg = f"rows must be a boolean mask or integer positions; got dtype {rows.dtype}."
        raise TypeError(msg)
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows[0] < 0 or rows[-1] >= n_rows or np.any(np.diff(rows) <= 0)):
        msg = f"rows must be ascending unique positions in 0..{n_rows - 1}."
        raise ValueError(msg)
    return rows


def read_rows(matrix: Any, rows: Any = None, *, chunk_size: int = 8192) -> sp.csr_matrix:
    """Rows ``rows`` (a mask or ascending positions; None: all) of a dense, sparse or backed matrix as one
    float32 CSR matrix, read chunk by chunk: never more than one dense chunk, never a float64 copy of all."""
    blocks = [x for _, x in iter_row_chunks(matrix, chunk_size, rows=rows, dtype=np.float32)]
    if not blocks:
        return sp.csr_matrix((0, matrix.shape[1]), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)


def check_expression(adata: AnnData, *, layer: str | None = None, chunk_size: int = 4096) -> None:
    """Fail clearly when the expression values are not real numbers (:func:`check_dtype`) or are negative, NaN or
    infinite (scaled data, a wrong layer).

    Raises
    ------
    InputDataError
        With the number of bad values and cells, the first cell and gene, and how to fix it.
    """
    matrix = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    check_dtype(matrix, where)
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


def sample_rows(rows: Any, n: int | None, seed: int = 0) -> np.ndarray:
    """A seeded random sample of at most ``n`` of ``rows`` (row indices), in their order: the one way the package
    draws a subset of cells (all of them when ``n`` is None or at least their number)."""
    rows = np.asarray(rows)
    if n is None or len(rows) <= n:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), int(n), replace=False))]


def value_kind(matrix: Any, n_rows: int = 2000) -> tuple[str, float]:
    """``("counts" | "log-normalised" | "other", max of the sampled values)`` from a sample of ``n_rows`` rows.

    The one counts-vs-log-normalised check of the package (01's inspection and normalisation, the
    baseline's normalisation): whole numbers are counts; other values below :data:`LOG_MAX` are taken
    for log1p-normalised ones.
    """
    n = matrix.shape[0]
    if n > n_rows:
        block = matrix[sample_rows(np.arange(n), n_rows)]
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
