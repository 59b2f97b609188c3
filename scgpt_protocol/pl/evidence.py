"""Evidence for each call, the views CellTypist and scanpy users expect: a marker dotplot (do the cells called
a type carry that type's markers?), the confidence of each predicted type, and the predicted label, the
majority-voting label and the confidence side by side on one UMAP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..annotate.columns import COLUMNS
from ..core.errors import format_keys
from ..data.colors import label_palette
from ..data.labels import by_count, cell_mask, missing_labels, ordered
from ..data.store import subsample
from ..evaluate.markers import expression_rows
from .embedding import plot_embedding
from .figure import new_figure, short_label

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_marker_dotplot", "plot_confidence_by_type", "plot_call_umaps", "dotplot_table"]

#: the x axis of :func:`plot_confidence_by_type`
CONFIDENCE_AXIS = "confidence (probability of the predicted class)"
#: share of expressing cells shown in the size legend of the dotplot
SIZE_STEPS = (0.25, 0.5, 0.75, 1.0)


def _groups(adata: AnnData, groupby: Any) -> pd.Series:
    if isinstance(groupby, str):
        if groupby not in adata.obs.columns:
            raise KeyError(f"groupby {groupby!r} not in adata.obs; columns: {format_keys(adata.obs.columns)}.")
        return adata.obs[groupby]
    values = pd.Series(np.asarray(groupby, dtype=object), index=adata.obs_names)
    if len(values) != adata.n_obs:
        raise ValueError(f"groupby has {len(values)} values for {adata.n_obs} cells; give one per cell.")
    return values


def dotplot_table(adata: AnnData, markers: Mapping[str, Sequence[str]], *, groupby: Any, cells: Any = None,
                  max_cells: int | None = 20000, seed: int = 0,
                  layer: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """``(share expressing, mean expression, cells per group)`` of the marker genes (columns, in the order of
    ``markers``) in each group of ``groupby`` (rows), from a seeded sample of at most ``max_cells`` of ``cells``;
    only the marker genes' columns of those rows are kept (``adata`` may be backed)."""
    genes = list(dict.fromkeys(g for gs in markers.values() for g in gs))
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"marker gene(s) {missing[:5]} not in adata.var_names; pass markers of this data.")
    groups = _groups(adata, groupby)
    rows = subsample(cell_mask(adata, cells) & ~missing_labels(groups), max_cells, seed=seed)
    if not rows.any():
        raise ValueError("no cell with a group to show; check cells and groupby.")
    x = expression_rows(adata, rows, genes=adata.var_names.get_indexer(genes), layer=layer)
    names = groups.to_numpy(dtype=object)[rows].astype(str)
    order = ordered(by_count(pd.Series(names).value_counts()), None)
    share, mean = [], []
    for name in order:
        block = x[np.flatnonzero(names == name)]
        share.append(np.asarray((block > 0).mean(axis=0)).ravel())
        mean.append(np.asarray(block.mean(axis=0)).ravel())
    sizes = pd.Series(names).value_counts().reindex(order)
    return (pd.DataFrame(share, index=order, columns=genes), pd.DataFrame(mean, index=order, columns=genes), sizes)


