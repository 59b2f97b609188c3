"""Step 01's figures: quality control per cell (genes, counts, mitochondrial share; read chunk by chunk)
and class sizes per split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.colors import mark_categories
from ..data.labels import SPLITS, ordered
from ..data.matrix import get_matrix, iter_row_chunks, value_kind
from ..model.vocab import gene_symbols
from ..pp.in_memory import PreparedData
from ..pp.inspect import MIN_MT_GENES
from ..pp.stages import mito_mask, percent_mito
from .figure import short_label

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure

__all__ = ["plot_qc", "plot_class_counts", "plot_overview_umap"]


# -- plots ----------------------------------------------------------------------------------
def plot_qc(adata: AnnData, *, layer: str | None = None, gene_symbol_key: str | None = None) -> Figure:
    """Histograms of genes per cell, total counts per cell and (when MT- genes exist) % mitochondrial.

    With fewer than :data:`~scgpt_protocol.pp.inspect.MIN_MT_GENES` ``MT-`` genes (a targeted panel) the last
    panel's title says the percentage is not meaningful; :func:`~scgpt_protocol.pp.inspect.mt_gene_count` gives
    the number for a report's warning.

    Parameters
    ----------
    adata : AnnData
        Input or prepared data.
    layer : str, optional
        The layer to summarise (None: ``X``).
    gene_symbol_key : str, optional
        ``var`` column with gene symbols, to find the ``MT-`` genes.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot: display it as the last expression of a cell (or ``display(fig)``),
        save it with :func:`scgpt_protocol.pl.figure.save_figure`.
    """
    from matplotlib.figure import Figure

    matrix = get_matrix(adata, layer)
    kind, _ = value_kind(matrix)
    where = f"layers[{layer!r}]" if layer else "X"
    mito = mito_mask(gene_symbols(adata, gene_symbol_key))
    # per-cell numbers chunk by chunk: the matrix may be on disk (open_lazy) or larger than a copy can be
    n_genes = np.zeros(adata.n_obs, dtype=np.int64)
    totals = np.zeros(adata.n_obs, dtype=np.float32)
    pct = np.zeros(adata.n_obs, dtype=np.float64)
    for start, chunk in iter_row_chunks(matrix, 8192):
        x = sp.csr_matrix(chunk, dtype=np.float32)
        end = start + x.shape[0]
        n_genes[start:end] = np.asarray((x != 0).sum(axis=1)).ravel()  # explicit zeros are not genes
        totals[start:end] = np.asarray(x.sum(axis=1)).ravel()
        if mito.any():
            pct[start:end] = percent_mito(x, mito, kind)
    panels = [
        (n_genes, "expressed genes per cell", "genes"),
        (totals, f"total {'counts' if kind == 'counts' else 'of values'} per cell ({where})",
         "counts" if kind == "counts" else "sum of values"),
    ]
    if mito.any():
        n_mt = int(mito.sum())
        title = (f"% mitochondrial ({n_mt} MT- genes)" if n_mt >= MIN_MT_GENES else
                 f"% mito: only {n_mt} MT- gene{'s' if n_mt > 1 else ''} measured,\nnot meaningful")
        panels.append((pct, title, "%"))
    fig = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (values, title, xlabel) in zip(axes, panels):
        note = _histogram(ax, values)
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cells")
    fig.suptitle(f"{adata.n_obs:,} cells x {adata.n_vars:,} genes", fontsize=11)
    return fig


def _histogram(ax: object, values: np.ndarray, bins: int = 50) -> str | None:
    """A histogram of ``values``; values all (nearly) equal, such as per-cell totals of CPM data (1e6 in every
    cell up to float rounding), get one bar and a note instead of numpy's "too many bins" error."""
    values = np.asarray(values, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high - low > 1e-6 * max(abs(low), abs(high), 1.0):
        ax.hist(values, bins=bins, color="#4c72b0")
        return None
    middle = (low + high) / 2
    ax.hist(values, bins=1, range=(middle - 0.5, middle + 0.5), color="#4c72b0")
    return f"all cells {middle:.6g} (normalised per cell?)"


def plot_class_counts(prepared: PreparedData, *, order: Sequence[Any] | None = None) -> Figure:
    """Horizontal bars: cells per class, stacked by split (rare classes marked "train only").

    ``order``: the classes top to bottom (e.g. :func:`~scgpt_protocol.data.labels.class_order` of the test
    cells, the order of every figure of the run); default: the most cells on top.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot (see :func:`plot_qc`).
    """
    from matplotlib.figure import Figure

    counts = prepared.split_counts.reindex(columns=list(SPLITS), fill_value=0)
    counts = counts.loc[counts.sum(axis=1).sort_values(ascending=True).index]
    if order is not None:  # bars are drawn bottom up: the first class of the order on top
        counts = counts.loc[ordered(counts.index, order)[::-1]]
    names = [f"{short_label(c)} (train only)" if c in prepared.rare_classes else short_label(c) for c in counts.index]
    fig = Figure(figsize=(7.0, max(2.5, 0.35 * len(counts) + 1.2)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(counts))
    colours = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
    for split in SPLITS:
        values = counts[split].to_numpy(dtype=float)
        ax.barh(names, values, left=left, label=f"{split} ({int(values.sum()):,})", color=colours[split])
        left += values
    mark_categories(ax, [prepared.colors.get(str(c)) for c in counts.index])  # the run's class colours
    ax.set_xlabel("cells")
    ax.set_title(f"cells per class and split ({len(counts)} classes)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_overview_umap(adata: AnnData, *, label_key: str, max_cells: int = 20000, seed: int = 0,
                       palette: Mapping[str, str] | None = None, layer: str | None = None,
                       order: Sequence[Any] | None = None) -> Figure:
    """A UMAP of the input's expression coloured by label: a first look at how well the types separate.

    Computed on a seeded random sample of at most ``max_cells`` cells (only those rows are read, so ``adata``
    may be backed): values that look like counts are log-normalised (log1p CP10k), then PCA, neighbours and
    UMAP with scanpy, all seeded (same seed, same picture).

    Parameters
    ----------
    adata
        The input (or prepared) data, labels in ``obs[label_key]``; cells without a label are drawn grey.
    label_key
        ``obs`` column of the labels.
    max_cells, seed
        Size and seed of the sample.
    palette, order
        The run's palette and class order (legend).
    layer
        The layer of expression values (None: ``X``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import warnings

    import anndata as ad
    import scanpy as sc

    from ..data.graph import neighbors
    from ..data.store import subsample
    from ..evaluate.markers import expression_rows
    from .embedding import plot_embedding

    if label_key not in adata.obs.columns:
        raise KeyError(f"label_key {label_key!r} not in adata.obs; set it to the column of cell types.")
    if adata.n_obs < 3:
        raise ValueError(f"a UMAP needs at least 3 cells; adata has {adata.n_obs}.")
    rows = subsample(np.ones(adata.n_obs, dtype=bool), max_cells, seed=seed)
    labels = adata.obs[label_key].to_numpy(dtype=object)[rows]
    sample = ad.AnnData(expression_rows(adata, rows, layer=layer),
                        obs=pd.DataFrame({"label": pd.Categorical(labels)},
                                         index=pd.Index([str(i) for i in range(len(labels))])))
    n_comps = int(min(50, sample.n_obs - 1, sample.n_vars - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.pca(sample, n_comps=n_comps, random_state=seed)
        neighbors(sample, n_neighbors=15, seed=seed)
        sc.tl.umap(sample, random_state=seed)
    what = f"{sample.n_obs:,} of {adata.n_obs:,} cells (a seeded sample)" if sample.n_obs < adata.n_obs else (
        f"all {adata.n_obs:,} cells")
    fig = plot_embedding(sample, basis="X_umap", color="label", palette=palette, order=order,
                         title=f"input by {label_key}: {what}")
    return fig
