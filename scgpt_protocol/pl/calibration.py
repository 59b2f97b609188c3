"""The reliability diagram: accuracy against confidence, one curve per model (before and after calibration)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

from ..annotate.calibration import table_ece
from .figure import new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_reliability"]

_COLUMNS = ("n", "mean_confidence", "accuracy")
#: the last word of a curve's name that marks it as raw (dashed, hollow markers) or calibrated (solid)
_RAW, _CALIBRATED = ("raw", "before"), ("calibrated", "after")


def plot_reliability(tables: Mapping[str, pd.DataFrame], *, title: str | None = None,
                     ax: Axes | None = None) -> Figure:
    """Reliability diagram: the accuracy of the cells in each confidence bin against their mean confidence.

    A calibrated model lies on the diagonal; below it, over-confident. One line per curve (e.g.
    ``"scGPT raw"``, ``"scGPT calibrated"``, ``"baseline"``), a point per non-empty bin (its area: the bin's
    cells), the expected calibration error of each in the legend. Curves named ``"<method> raw"`` / ``"... before"``
    are dashed, ``"<method> calibrated"`` / ``"... after"`` solid, in one colour per method.

    Parameters
    ----------
    tables
        Curve name -> :func:`~scgpt_protocol.annotate.calibration.reliability_table` (columns ``n``,
        ``mean_confidence``, ``accuracy``).
    title
        The axes' title (default: "Reliability diagram").
    ax
        Axes to draw into; None: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not tables:
        raise ValueError("tables is empty; give at least one curve: {'scGPT before': reliability_table(...)}.")
    for name, table in tables.items():
        if not isinstance(table, pd.DataFrame) or not set(_COLUMNS) <= set(table.columns):
            found = list(table.columns) if isinstance(table, pd.DataFrame) else type(table).__name__
            msg = (f"curve {name!r}: expected a reliability_table DataFrame with columns {list(_COLUMNS)}; "
                   f"found {found}.")
            raise ValueError(msg)
    if ax is None:
        fig = new_figure(4.6, 4.2)
        ax = fig.subplots()
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfectly calibrated")
    colours: dict[str, str] = {}
    total = max(int(t["n"].sum()) for t in tables.values())
    for name, table in tables.items():
        method, _, when = name.rpartition(" ")
        if when not in _RAW + _CALIBRATED:
            method, when = name, ""
        colour = colours.setdefault(method, f"C{len(colours)}")
        raw = when in _RAW
        filled = table[table["n"] > 0]
        x, y = filled["mean_confidence"].to_numpy(dtype=float), filled["accuracy"].to_numpy(dtype=float)
        ax.plot(x, y, color=colour, linestyle="--" if raw else "-", linewidth=1.2, alpha=0.8,
                label=f"{name} (ECE {table_ece(table):.3f})")
        sizes = 12 + 180 * filled["n"].to_numpy(dtype=float) / max(total, 1)  # marker area: the bin's cells
        ax.scatter(x, y, s=sizes, facecolors="none" if raw else colour, edgecolors=colour, linewidths=1, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("confidence (mean probability of the predicted class, per bin)")
    ax.set_ylabel("accuracy (share of the bin's cells called right)")
    ax.set_title(title or "Reliability diagram")
    legend = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False, fontsize=8,
                       title="dashed: raw softmax; solid: calibrated; marker area: cells in the bin", title_fontsize=7)
    legend.get_title().set_color("0.35")
    return fig
