"""Per-cell value binning, as the official scGPT preprocessing does it.

scGPT turns each cell's expression values into bin numbers before they enter the model. For one
cell, with ``nz`` its non-zero values:

1. ``edges = np.quantile(nz, np.linspace(0, 1, n_bins - 1))`` (``n_bins = 51`` gives 50 edges).
2. For every non-zero value ``x``: ``left`` = number of edges ``<= x`` and ``right`` = number of edges
   ``< x`` (``np.digitize(x, edges)`` and ``np.digitize(x, edges, right=True)``).
3. One uniform draw ``u`` in ``[0, 1)`` per non-zero value; the bin is
   ``ceil(u * (right - left) + left)``.

A value between two edges, or equal to exactly one edge, gets the deterministic bin ``left``. A value
equal to ``k >= 2`` edges (ties, common with integer counts) gets a bin drawn uniformly from
``right + 1 .. left``. Zeros stay 0; bins of non-zero values lie in ``1 .. n_bins - 1``.

Random numbers
--------------
Exactly one uniform is drawn per non-zero value, in the order of the values, with
``Generator.random``. Zeros (stored or not) consume no draw. Consequently, with one shared
:class:`numpy.random.Generator`:

* ``bin_values(X, rng=g)`` on a 2-D array equals binning its rows one after the other,
  ``bin_values(X[i], rng=g)`` for ``i = 0, 1, ...``;
* ``bin_values(row, rng=g)`` equals ``bin_nonzero(row[row != 0], rng=g)`` scattered back into the
  non-zero positions, so binning the ``data`` of each CSR row gives the same bins as binning the dense
  rows.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Union

import numpy as np

from ..core.errors import InputDataError

__all__ = ["bin_values", "bin_nonzero"]

RngLike = Union[np.random.Generator, int, np.integer, None]

#: how many offending positions an error message lists
_MAX_POSITIONS_SHOWN = 5

_EXPECTATION = (
    "scGPT value binning expects non-negative expression values: raw counts or "
    "log1p-normalised counts."
)


def _as_generator(rng: RngLike) -> np.random.Generator:
    """Return ``rng`` itself if it is a Generator, else a fresh Generator seeded with it."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(
        f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}."
    )


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}.")
    if n_bins < 3:
        raise ValueError(
            f"n_bins must be at least 3 (bin 0 for zeros and at least 2 bins for non-zero "
            f"values), got {n_bins}. scGPT checkpoints use n_bins=51 (see args.json)."
        )
    return int(n_bins)


def _as_float_array(values: object) -> np.ndarray:
    """Return ``values`` as a floating ndarray, keeping float32/float64 as they are."""
    if hasattr(values, "tocsr") or hasattr(values, "toarray"):
        raise InputDataError(
            "bin_values got a sparse matrix; it takes a dense 1-D or 2-D array. For CSR data, "
            "call bin_nonzero(X.data[X.indptr[i]:X.indptr[i + 1]]) on each row i (the fast "
            "path), or pass X.toarray()."
        )
    arr = np.asarray(values)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise InputDataError(
            f"Expression values must be numeric, got an array of dtype {arr.dtype}."
        )
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputDataError("Expression values must be real numbers, got complex values.")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _format_positions(mask: np.ndarray) -> str:
    idx = np.argwhere(mask)[:_MAX_POSITIONS_SHOWN]
    if mask.ndim == 1:
        shown = [str(int(i[0])) for i in idx]
    else:
        shown = ["(" + ", ".join(str(int(j)) for j in i) + ")" for i in idx]
    more = ", ..." if int(mask.sum()) > _MAX_POSITIONS_SHOWN else ""
    return "[" + ", ".join(shown) + more + "]"


