"""TODO docstring: data.store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:

    pass
import json
from typing import Mapping

__all__ = ["RowWriter", "create_store", "open_store", "take_rows", "subsample"]


# -- writing ------------------------------------------------------------------------------------
class CSRWriter:
    """An appendable CSR matrix in an h5ad group (anndata's encoding).

    ``indptr`` is int32 when ``max_nnz`` fits (as scipy, and so ``write_h5ad``, would store it), else int64.
    """

    def __init__(self, parent: Any, name: str, n_genes: int, max_nnz: int) -> None:
        g = parent.create_group(name)
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([0, n_genes], dtype=np.int64)
        self.group, self.n_genes, self.n_rows, self.nnz = g, n_genes, 0, 0
        g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        self.indptr_dtype = np.int32 if max_nnz < np.iinfo(np.int32).max else np.int64
        g.create_dataset("indptr", shape=(1,), maxshape=(None,), dtype=self.indptr_dtype, chunks=(1 << 16,),
                         data=[0])

    def append(self, x: sp.csr_matrix) -> None:
        n, k = x.shape[0], x.nnz
        if n == 0:
            return
        g = self.group
        g["data"].resize((self.nnz + k,))
        g["data"][self.nnz:] = x.data.astype(np.float32, copy=False)
        g["indices"].resize((self.nnz + k,))
        g["indices"][self.nnz:] = x.indices.astype(np.int32, copy=False)
        g["indptr"].resize((self.n_rows + n + 1,))
        g["indptr"][self.n_rows + 1:] = (x.indptr[1:].astype(np.int64) + self.nnz).astype(self.indptr_dtype)
        self.n_rows += n
        self.nnz += k
        g.attrs["shape"] = np.array([self.n_rows, self.n_genes], dtype=np.int64)

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
    :func:`~scgpt_protocol.embedding.iter_batches` yields them for the same ``chunk_size``.
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
    """Rows of an in-memory array or an on-disk (h5py) dataset as a NumPy array.

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
        index = np.flatnonzero(cells) if cells.dtype == bool else cells.astype(np.int64)
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


def subsample(cells: Any, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """A sorted random subset of at most ``max_cells`` of the ``True`` cells of a mask, as a mask.

    ``None`` or a cap at least the number of cells keeps them all (small data are unchanged).
    """
    mask = np.asarray(cells, dtype=bool)
    chosen = np.flatnonzero(mask)
    if max_cells is None or len(chosen) <= max_cells:
        return mask
    keep = np.zeros_like(mask)
    keep[np.sort(np.random.default_rng(seed).choice(chosen, int(max_cells), replace=False))] = True
    return keep
