"""A lean read-only view of an ``.h5ad`` file for predicting or embedding every cell of an atlas.

``anndata.read_h5ad(path, backed="r")`` leaves ``X`` on disk but reads all of ``obs`` into memory: at a
million cells its index of cell names alone is a few hundred MB of Python strings, which grows with the
number of cells. :func:`open_cells` opens the file without reading ``obs``: ``X`` stays on disk (read by
row blocks), ``var`` is read (small), cell names are read from the file one slice at a time and ``obs``
columns one at a time (:meth:`BackedCells.obs_column`). :func:`~scgpt_protocol.annotate.inference.predict` and
:func:`~scgpt_protocol.model.embedding.embed` (with ``out=``) accept it in place of an AnnData, so that the memory
of "predict / embed every cell" stays flat in the number of cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BackedCells", "open_cells",]


class _LazyNames:
    """Cell names read from the file only for the rows asked for (``names[start:stop]``, ``names[i]``)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return int(self.dataset.shape[0])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return self[int(key) : int(key) + 1][0]
        if not isinstance(key, slice):
            index = np.asarray(key)
            index = np.flatnonzero(index) if index.dtype == bool else index
            unique, inverse = np.unique(index, return_inverse=True)
            names = np.asarray(self.dataset.asstr()[unique] if len(unique) else [], dtype=object)
            return pd.Index(names[inverse], dtype=object)
        return pd.Index(self.dataset.asstr()[key], dtype=object)


class BackedCells:
    """Cells x genes of an ``.h5ad`` file opened read-only, with ``obs`` left on disk.

    Has what prediction and embedding use of an AnnData: ``X`` (a backed sparse dataset or h5py dataset),
    ``var`` / ``var_names``, ``obs_names`` (read by slices), ``n_obs`` / ``n_vars`` / ``shape``, an empty
    ``layers`` and an in-memory ``uns``. :meth:`obs_column` reads one ``obs`` column;
    :meth:`to_anndata` gives the ordinary backed AnnData of the same file.
    """

    is_view = False
    isbacked = True

    def __init__(self, path: str | Path) -> None:
        import h5py
        from anndata.io import read_elem

        from .matrix import disk_matrix

        self.filename = Path(path)
        self.file = h5py.File(self.filename, "r")
        self.X = disk_matrix(self.file["X"])
        self.var = read_elem(self.file["var"])
        obs = self.file["obs"]
        self._obs = obs
        self.obs_names = _LazyNames(obs[obs.attrs["_index"]])
        self.layers: dict[str, Any] = {}
        self.uns: dict[str, Any] = {}

    @property
    def n_obs(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.X.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def obs_keys(self) -> list[str]:
        return [k for k in self._obs.keys() if k != self._obs.attrs["_index"]]

    def obs_column(self, key: str) -> pd.Series:
        """One ``obs`` column, read from the file (a clear error for an unknown one)."""
        from anndata.io import read_elem

        from ..core.errors import format_keys

        if key not in self.obs_keys:
            raise KeyError(f"{key!r} is not an obs column of {self.filename}; columns: {format_keys(self.obs_keys)}.")
        return pd.Series(read_elem(self._obs[key]), name=key)

    def to_anndata(self) -> Any:
        """The ordinary ``read_h5ad(path, backed="r")`` AnnData (reads ``obs`` into memory)."""
        import anndata

        return anndata.read_h5ad(self.filename, backed="r")

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"BackedCells({self.n_obs:,} cells x {self.n_vars:,} genes, {self.filename}, obs on disk)"


def open_cells(path: str | Path) -> BackedCells:
    """Open an ``.h5ad`` file for chunked prediction / embedding without reading ``obs`` (:class:`BackedCells`).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .h5ad file at {path}; expected the prepared data of step 01 (prepared.h5ad).")
    return BackedCells(path)


