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


def plot_reliability(tables: Mapping[str, pd.DataFrame], *, title: str | None = None,
                     ax: Axes | None = None) -> Figure:
    """Reliability diagram: the accuracy of the cells in each confidence bin against their mean confidence.

    A calibrated model lies on the diagonal; below it, over-confident. One line per curve (e.g.
    ``"scGPT before"``, ``"scGPT after"``, ``"baseline"``), a point per non-empty bin, the expected
    calibration error of each in the legend.

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
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for i, (name, table) in enumerate(tables.items()):
        filled = table[table["n"] > 0]
        ax.plot(filled["mean_confidence"].to_numpy(dtype=float), filled["accuracy"].to_numpy(dtype=float),
                marker="o", markersize=4, color=f"C{i}", label=f"{name} (ECE {table_ece(table):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("confidence (mean probability of the predicted class, per bin)")
    ax.set_ylabel("accuracy (share of the bin's cells called right)")
    ax.set_title(title or "Reliability diagram")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    return fig