def plot_marker_dotplot(
    adata: AnnData,
    markers: Mapping[str, Sequence[str]],
    *,
    groupby: Any,
    order: Sequence[Any] | None = None,
    title: str | None = None,
    cells: Any = None,
    max_cells: int | None = 20000,
    seed: int = 0,
    layer: str | None = None,
) -> Figure:
    """Marker dotplot: do the cells called a type carry that type's markers?

    Parameters
    ----------
    adata
        Cells with expression values (may be backed: only the marker genes of the chosen rows are kept).
    markers
        ``{type: [gene, ...]}``, e.g. :func:`~scgpt_protocol.evaluate.markers.marker_genes` of the training cells.
    groupby
        The group of each cell: an ``obs`` column name or one value per cell (e.g. the predicted labels).
    order
        The order of the rows (groups) and of the marker blocks (types); ``Unknown`` is the last row.
    title
        Figure title.
    cells, max_cells, seed
        The cells to show (e.g. the test cells) and a seeded sample of at most ``max_cells`` of them.
    layer
        The layer of expression values (None: ``X``); counts are log-normalised
        (:func:`~scgpt_protocol.evaluate.markers.expression_rows`).

    Returns
    -------
    matplotlib.figure.Figure
        Rows: the groups, each with its number of cells; columns: the markers, grouped by type with the type's
        name above. Dot size: share of the group's cells expressing the gene; colour: mean log-normalised
        expression. The cell of a row with its own type's markers is shaded.
    """
    if not markers or not any(markers.values()):
        raise ValueError("markers is empty; compute them with evaluate.markers.marker_genes(...).")
    types = ordered([t for t, g in markers.items() if g], order)
    markers = {t: list(markers[t]) for t in types}
    share, mean, sizes = dotplot_table(adata, markers, groupby=groupby, cells=cells, max_cells=max_cells,
                                       seed=seed, layer=layer)
    rows = ordered(share.index, order)
    columns = [(t, g) for t in types for g in markers[t]]
    n_rows, n_cols = len(rows), len(columns)
    fig = new_figure(max(5.5, 0.27 * n_cols + 4.2), max(3.2, 0.32 * n_rows + 2.6))
    grid = fig.add_gridspec(2, 2, width_ratios=[max(n_cols, 4), 1.6], height_ratios=[1, 1])
    ax = fig.add_subplot(grid[:, 0])
    x, y = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    frac = np.array([[share.at[r, g] for _, g in columns] for r in rows])
    level = np.array([[mean.at[r, g] for _, g in columns] for r in rows])
    start = 0
    for t in types:  # shade the markers of a row's own type: the block a right call lights up
        if t in rows:
            ax.add_patch(_block(rows.index(t), start, len(markers[t])))
        start += len(markers[t])
    dots = ax.scatter(x.ravel(), y.ravel(), s=_dot_size(frac.ravel()), c=level.ravel(), cmap="Reds",
                      vmin=0, edgecolors="0.4", linewidths=0.3, zorder=2)
    ax.set_xticks(np.arange(n_cols), labels=[g for _, g in columns], rotation=90, fontsize=8)
    ax.set_yticks(np.arange(n_rows), labels=[f"{short_label(r)} (n={sizes[r]})" for r in rows], fontsize=9)
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_ylabel("cells grouped by predicted label")
    ax.set_xlabel("marker genes of each type")
    _type_names(ax, types, markers)
    colorbar = fig.colorbar(dots, cax=fig.add_subplot(grid[1, 1]))
    colorbar.set_label("mean expression\n(log1p CP10k)", fontsize=8)
    colorbar.ax.tick_params(labelsize=8)
    _size_legend(fig.add_subplot(grid[0, 1]))
    if title:
        fig.suptitle(title)
    return fig


def _dot_size(fraction: np.ndarray) -> np.ndarray:
    return 10 + 170 * np.asarray(fraction, dtype=np.float64)


