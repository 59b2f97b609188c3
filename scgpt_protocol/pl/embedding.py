"""Embeddings in two dimensions: :func:`compute_umap`, :func:`plot_embedding`, and the sampled AnnData a
figure draws (:func:`cells_for_plot` for one dataset, :func:`joint_embedding` for reference and query in
one sample), so that a UMAP of an atlas costs what one of ``max_cells`` cells does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..annotate.columns import PREDICTION_COLUMNS
from ..core.errors import format_keys
from ..core.renamed import renamed_arguments
from ..data.colors import NA_COLOR, REFERENCE, category_colors, fixed_color, spare_colors
from ..data.labels import ordered
from .figure import new_figure, short_label

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..annotate.atlas import AtlasIndex
    from ..annotate.zeroshot import ZeroShotResult


__all__ = ["joint_embedding", "cells_for_plot", "plot_embedding", "compute_umap"]


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
    """Colours of ``categories`` from ``palette``; others get default colours the palette does not use;
    ``Unknown`` and ``reference`` their fixed greys."""
    used = set(palette.values())
    spare = iter(c for c in spare_colors(len(categories)) if c not in used)
    return [fixed_color(c) or (palette[str(c)] if str(c) in palette else next(spare, "#000000"))
            for c in categories]


def _draw_continuous(values: np.ndarray, coords: np.ndarray, name: str, ax: Axes, size: float) -> None:
    finite = values[np.isfinite(values)]
    unit = finite.size and finite.min() >= 0 and finite.max() <= 1  # a share or a probability: 0..1
    order = np.argsort(np.nan_to_num(values, nan=-np.inf), kind="stable")  # high values on top
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad=NA_COLOR)  # cells without a value: the grey of no call
    points = ax.scatter(coords[order, 0], coords[order, 1], c=values[order], s=size, cmap=cmap,
                        linewidths=0, plotnonfinite=True, vmin=0 if unit else None, vmax=1 if unit else None,
                        rasterized=len(coords) > 2000)
    colorbar = ax.figure.colorbar(points, ax=ax, shrink=0.7)
    colorbar.set_label(name, fontsize=9)
    colorbar.ax.tick_params(labelsize=8)


def _draw_embedding(adata: AnnData, coords: np.ndarray, key: str, ax: Axes, size: float,
                    palette: Mapping[str, str] | None = None, order: Sequence[Any] | None = None,
                    name: str | None = None) -> None:
    from matplotlib.lines import Line2D

    column = adata.obs[key]
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        _draw_continuous(column.to_numpy(dtype=np.float64), coords, name or key, ax, size)
        return
    is_categorical = isinstance(column.dtype, pd.CategoricalDtype)
    cat = column if is_categorical else column.astype("category")
    categories = list(cat.cat.categories)
    if palette and any(str(c) in palette for c in categories):
        colors = _palette_colors(categories, palette)
    else:
        colors = category_colors(adata, key, categories, store=is_categorical)
    codes = cat.cat.codes.to_numpy()
    lut = np.asarray(colors + [NA_COLOR], dtype=object)  # code -1 (NaN) -> the grey of "no call"
    background = np.array([fixed_color(c) is not None for c in categories] + [True])
    draw = np.argsort(~background[codes], kind="stable")  # no call / reference underneath the others
    ax.scatter(coords[draw, 0], coords[draw, 1], c=list(lut[codes[draw]]), s=size, linewidths=0,
               rasterized=len(coords) > 2000)
    present = set(codes.tolist())
    shown = ordered([c for i, c in enumerate(categories) if i in present], order)
    shown = [c for c in shown if fixed_color(c) is None] + [c for c in shown if fixed_color(c) is not None]
    index = {str(c): i for i, c in enumerate(categories)}
    handles = [Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=colors[index[c]],
                      markeredgewidth=0, label=short_label(c)) for c in shown]
    if -1 in present:
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=NA_COLOR,
                              markeredgewidth=0, label="no label"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9,
              ncol=1 if len(handles) <= 14 else 2, handletextpad=0.2, borderaxespad=0.5)


def plot_embedding(
    adata: AnnData,
    *,
    basis: str = "X_umap",
    color: str | list[str],
    ax: Axes | Sequence[Axes] | None = None,
    title: str | list[str] | None = None,
    palette: Mapping[str, str] | None = None,
    order: Sequence[Any] | None = None,
) -> Figure:
    """Scatter plot of a 2-D embedding coloured by one or more ``obs`` columns, side by side.

    Categorical columns use the colours in ``adata.uns[f"{key}_colors"]`` when present (the ones
    scanpy uses), else scanpy's default palette, which is then **stored there** so that later plots
    (and ``sc.pl.umap``) agree; string columns that are not categorical get the palette without
    storing it. Numeric columns (e.g. the confidence) use ``viridis`` with a colour bar (0 to 1 when the
    values lie there). The legend is outside the axes.

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
        categories of such a panel get colours the palette does not use. ``Unknown`` (no call), cells
        without a value and ``reference`` cells (04) are grey whatever the palette, drawn underneath.
    order
        The class order of the legends (e.g. :func:`~scgpt_protocol.data.labels.class_order`); the greys last.
        Legend entries longer than 40 characters are shortened with an ellipsis.

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
        fig = new_figure(5.6 * len(keys), 4.2)
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
        _draw_embedding(adata, coords, key, panel, size, palette, order, name=panel_title)
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

    Runs :func:`~scgpt_protocol.data.graph.neighbors` (``sc.pp.neighbors`` at any size) and ``sc.tl.umap``
    on a light copy (only ``obs`` names and the representation), so the ``neighbors``, ``obsp`` and
    ``X_umap`` entries of ``adata`` -- e.g. a UMAP of the expression -- are left untouched.

    Parameters
    ----------
    adata
        Cells with the representation in ``obsm[use_rep]`` (e.g. from
        :func:`~scgpt_protocol.annotate.inference.annotate` or :func:`~scgpt_protocol.model.embedding.embed`).
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

    from ..data.graph import neighbors

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
    neighbors(light, use_rep=use_rep, n_neighbors=n_neighbors, seed=seed, method=method)
    sc.tl.umap(light, random_state=seed)
    adata.obsm[key_added] = light.obsm["X_umap"].astype(np.float32)


