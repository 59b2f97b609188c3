"""The training curves of step 02: losses and validation metrics per epoch, the best epoch marked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from .figure import two_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


__all__ = ["plot_training_curves"]


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
    fig, axes = two_axes(ax, 3.6, "losses, metrics")
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
            panel.legend(frameon=False, fontsize=9)
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
            low, high = float(np.min(epochs)), float(np.max(epochs))
            right_half = high > low and (best_epoch - low) / (high - low) > 0.5
            axes[1].annotate(  # written on the side of the line that lies inside the axes
                f"best epoch {best_epoch}", xy=(best_epoch, 0.03), xycoords=("data", "axes fraction"),
                xytext=(-4 if right_half else 4, 0), textcoords="offset points", fontsize=8, color="0.3",
                ha="right" if right_half else "left", annotation_clip=True,
            )
    if len(epochs) and np.allclose(epochs, np.round(epochs)):
        from matplotlib.ticker import MaxNLocator

        for panel in axes:
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
