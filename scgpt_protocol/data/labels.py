"""Labels and splits: the one missing-label rule of every step, the split names, the subset of a split,
and the cell masks that select cells by name or position."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.errors import format_keys, shown

if TYPE_CHECKING:
    from anndata import AnnData

#: the label of a cell whose confidence is below ``min_confidence`` (abstention: "no call")
UNKNOWN = "Unknown"
#: the one neutral grey of "no call" in every figure: :data:`UNKNOWN` cells and cells without a label
UNKNOWN_COLOR = "#9e9e9e"

__all__ = ["SPLITS", "UNKNOWN", "UNKNOWN_COLOR", "by_count", "class_order", "clean_labels", "shared_types",
           "trimmed_labels", "case_only_groups", "describe_case_groups", "check_label_column", "case_matches"]


def cell_mask(adata: AnnData, cells: Any) -> np.ndarray:
    """``cells`` (None, a boolean mask, integer positions or obs names) as a boolean mask."""
    n = adata.n_obs
    if cells is None:
        return np.ones(n, dtype=bool)
    values = cells.to_numpy() if isinstance(cells, (pd.Series, pd.Index)) else np.asarray(cells)
    if values.dtype == bool:
        if values.shape != (n,):
            msg = (
                f"cells is a boolean mask of shape {values.shape}; expected ({n},), "
                "one value per cell of adata."
            )
            raise ValueError(msg)
        return values
    mask = np.zeros(n, dtype=bool)
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < -n or values.max() >= n):
            msg = f"cells holds positions outside 0..{n - 1}; adata has {n} cells."
            raise IndexError(msg)
        mask[values] = True
        return mask
    names = pd.Index(values.astype(str))
    missing = names.difference(adata.obs_names)
    if len(missing):
        msg = f"{len(missing)} of the cells are not in adata.obs_names, e.g. {list(missing[:3])}."
        raise KeyError(msg)
    return adata.obs_names.isin(names)
#: the values of ``obs["split"]``, in this order
SPLITS = ("train", "val", "test")


def by_count(counts: Mapping[Any, Any]) -> list[Any]:
    """The keys of ``counts`` (class -> cells: a dict or a Series such as ``value_counts()``) largest first,
    ties by name: the one class order rule (:func:`class_order` adds categories without cells and
    :data:`UNKNOWN` last)."""
    items = counts.items()
    return [k for k, _ in sorted(items, key=lambda kv: (-int(kv[1]), str(kv[0])))]


def class_order(labels: Any, categories: Sequence[Any] | None = None) -> list[str]:
    """One class order for every figure and table: by number of cells in ``labels`` (e.g. the true labels
    of the test cells), largest first, ties by name; then the ``categories`` without such cells (in their
    order); :data:`UNKNOWN` last. Missing labels (:func:`missing_labels`) are not counted.
    """
    values = pd.Series(labels.to_numpy() if isinstance(labels, (pd.Series, pd.Index)) else
                       np.asarray(list(labels), dtype=object), dtype=object)
    counts = values[~missing_labels(values)].astype(str).value_counts()
    order = [str(c) for c in by_count(counts)]
    order += [str(c) for c in categories or () if str(c) not in set(order)]
    return [c for c in order if c != UNKNOWN] + ([UNKNOWN] if UNKNOWN in order else [])


def ordered(names: Sequence[Any], order: Sequence[Any] | None, *, unknown_last: bool = True) -> list[str]:
    """``names`` as text in ``order`` (those of ``order`` first, the others after in their own order);
    :data:`UNKNOWN` last when ``unknown_last``."""
    names = [str(n) for n in names]
    rank = {str(c): i for i, c in enumerate(order or ())}
    out = sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))
    if unknown_last and UNKNOWN in out:
        out = [n for n in out if n != UNKNOWN] + [UNKNOWN]
    return out


# -- inspection -----------------------------------------------------------------------------
#: label strings that mean "no label" (a column written from pandas with NaN turned to text, empty cells)
MISSING_LABEL_STRINGS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})


def missing_labels(labels: Any) -> np.ndarray:
    """Cells without a label (a boolean mask, by position): NaN / None / ``pd.NA``, and the strings of
    :data:`MISSING_LABEL_STRINGS` (``'nan'``, ``''``, ``'None'``, ``'NA'`` ... in any case, spaces around).

    The one rule of every step (01 drops such cells, 03 does not score them, 04 neither lets them vote nor
    scores them). Such strings come from a column converted to text with its missing values; kept as they
    are they would become a class named ``'nan'``. ``labels``: a Series (any dtype, categorical too), an
    Index, an array or a sequence.
    """
    values = labels.to_numpy(dtype=object) if isinstance(labels, (pd.Series, pd.Index)) else (
        np.asarray(labels if isinstance(labels, np.ndarray) else list(labels), dtype=object))
    if values.ndim != 1:
        msg = f"labels must be one-dimensional; got shape {values.shape}."
        raise ValueError(msg)
    missing = np.asarray(pd.isna(values), dtype=bool)
    text = pd.Series(values[~missing], dtype=object).astype(str).str.strip().str.lower()
    missing[np.flatnonzero(~missing)[text.isin(MISSING_LABEL_STRINGS).to_numpy()]] = True
    return missing


def require_obs_key(adata: AnnData, key: str, name: str) -> None:
    if key not in adata.obs.columns:
        msg = (
            f"{name} {shown(key)} not in adata.obs; available: {format_keys(adata.obs.columns)}. "
            f"Set {name} in the parameters cell or YAML."
        )
        raise KeyError(msg)


def clean_labels(labels: Any) -> np.ndarray:
    """Labels as text without surrounding spaces (``'T cell '`` and ``'T cell'`` are one class): the one
    way every step compares labels. Missing labels (:func:`missing_labels`) are left to the caller."""
    values = labels.to_numpy(dtype=object) if isinstance(labels, (pd.Series, pd.Index)) else (
        np.asarray(labels if isinstance(labels, np.ndarray) else list(labels), dtype=object))
    return np.array([str(v).strip() for v in values], dtype=object)


def shared_types(labels: Any, classes: Sequence[Any]) -> np.ndarray:
    """Cells of a **shared type** (a boolean mask): a label (not :func:`missing_labels`) that, trimmed, is one of
    ``classes`` (the model's classes, or the reference's labels in 04). Labelled cells outside it are of a
    **novel type**: the one rule 03 and 04 score novel types apart by."""
    return ~missing_labels(labels) & np.isin(clean_labels(labels), clean_labels(classes))


def trimmed_labels(labels: Any) -> list[str]:
    """The distinct labels that have spaces around them (``repr`` shows them in a message)."""
    values = pd.unique(pd.Series(labels, dtype=object).astype(str))
    return [v for v in values if v != v.strip()]


def case_only_groups(labels: Any) -> list[list[str]]:
    """Groups of distinct labels that differ only by upper / lower case (``['T cell', 't cell']``)."""
    distinct = sorted({str(v) for v in labels})
    groups: dict[str, list[str]] = {}
    for label in distinct:
        groups.setdefault(label.casefold(), []).append(label)
    return [g for g in groups.values() if len(g) > 1]


def describe_case_groups(groups: list[list[str]], limit: int = 5) -> str:
    """``'T cell' / 't cell'; 'B' / 'b'`` for a message (the first ``limit`` groups)."""
    shown = "; ".join(" / ".join(repr(v) for v in g) for g in groups[:limit])
    return shown + (f"; and {len(groups) - limit} more" if len(groups) > limit else "")


def check_label_column(obs: pd.DataFrame, key: str, *, name: str = "label_key") -> None:
    """Refuse a label column of measurements (floats, or integers nearly all distinct) with a short message
    that names the columns that could hold cell types.

    Raises
    ------
    InputDataError
        ``obs[key]`` is numeric and looks continuous.
    """
    from ..core.errors import InputDataError

    column = obs[key]
    if isinstance(column.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(column.dtype) \
            or pd.api.types.is_bool_dtype(column.dtype):
        return
    values = pd.to_numeric(column, errors="coerce").dropna().to_numpy()
    if values.size == 0:
        return
    n_distinct = len(np.unique(values))
    fractional = bool(np.any(values != np.round(values)))
    if not fractional and n_distinct <= max(100, values.size // 2):
        return  # integer codes such as cluster numbers are labels
    examples = ", ".join(f"{v:g}" for v in np.unique(values)[:3])
    candidates = [str(c) for c in obs.columns if c != key and not pd.api.types.is_numeric_dtype(obs[c].dtype)
                  and 2 <= obs[c].nunique() <= 200]
    msg = (
        f"{name} {key!r}: obs[{key!r}] holds numbers ({column.dtype}, {n_distinct:,} distinct values, e.g. "
        f"{examples}), a measurement rather than cell-type labels. Set {name} to the column with the cell "
        f"types; columns of text with a few distinct values: {format_keys(candidates)}."
    )
    raise InputDataError(msg)


def case_matches(labels: Any, categories: Any) -> dict[str, str]:
    """Labels absent from ``categories`` that match one of them when case is ignored: ``{'t cell': 'T cell'}``."""
    known = {str(c) for c in categories}
    folded = {c.casefold(): c for c in known}
    return {str(v): folded[str(v).casefold()] for v in pd.unique(pd.Series(labels, dtype=object).astype(str))
            if str(v) not in known and str(v).casefold() in folded}
