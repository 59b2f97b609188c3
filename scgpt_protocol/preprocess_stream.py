"""Step 01 with bounded memory: :func:`prepare_file` streams the expression matrix in row chunks.

:func:`scgpt_protocol.preprocess.prepare` works on an AnnData held in memory and copies it along
the way (several times the size of ``X`` at its peak). :func:`prepare_file` gives the same
``prepared.h5ad`` (same ``X``, ``layers["counts"]``, ``obs``, ``var``, ``uns``; see the tests) while
holding at most the input matrix plus one chunk:

* the matrix is either read into memory once (the *in-memory* path) or read from the ``.h5ad`` chunk
  by chunk (the *chunked* path, for data larger than memory); ``obs``, ``var``, ``uns``, ``obsm`` ...
  are always read whole;
* every row operation of :func:`prepare` (float32, duplicates summed, zeros dropped,
  ``filter_cells``, the mitochondrial share, ``normalize_total(1e4)``, ``log1p``) is applied to each
  chunk of rows with the same scanpy / scipy calls, so the values are the same bits;
* per-gene quantities are accumulated over the chunks: the cells per gene of ``filter_genes`` (exact
  integers), and the sums and sums of squares of ``expm1(X)`` per gene (and per batch) for the
  ``flavor="seurat"`` highly-variable genes, whose binning and dispersion normalisation are then
  done as scanpy does them (the means and variances agree with scanpy's to rounding, so the genes
  selected are the same unless two normalised dispersions tie at the cut-off);
* the prepared rows are appended to ``X`` and ``layers["counts"]`` of the output file as they are
  made; ``obs``, ``var`` and ``uns`` are written at the end (anndata's ``write_elem``).

scanpy itself has no chunked path for these steps without dask, which is not a dependency here.

The path is chosen by size (:func:`choose_chunked`): the chunked path when the stored matrix is
larger than a quarter of the memory available now; ``PreprocessParams.chunked`` forces either.

Limits: the chunked path reads rows of a CSR matrix; a CSC matrix on disk is read by rows too, but
each chunk then reads the whole file (convert it to CSR once: ``adata.X = adata.X.tocsr()``), and a
dense matrix on disk is read into memory whole.

Measured (synthetic counts, 20,000 genes, 1,000 expressed per cell, 2 CPU cores): 200k cells
(1.6 GB of CSR) take about 40 s at a peak of 2.3 GB RSS in memory (1.4x the CSR, including 0.45 GB
of imported libraries) and 0.7 GB chunked.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

    from .layout import RunLayout
    from .params import PreprocessParams
    from .preprocess import PreparedData

__all__ = ["prepare_file", "choose_chunked", "open_adata", "stored_matrix_bytes", "available_memory",
           "seurat_hvg"]

logger = logging.getLogger(__name__)

#: an ``uns`` key marking that the file has a ``.raw`` (which :func:`open_adata` does not read)
_RAW_FLAG = "_scgpt_protocol_has_raw"

#: stored values per chunk when ``chunk_size`` is None (about 16 MB of float32 data + int32 indices)
CHUNK_VALUES = 2_000_000


# -- opening the input ----------------------------------------------------------------------
def _matrix_key(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


def open_adata(path: str | Path, *, layer: str | None = None, in_memory: bool = False) -> AnnData:
    """The input ``.h5ad`` with ``obs``, ``var``, ``uns``, ``obsm`` ... in memory and its matrix on disk.

    Parameters
    ----------
    path : str or Path
        The file (checked as :func:`scgpt_protocol.preprocess.read_adata` checks it), or ``"demo"``.
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

    from .preprocess import _check_h5ad_path, _unreadable, read_adata

    if str(path) == "demo":
        return read_adata("demo")
    file = _check_h5ad_path(path)
    try:
        f = h5py.File(file, "r")
        parts = {k: read_elem(f[k]) for k in ("obs", "var", "uns", "obsm", "varm", "obsp", "varp") if k in f}
    except (OSError, KeyError, ValueError, TypeError) as err:  # h5py / anndata errors name no path
        raise _unreadable(file, err) from err

    def matrix(key: str) -> Any:
        elem = f[key]
        if in_memory and key == _matrix_key(layer):
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
    adata.uns.pop(_RAW_FLAG, None)
    if "raw" in f:
        adata.uns[_RAW_FLAG] = True  # .raw is not read; prepare_file reports it as dropped
    logger.info("opened %s (%s): %s cells x %s genes", file, "in memory" if in_memory else "matrix on disk",
                f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return adata


def stored_matrix_bytes(path: str | Path, layer: str | None = None) -> int:
    """Bytes of the stored matrix (``X`` or ``layers[layer]``) once in memory: data + indices + indptr."""
    import h5py

    with h5py.File(path, "r") as f:
        key = _matrix_key(layer)
        if key not in f:
            return 0
        elem = f[key]
        sparse = isinstance(elem, h5py.Group)
        parts = [elem[k] for k in ("data", "indices", "indptr") if k in elem] if sparse else [elem]
        return int(sum(d.size * d.dtype.itemsize for d in parts))


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` on Linux; else total physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_chunked(path: str | Path, layer: str | None = None, chunked: bool | None = None) -> bool:
    """The chunked path when forced, or when the stored matrix is over a quarter of the available memory.

    The in-memory path peaks at about the matrix once plus a chunk; the quarter leaves room for
    the later steps of a session (and for other processes).
    """
    if chunked is not None:
        return bool(chunked)
    if str(path) == "demo":
        return False
    try:
        need, have = stored_matrix_bytes(path, layer), available_memory()
    except OSError:  # not an HDF5 file: open_adata says so clearly
        return False
    choice = need > have // 4
    logger.info("matrix %.2f GB, %.2f GB memory available: %s path", need / 1e9, have / 1e9,
                "chunked" if choice else "in-memory")
    return choice


# -- chunks -----------------------------------------------------------------------------------
def _stored_values(matrix: Any) -> int:
    """Stored values of an in-memory or backed sparse matrix (all values of a dense one)."""
    nnz = getattr(matrix, "nnz", None)
    if nnz is None and hasattr(matrix, "group"):
        nnz = int(matrix.group["data"].shape[0])
    return int(nnz) if nnz is not None else int(matrix.shape[0]) * int(matrix.shape[1])


def _default_chunk_size(matrix: Any) -> int:
    n = matrix.shape[0]
    nnz = _stored_values(matrix)
    per_row = max(1.0, nnz / max(n, 1))
    return int(max(64, min(n, CHUNK_VALUES // per_row)))


def _chunks(matrix: Any, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
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


def _rows(x: sp.csr_matrix, mask: np.ndarray) -> sp.csr_matrix:
    return x if mask.all() else x[np.flatnonzero(mask)]


def _cols(x: sp.csr_matrix, cols: np.ndarray | None) -> sp.csr_matrix:
    return x if cols is None else x[:, cols]


def _normalise_log(x: sp.csr_matrix) -> sp.csr_matrix:
    """``normalize_total(target_sum=1e4)`` + ``log1p`` of these rows, by scanpy (row by row operations)."""
    import anndata
    import scanpy as sc

    a = anndata.AnnData(x.copy())  # normalize_total works in place; x may be the counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    return a.X


# -- highly variable genes ----------------------------------------------------------------------
class _GeneMoments:
    """Per-gene count, sum and sum of squares of ``expm1(X)`` per batch (one batch without batch_key)."""

    def __init__(self, n_genes: int, n_batches: int) -> None:
        self.n = np.zeros(n_batches, dtype=np.int64)
        self.s1 = np.zeros((n_batches, n_genes))
        self.s2 = np.zeros((n_batches, n_genes))
        self.nz = np.zeros((n_batches, n_genes), dtype=np.int64)

    def add(self, x: sp.csr_matrix, batch: np.ndarray) -> None:
        for b in np.unique(batch):
            rows = x[np.flatnonzero(batch == b)] if len(np.unique(batch)) > 1 else x
            v = np.expm1(rows.data).astype(np.float64)
            idx = rows.indices
            self.n[b] += rows.shape[0]
            self.s1[b] += np.bincount(idx, weights=v, minlength=self.s1.shape[1])
            self.s2[b] += np.bincount(idx, weights=v * v, minlength=self.s1.shape[1])
            self.nz[b] += np.bincount(idx[v > 0], minlength=self.s1.shape[1])

    def mean_var(self, b: int, genes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = self.n[b]
        s1, s2 = (self.s1[b], self.s2[b]) if genes is None else (self.s1[b][genes], self.s2[b][genes])
        mean = s1 / n
        var = (s2 / n - mean**2) * (n / (n - 1)) if n > 1 else np.zeros_like(mean)
        return mean, np.maximum(var, 0.0)


def _seurat_one(mean: np.ndarray, var: np.ndarray, names: pd.Index, n_top: int,
                n_bins: int = 20) -> pd.DataFrame:
    """scanpy's ``flavor="seurat"`` dispersions and top-``n_top`` selection from per-gene mean, variance."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()  # one gene in its bin: its normalised dispersion becomes 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - stats["avg"]) / stats["dev"]
    norm = df["dispersions_norm"].to_numpy()
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    n = min(n_top, len(names), finite.size)
    cut = finite[n - 1] if n else np.inf
    df["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cut
    df.index = names
    return df.drop(columns="mean_bin")


def seurat_hvg(moments: _GeneMoments, names: pd.Index, n_top: int, batches: list[str] | None) -> pd.DataFrame:
    """What `sc.pp.highly_variable_genes(flavor="seurat", n_top_genes=n_top, batch_key=...)` puts in var."""
    if batches is None:
        mean, var = moments.mean_var(0)
        return _seurat_one(mean, var, names, n_top)
    dfs = []
    for b in range(len(batches)):
        expressed = moments.nz[b] >= 1  # scanpy drops the genes a batch does not express
        mean, var = moments.mean_var(b, expressed)
        df = _seurat_one(mean, var, names[expressed], n_top)
        if (~expressed).any():
            missing = pd.DataFrame(np.zeros((int((~expressed).sum()), len(df.columns))), columns=df.columns)
            missing["highly_variable"] = missing["highly_variable"].astype(bool)
            missing.index = names[~expressed]
            df = pd.concat([df, missing]).loc[names]
        dfs.append(df)
    df = pd.concat(dfs, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"})
    df["highly_variable_nbatches"] = df["highly_variable"]
    df["highly_variable_intersection"] = df["highly_variable_nbatches"] == len(batches)
    df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last",
                   inplace=True)
    df["highly_variable"] = np.arange(df.shape[0]) < n_top
    return df.loc[names]


# -- writing ------------------------------------------------------------------------------------
class _CSRWriter:
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


# -- the streamed prepare -----------------------------------------------------------------------
def prepare_file(
    params: PreprocessParams,
    vocab: dict[str, int],
    layout: RunLayout,
    *,
    chunked: bool | None = None,
    chunk_size: int | None = None,
) -> PreparedData:
    """Step 01's heavy part from a file: read, filter, normalise, select genes, split, write; bounded memory.

    Parameters
    ----------
    params : PreprocessParams
        As for :func:`~scgpt_protocol.preprocess.prepare`; ``adata_path`` is the input file (or ``"demo"``),
        ``chunked`` and ``chunk_size`` choose the path.
    vocab : dict of str to int
        The checkpoint's vocabulary.
    layout : RunLayout
        The run: writes ``layout.prepared_adata`` (atomically) and ``layout.labels``.
    chunked : bool, optional
        Overrides ``params.chunked``: True reads the matrix chunk by chunk from the file, False reads it
        into memory once, None (both None) decides by size (:func:`choose_chunked`).
    chunk_size : int, optional
        Overrides ``params.chunk_size``: cells per chunk (None: about 2 million stored values).

    Returns
    -------
    PreparedData
        As :func:`~scgpt_protocol.preprocess.prepare` returns, except that ``adata`` holds no ``X``:
        ``obs``, ``var`` and ``uns`` of the prepared data (the matrices are in the file).

    Notes
    -----
    Peak memory: the in-memory path holds the input matrix once plus a chunk; the chunked path holds
    a chunk, ``obs`` and a few numbers per cell and per gene. The written file equals what
    ``write_prepared(prepare(read_adata(path), params, vocab), ...)`` writes (tested), except that the
    highly-variable-gene statistics in ``var`` agree to rounding.

    Raises
    ------
    As :func:`~scgpt_protocol.preprocess.prepare` and :func:`~scgpt_protocol.preprocess.read_adata`.
    """
    from .preprocess import _check_h5ad_path, _write_labels

    if str(params.adata_path) != "demo":
        _check_h5ad_path(params.adata_path)  # a clear error before anything else reads the file
    use_chunked = choose_chunked(params.adata_path, params.layer,
                                 params.chunked if chunked is None else chunked)
    source = open_adata(params.adata_path, layer=params.layer, in_memory=not use_chunked)
    size = chunk_size if chunk_size is not None else params.chunk_size
    prepared = _prepare_source(source, params, vocab, layout, size)
    _write_labels(prepared, layout, params.label_key)
    prepared.files = {"prepared_adata": layout.prepared_adata, "labels": layout.labels}
    return prepared


def _prepare_source(source: AnnData, params: PreprocessParams, vocab: dict[str, int], layout: RunLayout,
                    chunk_size: int | None) -> PreparedData:
    import anndata
    import scanpy as sc

    from .layout import atomic_write
    from .preprocess import (_check_left, _finish, _mito_mask, _no_mito_genes, _normalisation, _pct_mito,
                             _require_obs_key, _vocabulary_genes, _warn, missing_labels)
    from .tokenize import check_expression, gene_symbols, get_matrix, value_kind

    log: list[str] = []

    def record(message: str) -> None:
        log.append(message)
        logger.info("%s", message)

    label_key, batch_key = params.label_key, params.batch_key
    _require_obs_key(source, label_key, "label_key")
    if batch_key is not None:
        _require_obs_key(source, batch_key, "batch_key")
    matrix = get_matrix(source, params.layer)
    check_expression(source, layer=params.layer)
    n_cells_in, n_genes_in = int(source.n_obs), int(source.n_vars)
    size = int(chunk_size) if chunk_size else _default_chunk_size(matrix)

    has_raw = source.raw is not None or bool(source.uns.get(_RAW_FLAG, False))
    uns = {k: v for k, v in source.uns.items() if k != _RAW_FLAG}
    # the metadata goes through the same AnnData operations as in prepare(), without X
    meta = anndata.AnnData(obs=source.obs, var=source.var, uns=uns, obsm=dict(source.obsm),
                           varm=dict(source.varm), obsp=dict(source.obsp), varp=dict(source.varp))

    # labels
    missing = missing_labels(meta.obs[label_key])
    cells = np.flatnonzero(~missing)  # input rows still in, in order
    if missing.any():
        _warn(f"dropped {int(missing.sum()):,} cells without a label in obs[{label_key!r}]: "
              f"{n_cells_in:,} -> {len(cells):,} cells")
        log.append(f"dropped cells without a label: {n_cells_in:,} -> {len(cells):,} cells")
    out = meta[cells].copy()
    where = f"adata.layers[{params.layer!r}]" if params.layer else "adata.X"
    dropped = [f"layers[{k!r}]" for k in source.layers.keys()] + (["raw"] if has_raw else [])
    record(f"expression from {where} as float32 CSR"
           + (f" (dropped {', '.join(dropped)})" if dropped else ""))
    sample = cells if len(cells) <= 2000 else \
        cells[np.sort(np.random.default_rng(0).choice(len(cells), 2000, replace=False))]
    block = sp.csr_matrix(matrix[sample], dtype=np.float32)
    block.sum_duplicates()
    block.eliminate_zeros()
    kind, vmax = value_kind(block, n_rows=block.shape[0])
    del block
    record(f"values look like {kind} (max {vmax:.4g} in a sample of cells)")

    n_genes_all = n_genes_in
    keep = ~missing  # over input rows
    genes = None  # input columns still in (None: all)

    # pass 1: genes per cell (filter_cells), cells per gene (filter_genes), % mitochondrial when possible
    mito_wanted = params.max_pct_mito is not None
    mito_in_pass1 = mito_wanted and params.min_cells == 0
    number_cells = None
    number_genes = None
    pct_all = np.zeros(n_cells_in, dtype=np.float32) if mito_wanted else None
    mito_all = _mito_mask(gene_symbols(meta, params.gene_symbol_key)) if mito_wanted else None
    if params.min_genes > 0 or params.min_cells > 0 or mito_in_pass1:
        for start, x in _chunks(matrix, size):
            rows = keep[start:start + x.shape[0]]
            x = _rows(x, rows)
            idx = start + np.flatnonzero(rows)
            ok = np.ones(x.shape[0], dtype=bool)
            if params.min_genes > 0:
                ok, number = sc.pp.filter_cells(x, min_genes=params.min_genes, inplace=False)
                if number_cells is None:
                    number_cells = np.zeros(n_cells_in, dtype=np.asarray(number).dtype)
                number_cells[idx] = number
            if params.min_cells > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, number = sc.pp.filter_genes(_rows(x, ok), min_cells=1, inplace=False)
                number = np.asarray(number)
                number_genes = number.copy() if number_genes is None else number_genes + number
            if mito_in_pass1 and mito_all.any():
                pct_all[idx] = _pct_mito(x, mito_all, kind)
    if params.min_genes > 0:
        before = len(cells)
        out.obs["n_genes"] = number_cells[cells]
        passed = number_cells[cells] >= params.min_genes
        out = out[passed].copy()
        keep[cells[~passed]] = False
        cells = cells[passed]
        record(f"filter_cells(min_genes={params.min_genes}): {before:,} -> {len(cells):,} cells")
    if params.min_cells > 0:
        before = out.n_vars
        if number_genes is None:
            number_genes = np.zeros(n_genes_all, dtype=np.int64)
        out.var["n_cells"] = number_genes
        passed = number_genes >= params.min_cells
        out = out[:, passed].copy()
        genes = np.flatnonzero(passed)
        record(f"filter_genes(min_cells={params.min_cells}): {before:,} -> {out.n_vars:,} genes")
    if mito_wanted:
        mito = _mito_mask(gene_symbols(out, params.gene_symbol_key))
        if not mito.any():
            _no_mito_genes(params, log)
        else:
            if not mito_in_pass1:  # pass 2: the share over the genes left by filter_genes
                for start, x in _chunks(matrix, size):
                    rows = keep[start:start + x.shape[0]]
                    share = _pct_mito(_cols(_rows(x, rows), genes), mito, kind)
                    pct_all[start + np.flatnonzero(rows)] = share
            pct = pct_all[cells]
            before = len(cells)
            out.obs["pct_mito"] = pct.astype(np.float32)
            passed = pct <= params.max_pct_mito
            out = out[passed].copy()
            keep[cells[~passed]] = False
            cells = cells[passed]
            record(f"max_pct_mito={params.max_pct_mito} ({int(mito.sum())} MT- genes): "
                   f"{before:,} -> {len(cells):,} cells")
    _check_left(out.n_obs, out.n_vars, params)

    # normalisation (done chunk by chunk below)
    is_counts, normalise = _normalisation(params, kind, vmax, record)
    if normalise:
        out.uns["log1p"] = {"base": None}

    # genes of the vocabulary
    out, match = _vocabulary_genes(out, vocab, params, record)
    cols = match.columns
    genes_after_filter = genes
    sel = np.asarray(cols)  # columns of the filtered matrix kept (vocabulary, then HVG)

    def rows_out(x: sp.csr_matrix, start: int) -> tuple[sp.csr_matrix, sp.csr_matrix | None, np.ndarray]:
        """The model rows and counts rows of this chunk's kept cells, and their input row numbers."""
        rows = keep[start:start + x.shape[0]]
        x = _cols(_rows(x, rows), genes_after_filter)
        counts = x if is_counts else None
        y = _normalise_log(x) if normalise else x
        return y[:, sel], (counts[:, sel] if counts is not None else None), start + np.flatnonzero(rows)

    # highly variable genes: pass 3 accumulates expm1(X) moments
    if params.n_hvg is not None:
        if params.n_hvg >= out.n_vars:
            record(f"n_hvg={params.n_hvg} >= {out.n_vars:,} genes: no highly-variable-gene selection")
        else:
            before = out.n_vars
            batches = None
            code = np.zeros(n_cells_in, dtype=np.int64)
            if batch_key is not None:
                out._sanitize()  # as scanpy's highly_variable_genes does (strings to categoricals)
                batch = out.obs[batch_key]
                batches = list(batch.cat.categories)
                code[cells] = batch.cat.codes.to_numpy()
            moments = _GeneMoments(out.n_vars, 1 if batches is None else len(batches))
            for start, x in _chunks(matrix, size):
                y, _, idx = rows_out(x, start)
                moments.add(y, code[idx])
            df = seurat_hvg(moments, out.var_names, params.n_hvg, batches)
            out.uns["hvg"] = {"flavor": "seurat"}
            out.var["highly_variable"] = df["highly_variable"].to_numpy()
            out.var["means"] = df["means"].to_numpy()
            out.var["dispersions"] = df["dispersions"].to_numpy()
            out.var["dispersions_norm"] = df["dispersions_norm"].to_numpy().astype(np.float32)
            if batches is not None:
                out.var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
                out.var["highly_variable_intersection"] = df["highly_variable_intersection"].to_numpy()
            hv = out.var["highly_variable"].to_numpy()
            out = out[:, hv].copy()
            sel = sel[hv]
            per = f", per batch of obs[{batch_key!r}]" if batch_key else ""
            record(f"highly variable genes (seurat{per}): {before:,} -> {out.n_vars:,} genes")

    # pass 4: write the rows, dropping cells with no expressed gene left
    n_genes_out = out.n_vars
    nonempty = np.zeros(n_cells_in, dtype=bool)

    def write_matrices(tmp: Path) -> None:
        import h5py
        from anndata.io import write_elem

        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            max_nnz = _stored_values(matrix)
            xw = _CSRWriter(f, "X", n_genes_out, max_nnz)
            layers = f.create_group("layers")
            layers.attrs["encoding-type"] = "dict"
            layers.attrs["encoding-version"] = "0.1.0"
            cw = _CSRWriter(layers, "counts", n_genes_out, max_nnz) if is_counts else None
            for start, x in _chunks(matrix, size):
                y, counts, idx = rows_out(x, start)
                full = np.diff(y.indptr) > 0
                nonempty[idx[full]] = True
                xw.append(_rows(y, full))
                if cw is not None:
                    cw.append(_rows(counts, full))
            final = finish(full_mask=nonempty)
            a = final.adata
            for key, value in (("obs", a.obs), ("var", a.var), ("uns", dict(a.uns)), ("obsm", dict(a.obsm)),
                               ("varm", dict(a.varm)), ("obsp", dict(a.obsp)), ("varp", dict(a.varp))):
                write_elem(f, key, value)
            result.append(final)

    result: list[PreparedData] = []

    def finish(full_mask: np.ndarray) -> PreparedData:
        nonlocal out
        empty = ~full_mask[cells]
        if empty.any():
            before = out.n_obs
            out = out[~empty].copy()
            _warn(f"dropped {int(empty.sum()):,} cells with no expressed gene among the {out.n_vars:,} "
                  f"selected genes: {before:,} -> {out.n_obs:,} cells", stacklevel=4)
            log.append(f"dropped cells with no expressed selected gene: {before:,} -> {out.n_obs:,} cells")
        return _finish(out, source, params, log, record,
                       input_record={"n_cells": n_cells_in, "n_genes": n_genes_in, "matrix": where,
                                     "value_kind": kind, "value_max": vmax},
                       normalise=normalise, is_counts=is_counts, match_fraction=match.fraction)

    path = atomic_write(layout.prepared_adata, write_matrices)
    logger.info("wrote %s (%s cells x %s genes)", path, f"{result[0].adata.n_obs:,}", f"{n_genes_out:,}")
    return result[0]
