"""Figures of the protocol: confusion matrix, embeddings, per-class F1, training curves.

Every ``plot_*`` function draws with matplotlib's object API and returns the
:class:`~matplotlib.figure.Figure`; none calls ``plt.show()`` or saves. Without ``ax`` a new
figure is made that pyplot does not track (so Jupyter shows it once, as the cell's value, and
tests can make many without the "too many open figures" warning); with ``ax`` the plot goes into
the caller's axes and their figure is returned. :func:`save_figure` writes a figure to the run's
``figures/`` folder.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import format_keys

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .layout import RunLayout

__all__ = [
    "SavedFigure",
    "METHOD_COLORS",
    "set_style",
    "label_palette",
    "run_palette",
    "mark_categories",
    "plot_confusion",
    "plot_embedding",
    "compute_umap",
    "plot_per_class_f1",
    "plot_training_curves",
    "plot_coverage_curve",
    "save_figure",
]

logger = logging.getLogger(__name__)

#: colour of cells without a value (e.g. reference cells in a panel of query predictions)
NA_COLOR = "#e3e3e3"
#: classes up to which :func:`plot_confusion` writes the value into each cell
ANNOTATE_MAX_CLASSES = 15


def set_style() -> None:
    """Set matplotlib defaults for the protocol's figures (changes the global ``rcParams``).

    Readable font sizes, no top/right spines, white background, 120 dpi when saving. Use
    ``matplotlib.rc_context()`` around it to keep the change local.
    """
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 120,
            "figure.facecolor": "white",
            "savefig.facecolor": "white",
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": False,
        }
    )


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# -- confusion matrix -----------------------------------------------------------------------
def plot_confusion(confusion_df: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Heatmap of a confusion matrix, rows = true labels, columns = predicted labels.

    Parameters
    ----------
    confusion_df
        The result of :func:`~scgpt_protocol.evaluate.confusion` (row-normalised: each row sums
        to 1; NaN rows -- labels without true cells -- are drawn grey). When it carries
        ``attrs["support"]`` the number of true cells is added to each row name.
    ax
        Axes to draw into; None: a new figure sized for the number of classes.
    title
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        With values written into the cells when there are at most 15 classes.
    """
    import matplotlib as mpl

    if confusion_df.empty:
        msg = "confusion_df is empty; compute it with evaluate.confusion(y_true, y_pred, categories)."
        raise ValueError(msg)
    values = confusion_df.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    normalised = confusion_df.attrs.get("normalize", "true" if np.nanmax(values) <= 1 else None) is not None
    if ax is None:
        side = max(4.5, 0.42 * max(n_rows, n_cols) + 2.5)
        fig = _new_figure(side + 1.0, side)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = mpl.colormaps["Blues"].with_extremes(bad="0.85")
    vmax = 1.0 if normalised else max(float(np.nanmax(values)), 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal",
                      interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true class" if normalised else "cells")

    support = confusion_df.attrs.get("support") or {}
    row_names = [f"{r} (n={support[r]})" if r in support else str(r) for r in confusion_df.index]
    ax.set_xticks(np.arange(n_cols), labels=[str(c) for c in confusion_df.columns], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(np.arange(n_rows), labels=row_names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if max(n_rows, n_cols) <= ANNOTATE_MAX_CLASSES:
        size = 8 if max(n_rows, n_cols) > 8 else 9
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                if not np.isfinite(v) or v == 0:
                    continue
                text = f"{v:.2f}" if normalised else f"{v:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if v > 0.55 * vmax else "black")
    if title:
        ax.set_title(title)
    return fig


# -- embeddings -----------------------------------------------------------------------------
def _default_palette(n: int) -> list[str]:
    """scanpy's default categorical palettes (same colours as ``sc.pl.umap``)."""
    from scanpy.plotting import palettes

    if n <= 20:
        return list(palettes.default_20[:n])
    if n <= 28:
        return list(palettes.default_28[:n])
    if n <= len(palettes.default_102):
        return list(palettes.default_102[:n])
    return ["grey"] * n


def _stored_colors(adata: AnnData, key: str) -> dict[str, str]:
    """``{category: colour}`` from ``uns[key + "_colors"]`` when it fits the categorical ``obs[key]``."""
    from matplotlib.colors import is_color_like

    stored = adata.uns.get(f"{key}_colors")
    column = adata.obs[key] if key in adata.obs else None
    if stored is None or column is None or not isinstance(column.dtype, pd.CategoricalDtype):
        return {}
    stored = [str(c) for c in np.asarray(stored).tolist()]
    categories = [str(c) for c in column.cat.categories]
    if len(stored) < len(categories) or not all(is_color_like(c) for c in stored[: len(categories)]):
        return {}
    return dict(zip(categories, stored))


def label_palette(
    categories: Sequence[Any], *, adata: AnnData | None = None, label_key: str | None = None
) -> dict[str, str]:
    """One fixed colour per category: the palette of a run, shared by every figure of every step.

    Parameters
    ----------
    categories
        The classes, in their order.
    adata, label_key
        Data whose ``uns[f"{label_key}_colors"]`` (scanpy's convention) holds colours for the
        categorical ``obs[label_key]``: those colours are kept, matched by category name.

    Returns
    -------
    dict
        ``{category: colour}``; categories without a stored colour get scanpy's default palette
        (in order, skipping colours already taken).
    """
    names = [str(c) for c in categories]
    known = _stored_colors(adata, label_key) if adata is not None and label_key else {}
    out = {c: known[c] for c in names if c in known}
    taken = set(out.values())
    spare = iter(c for c in _spare_colors(len(names)) if c not in taken)
    for c in names:
        if c not in out:
            out[c] = next(spare, "grey")
    return out


def _spare_colors(n: int) -> list[str]:
    """scanpy's default palette for ``n`` categories, then the 102 colours of its largest one."""
    from scanpy.plotting import palettes

    seen: dict[str, None] = dict.fromkeys(_default_palette(n) + list(palettes.default_102))
    return list(seen)


def run_palette(layout: RunLayout) -> dict[str, str]:
    """The run's ``{class: colour}``, written by 01 into ``data/labels.json`` (every step's figures use it).

    Runs prepared before colours were stored get :func:`label_palette` of their categories.
    """
    labels = layout.read_json(layout.labels, step="01_preprocess")
    colors = labels.get("colors")
    return dict(colors) if colors else label_palette(labels["categories"])


def mark_categories(ax: Axes, colors: Sequence[str | None], *, axis: str = "y") -> None:
    """A colour swatch beside each tick label of ``axis`` (e.g. the run's class colours on a bar chart).

    ``colors[i]`` belongs to the i-th tick (None: no swatch); the tick labels move aside to make room.
    """
    from matplotlib.transforms import blended_transform_factory

    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    for position, color in zip(ticks, colors):
        if color is None:
            continue
        if axis == "y":
            transform = blended_transform_factory(ax.transAxes, ax.transData)
            xy = (-0.012, position)
        else:
            transform = blended_transform_factory(ax.transData, ax.transAxes)
            xy = (position, -0.012)
        ax.plot(*xy, marker="s", markersize=8, color=color, markeredgecolor="0.3", markeredgewidth=0.4,
                transform=transform, clip_on=False, linestyle="")
    ax.tick_params(axis=axis, pad=14)


def _category_colors(adata: AnnData, key: str, categories: Sequence[Any], store: bool) -> list[str]:
    """Colours of ``categories``: ``uns[key + "_colors"]`` when valid, else a default palette (stored)."""
    from matplotlib.colors import is_color_like

    uns_key = f"{key}_colors"
    stored = adata.uns.get(uns_key)
    if stored is not None:
        stored = list(np.asarray(stored).tolist())
        if len(stored) >= len(categories) and all(is_color_like(c) for c in stored[: len(categories)]):
            return [str(c) for c in stored[: len(categories)]]
        logger.info("adata.uns[%r] has %d colours for %d categories; using the default palette",
                    uns_key, len(stored), len(categories))
    colors = _default_palette(len(categories))
    if store:
        adata.uns[uns_key] = list(colors)
    return colors


def _basis(adata: AnnData, basis: str) -> np.ndarray:
    key = basis if basis in adata.obsm else f"X_{basis}" if f"X_{basis}" in adata.obsm else None
    if key is None:
        msg = (
            f"basis {basis!r} is not in adata.obsm (keys: {format_keys(adata.obsm.keys())}); compute it first, e.g. "
            "compute_umap(adata, use_rep='X_scgpt', key_added='X_umap_scgpt')."
        )
        raise KeyError(msg)
    coords = np.asarray(adata.obsm[key])
    if coords.ndim != 2 or coords.shape[1] < 2:
        msg = f"adata.obsm[{key!r}] has shape {coords.shape}; expected at least 2 columns."
        raise ValueError(msg)
    return coords[:, :2]


def _palette_colors(categories: Sequence[Any], palette: Mapping[str, str]) -> list[str]:
    """Colours of ``categories`` from ``palette``; others get default colours the palette does not use."""
    used = set(palette.values())
    spare = iter(c for c in _spare_colors(len(categories)) if c not in used)
    return [palette[str(c)] if str(c) in palette else next(spare, "grey") for c in categories]


def _draw_embedding(adata: AnnData, coords: np.ndarray, key: str, ax: Axes, size: float,
                    palette: Mapping[str, str] | None = None) -> None:
    from matplotlib.lines import Line2D

    column = adata.obs[key]
    fig = ax.figure
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64)
        order = np.argsort(np.nan_to_num(values, nan=-np.inf), kind="stable")  # high values on top
        points = ax.scatter(coords[order, 0], coords[order, 1], c=values[order], s=size, cmap="viridis",
                            linewidths=0, plotnonfinite=True)
        fig.colorbar(points, ax=ax, shrink=0.7, label=key)
        return
    is_categorical = isinstance(column.dtype, pd.CategoricalDtype)
    cat = column if is_categorical else column.astype("category")
    categories = list(cat.cat.categories)
    if palette and any(str(c) in palette for c in categories):
        colors = _palette_colors(categories, palette)
    else:
        colors = _category_colors(adata, key, categories, store=is_categorical)
    codes = cat.cat.codes.to_numpy()
    lut = np.asarray(colors + [NA_COLOR], dtype=object)  # code -1 (NaN) -> light grey
    order = np.argsort(codes != -1, kind="stable")  # cells without a value underneath the others
    ax.scatter(coords[order, 0], coords[order, 1], c=list(lut[codes[order]]), s=size, linewidths=0,
               rasterized=len(coords) > 2000)
    present = set(codes.tolist())
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=colors[i], markeredgewidth=0,
               label=str(c))
        for i, c in enumerate(categories) if i in present
    ]
    if -1 in present:
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=NA_COLOR,
                              markeredgewidth=0, label="NA"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small",
              ncol=1 if len(handles) <= 14 else 2, handletextpad=0.2, borderaxespad=0.5)


