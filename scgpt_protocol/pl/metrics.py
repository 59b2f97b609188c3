"""Figures of scores: the confusion matrix, per-class F1 of several methods side by side, and the
coverage curve of abstention; each method keeps its colour (:data:`METHOD_COLORS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..data.colors import mark_categories
from ..data.labels import by_count, ordered
from ..metrics import BASELINE, SCGPT, ZEROSHOT
from .figure import new_figure, short_label, two_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


__all__ = ["METHOD_COLORS", "plot_confusion", "plot_per_class_f1", "plot_coverage_curve"]

#: classes up to which :func:`plot_confusion` writes the value into each cell
ANNOTATE_MAX_CLASSES = 15


# -- confusion matrix -----------------------------------------------------------------------
def plot_confusion(confusion_df: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None,
                   order: Sequence[Any] | None = None) -> Figure:
    """Heatmap of a confusion matrix, rows = true labels, columns = predicted labels.

    Parameters
    ----------
    confusion_df
        The result of :func:`~scgpt_protocol.metrics.confusion` (row-normalised: each row sums
        to 1). Rows of labels without true cells (e.g. ``Unknown``, which no cell has as its true label)
        are left out. When it carries ``attrs["support"]`` the number of true cells is added to each row name.
    ax
        Axes to draw into; None: a new figure sized for the number of classes.
    title
        Axes title.
    order
        The class order of rows and columns (e.g. :func:`~scgpt_protocol.data.labels.class_order` of the
        test cells, the order of every figure); labels not in it follow; the ``Unknown`` column is last.

    Returns
    -------
    matplotlib.figure.Figure
        With values written into the cells when there are at most 15 classes.
    """
    import matplotlib as mpl

    if confusion_df.empty:
        msg = "confusion_df is empty; compute it with evaluate.confusion(y_true, y_pred, categories)."
        raise ValueError(msg)
    support = confusion_df.attrs.get("support") or {}
    frame = confusion_df.copy()
    frame.index, frame.columns = frame.index.astype(str), frame.columns.astype(str)
    empty = frame.isna().all(axis=1) | (frame.fillna(0) == 0).all(axis=1)
    empty |= frame.index.map(lambda r: support.get(r, 1) == 0).to_numpy(dtype=bool)
    if empty.all():
        raise ValueError("confusion_df has no row with true cells; there is nothing to draw.")
    frame = frame.loc[~empty]
    frame = frame.loc[ordered(frame.index, order), ordered(frame.columns, order)]
    values = frame.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    normalised = confusion_df.attrs.get("normalize", "true" if np.nanmax(values) <= 1 else None) is not None
    if ax is None:
        fig = new_figure(max(4.5, 0.42 * n_cols + 3.5), max(3.5, 0.42 * n_rows + 2.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = mpl.colormaps["Blues"].with_extremes(bad="0.85")
    vmax = 1.0 if normalised else max(float(np.nanmax(values)), 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal",
                      interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true class" if normalised else "cells")

    row_names = [f"{short_label(r)} (n={support[r]})" if r in support else short_label(r) for r in frame.index]
    ax.set_xticks(np.arange(n_cols), labels=[short_label(c) for c in frame.columns], rotation=45, ha="right",
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
_MORE_METHOD_COLORS = ("#00441b", "#67000d", "#54278f", "#014636")  # dark: no cell-type colour


def _method_colors(methods: Sequence[str]) -> list[str]:
    out, spare = [], iter(_MORE_METHOD_COLORS)
    for method in methods:
        match = next((c for prefix, c in METHOD_COLORS.items() if str(method).startswith(prefix)), None)
        out.append(match if match is not None and match not in out else next(spare, "grey"))
    return out


def plot_per_class_f1(
    metrics_by_method: Mapping[str, Mapping[str, Any]], *, ax: Axes | None = None, few: int = 5,
    order: Sequence[Any] | None = None, palette: Mapping[str, str] | None = None,
) -> Figure:
    """Horizontal grouped bars of the per-class F1 of several methods (e.g. scGPT beside the baseline).

    Parameters
    ----------
    metrics_by_method
        Method name -> metrics dict of :func:`~scgpt_protocol.metrics.classification_metrics`
        (or an object with ``.metrics``). Classes with true cells in any method's test set are
        shown, one row each with its number of test cells; the legend (below the plot) gives each
        method's macro F1. An F1 of 0 is marked so that it is not mistaken for a missing bar; methods
        keep their colour in every figure (:attr:`~scgpt_protocol.metrics.Method.color`).
    ax
        Axes to draw into; None: a new figure.
    few
        Classes with fewer test cells are marked with ``*`` (their F1 rests on a handful of cells).
    order
        The class order, top to bottom (e.g. :func:`~scgpt_protocol.data.labels.class_order`); default:
        largest class first.
    palette
        ``{class: colour}`` (the run's palette): a swatch of the class colour beside each name.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.lines import Line2D

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
    by_size = by_count({c: n for c, n in support.items() if n > 0})
    classes = ordered(by_size, order)
    if not classes:
        raise ValueError("no class has true cells in the metrics given; there is nothing to plot.")
    n_methods = len(per_method)
    own = ax is None
    if own:
        fig = new_figure(7.0, max(2.8, 0.2 * len(classes) * max(n_methods, 2) + 1.8))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    height = 0.8 / n_methods
    y = np.arange(len(classes))
    for i, ((method, f1), color) in enumerate(zip(per_method.items(), _method_colors(list(per_method)))):
        widths = np.array([f1.get(c, np.nan) for c in classes], dtype=np.float64)
        label = method if macro[method] is None else f"{method} (macro F1 {macro[method]:.3f})"
        offset = y + (i - (n_methods - 1) / 2) * height
        ax.barh(offset, widths, height=height, label=label, color=color)
        zero = np.flatnonzero(widths == 0)
        if zero.size:  # a bar of length 0 is invisible: mark it on the axis
            ax.plot(np.full(zero.size, 0.012), offset[zero], linestyle="", marker="<", markersize=5,
                    color=color, markeredgecolor="black", markeredgewidth=0.5, clip_on=False)
    names = [f"{short_label(c)} (n={support[c]}){' *' if support[c] < few else ''}" for c in classes]
    ax.set_yticks(y, labels=names)
    ax.set_ylim(len(classes) - 0.5, -0.5)  # the first class on top
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("F1 on the test cells")
    ax.set_title("per-class F1 on the test cells")
    if palette:
        mark_categories(ax, [palette.get(c) for c in classes])
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="", marker="<", color="0.5", markeredgecolor="black",
                          markeredgewidth=0.5, markersize=5))
    labels.append("F1 = 0")
    if any(support[c] < few for c in classes):
        handles.append(Line2D([], [], linestyle=""))
        labels.append(f"* fewer than {few} test cells")
    if own:
        fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=9, ncol=2)
    else:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return fig


