"""The labelled cells a fine-tuning reads: class codes and splits from the prepared data's categorical
columns, and the fingerprint that tells a resumed run it sees the same data. Read by slices, so that memory
does not grow with the number of cells (``benchmarks/bench_scale.py``)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import format_keys
from ..model.tokenize import cell_keys

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["cell_name_keys", "codes_and_splits", "data_fingerprint"]


def _obs_keys(adata: Any) -> list[str]:
    return list(adata.obs_keys) if hasattr(adata, "obs_column") else list(adata.obs.columns)


def _obs_column(adata: Any, key: str) -> pd.Series:
    """``obs[key]`` of an AnnData, or read from the file for :class:`~scgpt_protocol.data.backed.BackedCells`."""
    return adata.obs_column(key) if hasattr(adata, "obs_column") else adata.obs[key]


def cell_name_keys(names: Any, step: int = 65536) -> np.ndarray:
    """:func:`~scgpt_protocol.model.tokenize.cell_keys` of every cell, names read a slice at a time."""
    return np.concatenate([cell_keys(names[i : i + step]) for i in range(0, len(names), step)] or
                          [np.zeros(0, dtype=np.uint64)])


def _as_categorical(column: pd.Series) -> pd.Categorical:
    """``column`` as a Categorical (a categorical column as it is: no string per cell is made)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.array
    return pd.Categorical(column.astype(str))


def codes_and_splits(adata: AnnData, label_key: str, split_key: str, categories: list[str]) -> tuple:
    """``(codes, train_rows, val_rows)``: each cell's class (index into ``categories``) and the rows of the
    train and val cells, from the categorical codes of the label and split columns (no string per cell)."""
    for key in (label_key, split_key):
        if key not in _obs_keys(adata):
            msg = f"{key!r} not in adata.obs (columns: {format_keys(_obs_keys(adata))}); run 01_preprocess first."
            raise KeyError(msg)
    labels = _as_categorical(_obs_column(adata, label_key))
    present = labels.categories[np.unique(labels.codes[labels.codes >= 0])].astype(str)
    unknown = sorted(set(present) - set(categories)) + (["<missing>"] if (labels.codes < 0).any() else [])
    if unknown:
        msg = f"labels {unknown[:5]} of obs[{label_key!r}] are not among the run's categories {categories}."
        raise ValueError(msg)
    position = {c: i for i, c in enumerate(categories)}
    lookup = np.array([position.get(c, -1) for c in labels.categories.astype(str)] or [0], dtype=np.int64)
    codes = lookup[labels.codes]
    split = _as_categorical(_obs_column(adata, split_key))
    split_code = {str(c): i for i, c in enumerate(split.categories)}
    train_rows = np.flatnonzero(split.codes == split_code.get("train", -2))
    val_rows = np.flatnonzero(split.codes == split_code.get("val", -2))
    if len(train_rows) == 0 or len(val_rows) == 0:
        found = dict(zip(split.categories.astype(str), np.bincount(split.codes[split.codes >= 0],
                                                                  minlength=len(split.categories))))
        msg = f"obs[{split_key!r}] needs 'train' and 'val' cells; found {found}."
        raise ValueError(msg)
    return codes, train_rows, val_rows


def data_fingerprint(adata: AnnData, label_key: str, categories: Sequence[str], split_key: str = "split",
                     base_sha256: str | None = None) -> str:
    """sha256 of what a model is trained on: genes, classes, train/val cells and their labels, base model.

    A resumed or reused training must match it: after re-running 01 with another split, an old model
    would otherwise be scored on cells it was trained on.
    """

    split = _as_categorical(_obs_column(adata, split_key))
    fit = np.isin(split.codes, np.flatnonzero(split.categories.isin(["train", "val"])))
    labels = _as_categorical(_obs_column(adata, label_key))
    label_names = np.asarray(labels.categories.astype(str), dtype=object)
    split_names = np.asarray(split.categories.astype(str), dtype=object)
    names, step = adata.obs_names, 65536
    slices = [(i, np.flatnonzero(fit[i : i + step])) for i in range(0, len(fit), step)]
    slices = [(i, rows) for i, rows in slices if len(rows)]
    per_cell = (
        lambda i, rows: map(str, np.asarray(names[i : i + step])[rows]),  # names read by contiguous slices
        lambda i, rows: split_names[split.codes[i + rows]],
        lambda i, rows: label_names[labels.codes[i + rows]],
    )
    digest = hashlib.sha256()
    # the bytes of "\x1f".join(part) for each part, hashed a slice of cells at a time (flat memory)
    for part in ([map(str, adata.var_names)], [categories], *([fn(i, rows) for i, rows in slices] for fn in per_cell),
                 [[str(base_sha256)]]):
        first = True
        for piece in part:
            text = "\x1f".join(piece)
            digest.update(("" if first else "\x1f").encode() + text.encode())
            first = False
        digest.update(b"\x1e")
    return digest.hexdigest()