def plot_embedding(
    adata: AnnData,
    *,
    basis: str = "X_umap",
    color: str | list[str],
    ax: Axes | Sequence[Axes] | None = None,
    title: str | list[str] | None = None,
    palette: Mapping[str, str] | None = None,
) -> Figure:
    """Scatter plot of a 2-D embedding coloured by one or more ``obs`` columns, side by side.

    Categorical columns use the colours in ``adata.uns[f"{key}_colors"]`` when present (the ones
    scanpy uses), else scanpy's default palette, which is then **stored there** so that later plots
    (and ``sc.pl.umap``) agree; string columns that are not categorical get the palette without
    storing it. Numeric columns use ``viridis`` with a colour bar. The legend is outside the axes.

    Parameters
    ----------
    adata
        Cells with the embedding in ``obsm[basis]`` and the ``color`` columns in ``obs``.
    basis
        ``obsm`` key of the coordinates (the first two columns are drawn); ``"umap"`` also finds
        ``"X_umap"``.
    color
        One ``obs`` column, or a list of them (one panel each).
    ax
        Axes to draw into (one per colour); None: a new figure.
    title
        Panel title(s); default: the column names.
    palette
        ``{category: colour}`` for every categorical panel that holds any of these categories
        (e.g. the run's :func:`label_palette`, so that the true and the predicted label of a cell
        type have the same colour in every panel, whatever categories each column has). Other
        categories of such a panel get colours the palette does not use.

    Returns
    -------
    matplotlib.figure.Figure
    """
    keys = [color] if isinstance(color, str) else list(color)
    if not keys:
        raise ValueError("color is empty; give an obs column name or a list of them.")
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        msg = f"color column(s) {missing} not in adata.obs; columns: {format_keys(adata.obs.columns)}."
        raise KeyError(msg)
    coords = _basis(adata, basis)
    titles = keys if title is None else [title] if isinstance(title, str) else list(title)
    if len(titles) != len(keys):
        msg = f"{len(titles)} titles given for {len(keys)} colour columns; give one per column."
        raise ValueError(msg)
    if ax is None:
        fig = _new_figure(5.6 * len(keys), 4.2)
        axes = list(np.atleast_1d(fig.subplots(1, len(keys))))
    else:
        axes = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
        if len(axes) != len(keys):
            msg = f"{len(axes)} axes given for {len(keys)} colour columns; give one axes per column."
            raise ValueError(msg)
        fig = axes[0].figure
    size = float(np.clip(120_000 / max(adata.n_obs, 1), 1.0, 40.0))
    axis_name = basis.removeprefix("X_").split("_")[0].upper()  # X_umap_scgpt -> UMAP
    for key, panel, panel_title in zip(keys, axes, titles):
        _draw_embedding(adata, coords, key, panel, size, palette)
        panel.set_title(panel_title)
        panel.set_xticks([])
        panel.set_yticks([])
        panel.set_xlabel(f"{axis_name} 1")
        panel.set_ylabel(f"{axis_name} 2")
        panel.set_aspect("equal", adjustable="datalim")
    return fig


