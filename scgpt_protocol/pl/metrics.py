"""Figures of scores: the confusion matrix, per-class F1 of several methods side by side, and the
coverage curve of abstention; each method keeps its colour (:data:`METHOD_COLORS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..metrics import BASELINE, SCGPT, ZEROSHOT
from .figure import new_figure, short_label, two_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


__all__ = ["METHOD_COLORS", "plot_confusion", "plot_per_class_f1", "plot_coverage_curve"]

#: classes up to which :func:`plot_confusion` writes the value into each cell
ANNOTATE_MAX_CLASSES = 15


# -- confusion matrix -----------------------------------------------------------------------
def plot_confusion(confusion_df: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Heatmap of a confusion matrix, rows = true labels, columns = predicted labels.

    Parameters
    ----------
    confusion_df
        The result of :func:`~scgpt_protocol.metrics.confusion` (row-normalised: each row sums
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
        fig = new_figure(side + 1.0, side)
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
    row_names = [f"{short_label(r)} (n={support[r]})" if r in support else short_label(r) for r in confusion_df.index]
    ax.set_xticks(np.arange(n_cols), labels=[short_label(c) for c in confusion_df.columns], rotation=45, ha="right",
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


# -- metrics --------------------------------------------------------------------------------
#: one colour per method in every figure (by the start of the method's name), others in order
#: method name prefix -> colour (:data:`~scgpt_protocol.metrics.METHODS`; names such as
#: "scGPT fine-tuned: lora" or "baseline: ..." take the colour of their method)
METHOD_COLORS: dict[str, str] = {
    SCGPT.short: SCGPT.color,
    "logistic regression": BASELINE.color,
    BASELINE.short: BASELINE.color,
    ZEROSHOT.short: ZEROSHOT.color,
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
        Method name -> metrics dict of :func:`~scgpt_protocol.metrics.classification_metrics`
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
        fig = new_figure(max(6.0, 0.32 * len(classes) * max(n_methods, 2) + 4.5), 4.4)
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
    names = [f"{short_label(c)} (n={support[c]}){' *' if support[c] < few else ''}" for c in classes]
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
        :func:`~scgpt_protocol.metrics.coverage_curve` (a DataFrame or its list of rows), or a
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
    fig, axes = two_axes(ax, 3.8, "coverage, accuracy")
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