def _block(row: int, start: int, width: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((start - 0.5, row - 0.5), width, 1.0, facecolor="#fff3c4", edgecolor="#e0b000",
                     linewidth=0.6, zorder=1)


def _type_names(ax: Axes, types: Sequence[str], markers: Mapping[str, Sequence[str]]) -> None:
    """The name of each type above its block of marker columns, with a bracket."""
    from matplotlib.transforms import blended_transform_factory

    transform = blended_transform_factory(ax.transData, ax.transAxes)
    start = 0
    for t in types:
        stop = start + len(markers[t]) - 1
        ax.plot([start - 0.3, stop + 0.3], [1.01, 1.01], color="0.3", linewidth=0.8, transform=transform,
                clip_on=False)
        ax.text((start + stop) / 2, 1.025, short_label(t, 28), rotation=40, ha="left", va="bottom", fontsize=8,
                transform=transform, rotation_mode="anchor")
        start = stop + 1


def _size_legend(ax: Axes) -> None:
    ax.scatter(np.zeros(len(SIZE_STEPS)), np.arange(len(SIZE_STEPS)), s=_dot_size(np.array(SIZE_STEPS)),
               color="0.5", edgecolors="0.3", linewidths=0.3)
    for i, step in enumerate(SIZE_STEPS):
        ax.text(0.6, i, f"{step:.0%}", va="center", fontsize=8)
    ax.set_xlim(-0.8, 2.2)
    ax.set_ylim(len(SIZE_STEPS) - 0.4, -1.4)
    ax.text(-0.6, -1.2, "cells expressing", fontsize=8, va="center")
    ax.axis("off")


def plot_confidence_by_type(
    labels: Any,
    confidence: Any,
    *,
    order: Sequence[Any] | None = None,
    palette: Mapping[str, str] | None = None,
    threshold: float | None = None,
    title: str | None = None,
) -> Figure:
    """The confidence of the cells of each predicted type: a horizontal box and the cells as points.

    Parameters
    ----------
    labels
        The predicted label of each cell (the model's call before abstention shows what each type's
        confidence looks like; with abstention, ``Unknown`` is a row of its own, last).
    confidence
        The probability of the predicted class of each cell, in [0, 1].
    order
        The order of the types, top to bottom (default: most cells first).
    palette
        ``{type: colour}`` (the run's palette) for the points.
    threshold
        ``min_confidence``: a vertical line when above 0 (cells left of it are ``Unknown``).
    title
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = pd.Series(np.asarray(labels, dtype=object))
    values = np.asarray(confidence, dtype=np.float64)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} labels but {len(values)} confidences; give one of each per cell.")
    keep = ~missing_labels(names) & np.isfinite(values)
    names, values = names[keep].astype(str).to_numpy(), values[keep]
    if not len(names):
        raise ValueError("no cell with a label and a finite confidence; there is nothing to plot.")
    counts = pd.Series(names).value_counts()
    rows = ordered(by_count(counts), order)
    colors = label_palette(rows) if palette is None else {**label_palette(rows), **palette}
    fig = new_figure(7.0, max(2.6, 0.34 * len(rows) + 1.5))
    ax = fig.add_subplot()
    data = [values[names == r] for r in rows]
    ax.boxplot(data, positions=np.arange(len(rows)), orientation="horizontal", widths=0.6, showfliers=False,
               patch_artist=True, boxprops={"facecolor": "none", "edgecolor": "0.3"},
               medianprops={"color": "0.1"}, whiskerprops={"color": "0.4"}, capprops={"color": "0.4"})
    jitter = np.random.default_rng(0)
    for i, (r, v) in enumerate(zip(rows, data)):
        ax.scatter(v, i + jitter.uniform(-0.22, 0.22, len(v)), s=6 if len(v) > 500 else 10,
                   color=colors.get(r, "0.5"), alpha=0.6, linewidths=0, zorder=1, rasterized=len(v) > 2000)
    ax.set_yticks(np.arange(len(rows)), labels=[f"{short_label(r)} (n={counts[r]})" for r in rows], fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(CONFIDENCE_AXIS)
    ax.set_ylabel("predicted label")
    if threshold:
        ax.axvline(threshold, color="#c2410c", linestyle="--", linewidth=1.2)
        ax.annotate(f"min_confidence {threshold:g}", xy=(threshold, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                    color="#c2410c")
    ax.set_title(title or "confidence of each predicted type", pad=14 if threshold else 6)
    return fig


def plot_call_umaps(
    adata: AnnData,
    *,
    basis: str,
    label_key: str = COLUMNS["labels"],
    majority_key: str = COLUMNS["majority_voting"],
    confidence_key: str = COLUMNS["confidence"],
    palette: Mapping[str, str] | None = None,
    order: Sequence[Any] | None = None,
) -> Figure:
    """Three UMAPs side by side: the predicted label, the majority-voting label (over-clusters) and the
    confidence; the middle panel says "majority voting off" when ``majority_key`` is not in ``obs``.

    Parameters
    ----------
    adata
        Cells with the coordinates in ``obsm[basis]`` and the columns in ``obs`` (03's annotated cells).
    basis
        ``obsm`` key of the 2-D coordinates (e.g. ``"X_umap_scgpt"``).
    label_key, majority_key, confidence_key
        ``obs`` columns of the call, of the majority-voting call and of the confidence.
    palette, order
        The run's palette and class order (legends; ``Unknown`` grey and last).

    Returns
    -------
    matplotlib.figure.Figure
    """
    for key in (label_key, confidence_key):
        if key not in adata.obs.columns:
            raise KeyError(f"{key!r} not in adata.obs; columns: {format_keys(adata.obs.columns)}.")
    fig = new_figure(17.0, 4.4)
    axes = list(fig.subplots(1, 3))
    plot_embedding(adata, basis=basis, color=label_key, ax=axes[0], title="predicted label", palette=palette,
                   order=order)
    if majority_key in adata.obs.columns:
        plot_embedding(adata, basis=basis, color=majority_key, ax=axes[1], title="majority voting (over-clusters)",
                       palette=palette, order=order)
    else:
        axes[1].text(0.5, 0.5, "majority voting off", ha="center", va="center", fontsize=11, color="0.35",
                     transform=axes[1].transAxes)
        axes[1].set_title("majority voting (over-clusters)")
        axes[1].set_axis_off()
    plot_embedding(adata, basis=basis, color=confidence_key, ax=axes[2], title=f"confidence ({confidence_key})")
    return fig
