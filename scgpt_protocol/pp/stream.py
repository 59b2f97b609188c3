"""Step 01 with bounded memory: :func:`prepare_file` streams the expression matrix in row chunks.

:func:`scgpt_protocol.pp.in_memory.prepare` works on an AnnData held in memory and copies it along
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ..data.matrix import iter_row_chunks, log1p_cp10k, sample_rows, select_cols, select_rows
from ..data.read import RAW_FLAG, matrix_key, open_lazy
from ..data.store import CSRWriter, begin_h5ad
from .hvg import GeneMoments, seurat_hvg

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
    from ..core.params import PreprocessParams
    from .in_memory import PreparedData

logger = logging.getLogger(__name__)

__all__ = ["prepare_file", "choose_chunked", "stored_matrix_bytes", "available_memory"]

#: stored values per chunk when ``chunk_size`` is None (about 16 MB of float32 data + int32 indices)
CHUNK_VALUES = 2_000_000


def stored_matrix_bytes(path: str | Path, layer: str | None = None) -> int:
    """Bytes of the stored matrix (``X`` or ``layers[layer]``) once in memory: data + indices + indptr."""
    import h5py

    with h5py.File(path, "r") as f:
        key = matrix_key(layer)
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
    except OSError:  # not an HDF5 file: open_lazy says so clearly
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
        As for :func:`~scgpt_protocol.pp.in_memory.prepare`; ``adata_path`` is the input file (or ``"demo"``),
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
        As :func:`~scgpt_protocol.pp.in_memory.prepare` returns, except that ``adata`` holds no ``X``:
        ``obs``, ``var`` and ``uns`` of the prepared data (the matrices are in the file).

    Notes
    -----
    Peak memory: the in-memory path holds the input matrix once plus a chunk; the chunked path holds
    a chunk, ``obs`` and a few numbers per cell and per gene. The written file equals what
    ``write_prepared(prepare(read_adata(path), params, vocab), ...)`` writes (tested), except that the
    highly-variable-gene statistics in ``var`` agree to rounding.

    Raises
    ------
    As :func:`~scgpt_protocol.pp.in_memory.prepare` and :func:`~scgpt_protocol.data.read.read_adata`.
    """
    from ..data.label_map import read_label_map
    from ..data.read import check_h5ad_path
    from .io import write_labels

    if str(params.adata_path) != "demo":
        check_h5ad_path(params.adata_path)  # a clear error before anything else reads the file
    read_label_map(params.label_map)  # a bad map (missing file or column) fails before the data are read
    use_chunked = choose_chunked(params.adata_path, params.layer,
                                 params.chunked if chunked is None else chunked)
    source = open_lazy(params.adata_path, layer=params.layer, in_memory=not use_chunked)
    size = chunk_size if chunk_size is not None else params.chunk_size
    prepared = _prepare_source(source, params, vocab, layout, size)
    write_labels(prepared, layout, params.label_key)
    prepared.files = {"prepared_adata": layout.prepared_adata, "labels": layout.labels}
    return prepared


@dataclass
class _Stream:
    """The streamed prepare's state: the input matrix, the rows and columns still in, and the kept metadata."""

    matrix: Any
    size: int  # cells per chunk
    out: AnnData  # obs / var / uns ... of the cells and genes still in (no X)
    keep: np.ndarray  # over input rows: still in
    cells: np.ndarray  # input rows still in, in order
    kind: str
    vmax: float
    genes: np.ndarray | None = None  # input columns left by filter_genes (None: all)
    sel: np.ndarray | None = None  # columns of the filtered matrix kept (vocabulary, then HVG)
    is_counts: bool = False
    normalise: bool = False
    label_map: Any = None  # the LabelMapResult applied to the labels (None: no map)

    def drop_cells(self, passed: np.ndarray) -> None:
        """Keep the cells of ``out`` where ``passed`` (a mask over ``cells``)."""
        self.out = self.out[passed].copy()
        self.keep[self.cells[~passed]] = False
        self.cells = self.cells[passed]

    def rows_out(self, x: sp.csr_matrix, start: int) -> tuple[sp.csr_matrix, sp.csr_matrix | None, np.ndarray]:
        """The model rows and counts rows of this chunk's kept cells, and their input row numbers."""
        rows = self.keep[start:start + x.shape[0]]
        x = select_cols(select_rows(x, rows), self.genes)
        counts = x if self.is_counts else None
        y = log1p_cp10k(x, copy=True) if self.normalise else x  # x may be the counts
        sel = self.sel
        return y[:, sel], (counts[:, sel] if counts is not None else None), start + np.flatnonzero(rows)