def compute_umap(
    adata: AnnData,
    *,
    use_rep: str = "X_scgpt",
    key_added: str = "X_umap_scgpt",
    seed: int = 0,
    n_neighbors: int = 15,
    method: str = "umap",
) -> None:
    """UMAP of an embedding, written **in place** to ``adata.obsm[key_added]`` and nothing else.

    Runs ``sc.pp.neighbors(use_rep=use_rep)`` and ``sc.tl.umap`` on a light copy (only ``obs``
    names and the representation), so the ``neighbors``, ``obsp`` and ``X_umap`` entries of
    ``adata`` -- e.g. a UMAP of the expression -- are left untouched.

    Parameters
    ----------
    adata
        Cells with the representation in ``obsm[use_rep]`` (e.g. from
        :func:`~scgpt_protocol.evaluate.annotate` or :func:`~scgpt_protocol.embedding.embed`).
    use_rep
        ``obsm`` key of the representation.
    key_added
        ``obsm`` key of the 2-D result.
    seed
        Random state of the neighbour search and of the layout (same seed, same result).
    n_neighbors
        Neighbours of the kNN graph (capped at ``n_cells - 1``).
    method
        ``"umap"`` (scanpy's default connectivities) or ``"gauss"``. The first ``"umap"`` call in a
        Python session compiles umap-learn's numba code, which takes about 20 s on a laptop;
        ``"gauss"`` avoids it and gives a similar picture.
    """
    import anndata as ad
    import scanpy as sc

    if use_rep not in adata.obsm:
        msg = (
            f"use_rep={use_rep!r} is not in adata.obsm (keys: {format_keys(adata.obsm.keys())}); compute it first, "
            "e.g. annotate(adata, prediction) or embed(adata, model)."
        )
        raise KeyError(msg)
    if adata.n_obs < 3:
        raise ValueError(f"a UMAP needs at least 3 cells; adata has {adata.n_obs}.")
    light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()),
                       obsm={use_rep: np.asarray(adata.obsm[use_rep], dtype=np.float32)})
    sc.pp.neighbors(light, use_rep=use_rep, n_neighbors=min(n_neighbors, adata.n_obs - 1), random_state=seed,
                    method=method)
    sc.tl.umap(light, random_state=seed)
    adata.obsm[key_added] = light.obsm["X_umap"].astype(np.float32)


