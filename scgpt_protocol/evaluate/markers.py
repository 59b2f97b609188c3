"""Evidence for each call: the marker genes of each cell type among the training cells (scanpy's
``rank_genes_groups``), and the log-normalised values of chosen cells and genes that a dotplot shows.

Both read only the rows they need (a seeded sample of at most ``max_cells`` cells) from an AnnData that may be
backed (``read_h5ad(backed="r")``), so that they cost the same on an atlas as on the demo.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.labels import UNKNOWN, cell_mask, class_order, missing_labels
from ..data.matrix import get_matrix, iter_row_chunks, log1p_cp10k, value_kind
from ..data.store import subsample

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["marker_genes", "expression_rows"]

#: ranked genes of each type that :func:`marker_genes` picks from (to keep the markers unique across types)
CANDIDATES = 50


def expression_rows(adata: AnnData, rows: Any, *, genes: Sequence[int] | None = None, layer: str | None = None,
                    chunk_size: int = 4096) -> sp.csr_matrix:
    """Log-normalised values (log1p of counts per 10k, scanpy's ``normalize_total`` + ``log1p``) of the cells
    ``rows`` (a boolean mask or ascending positions) and the genes ``genes`` (positions; None: all).

    Values that look like counts (:func:`~scgpt_protocol.data.matrix.value_kind`) are normalised on all genes
    of a cell before the genes are chosen; other values are taken as they are. Reads a chunk of rows at a time,
    so ``adata`` may be backed.
    """
    matrix = get_matrix(adata, layer)
    counts = value_kind(matrix)[0] == "counts"
    blocks = []
    for _, x in iter_row_chunks(matrix, chunk_size, rows=rows, dtype=np.float32):
        if counts:
            x = log1p_cp10k(x)
        blocks.append(x if genes is None else x[:, np.asarray(genes, dtype=np.int64)])
    n_genes = matrix.shape[1] if genes is None else len(genes)
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)


def marker_genes(
    adata: AnnData,
    *,
    label_key: str,
    cells: Any = None,
    n_genes: int = 3,
    max_cells: int = 5000,
    seed: int = 0,
    method: str = "wilcoxon",
    layer: str | None = None,
) -> dict[str, list[str]]:
    """The top marker genes of each cell type among ``cells`` (e.g. the training cells of step 03).

    Parameters
    ----------
    adata
        Cells with the labels in ``obs[label_key]``; may be backed (only the chosen rows are read).
    label_key
        ``obs`` column of the cell types. Cells without a label, and ``Unknown``, are left out.
    cells
        The cells to rank on (None, a boolean mask, positions or obs names; :func:`~scgpt_protocol.data.labels.
        cell_mask`); None: all cells.
    n_genes
        Markers per type.
    max_cells
        At most this many of those cells, a seeded random sample (types keep their share).
    seed
        Seed of that sample.
    method
        ``"wilcoxon"`` or ``"t-test"`` (scanpy's ``rank_genes_groups``, each type against all others, on
        log-normalised values: :func:`expression_rows`).
    layer
        The layer of expression values (None: ``X``).

    Returns
    -------
    dict
        ``{type: [gene, ...]}`` (``var_names``), types by number of cells, largest first; genes up-regulated in the
        type, unique across types where the top candidates allow. Types with fewer than 2 cells in the sample
        are skipped; with fewer than two such types there is nothing to compare and the result is empty.
    """
    import anndata as ad
    import scanpy as sc

    if method not in ("wilcoxon", "t-test"):
        raise ValueError(f"method={method!r}; use 'wilcoxon' or 't-test'.")
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1; got {n_genes}.")
    if label_key not in adata.obs.columns:
        raise KeyError(f"label_key {label_key!r} not in adata.obs; set label_key to the column of cell types.")
    labels = adata.obs[label_key]
    usable = cell_mask(adata, cells) & ~missing_labels(labels) & (labels.astype(str) != UNKNOWN).to_numpy()
    rows = subsample(usable, max_cells, seed=seed)
    names = labels.to_numpy(dtype=object)[rows].astype(str)
    sizes = pd.Series(names).value_counts()
    types = [t for t in class_order(names) if sizes.get(t, 0) >= 2]
    if len(types) < 2:
        logger.warning("marker_genes: %d cell type(s) with at least 2 cells; markers need two to compare.",
                       len(types))
        return {}
    keep = np.isin(names, types)
    x = expression_rows(adata, np.flatnonzero(rows)[keep], layer=layer)
    obs = pd.DataFrame({"type": pd.Categorical(names[keep], categories=types)},
                       index=pd.Index([str(i) for i in range(int(keep.sum()))]))
    sample = ad.AnnData(x, obs=obs,
                        var=pd.DataFrame(index=adata.var_names.astype(str)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(sample, "type", method=method, use_raw=False, n_genes=CANDIDATES, pts=False)
    result = sample.uns["rank_genes_groups"]
    out: dict[str, list[str]] = {}
    taken: set[str] = set()
    for t in types:
        ranked = [str(g) for g, fc in zip(result["names"][t], result["logfoldchanges"][t]) if fc > 0]
        fresh = [g for g in ranked if g not in taken]
        chosen = (fresh + [g for g in ranked if g in taken])[:n_genes]  # reuse a gene only when none is left
        out[t] = chosen
        taken.update(chosen)
    return out