def _validate(arr: np.ndarray, what: str) -> None:
    """Raise :class:`InputDataError` if ``arr`` holds NaN, infinite or negative values."""
    if arr.size == 0:
        return
    # fast path: one reduction for the usual, clean case (NaN makes min() NaN, so it fails too)
    lo = arr.min()
    hi = arr.max()
    if lo >= 0 and np.isfinite(hi):
        return
    problems = []
    nan = np.isnan(arr)
    if nan.any():
        problems.append(
            f"{int(nan.sum())} NaN value(s) at position(s) {_format_positions(nan)}"
        )
    inf = np.isinf(arr)
    if inf.any():
        problems.append(
            f"{int(inf.sum())} infinite value(s) at position(s) {_format_positions(inf)}"
        )
    neg = arr < 0
    if neg.any():
        problems.append(
            f"{int(neg.sum())} negative value(s) at position(s) {_format_positions(neg)} "
            f"(smallest {float(arr[neg].min()):g})"
        )
    raise InputDataError(
        f"Cannot bin {what}: found " + "; ".join(problems) + ". " + _EXPECTATION + " "
        "Negative or NaN values usually mean the data were scaled or z-scored (e.g. "
        "sc.pp.scale) or come from a broken file; use the raw counts (adata.raw or "
        "adata.layers['counts']), optionally normalised with sc.pp.normalize_total and "
        "sc.pp.log1p, and drop or impute NaN entries before binning."
    )


@lru_cache(maxsize=16)
def _quantile_levels(n_bins: int) -> np.ndarray:
    """``np.linspace(0, 1, n_bins - 1)``, computed once per ``n_bins`` (read-only)."""
    levels = np.linspace(0, 1, n_bins - 1)
    levels.flags.writeable = False
    return levels