#: the three quantities of the right panel of :func:`plot_coverage_curve`: (column, legend, colour, linestyle)
COVERAGE_LINES = (
    ("coverage", "coverage (share of cells assigned)", "#6a3d9a", ":"),
    ("accuracy_assigned", "accuracy of the assigned cells", "#1f5fa8", "-"),
    ("accuracy_all", "accuracy of all cells (Unknown = wrong)", "#c2410c", "--"),
)


def label_points(ax: Axes, points: Sequence[tuple[float, float, str]], color: str, *, min_gap: float = 0.06,
                 taken: list[tuple[float, float]] | None = None) -> list[tuple[float, float]]:
    """Write ``text`` beside each ``(x, y, text)`` point, leaving out points closer than ``min_gap`` (a share of
    the axes) to one already labelled, so that no two labels overprint. Returns the labelled positions."""
    taken = [] if taken is None else taken
    to_axes = ax.transLimits  # data -> axes fraction, for the limits set before the call
    for x, y, text in points:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ax_x, ax_y = to_axes.transform((x, y))
        if any(abs(ax_x - a) < min_gap * 1.6 and abs(ax_y - b) < min_gap for a, b in taken):
            continue
        ax.annotate(text, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points", color=color)
        taken.append((ax_x, ax_y))
    return taken


def plot_coverage_curve(
    curves: Any, *, min_confidence: float | None = None, ax: Sequence[Axes] | None = None,
    title: str | None = None,
) -> Figure:
    """Coverage against accuracy of abstention over ``min_confidence`` thresholds, to pick one.

    Left: accuracy of the assigned cells against coverage (share of cells assigned), one point per
    threshold (thresholds written beside the points where they do not overprint). Right: coverage, accuracy of
    the assigned cells and accuracy on all cells (``Unknown`` counted as an error) against the threshold, each
    in its own colour and line style.

    Parameters
    ----------
    curves
        :func:`~scgpt_protocol.metrics.coverage_curve` (a DataFrame or its list of rows), or a
        mapping name -> curve to draw several (e.g. the fine-tuned model and the zero-shot vote): then
        each curve has its method's colour and the quantities differ by line style.
    min_confidence
        The threshold in use, marked on both panels.
    ax
        Two axes to draw into; None: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.lines import Line2D

    named = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    frames = {name: pd.DataFrame(c) for name, c in named.items()}
    need = {"threshold", "coverage", "accuracy_assigned", "accuracy_all"}
    for name, frame in frames.items():
        if not need <= set(frame.columns) or frame.empty:
            msg = (f"curve {name!r} needs rows with {sorted(need)}; found columns {list(frame.columns)}. Pass "
                   "refine.coverage_curve(...) or metrics['refinement']['curve'].")
            raise ValueError(msg)
    fig, axes = two_axes(ax, 3.9, "coverage, accuracy")
    left, right = axes
    left.set_xlim(-0.02, 1.08)
    left.set_ylim(0, 1.08)
    several = len(frames) > 1
    curve_colors = _method_colors(list(frames)) if several else [COVERAGE_LINES[1][2]]
    taken: list[tuple[float, float]] = []
    for (name, frame), color in zip(frames.items(), curve_colors):
        left.plot(frame["coverage"], frame["accuracy_assigned"], marker="o", markersize=3, color=color,
                  label=name or None)
        rounded = frame["threshold"].round(2)
        steps = frame[np.isclose(rounded * 10, np.round(rounded * 10))]  # label the thresholds 0.1, 0.2, ...
        label_points(left, [(float(r.coverage), float(r.accuracy_assigned), f"{r.threshold:g}")
                            for r in steps.itertuples()], color, taken=taken)
        for column, _, line_color, style in COVERAGE_LINES:
            right.plot(frame["threshold"], frame[column], color=color if several else line_color, linestyle=style,
                       linewidth=1.6)
    if min_confidence:
        right.axvline(min_confidence, color="0.4", linewidth=1)
        for name, frame in frames.items():
            row = frame.iloc[int(np.argmin(np.abs(frame["threshold"].to_numpy() - min_confidence)))]
            left.plot([row["coverage"]], [row["accuracy_assigned"]], marker="s", color="0.2", markersize=7,
                      fillstyle="none")
        right.annotate(f"min_confidence {min_confidence:g}", xy=(min_confidence, 1.0),
                       xycoords=("data", "axes fraction"), xytext=(0, 3), textcoords="offset points",
                       fontsize=8, color="0.3", ha="center", va="bottom")
    left.set_xlabel("coverage (share of cells assigned)")
    left.set_ylabel("accuracy of the assigned cells")
    left.set_title("coverage vs accuracy (labels: threshold)", pad=14)
    if several:
        left.legend(frameon=False, fontsize=9, loc="lower left")
    right.set_xlabel("min_confidence (threshold)")
    right.set_ylabel("share of cells / accuracy")
    right.set_ylim(0, 1.02)
    right.set_title("by threshold", pad=14)
    handles = [Line2D([], [], color="0.2" if several else c, linestyle=st) for _, _, c, st in COVERAGE_LINES]
    right.legend(handles, [text for _, text, _, _ in COVERAGE_LINES], frameon=False, fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return fig