def _labelled_stream(source: AnnData, matrix: Any, size: int, params: PreprocessParams, where: str,
                     log: list[str], note: Any) -> _Stream:
    """The metadata of the labelled cells (without X) and the kind of values, from a sample of them."""
    import anndata

    from ..data.labels import missing_labels
    from ..data.matrix import dense_block, value_kind
    from .stages import map_training_labels, report_unlabelled

    label_key, n_cells_in = params.label_key, int(source.n_obs)
    has_raw = source.raw is not None or bool(source.uns.get(RAW_FLAG, False))
    uns = {k: v for k, v in source.uns.items() if k != RAW_FLAG}
    # the metadata goes through the same AnnData operations as in prepare(), without X
    obs, mapped = map_training_labels(source.obs, params)
    meta = anndata.AnnData(obs=obs, var=source.var, uns=uns, obsm=dict(source.obsm),
                           varm=dict(source.varm), obsp=dict(source.obsp), varp=dict(source.varp))
    missing = missing_labels(meta.obs[label_key])
    cells = np.flatnonzero(~missing)  # input rows still in, in order
    report_unlabelled(label_key, n_cells_in, len(cells), mapped, log, stacklevel=4)  # points at prepare_file's call
    out = meta[cells].copy()
    dropped = [f"layers[{k!r}]" for k in source.layers.keys()] + (["raw"] if has_raw else [])
    note(f"expression read from {where} (kept sparse, 32-bit)"
         + (f" (dropped {', '.join(dropped)})" if dropped else ""))
    sample = sample_rows(cells, 2000)
    block = matrix[sample]
    block = sp.csr_matrix(block if sp.issparse(block) else dense_block(block), dtype=np.float32)
    block.sum_duplicates()
    block.eliminate_zeros()
    kind, vmax = value_kind(block, n_rows=block.shape[0])
    del block
    note(f"values look like {kind} (max {vmax:.4g} in a sample of cells)")
    return _Stream(matrix=matrix, size=size, out=out, keep=~missing, cells=cells, kind=kind, vmax=vmax,
                   label_map=mapped)