def cells_for_plot(adata: Any, cells: Any, *, max_cells: int | None = None, seed: int = 0,
                   key: str = "X_scgpt", prediction: Any = None) -> Any:
    """An in-memory AnnData of the chosen cells for a figure: their ``obs``, ``obsm[key]`` and ``uns``, no ``X``.

    ``cells`` is a boolean mask; with more than ``max_cells`` of them a seeded random sample of
    ``max_cells`` is kept (:func:`~scgpt_protocol.data.store.subsample`), so that a UMAP of an atlas costs
    what one of ``max_cells`` cells does. The embedding comes from ``adata.obsm[key]`` or, for a
    prediction made with ``predict(out=...)``, from its store (only these rows are read). Works on
    backed AnnData (whose views cannot be copied).
    """
    import anndata

    from ..data.store import embedding_rows, subsample

    mask = subsample(np.asarray(cells, dtype=bool), max_cells, seed=seed)
    emb = embedding_rows(adata, mask, key=key, stored=None if prediction is None else prediction.embeddings)
    return anndata.AnnData(obs=adata.obs[mask].copy(), obsm={key: emb}, uns=dict(adata.uns))


@renamed_arguments(embedding_key="use_rep")
def joint_embedding(
    reference: AnnData | AtlasIndex,
    query: AnnData,
    *,
    label_key: str,
    use_rep: str = "X_scgpt",
    result: ZeroShotResult | None = None,
    max_cells: int | None = None,
    seed: int = 0,
) -> AnnData:
    """Reference and query cells in one small AnnData, for a joint UMAP.

    Parameters
    ----------
    reference, query
        Both with ``obsm[use_rep]`` (e.g. after :func:`zeroshot_annotate`). A reference index
        (:class:`~scgpt_protocol.annotate.atlas.AtlasIndex`) gives its seeded sample of cells
        (:meth:`~scgpt_protocol.annotate.atlas.AtlasIndex.sample_adata`).
    label_key
        ``obs`` column of the labels; cells without it get NaN in ``label``.
    use_rep
        ``obsm`` key of the embeddings, kept under the same key.
    result
        The :class:`ZeroShotResult` of these two datasets; its majority labels fill ``predicted``
        for the query cells (``"reference"`` for reference cells, drawn grey). Without it the query cells'
        ``predicted`` is NaN. Its
        embeddings are used where a dataset has no ``obsm[use_rep]`` (``zeroshot_annotate`` with
        ``store_dir``: only the chosen rows are read from disk).
    max_cells
        At most this many cells (reference and query together; a seeded random sample,
        :func:`~scgpt_protocol.data.store.subsample`), so that a UMAP of an atlas costs what one of
        ``max_cells`` cells does. None: all cells.
    seed
        Seed of that sample.

    Returns
    -------
    AnnData
        ``n_vars = 0``; ``obs_names`` are the original names plus ``-reference`` / ``-query``;
        ``obs`` has ``dataset`` (``"reference"`` / ``"query"``), ``label``, ``predicted`` and
        ``cell`` (the original name); ``obsm[use_rep]`` stacks the embeddings.

    Examples
    --------
    >>> joint = joint_embedding(ref, query, label_key="cell_type", result=res)  # doctest: +SKIP
    >>> from scgpt_protocol.data import neighbors  # sc.pp.neighbors at any size  # doctest: +SKIP
    >>> neighbors(joint, use_rep="X_scgpt"); sc.tl.umap(joint)  # doctest: +SKIP
    >>> sc.pl.umap(joint, color=["dataset", "label", "predicted"])  # doctest: +SKIP
    """
    import anndata as ad

    from ..annotate.atlas import AtlasIndex
    from ..data.store import embedding_rows, subsample

    if isinstance(reference, AtlasIndex):  # not embedded here: the sample the index keeps
        reference = reference.sample_adata(label_key, key=use_rep)
    n_ref, n_query = reference.n_obs, query.n_obs
    keep = subsample(np.ones(n_ref + n_query, dtype=bool), max_cells, seed=seed)  # one sample of both
    chosen = {"reference": keep[:n_ref], "query": keep[n_ref:]}
    parts = [embedding_rows(adata, chosen[name], key=use_rep, what=name,
                            stored=None if result is None else getattr(result, f"{name}_embedding"))
             for name, adata in (("reference", reference), ("query", query))]
    if parts[0].shape[1] != parts[1].shape[1]:
        msg = (
            f"reference embeddings have {parts[0].shape[1]} dimensions but query embeddings "
            f"{parts[1].shape[1]}; embed both with the same model."
        )
        raise ValueError(msg)

    def labels(adata: AnnData, mask: np.ndarray) -> np.ndarray:
        if label_key in adata.obs.columns:
            return adata.obs[label_key].to_numpy(dtype=object)[mask]
        return np.full(int(mask.sum()), np.nan, dtype=object)

    predicted = np.full(n_query, np.nan, dtype=object)
    if result is not None:
        if len(result.predictions) != n_query:
            msg = (
                f"result has {len(result.predictions)} predictions but the query has {n_query} cells; "
                "pass the result of zeroshot_annotate on this query."
            )
            raise ValueError(msg)
        predicted = result.predictions[PREDICTION_COLUMNS[0]].to_numpy(dtype=object)
    ref_names = np.asarray(reference.obs_names.astype(str))[chosen["reference"]]
    query_names = np.asarray(query.obs_names.astype(str))[chosen["query"]]
    n_r, n_q = len(ref_names), len(query_names)
    names = [*(f"{n}-reference" for n in ref_names), *(f"{n}-query" for n in query_names)]
    query_predicted = np.asarray([v if pd.isna(v) else str(v) for v in predicted[chosen["query"]]], dtype=object)
    called = sorted({v for v in query_predicted if not pd.isna(v)})
    no_prediction = np.full(n_r, REFERENCE, dtype=object)  # drawn grey, named "reference" in legends
    cells = np.concatenate([ref_names, query_names])
    obs = pd.DataFrame(
        {
            "dataset": pd.Categorical(["reference"] * n_r + ["query"] * n_q, categories=["reference", "query"]),
            "label": pd.Categorical(np.concatenate([labels(reference, chosen["reference"]),
                                                    labels(query, chosen["query"])])),
            "predicted": pd.Categorical(np.concatenate([no_prediction, query_predicted]),
                                        categories=list(dict.fromkeys([*called, REFERENCE]))),
            "cell": cells.astype(object),
        },
        index=pd.Index(names),
    )
    joint = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    joint.uns["dataset_colors"] = ["#b8b8b8", "#2b2b2b"]  # reference light, query dark: no cell-type colour
    joint.obsm[use_rep] = np.concatenate(parts).astype(np.float32, copy=False)
    return joint