# -- metrics --------------------------------------------------------------------------------
#: one colour per method in every figure (by the start of the method's name), others in order
METHOD_COLORS: dict[str, str] = {
    "scGPT": "#1f77b4",
    "logistic regression": "#ff7f0e",
    "baseline": "#ff7f0e",
    "zero-shot": "#2ca02c",
}
_MORE_METHOD_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _method_colors(methods: Sequence[str]) -> list[str]:
    out, spare = [], iter(_MORE_METHOD_COLORS)
    for method in methods:
        match = next((c for prefix, c in METHOD_COLORS.items() if str(method).startswith(prefix)), None)
        out.append(match if match is not None and match not in out else next(spare, "grey"))
    return out


def plot_per_class_f1(
    metrics_by_method: Mapping[str, Mapping[str, Any]], *, ax: Axes | None = None, few: int = 5
) -> Figure:
    """Grouped bars of the per-class F1 of several methods (e.g. scGPT beside the baseline).

    Parameters
    ----------
    metrics_by_method
        Method name -> metrics dict of :func:`~scgpt_protocol.evaluate.classification_metrics`
        (or an object with ``.metrics``). Classes with true cells in any method's test set are
        shown, largest first, each with its number of test cells; the legend (right of the plot)
        gives each method's macro F1. An F1 of 0 is marked so that it is not mistaken for a
        missing bar; methods keep their colour in every figure (:data:`METHOD_COLORS`).
    ax
        Axes to draw into; None: a new figure.
    few
        Classes with fewer test cells are marked with ``*`` (their F1 rests on a handful of cells).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not metrics_by_method:
        raise ValueError("metrics_by_method is empty; give method name -> metrics dict.")
    per_method: dict[str, dict[str, float]] = {}
    macro: dict[str, Any] = {}
    support: dict[str, int] = {}
    for method, value in metrics_by_method.items():
        metrics = getattr(value, "metrics", value)
        if not isinstance(metrics, Mapping) or "per_class" not in metrics:
            msg = (
                f"metrics of {method!r} have no 'per_class' entry; "
                "pass the dicts of classification_metrics()."
            )
            raise ValueError(msg)
        per_method[method] = {str(r["label"]): float(r["f1"]) for r in metrics["per_class"]}
        macro[method] = metrics.get("macro_f1")
        for row in metrics["per_class"]:
            label = str(row["label"])
            support[label] = max(support.get(label, 0), int(row["support"]))
    classes = sorted((c for c, n in support.items() if n > 0), key=lambda c: -support[c])
    if not classes:
        raise ValueError("no class has true cells in the metrics given; there is nothing to plot.")
    n_methods = len(per_method)
    if ax is None:
        fig = _new_figure(max(6.0, 0.32 * len(classes) * max(n_methods, 2) + 4.5), 4.4)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    width = 0.8 / n_methods
    x = np.arange(len(classes))
    for i, ((method, f1), color) in enumerate(zip(per_method.items(), _method_colors(list(per_method)))):
        heights = np.array([f1.get(c, np.nan) for c in classes], dtype=np.float64)
        label = method if macro[method] is None else f"{method} (macro F1 {macro[method]:.3f})"
        offset = x + (i - (n_methods - 1) / 2) * width
        ax.bar(offset, heights, width=width, label=label, color=color)
        zero = np.flatnonzero(heights == 0)
        if zero.size:  # a bar of height 0 is invisible: mark it on the axis
            ax.plot(offset[zero], np.full(zero.size, 0.012), linestyle="", marker="v", markersize=5,
                    color=color, markeredgecolor="black", markeredgewidth=0.5, clip_on=False)
    names = [f"{c} (n={support[c]}){' *' if support[c] < few else ''}" for c in classes]
    ax.set_xticks(x, labels=names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 on the test cells")
    ax.set_title("per-class F1 (classes by number of test cells)")
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], linestyle="", marker="v", color="0.5", markeredgecolor="black",
                          markeredgewidth=0.5, markersize=5))
    labels.append("F1 = 0")
    if any(support[c] < few for c in classes):
        handles.append(Line2D([], [], linestyle=""))
        labels.append(f"* fewer than {few} test cells")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return fig


def _two_axes(ax: Any, height: float, what: str) -> tuple[Figure, list[Axes]]:
    """A new figure with two panels side by side, or the caller's two axes (``what`` names them)."""
    if ax is None:
        fig = _new_figure(9.5, height)
        return fig, list(fig.subplots(1, 2))
    axes = list(np.ravel(ax))
    if len(axes) != 2:
        raise ValueError(f"ax must be two axes ({what}); got {len(axes)}.")
    return axes[0].figure, axes


