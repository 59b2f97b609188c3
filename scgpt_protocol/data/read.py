"""Opening ``.h5ad`` files, each reader named for what it returns.

* :func:`read_adata` -- an AnnData wholly in memory (or the demo data for ``"demo"``);
* :func:`read_with_symbols` -- the same, its ``var_names`` the gene symbols of a ``var`` column;
* :func:`open_lazy` -- an AnnData with annotations in memory and its matrices left on disk (step 01's
  streamed path);
* :func:`open_backed` -- anndata's backed mode, read-only, with only ``obs``, ``var`` and ``uns`` in memory
  (:func:`opened_backed`: the same for a block, closed after it);
* :func:`~scgpt_protocol.data.backed.open_cells` -- not an AnnData: cells whose ``X`` and ``obs`` stay on
  disk (step 02 at atlas scale).

Step-level readers of a run's files (``read_prepared``, ``open_prepared_cells``) are in
:mod:`scgpt_protocol.pp.io`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd

from ..core.errors import InputDataError, format_keys

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["opened_backed", "read_adata", "read_with_symbols", "open_backed", "open_lazy"]


# -- reading --------------------------------------------------------------------------------
def read_adata(path: str) -> AnnData:
    """Read the input data.

    Parameters
    ----------
    path : str
        An ``.h5ad`` file, or ``"demo"`` for scanpy's bundled ``pbmc68k_reduced``
        (:func:`scgpt_protocol.data.demo.load_demo`).

    Returns
    -------
    AnnData
        The data, read fully into memory.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message gives the current working directory, against
        which a relative path is resolved).
    ValueError
        The file name does not end in ``.h5ad``.
    InputDataError
        The file cannot be read as an ``.h5ad`` file (truncated, another format).
    """
    if str(path) == "demo":
        from .demo import load_demo

        adata = load_demo()
        logger.info("read the demo data (scanpy's pbmc68k_reduced): %s cells x %s genes",
                    f"{adata.n_obs:,}", f"{adata.n_vars:,}")
        return adata
    file = check_h5ad_path(path)
    import anndata

    try:
        adata = anndata.read_h5ad(file)
    except (OSError, KeyError, ValueError, TypeError) as err:  # h5py / anndata errors name no path
        raise _unreadable(file, err) from err
    logger.info("read %s: %s cells x %s genes", file, f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return adata


def _unreadable(file: Path, err: Exception) -> InputDataError:
    """The error for an ``.h5ad`` file that h5py / anndata cannot read."""
    return InputDataError(
        f"adata_path {str(file)!r} could not be read as an .h5ad file ({type(err).__name__}: {err}). It is "
        f"{file.stat().st_size:,} bytes: a truncated copy or download, or another format with an .h5ad "
        "name. Copy or write it again (adata.write_h5ad) and check that it opens with anndata.read_h5ad."
    )


def check_h5ad_path(path: str | Path) -> Path:
    """``path`` as a Path: an existing ``.h5ad`` file, or a clear error (see :func:`read_adata`)."""
    file = Path(path).expanduser()
    if file.suffix.lower() != ".h5ad":
        msg = (
            f"adata_path {str(path)!r} is not an .h5ad file (suffix {file.suffix or 'none'!r}). "
            "Convert the data to AnnData first (e.g. sc.read_10x_mtx, sc.read_10x_h5, sc.read_csv, "
            "sc.read_loom), then adata.write_h5ad('data.h5ad') and set adata_path to that file; "
            "or use 'demo'."
        )
        raise ValueError(msg)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        msg = (
            f"adata_path {str(path)!r} {what} (resolved to {file.absolute()}; the current working "
            f"directory is {Path.cwd()}). Give the path of an .h5ad file, absolute or relative to that "
            "directory, or 'demo'."
        )
        raise FileNotFoundError(msg)
    return file


def open_backed(path: str | Path) -> AnnData:
    """An ``.h5ad`` file as a read-only backed AnnData with only ``obs``, ``var`` and ``uns`` in memory.

    ``anndata.read_h5ad(path, backed="r")`` leaves ``X`` on disk but reads every layer, ``obsm`` and
    ``obsp`` into memory: for a prepared file, ``layers["counts"]`` is as large as ``X`` (measured at
    200,000 cells x 20,000 genes: 1.86 GiB peak just to open it, against 0.13 GiB here). The AnnData
    returned reads rows of ``X`` from the file on demand; its layers, ``obsm`` and ``obsp`` are not loaded
    (read them with ``anndata.io.read_elem`` if needed). Close it with ``adata.file.close()``.
    """
    import anndata
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    with h5py.File(path, "r") as f:
        parts = {key: read_elem(f[key]) for key in ("var", "uns") if key in f}
        parts["obs"] = _read_obs(f["obs"])
    return anndata.AnnData(**parts, filename=path, filemode="r")



@contextmanager
def opened_backed(source: AnnData | str | Path) -> Iterator[AnnData]:
    """``source`` as an AnnData: an AnnData as it is, or a path opened with :func:`open_backed` (X on disk)
    and closed when the block ends."""
    if not isinstance(source, (str, Path)):
        yield source
        return
    if not Path(source).is_file():
        msg = f"{source} does not exist; expected an .h5ad file (the run's prepared data)."
        raise FileNotFoundError(msg)
    adata = open_backed(source)
    try:
        yield adata
    finally:
        adata.file.close()


def _read_obs(group: Any, step: int = 65536) -> pd.DataFrame:
    """``obs`` of an open ``.h5ad``, its index (cell names) decoded a slice at a time: read whole, the names
    pass through a second full copy (bytes, then str) that doubles their peak memory."""
    from anndata.io import read_elem

    index_key = group.attrs["_index"]
    names = group[index_key]
    if names.dtype.kind != "O":  # not variable-length strings: anndata's own reader
        return read_elem(group)
    index = np.empty(names.shape[0], dtype=object)
    for start in range(0, len(index), step):
        index[start : start + step] = names.asstr()[start : start + step]
    columns = [str(c) for c in group.attrs.get("column-order", [])]
    obs = pd.DataFrame({c: read_elem(group[c]) for c in columns}, index=pd.Index(index, name=None))
    return obs if index_key == "_index" else obs.rename_axis(index_key)

#: an ``uns`` key marking that the file has a ``.raw`` (which :func:`open_lazy` does not read)
RAW_FLAG = "_scgpt_protocol_has_raw"


# -- opening the input ----------------------------------------------------------------------
def matrix_key(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


def open_lazy(path: str | Path, *, layer: str | None = None, in_memory: bool = False) -> AnnData:
    """The input ``.h5ad`` with ``obs``, ``var``, ``uns``, ``obsm`` ... in memory and its matrix on disk.

    Parameters
    ----------
    path : str or Path
        The file (checked as :func:`scgpt_protocol.data.read.read_adata` checks it), or ``"demo"``.
    layer : str, optional
        With ``in_memory``: the one matrix read into memory (None: ``X``); the others stay out.
    in_memory : bool
        Read the matrix ``layer`` into memory (the other layers and ``.raw`` are not read).

    Returns
    -------
    AnnData
        ``X`` and each sparse layer are anndata's backed sparse datasets (rows read on indexing) unless
        read into memory; a dense matrix on disk is read into memory. ``.raw`` is not read. The file
        stays open as long as the AnnData is referenced.
    """
    import anndata
    import h5py
    from anndata.io import read_elem, sparse_dataset

    if str(path) == "demo":
        return read_adata("demo")
    file = check_h5ad_path(path)
    try:
        f = h5py.File(file, "r")
        parts = {k: read_elem(f[k]) for k in ("obs", "var", "uns", "obsm", "varm", "obsp", "varp") if k in f}
    except (OSError, KeyError, ValueError, TypeError) as err:  # h5py / anndata errors name no path
        raise _unreadable(file, err) from err

    def matrix(key: str) -> Any:
        elem = f[key]
        if in_memory and key == matrix_key(layer):
            return read_elem(elem)
        if isinstance(elem, h5py.Group) and elem.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            return sparse_dataset(elem)
        return read_elem(elem)  # dense on disk: read whole

    x = matrix("X") if "X" in f else None
    layers = {}
    if "layers" in f:
        for k in f["layers"]:
            layers[k] = matrix(f"layers/{k}")
    adata = anndata.AnnData(X=x, layers=layers or None, **parts)
    adata.uns.pop(RAW_FLAG, None)
    if "raw" in f:
        adata.uns[RAW_FLAG] = True  # .raw is not read; prepare_file reports it as dropped
    logger.info("opened %s (%s): %s cells x %s genes", file, "in memory" if in_memory else "matrix on disk",
                f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return adata


def read_with_symbols(path: str, gene_symbol_key: str | None, *, what: str, name: str) -> AnnData:
    """An external .h5ad read into memory, its ``var_names`` set to the gene symbols of
    ``var[gene_symbol_key]`` (the old names kept in ``var["original_var_name"]``) when a key is given."""
    adata = read_adata(path)
    if gene_symbol_key is None:
        return adata
    if gene_symbol_key not in adata.var.columns:
        msg = (f"{name}={gene_symbol_key!r} is not a column of the var of {what} ({path}); columns: "
               f"{format_keys(adata.var.columns)}. Set {name} to the column with gene symbols (or None when "
               "var_names are symbols).")
        raise InputDataError(msg)
    symbols = adata.var[gene_symbol_key].astype(object)
    original = np.asarray(adata.var_names, dtype=str)
    text = symbols.where(symbols.notna(), "").astype(str).str.strip().to_numpy()
    adata.var["original_var_name"] = original
    adata.var_names = pd.Index(np.where(text != "", text, original), dtype=str)  # no symbol: keep the id
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata
