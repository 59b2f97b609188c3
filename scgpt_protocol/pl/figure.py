"""Figures of the protocol: one style, and saving (PNG for reports, PDF for print; atomic).

Every ``plot_*`` function draws with matplotlib's object API and returns the
:class:`~matplotlib.figure.Figure`; none calls ``plt.show()`` or saves. Without ``ax`` a new
figure is made that pyplot does not track (so Jupyter shows it once, as the cell's value, and
tests can make many without the "too many open figures" warning); with ``ax`` the plot goes into
the caller's axes and their figure is returned. :func:`save_figure` writes a figure to the run's
``figures/`` folder.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..core.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = ["SavedFigure", "set_style", "save_figure", "short_label", "LABEL_WIDTH"]

#: the most characters of a class name a figure shows (tick labels, legends); tables keep the full name
LABEL_WIDTH = 40


def short_label(text: object, width: int = LABEL_WIDTH) -> str:
    """``text`` cut to ``width`` characters with an ellipsis, for figures: a 660-character class name would
    make a figure thousands of pixels wide. Tables and files keep the full name."""
    text = str(text)
    return text if len(text) <= width else text[: width - 1].rstrip() + "\u2026"


def missing_glyphs(fig: Figure) -> tuple[str, str]:
    """``(characters, font)``: the characters of the figure's texts that its font cannot draw (CJK, emoji with
    matplotlib's default DejaVu Sans); ``("", font)`` when every character has a glyph."""
    from matplotlib.font_manager import findfont, get_font
    from matplotlib.text import Text

    missing: dict[str, None] = {}
    font_name = ""
    charmaps: dict[str, set[int]] = {}
    for text in fig.findobj(Text):
        content = text.get_text()
        if not content or content.isascii():
            continue
        path = findfont(text.get_fontproperties())
        if path not in charmaps:
            font = get_font(path)
            charmaps[path] = set(font.get_charmap())
            font_name = font.family_name
        for char in content:
            if not char.isspace() and ord(char) not in charmaps[path]:
                missing[char] = None
    return "".join(missing), font_name


def _note_missing_glyphs(fig: Figure) -> None:
    """A note on the figure (and in the log) when label characters would draw as boxes."""
    chars, font = missing_glyphs(fig)
    if not chars:
        return
    shown = ", ".join(f"U+{ord(c):04X}" for c in chars[:6]) + (", ..." if len(chars) > 6 else "")
    note = (f"Some characters of the labels ({shown}) have no glyph in the font {font} and show as boxes; "
            "the tables hold the full names.")
    logger.warning("%s Install a font with them (e.g. Noto Sans CJK) for figures that show them.", note)
    fig.text(0.0, 0.0, note, fontsize=7, color="0.35", ha="left", va="top", wrap=True)


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


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def two_axes(ax: Any, height: float, what: str) -> tuple[Figure, list[Axes]]:
    """A new figure with two panels side by side, or the caller's two axes (``what`` names them)."""
    if ax is None:
        fig = new_figure(9.5, height)
        return fig, list(fig.subplots(1, 2))
    axes = list(np.ravel(ax))
    if len(axes) != 2:
        raise ValueError(f"ax must be two axes ({what}); got {len(axes)}.")
    return axes[0].figure, axes


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
        The run's :class:`~scgpt_protocol.core.layout.RunLayout`; ``figures/`` is created.
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
    with warnings.catch_warnings():  # noted on the figure itself (_note_missing_glyphs)
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig.draw_without_rendering()  # makes the tick labels, to check their characters
        _note_missing_glyphs(fig)
        for path, fmt in targets:
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(
                tmp, format=fmt, dpi=SCREEN_DPI if fmt == "png" else PRINT_DPI, bbox_inches="tight"))
    try:
        shown = png.resolve().relative_to(Path(layout.run_dir).resolve())
    except ValueError:
        shown = png
    logger.info("saved %s%s", shown, " (+ .pdf for print)" if pdf else "")
    return SavedFigure(png)