def plot_training_curves(history: pd.DataFrame, *, ax: Sequence[Axes] | None = None) -> Figure:
    """Two panels: train/validation loss, and validation macro F1 / accuracy, per epoch.

    Parameters
    ----------
    history
        One row per epoch with ``epoch`` and any of ``train_loss``, ``val_loss``, ``val_macro_f1``,
        ``val_accuracy`` (``train/history.csv`` of 02_finetune; ``lr`` is not drawn). If a boolean
        column ``best`` exists, the last epoch with ``best=True`` (the one kept) is marked.
    ax
        Two axes to draw into (losses, metrics); None: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if "epoch" not in history.columns or history.empty:
        msg = (
            f"history needs an 'epoch' column and at least one row; found columns {list(history.columns)} "
            f"and {len(history)} rows. Read it with pandas.read_csv(layout.history)."
        )
        raise ValueError(msg)
    losses = [c for c in ("train_loss", "val_loss") if c in history.columns]
    scores = [c for c in ("val_macro_f1", "val_accuracy") if c in history.columns]
    if not losses and not scores:
        msg = (
            "history has none of train_loss, val_loss, val_macro_f1, val_accuracy; "
            f"found {list(history.columns)}."
        )
        raise ValueError(msg)
    fig, axes = _two_axes(ax, 3.6, "losses, metrics")
    epochs = history["epoch"].to_numpy()
    marker = "o" if len(history) <= 30 else None
    names = {
        "train_loss": "train", "val_loss": "validation",
        "val_macro_f1": "macro F1", "val_accuracy": "accuracy",
    }
    for panel, columns, ylabel in ((axes[0], losses, "loss"), (axes[1], scores, "validation score")):
        for column in columns:
            panel.plot(epochs, history[column].to_numpy(dtype=np.float64), marker=marker, markersize=3,
                       label=names[column])
        panel.set_xlabel("epoch")
        panel.set_ylabel(ylabel)
        if columns:
            panel.legend(frameon=False, fontsize="small")
    axes[0].set_title("loss")
    axes[1].set_title("validation metrics")
    if scores:
        axes[1].set_ylim(0, 1.02)
    if "best" in history.columns:
        best = history["best"].fillna(False).astype(bool).to_numpy()
        if best.any():
            best_epoch = epochs[np.flatnonzero(best)[-1]]
            for panel in axes:
                panel.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1)
            axes[1].annotate(
                f"best epoch {best_epoch}", xy=(best_epoch, 0.02), xycoords=("data", "axes fraction"),
                xytext=(3, 0), textcoords="offset points", fontsize="small", color="0.3",
            )
    if len(epochs) and np.allclose(epochs, np.round(epochs)):
        from matplotlib.ticker import MaxNLocator

        for panel in axes:
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_coverage_curve(
    curves: Any, *, min_confidence: float | None = None, ax: Sequence[Axes] | None = None,
    title: str | None = None,
) -> Figure:
    """Coverage against accuracy of abstention over ``min_confidence`` thresholds, to pick one.

    Left: accuracy of the assigned cells against coverage (share of cells assigned), one point per
    threshold (every other one labelled). Right: coverage, accuracy of the assigned cells and
    accuracy on all cells (``Unknown`` counted as an error) against the threshold.

    Parameters
    ----------
    curves
        :func:`~scgpt_protocol.refine.coverage_curve` (a DataFrame or its list of rows), or a
        mapping name -> curve to draw several (e.g. the fine-tuned model and the zero-shot vote).
    min_confidence
        The threshold in use, marked on both panels.
    ax
        Two axes to draw into; None: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    named = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    frames = {name: pd.DataFrame(c) for name, c in named.items()}
    need = {"threshold", "coverage", "accuracy_assigned", "accuracy_all"}
    for name, frame in frames.items():
        if not need <= set(frame.columns) or frame.empty:
            msg = (f"curve {name!r} needs rows with {sorted(need)}; found columns {list(frame.columns)}. Pass "
                   "refine.coverage_curve(...) or metrics['refinement']['curve'].")
            raise ValueError(msg)
    fig, axes = _two_axes(ax, 3.8, "coverage, accuracy")
    left, right = axes
    for i, (name, frame) in enumerate(frames.items()):
        color = f"C{i}"
        prefix = f"{name}: " if name else ""
        left.plot(frame["coverage"], frame["accuracy_assigned"], marker="o", markersize=3, color=color,
                  label=name or None)
        last = None
        for _, row in frame.iloc[::2].iterrows():  # label every other threshold, once per distinct point
            point = (round(float(row["coverage"]), 3), round(float(row["accuracy_assigned"]), 3))
            if np.isfinite(row["accuracy_assigned"]) and point != last:
                left.annotate(f"{row['threshold']:g}", (row["coverage"], row["accuracy_assigned"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points", color=color)
                last = point
        right.plot(frame["threshold"], frame["coverage"], color=color, linestyle=":", label=f"{prefix}coverage")
        right.plot(frame["threshold"], frame["accuracy_assigned"], color=color, label=f"{prefix}accuracy, assigned")
        right.plot(frame["threshold"], frame["accuracy_all"], color=color, linestyle="--",
                   label=f"{prefix}accuracy, all (Unknown = wrong)")
    if min_confidence:
        right.axvline(min_confidence, color="0.4", linewidth=1)
        for name, frame in frames.items():
            row = frame.iloc[int(np.argmin(np.abs(frame["threshold"].to_numpy() - min_confidence)))]
            left.plot([row["coverage"]], [row["accuracy_assigned"]], marker="s", color="0.2", markersize=6,
                      fillstyle="none")
        right.annotate(f"min_confidence {min_confidence:g}", xy=(min_confidence, 0.02),
                       xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                       fontsize="small", color="0.3")
    left.set_xlabel("coverage (share of cells assigned)")
    left.set_ylabel("accuracy of the assigned cells")
    left.set_xlim(-0.02, 1.05)
    left.set_ylim(0, 1.05)
    left.set_title("coverage vs accuracy (labels: threshold)")
    if len(frames) > 1:
        left.legend(frameon=False, fontsize="small")
    right.set_xlabel("min_confidence")
    right.set_ylim(0, 1.02)
    right.set_title("by threshold")
    right.legend(frameon=False, fontsize="x-small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


# -- saving ---------------------------------------------------------------------------------
def show_text_literally(fig: Figure) -> Figure:
    """Turn off matplotlib's mathtext for every text of ``fig``: labels are data, shown as written.

    A cell type such as ``Mono $\\q$`` would otherwise be parsed as TeX and fail to draw.
    """
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)
    return fig


class SavedFigure(type(Path())):  # type: ignore[misc]
    """The path of a saved PNG that displays as the image in a notebook (``_repr_png_``).

    Notebooks end a plotting cell with ``save_figure(...)``: the report then shows the very file
    that was written, whatever the matplotlib backend (inline, agg under papermill, Colab).
    """

    def _repr_png_(self) -> bytes:
        return self.read_bytes()


#: resolution of the PNG shown in reports, and of the raster parts (scatter points) of the PDF for print
SCREEN_DPI, PRINT_DPI = 120, 300


def save_figure(fig: Figure, layout: RunLayout, name: str, *, pdf: bool = True) -> SavedFigure:
    """Save ``fig`` as ``layout.figure(name)`` (PNG, 120 dpi, tight bounding box) and a PDF beside it.

    The PNG is what reports show; the PDF is for print and for editing (text and lines are vector,
    dense scatter points are drawn at 300 dpi). Both are written atomically.

    Parameters
    ----------
    fig
        The figure.
    layout
        The run's :class:`~scgpt_protocol.layout.RunLayout`; ``figures/`` is created.
    name
        File stem, e.g. ``"confusion_test"`` (letters, digits, ``._-``).
    pdf
        Also write the PDF next to the PNG (default).

    Returns
    -------
    SavedFigure
        The PNG's path (a :class:`pathlib.Path`), shown as the image when it is a cell's value.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        msg = (
            f"figure name {name!r} must be a plain file stem (letters, digits, '.', '_', '-'), "
            "e.g. 'confusion_test'."
        )
        raise ValueError(msg)
    show_text_literally(fig)
    png = layout.figure(name)
    png.parent.mkdir(parents=True, exist_ok=True)
    targets = [(png, "png")] + ([(png.with_suffix(".pdf"), "pdf")] if pdf else [])
    for path, fmt in targets:
        tmp = path.with_name(f".{path.name}.partial")
        try:
            fig.savefig(tmp, format=fmt, dpi=SCREEN_DPI if fmt == "png" else PRINT_DPI, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        shown = png.resolve().relative_to(Path(layout.run_dir).resolve())
    except ValueError:
        shown = png
    logger.info("saved %s%s", shown, " (+ .pdf for print)" if pdf else "")
    return SavedFigure(png)
