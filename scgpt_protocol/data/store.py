"""Per-cell outputs of prediction and embedding written to an HDF5 file chunk by chunk.

At atlas scale the per-cell matrices (class probabilities ``n x C``, embeddings ``n x d``) grow with the
number of cells; :func:`~scgpt_protocol.annotate.inference.predict` and :func:`~scgpt_protocol.model.embedding.embed`
given ``out=`` write them here one chunk of cells at a time and keep in memory only the small per-cell
vectors (codes, confidence). The file is a plain HDF5 file (``h5py``), one dataset per output, rows in the
order of ``adata.obs_names``. It is not memory-mapped: reading rows back reads them from disk
(:func:`take_rows`), so what a later step holds in memory is what it asks for.

:class:`CSRWriter` appends CSR rows to an HDF5 group in anndata's encoding (``prepared.h5ad``, ``vars.h5``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from .matrix import sample_rows

__all__ = ["CSRWriter", "begin_h5ad", "write_elem", "RowWriter", "create_store", "open_store", "take_rows",
    "embedding_rows", "subsample"]


# -- writing ------------------------------------------------------------------------------------
def _hdf5_chunks(size: int | bool) -> int | bool | tuple[int]:
    """h5py's ``chunks=`` for a 1-d dataset: a length, or True for h5py's guess."""
    return size if isinstance(size, bool) else (size,)


class CSRWriter:
    """An appendable CSR matrix in an HDF5 group, in anndata's ``csr_matrix`` encoding: the one chunked CSR
    writer (``prepared.h5ad``'s ``X`` and ``layers["counts"]``, ``export/vars.h5``).

    Parameters
    ----------
    parent
        An open h5py file or group; the matrix becomes its group ``name``.
    n_cols
        Columns (genes).
    max_nnz
        An upper bound of the stored values: ``indptr`` is int32 when it fits (as scipy, and so
        ``write_h5ad``, would store it), else int64. Or give ``indptr_dtype``.
    compression
        h5py options for the three datasets, e.g. ``{"compression": "gzip", "compression_opts": 4}``.
    value_chunks, indptr_chunks
        HDF5 chunk lengths (``True``: h5py's guess).
    """

    def __init__(self, parent: Any, name: str, n_cols: int, max_nnz: int | None = None, *,
                 indptr_dtype: Any = None, compression: Mapping[str, Any] | None = None,
                 value_chunks: int | bool = 1 << 18, indptr_chunks: int | bool = 1 << 16) -> None:
        if indptr_dtype is None:
            if max_nnz is None:
                msg = "CSRWriter needs max_nnz or indptr_dtype."
                raise ValueError(msg)
            indptr_dtype = np.int32 if max_nnz < np.iinfo(np.int32).max else np.int64
        opts = dict(compression or {})
        g = parent.create_group(name)
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([0, n_cols], dtype=np.int64)
        self.group, self.n_cols, self.n_rows, self.nnz = g, n_cols, 0, 0
        self.index_dtype = np.int32 if n_cols < 2**31 else np.int64
        self.indptr_dtype = np.dtype(indptr_dtype)
        self._chunks = (value_chunks if not isinstance(value_chunks, bool) else 0,
                        indptr_chunks if not isinstance(indptr_chunks, bool) else 0)
        g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                         chunks=_hdf5_chunks(value_chunks), **opts)
        g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=self.index_dtype,
                         chunks=_hdf5_chunks(value_chunks), **opts)
        g.create_dataset("indptr", shape=(1,), maxshape=(None,), dtype=self.indptr_dtype,
                         chunks=_hdf5_chunks(indptr_chunks), data=np.zeros(1, dtype=self.indptr_dtype), **opts)

    def disk_bytes(self, nnz: int, n_rows: int) -> int:
        """About the bytes this matrix takes on disk with ``nnz`` values in ``n_rows`` rows (whole HDF5 chunks,
        uncompressed): what a full disk must leave room for."""
        def whole(n: int, chunk: int, itemsize: int) -> int:
            return (-(-n // chunk) * chunk if chunk else n) * itemsize

        values, indptr = self._chunks
        return (whole(nnz, values, 4) + whole(nnz, values, np.dtype(self.index_dtype).itemsize)
                + whole(n_rows + 1, indptr, self.indptr_dtype.itemsize))

    def append(self, x: sp.csr_matrix) -> None:
        """Append the rows of ``x`` as they are (sort or canonicalise them first where the file must be)."""
        n, k = x.shape[0], x.nnz
        if n == 0:
            return
        g = self.group
        g["data"].resize((self.nnz + k,))
        g["data"][self.nnz:] = x.data.astype(np.float32, copy=False)
        g["indices"].resize((self.nnz + k,))
        g["indices"][self.nnz:] = x.indices.astype(self.index_dtype, copy=False)
        g["indptr"].resize((self.n_rows + n + 1,))
        g["indptr"][self.n_rows + 1:] = (x.indptr[1:].astype(np.int64) + self.nnz).astype(self.indptr_dtype)
        self.n_rows += n
        self.nnz += k
        g.attrs["shape"] = np.array([self.n_rows, self.n_cols], dtype=np.int64)


def begin_h5ad(handle: Any) -> None:
    """The root attributes of an ``.h5ad`` file written element by element (``prepared.h5ad``, ``vars.h5``)."""
    handle.attrs["encoding-type"] = "anndata"
    handle.attrs["encoding-version"] = "0.1.0"


def write_elem(group: Any, key: str, value: Any) -> None:
    """anndata's writer of one element (``anndata.io`` from 0.11, ``anndata.experimental`` before)."""
    import anndata

    writer = getattr(getattr(anndata, "io", None), "write_elem", None)
    if writer is None:  # anndata < 0.11
        from anndata.experimental import write_elem as writer
    writer(group, key, value)


#: rows per HDF5 chunk of a stored dataset
CHUNK_ROWS = 1024


def create_store(path: str | Path, n_rows: int, columns: Mapping[str, int], *, attrs: Mapping[str, Any] | None = None,
                 chunk_rows: int = 4096) -> RowWriter:
    """Create (replace) the HDF5 file ``path`` with one float32 dataset ``[n_rows, columns[name]]`` per name.

    Returns a :class:`RowWriter` that buffers ``chunk_rows`` rows and writes each completed block once.
    ``attrs`` (JSON-ready) are stored as the file's attributes (e.g. the class names).
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = h5py.File(path, "w")
    datasets = {}
    for name, width in columns.items():
        chunks = (max(1, min(CHUNK_ROWS, n_rows)), max(1, width)) if n_rows and width else None
        datasets[name] = handle.create_dataset(name, shape=(n_rows, width), dtype=np.float32, chunks=chunks)
    for key, value in (attrs or {}).items():
        handle.attrs[key] = json.dumps(value)
    return RowWriter(handle, datasets, n_rows, chunk_rows)


class RowWriter:
    """Buffers rows of a window of ``chunk_rows`` cells and writes each window as one contiguous block.

    Rows must arrive window by window (any order within a window), as
    :func:`~scgpt_protocol.model.embedding.iter_batches` yields them for the same ``chunk_size``.
    """

    def __init__(self, handle: Any, datasets: dict[str, Any], n_rows: int, chunk_rows: int) -> None:
        self.handle, self.datasets, self.n_rows = handle, datasets, n_rows
        self.chunk = max(1, int(chunk_rows))
        self.lo = 0
        self.buffers = {k: np.zeros((min(self.chunk, n_rows), ds.shape[1]), np.float32) for k, ds in datasets.items()}

    def put(self, index: np.ndarray, **values: np.ndarray) -> None:
        """Store ``values[name][i]`` as row ``index[i]`` of each dataset."""
        index = np.asarray(index)
        if index.size == 0:
            return
        while index.min() >= self.lo + self.chunk:
            self._flush()
        if index.min() < self.lo or index.max() >= self.lo + self.chunk:
            msg = (f"rows {index.min()}..{index.max()} fall outside the buffered window {self.lo}.."
                   f"{self.lo + self.chunk - 1}; rows must arrive window by window (the same chunk_size).")
            raise ValueError(msg)
        for name, value in values.items():
            self.buffers[name][index - self.lo] = value

    def _flush(self) -> None:
        hi = min(self.lo + self.chunk, self.n_rows)
        for name, ds in self.datasets.items():
            ds[self.lo : hi] = self.buffers[name][: hi - self.lo]
        self.lo = hi

    def close(self) -> Path:
        """Write the rows still buffered and close the file; returns its path."""
        while self.lo < self.n_rows:
            self._flush()
        path = Path(self.handle.filename)
        self.handle.close()
        return path

    def abort(self) -> None:
        """Close the file without finishing it (after an error)."""
        if self.handle.id.valid:
            self.handle.close()


def open_store(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(datasets, attrs)`` of a store, read-only: h5py datasets (read rows with :func:`take_rows`)."""
    import h5py

    handle = h5py.File(path, "r")
    attrs = {k: json.loads(v) for k, v in handle.attrs.items()}
    return {k: handle[k] for k in handle.keys()}, attrs


def take_rows(array: Any, cells: Any = None, *, block: int = 65536) -> np.ndarray:
    """Rows of an in-memory array or an on-disk (h5py) dataset of per-cell outputs (embeddings, probabilities)
    as a NumPy array, in the order asked (any order, repeats allowed). Expression matrices are read with
    :func:`~scgpt_protocol.data.matrix.iter_row_chunks` instead (sparse, ascending rows).

    ``cells``: a boolean mask, an index array or None (all rows). An on-disk dataset is read in blocks of
    ``block`` rows, so memory holds the selected rows plus one block.
    """
    if isinstance(array, np.ndarray):
        return array if cells is None else array[cells]
    n = array.shape[0]
    if cells is None:
        index = np.arange(n)
    else:
        cells = np.asarray(cells)
        if cells.dtype == bool and cells.shape != (n,):
            msg = f"cells is a boolean mask of shape {cells.shape}; expected ({n},), one value per row."
            raise ValueError(msg)
        index = np.flatnonzero(cells) if cells.dtype == bool else cells.astype(np.int64)
        if index.size and (index.min() < -n or index.max() >= n):
            msg = f"cells holds positions outside 0..{n - 1}; the stored array has {n} rows."
            raise IndexError(msg)
        index = np.where(index < 0, index + n, index)  # as NumPy indexing counts from the end
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    out = np.empty((len(index), *array.shape[1:]), dtype=array.dtype)
    for lo in range(0, n, block):
        a, b = np.searchsorted(sorted_index, [lo, lo + block])
        if a == b:
            continue
        part = array[lo : min(lo + block, n)]
        out[order[a:b]] = part[sorted_index[a:b] - lo]
    return out


def embedding_rows(adata: Any, cells: np.ndarray, *, key: str = "X_scgpt", stored: Any = None,
                   what: str = "adata") -> np.ndarray:
    """float32 rows ``cells`` (a boolean mask) of the cells' embedding: ``adata.obsm[key]``, else ``stored``
    (the embeddings of the same cells in memory or in a store written with ``out=``; only these rows are
    read). The one source of the embeddings a figure samples (:func:`~scgpt_protocol.pl.cells_for_plot`,
    :func:`~scgpt_protocol.pl.joint_embedding`)."""
    from ..core.errors import format_keys

    if key in adata.obsm:
        return np.asarray(np.asarray(adata.obsm[key])[cells], dtype=np.float32)
    if stored is not None and stored.shape[0] == adata.n_obs:
        return np.asarray(take_rows(stored, cells), dtype=np.float32)
    msg = (
        f"the {what} has no obsm[{key!r}] (found {format_keys(adata.obsm.keys())}) and no stored embeddings "
        "of its cells; run zeroshot_annotate, embed or predict on it first."
    )
    raise KeyError(msg)


def subsample(cells: Any, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """A sorted random subset of at most ``max_cells`` of the ``True`` cells of a mask, as a mask.

    ``None`` or a cap at least the number of cells keeps them all (small data are unchanged).
    """
    mask = np.asarray(cells, dtype=bool)
    chosen = np.flatnonzero(mask)
    if max_cells is None or len(chosen) <= max_cells:
        return mask
    keep = np.zeros_like(mask)
    keep[sample_rows(chosen, max_cells, seed)] = True
    return keep
