"""Cells measured on the cells that trained the model: a 03 query that holds training cells, a 04 reference
that holds query cells. Found by cell name and by file content (sha256); the callers warn and score the
overlapping cells apart (:func:`scored_apart`)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["Overlap", "find_overlap", "same_file", "scored_apart"]


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths name one file or two files of equal content (size, then sha256)."""
    from ..core.io import sha256_file

    if not a or not b or str(a) == "demo" or str(b) == "demo":
        return str(a) == str(b) == "demo"
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_file() and pb.is_file()):
        return False
    if pa.resolve() == pb.resolve():
        return True
    return pa.stat().st_size == pb.stat().st_size and sha256_file(pa) == sha256_file(pb)


@dataclass
class Overlap:
    """Which cells of ``what`` (a query) are also cells of ``against`` (the training cells, a reference)."""

    seen: np.ndarray  # boolean, one per cell of ``what``
    what: str
    against: str
    same_file: bool = False

    @property
    def n_seen(self) -> int:
        return int(self.seen.sum())

    def __bool__(self) -> bool:
        return bool(self.n_seen or self.same_file)

    def message(self) -> str:
        how = " (the same file, by sha256)" if self.same_file else " (by cell name)"
        return (f"{self.n_seen:,} of {self.seen.size:,} cells of {self.what} are also cells of {self.against}"
                f"{how}: their scores measure recall of seen cells, not generalisation. They are scored apart "
                "('seen cells' / 'unseen cells'); give data the model never saw for an honest number.")

    def to_dict(self) -> dict[str, Any]:
        return {"n_cells": self.n_seen, "n_total": int(self.seen.size), "what": self.what, "against": self.against,
                "same_file": bool(self.same_file), "warning": self.message()}

    def warn(self) -> None:
        """The message as a log warning and a ``UserWarning`` (shown in the notebook's report)."""
        logger.warning("%s", self.message())
        warnings.warn(self.message(), UserWarning, stacklevel=3)


def find_overlap(names: Any, other_names: Any, *, what: str, against: str, path: str | Path | None = None,
                 other_path: str | Path | None = None) -> Overlap:
    """The cells of ``names`` that are in ``other_names``, and whether the two came from one file."""
    seen = pd.Index(np.asarray(names, dtype=str)).isin(pd.Index(np.asarray(other_names, dtype=str)))
    return Overlap(seen=np.asarray(seen, dtype=bool), what=what, against=against,
                   same_file=same_file(path, other_path))


def scored_apart(score: Callable[[np.ndarray], dict[str, Any] | None], overlap: Overlap) -> dict[str, Any]:
    """``{"seen cells": score(seen), "unseen cells": score(~seen)}`` for the groups that hold cells."""
    out = {}
    for name, mask in (("seen cells", overlap.seen), ("unseen cells", ~overlap.seen)):
        if mask.any():
            out[name] = score(mask)
    return out
