"""One colour per class for a whole run: palettes stored once in ``adata.uns[f"{label_key}_colors"]`` and
``labels.json``, reused by every figure and notebook (:func:`label_palette`, :func:`run_palette`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from .labels import UNKNOWN, UNKNOWN_COLOR

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

    from ..core.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = ["label_palette", "run_palette", "mark_categories", "REFERENCE", "REFERENCE_COLOR", "fixed_color"]

#: colour of cells without a value: the grey of "no call" (:data:`~scgpt_protocol.data.labels.UNKNOWN_COLOR`)
NA_COLOR = UNKNOWN_COLOR
#: the name of reference cells in a panel of query predictions (04's joint UMAP), and their light grey
REFERENCE, REFERENCE_COLOR = "reference", "#d4d4d4"
#: categories that never take a class colour: "no call" and the reference background
FIXED_COLORS = {UNKNOWN: UNKNOWN_COLOR, REFERENCE: REFERENCE_COLOR}


def fixed_color(category: Any) -> str | None:
    """The fixed grey of :data:`~scgpt_protocol.data.labels.UNKNOWN` (and of :data:`REFERENCE`), else None."""
    return FIXED_COLORS.get(str(category))


def is_grey(color: str, tolerance: float = 0.06) -> bool:
    """Whether ``color`` is a (nearly) achromatic grey, neither near black nor near white: such colours are kept
    for "no call" (:data:`~scgpt_protocol.data.labels.UNKNOWN_COLOR`), never given to a class."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(color)
    return max(rgb) - min(rgb) <= tolerance and 0.25 <= sum(rgb) / 3 <= 0.95


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
        categorical ``obs[label_key]``: those colours are kept, matched by category name, except greys.

    Returns
    -------
    dict
        ``{category: colour}``; categories without a stored colour get scanpy's default palette
        (in order, skipping colours already taken, and greys). :data:`~scgpt_protocol.data.labels.UNKNOWN`
        is always there, last, in :data:`~scgpt_protocol.data.labels.UNKNOWN_COLOR`: no class has its grey.
    """
    names = [str(c) for c in categories]
    known = _stored_colors(adata, label_key) if adata is not None and label_key else {}
    out = {c: known[c] for c in names if c in known and c != UNKNOWN and not is_grey(known[c])}  # greys: no call
    taken = {c.lower() for c in out.values()}
    spare = iter(c for c in spare_colors(len(names)) if c.lower() not in taken)
    for c in names:
        if c not in out and c != UNKNOWN:
            out[c] = next(spare, "#000000")
    ordered = {c: out[c] for c in names if c != UNKNOWN}  # in the categories' order, whichever got a new colour
    ordered[UNKNOWN] = UNKNOWN_COLOR
    return ordered


def spare_colors(n: int) -> list[str]:
    """scanpy's default palette for ``n`` categories, then the 102 colours of its largest one."""
    from scanpy.plotting import palettes

    seen: dict[str, None] = dict.fromkeys(_default_palette(n) + list(palettes.default_102))
    return [c for c in seen if not is_grey(c)]  # greys mean "no call"


def run_palette(layout: RunLayout) -> dict[str, str]:
    """The run's ``{class: colour}``, written by 01 into ``data/labels.json`` (every step's figures use it).

    Runs prepared before colours were stored get :func:`label_palette` of their categories; ``Unknown``
    is always grey (:data:`~scgpt_protocol.data.labels.UNKNOWN_COLOR`), also in runs written before it was.
    """
    labels = layout.read_json(layout.labels, step="01_preprocess")
    colors = labels.get("colors")
    return {**colors, UNKNOWN: UNKNOWN_COLOR} if colors else label_palette(labels["categories"])


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


def category_colors(adata: AnnData, key: str, categories: Sequence[Any], store: bool) -> list[str]:
    """Colours of ``categories``: ``uns[key + "_colors"]`` when valid, else a default palette (stored)."""
    from matplotlib.colors import is_color_like

    uns_key = f"{key}_colors"
    stored = adata.uns.get(uns_key)
    if stored is not None:
        stored = list(np.asarray(stored).tolist())
        if len(stored) >= len(categories) and all(is_color_like(c) for c in stored[: len(categories)]):
            return [fixed_color(c) or str(s) for c, s in zip(categories, stored)]
        logger.info("adata.uns[%r] has %d colours for %d categories; using the default palette",
                    uns_key, len(stored), len(categories))
    spare = iter(c for c in spare_colors(len(categories)))
    colors = [fixed_color(c) or next(spare, "#000000") for c in categories]
    if store:
        adata.uns[uns_key] = list(colors)
    return colors
