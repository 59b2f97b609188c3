"""How a report shows a query scored with other label names: the novel types, the "all cells" accuracy, and the
cross-tab of query label against call.

* :func:`novel_frame` / :func:`novel_display` -- for each method and each novel type (a query label the model
  has no class for): its cells, the share called ``Unknown`` (the right answer for a type never seen), and
  what the others were called instead; then the "all cells" accuracy, where a novel cell counts as right only
  when it is ``Unknown``;
* :func:`crosstab_display` -- cells per query label (rows) and call (columns).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from .tables import styled

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

__all__ = ["novel_frame", "novel_display", "all_cells_frame", "crosstab_display"]

#: calls shown per novel type in "called instead"
SHOWN_CALLS = 3


def _called_instead(called: Mapping[str, int], unknown: str) -> str:
    others = [(label, n) for label, n in called.items() if label != unknown]
    shown = ", ".join(f"{label} ({n:,})" for label, n in others[:SHOWN_CALLS])
    more = len(others) - SHOWN_CALLS
    return shown + (f", +{more} more" if more > 0 else "") if shown else "-"


def novel_frame(record: Mapping[str, Any], unknown: str = "Unknown") -> pd.DataFrame:
    """One row per (novel type, method): ``cells``, ``share Unknown``, ``called instead`` (most frequent first).

    ``record``: :func:`~scgpt_protocol.evaluate.novel.novel_record` (a query's ``metrics["novel"]``).
    """
    rows = []
    for method, scored in record["methods"].items():
        for label, entry in scored["novel"].items():
            rows.append({"novel type": label, "method": method, "cells": int(entry["n_cells"]),
                         "share Unknown": float(entry["unknown_rate"]),
                         "called instead": _called_instead(entry["called"], unknown)})
    frame = pd.DataFrame(rows, columns=["novel type", "method", "cells", "share Unknown", "called instead"])
    return frame.set_index(["novel type", "method"])


def all_cells_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method: accuracy over every labelled query cell (a novel cell right only when ``Unknown``),
    and how many cells are of shared and of novel types."""
    rows = {method: {"accuracy, all cells": float(s["all_cells"]["accuracy"]), "cells": int(s["all_cells"]["n_cells"]),
                     "shared-type cells": int(s["all_cells"]["n_shared"]),
                     "novel-type cells": int(s["all_cells"]["n_novel"])}
            for method, s in record["methods"].items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def novel_display(record: Mapping[str, Any] | None, *, caption: str | None = None) -> Any:
    """The novel types of a query and every method's "all cells" accuracy, as two report tables (or a line
    saying there is none)."""
    if not record:
        return "Every labelled query cell is of a type the model has: no novel type."
    from IPython.display import HTML

    novel = styled(novel_frame(record), integer=["cells"], text=["called instead"],
                   caption=caption or f"novel types ({record['n_cells']:,} cells): the right call is 'Unknown'")
    cells = styled(all_cells_frame(record), integer=["cells", "shared-type cells", "novel-type cells"],
                   caption="all cells: a novel-type cell counts as right only when it is 'Unknown'")
    return HTML(novel.to_html() + cells.to_html())


def crosstab_display(table: pd.DataFrame, *, caption: str | None = None) -> Styler:
    """Cells per query label (rows) and call (columns), zeros shown as blanks so that the calls stand out."""
    frame = table.copy()
    styler = styled(frame, integer=list(frame.columns), caption=caption or "query label (rows) x call (columns)")
    return styler.format(lambda v: "" if v == 0 else f"{int(v):,}")