def _bin_positive(nz: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin strictly positive, validated values (the core; no checks). Returns float32.

    Equivalent to ``np.digitize`` of each value against the quantile edges, but computed from
    one sort of the values: the ``n_bins - 1`` edges are located in the sorted values (a few
    dozen binary searches) instead of every value being searched among the edges, which is
    2-3x faster for thousands of values. Comparisons are the same (``<=`` and ``<`` after the
    usual dtype promotion), so the bins are identical.
    """
    n = nz.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    order = np.argsort(nz)
    srt = nz[order]
    edges = np.quantile(srt, _quantile_levels(n_bins))
    # np.quantile is monotone in exact arithmetic; guard the binary searches against rounding
    edges = np.maximum.accumulate(edges)
    # position j of the sorted values has left = #{edges <= srt[j]} and right = #{edges < srt[j]};
    # edge k is <= srt[j] exactly for j >= (number of values < edge k), and < srt[j] for
    # j >= (number of values <= edge k)
    first_ge = np.searchsorted(srt, edges, side="left")
    first_gt = np.searchsorted(srt, edges, side="right")
    left = np.empty(n, dtype=np.intp)
    right = np.empty(n, dtype=np.intp)
    left[order] = np.cumsum(np.bincount(first_ge, minlength=n + 1)[:n])
    right[order] = np.cumsum(np.bincount(first_gt, minlength=n + 1)[:n])
    u = rng.random(n)
    # the official formula, ceil(u * (right - left) + left), in the same float64 arithmetic
    digits = np.ceil(u * (right - left) + left)
    return digits.astype(np.float32)


def _bin_row(row: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin one validated 1-D row that may contain zeros. Returns float32 of the same length."""
    nonzero = row != 0
    if nonzero.all():
        return _bin_positive(row, n_bins, rng)
    out = np.zeros(row.shape[0], dtype=np.float32)
    if nonzero.any():
        out[nonzero] = _bin_positive(row[nonzero], n_bins, rng)
    return out


def bin_nonzero(
    nz_values: np.ndarray,
    n_bins: int = 51,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Bin the non-zero expression values of one cell (fast path for CSR row data).

    Parameters
    ----------
    nz_values : numpy.ndarray
        1-D array of one cell's non-zero expression values, e.g. the ``data`` slice of one CSR
        row. Explicitly stored zeros are allowed: they get bin 0, take no part in the quantile
        edges and consume no random draw, exactly as in :func:`bin_values`.
    n_bins : int, default 51
        Number of bins including bin 0; non-zero values go to ``1 .. n_bins - 1`` using
        ``n_bins - 1`` quantile edges. Must be at least 3.
    rng : numpy.random.Generator or int or None, optional
        Source of the tie-breaking draws: a Generator (used and advanced in place), an int seed,
        or None for a fresh, unseeded Generator. One uniform is drawn per non-zero value.

    Returns
    -------
    numpy.ndarray
        float32 array of the same length as ``nz_values`` with the bin of each value.

    Raises
    ------
    InputDataError
        If the input is not 1-D or holds NaN, infinite or negative values.
    ValueError
        If ``n_bins < 3``.

    See Also
    --------
    bin_values : the same binning for a dense cell or a dense cells x genes matrix.

    Examples
    --------
    >>> bin_nonzero(np.array([1.0, 5.0, 3.0]), n_bins=5, rng=0)
    array([1., 4., 2.], dtype=float32)
    """
    n_bins = _check_n_bins(n_bins)
    arr = _as_float_array(nz_values)
    if arr.ndim != 1:
        raise InputDataError(
            f"bin_nonzero expects the 1-D non-zero values of one cell, got an array of shape "
            f"{arr.shape}. Use bin_values for a dense 2-D cells x genes matrix."
        )
    _validate(arr, "the expression values")
    gen = _as_generator(rng)
    if arr.size and arr.min() > 0:
        return _bin_positive(arr, n_bins, gen)
    return _bin_row(arr, n_bins, gen)


def bin_values(
    values: np.ndarray,
    n_bins: int = 51,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Bin expression values per cell, as the official scGPT preprocessing does.

    Parameters
    ----------
    values : numpy.ndarray
        One cell as a 1-D array, or a dense 2-D array with one cell per row (cells x genes).
        Values must be non-negative (raw counts or log1p-normalised counts); zeros may be present.
        Integer input is converted to float64; float32 and float64 are kept as they are.
    n_bins : int, default 51
        Number of bins including bin 0; non-zero values go to ``1 .. n_bins - 1`` using
        ``n_bins - 1`` quantile edges of the cell's non-zero values. Must be at least 3.
    rng : numpy.random.Generator or int or None, optional
        Source of the tie-breaking draws: a Generator (used and advanced in place), an int seed,
        or None for a fresh, unseeded Generator. The same seed gives the same output.
        For 2-D input a single Generator is used for all rows, in row order, with one draw per
        non-zero value; so the result equals binning the rows one by one with that Generator
        (``bin_values(X[i], rng=g)``, or ``bin_nonzero`` on the row's non-zero values).

    Returns
    -------
    numpy.ndarray
        float32 array of the shape of ``values``: 0 where the value is 0, otherwise the bin in
        ``1 .. n_bins - 1``. A row of zeros gives a row of zeros.

    Raises
    ------
    InputDataError
        If ``values`` is not 1-D or 2-D, is sparse, or holds NaN, infinite or negative values
        (the message gives their number and first positions).
    ValueError
        If ``n_bins < 3``.

    Notes
    -----
    For one cell with non-zero values ``nz``, the edges are
    ``np.quantile(nz, np.linspace(0, 1, n_bins - 1))``. A value ``x`` with ``left`` edges
    ``<= x`` and ``right`` edges ``< x`` gets ``ceil(u * (right - left) + left)`` with
    ``u ~ Uniform[0, 1)``: the deterministic bin ``left`` unless ``x`` equals two or more edges,
    in which case the bin is uniform over ``right + 1 .. left``.

    Examples
    --------
    >>> bin_values(np.array([0.0, 1.0, 5.0, 0.0, 3.0]), n_bins=5, rng=0)
    array([0., 1., 4., 0., 2.], dtype=float32)
    """
    n_bins = _check_n_bins(n_bins)
    arr = _as_float_array(values)
    if arr.ndim not in (1, 2):
        raise InputDataError(
            f"bin_values expects one cell as a 1-D array or cells x genes as a 2-D array, got "
            f"an array with {arr.ndim} dimension(s) (shape {arr.shape}). Reshape or select "
            f"the cells first."
        )
    _validate(arr, "the expression matrix" if arr.ndim == 2 else "the expression values")
    gen = _as_generator(rng)
    if arr.ndim == 1:
        return _bin_row(arr, n_bins, gen)
    out = np.zeros(arr.shape, dtype=np.float32)
    for i in range(arr.shape[0]):
        out[i] = _bin_row(arr[i], n_bins, gen)
    return out