def _count_pass(s: _Stream, params: PreprocessParams, mito_all: np.ndarray | None,
                pct_all: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Pass 1: genes per cell (filter_cells), cells per gene (filter_genes), and, when no gene is filtered,
    the % mitochondrial into ``pct_all``. Returns ``(genes per input cell, cells per input gene)`` (None: not
    counted)."""
    import scanpy as sc

    from .stages import percent_mito

    mito_in_pass1 = params.max_pct_mito is not None and params.min_cells == 0
    number_cells = None
    number_genes = None
    if not (params.min_genes > 0 or params.min_cells > 0 or mito_in_pass1):
        return number_cells, number_genes
    n_cells_in = s.keep.shape[0]
    for start, x in iter_row_chunks(s.matrix, s.size, dtype=np.float32, canonical=True):
        rows = s.keep[start:start + x.shape[0]]
        x = select_rows(x, rows)
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
                _, number = sc.pp.filter_genes(select_rows(x, ok), min_cells=1, inplace=False)
            number = np.asarray(number)
            number_genes = number.copy() if number_genes is None else number_genes + number
        if mito_in_pass1 and mito_all.any():
            pct_all[idx] = percent_mito(x, mito_all, s.kind)
    return number_cells, number_genes


def _filter_cells_genes(s: _Stream, params: PreprocessParams, number_cells: np.ndarray | None,
                        number_genes: np.ndarray | None, n_genes_all: int, note: Any) -> None:
    """``filter_cells(min_genes)`` and ``filter_genes(min_cells)`` from the counts of pass 1."""
    if params.min_genes > 0:
        before = len(s.cells)
        s.out.obs["n_genes"] = number_cells[s.cells]
        s.drop_cells(number_cells[s.cells] >= params.min_genes)
        note(f"filter_cells(min_genes={params.min_genes}): {before:,} -> {len(s.cells):,} cells")
    if params.min_cells > 0:
        before = s.out.n_vars
        if number_genes is None:
            number_genes = np.zeros(n_genes_all, dtype=np.int64)
        s.out.var["n_cells"] = number_genes
        passed = number_genes >= params.min_cells
        s.out = s.out[:, passed].copy()
        s.genes = np.flatnonzero(passed)
        note(f"filter_genes(min_cells={params.min_cells}): {before:,} -> {s.out.n_vars:,} genes")


def _filter_mito(s: _Stream, params: PreprocessParams, mito: np.ndarray, pct_all: np.ndarray,
                 note: Any) -> None:
    """The mitochondrial filter; pass 2 (the share over the genes left by filter_genes) unless pass 1 did it."""
    from .stages import percent_mito

    if params.min_cells != 0:  # pass 1 did not count it
        for start, x in iter_row_chunks(s.matrix, s.size, dtype=np.float32, canonical=True):
            rows = s.keep[start:start + x.shape[0]]
            share = percent_mito(select_cols(select_rows(x, rows), s.genes), mito, s.kind)
            pct_all[start + np.flatnonzero(rows)] = share
    pct = pct_all[s.cells]
    before = len(s.cells)
    s.out.obs["pct_mito"] = pct.astype(np.float32)
    s.drop_cells(pct <= params.max_pct_mito)
    note(f"max_pct_mito={params.max_pct_mito} ({int(mito.sum())} MT- genes): "
           f"{before:,} -> {len(s.cells):,} cells")


def _select_hvg(s: _Stream, params: PreprocessParams, note: Any) -> None:
    """Highly variable genes (seurat flavour): pass 3 accumulates the moments of expm1(X) per gene (and batch)."""
    if params.n_hvg >= s.out.n_vars:
        note(f"n_hvg={params.n_hvg} >= {s.out.n_vars:,} genes: no highly-variable-gene selection")
        return
    batch_key, out = params.batch_key, s.out
    before = out.n_vars
    batches = None
    code = np.zeros(s.keep.shape[0], dtype=np.int64)
    if batch_key is not None:
        out.strings_to_categoricals()  # as scanpy's highly_variable_genes does
        batch = out.obs[batch_key]
        batches = list(batch.cat.categories)
        code[s.cells] = batch.cat.codes.to_numpy()
    moments = GeneMoments(out.n_vars, 1 if batches is None else len(batches))
    for start, x in iter_row_chunks(s.matrix, s.size, dtype=np.float32, canonical=True):
        y, _, idx = s.rows_out(x, start)
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
    s.out = out[:, hv].copy()
    s.sel = s.sel[hv]
    per = f", per batch of obs[{batch_key!r}]" if batch_key else ""
    note(f"highly variable genes (seurat{per}): {before:,} -> {s.out.n_vars:,} genes")


class _PreparedWriter:
    """Pass 4, the ``write`` given to :func:`atomic_write`: appends the rows of the cells with an expressed
    gene left to ``X`` (and ``layers["counts"]``), then writes obs, var, uns ...; the result is ``prepared``."""

    def __init__(self, s: _Stream, finish: Any, target: Path) -> None:
        self.s, self.finish, self.target = s, finish, target  # finish(full_mask) -> PreparedData
        self.prepared: PreparedData | None = None

    def write(self, tmp: Path) -> None:
        import h5py
        from anndata.io import write_elem

        from ..core.io import SpaceGuard

        s = self.s
        guard = SpaceGuard(self.target, tmp, what="the prepared data")
        rows_seen = nnz_seen = 0
        n_genes_out = s.out.n_vars
        nonempty = np.zeros(s.keep.shape[0], dtype=bool)
        with h5py.File(tmp, "w") as f:
            begin_h5ad(f)
            max_nnz = _stored_values(s.matrix)
            xw = CSRWriter(f, "X", n_genes_out, max_nnz)
            layers = f.create_group("layers")
            layers.attrs["encoding-type"] = "dict"
            layers.attrs["encoding-version"] = "0.1.0"
            cw = CSRWriter(layers, "counts", n_genes_out, max_nnz) if s.is_counts else None
            for start, x in iter_row_chunks(s.matrix, s.size, dtype=np.float32, canonical=True):
                y, counts, idx = s.rows_out(x, start)
                full = np.diff(y.indptr) > 0
                nonempty[idx[full]] = True
                rows_seen, nnz_seen = rows_seen + len(idx), nnz_seen + y.nnz
                if rows_seen:  # the file's projected size must fit before this block is written
                    nnz = nnz_seen * len(s.cells) // rows_seen
                    guard.check(sum(w.disk_bytes(nnz, len(s.cells)) for w in (xw, cw) if w is not None))
                xw.append(select_rows(y, full))
                if cw is not None:
                    cw.append(select_rows(counts, full))
            final = self.finish(nonempty)
            a = final.adata
            for key, value in (("obs", a.obs), ("var", a.var), ("uns", dict(a.uns)), ("obsm", dict(a.obsm)),
                               ("varm", dict(a.varm)), ("obsp", dict(a.obsp)), ("varp", dict(a.varp))):
                write_elem(f, key, value)
            self.prepared = final


def _prepare_source(source: AnnData, params: PreprocessParams, vocab: dict[str, int], layout: RunLayout,
                    chunk_size: int | None) -> PreparedData:
    from ..core.io import atomic_write
    from ..data.labels import require_obs_key
    from ..data.matrix import check_expression, get_matrix
    from ..model.vocab import gene_symbols
    from .in_memory import finish_prepared
    from .stages import (
        check_cells_left,
        choose_normalisation,
        mito_mask,
        vocabulary_genes,
        warn_no_mito_genes,
        warn_user,
    )

    log: list[str] = []

    def note(message: str) -> None:
        log.append(message)
        logger.info("%s", message)

    require_obs_key(source, params.label_key, "label_key")
    if params.batch_key is not None:
        require_obs_key(source, params.batch_key, "batch_key")
    matrix = get_matrix(source, params.layer)
    check_expression(source, layer=params.layer)
    n_cells_in, n_genes_in = int(source.n_obs), int(source.n_vars)
    size = int(chunk_size) if chunk_size else _default_chunk_size(matrix)
    where = f"adata.layers[{params.layer!r}]" if params.layer else "adata.X"
    s = _labelled_stream(source, matrix, size, params, where, log, note)

    # pass 1 (and 2): filter_cells, filter_genes, % mitochondrial
    mito_wanted = params.max_pct_mito is not None
    pct_all = np.zeros(n_cells_in, dtype=np.float32) if mito_wanted else None
    mito_all = mito_mask(gene_symbols(s.out, params.gene_symbol_key)) if mito_wanted else None
    number_cells, number_genes = _count_pass(s, params, mito_all, pct_all)
    _filter_cells_genes(s, params, number_cells, number_genes, n_genes_in, note)
    if mito_wanted:
        mito = mito_mask(gene_symbols(s.out, params.gene_symbol_key))
        if not mito.any():
            warn_no_mito_genes(params, log)
        else:
            _filter_mito(s, params, mito, pct_all, note)
    check_cells_left(s.out.n_obs, s.out.n_vars, params)

    # normalisation (done chunk by chunk), genes of the vocabulary, highly variable genes (pass 3)
    s.is_counts, s.normalise = choose_normalisation(params, s.kind, s.vmax, note)
    if s.normalise:
        s.out.uns["log1p"] = {"base": None}
    s.out, match = vocabulary_genes(s.out, vocab, params, note)
    s.sel = np.asarray(match.columns)
    if params.n_hvg is not None:
        _select_hvg(s, params, note)
    n_genes_out = s.out.n_vars

    def finish(full_mask: np.ndarray) -> PreparedData:
        """Drops the cells with no expressed gene left, then classes, split and record (preprocess._finish)."""
        out = s.out
        empty = ~full_mask[s.cells]
        if empty.any():
            before = out.n_obs
            out = out[~empty].copy()
            warn_user(f"dropped {int(empty.sum()):,} cells with no expressed gene among the {out.n_vars:,} "
                  f"selected genes: {before:,} -> {out.n_obs:,} cells", stacklevel=4)
            log.append(f"dropped cells with no expressed selected gene: {before:,} -> {out.n_obs:,} cells")
        return finish_prepared(out, source, params, log, note,
                       input_record={"n_cells": n_cells_in, "n_genes": n_genes_in, "matrix": where,
                                     "value_kind": s.kind, "value_max": s.vmax},
                       normalise=s.normalise, is_counts=s.is_counts, match_fraction=match.fraction,
                       label_map=s.label_map)

    # pass 4: write the rows, dropping cells with no expressed gene left
    writer = _PreparedWriter(s, finish, layout.prepared_adata)
    path = atomic_write(layout.prepared_adata, writer.write)
    logger.info("wrote %s (%s cells x %s genes)", path, f"{writer.prepared.adata.n_obs:,}", f"{n_genes_out:,}")
    return writer.prepared
