"""Label maps: a dataset's own label names translated to the model's, and the types the model never saw.

Real references and queries name cell types differently ("CD4 T cells", "T_CD4", "CD4+ T") and at other
granularities. A **label map** says, for each of the dataset's labels, which of the model's labels it is:

* a CSV file of two columns -- the dataset's label, the model's label. A header row is optional (it is
  recognised when its two cells are column names such as ``label``/``source``/``query`` and
  ``model``/``target``/``coarse``..., or forced with ``header=True``); with more than two columns the first
  two are used;
* or an inline mapping (``label_map: {"T_CD4": "CD4 T", "HSC": null}`` in YAML).

Many labels may map to one. A label mapped to nothing (an empty cell, ``null`` or ``""``) is **dropped** from
scoring, and its cells are counted. Labels not in the map are kept as they are. Labels are compared after
trimming the spaces around them. A label that then matches none of the model's classes is a **novel type**
(:func:`novel_types`): a type the model never saw, scored apart
(:func:`~scgpt_protocol.evaluate.novel.split_novel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.errors import ScGPTProtocolError, format_keys
from .labels import clean_labels, missing_labels, shared_types

__all__ = ["LabelMapError", "LabelMapNotFoundError", "LabelMapResult", "read_label_map", "apply_label_map",
           "novel_types", "map_obs_labels", "describe_label_map", "label_map_record"]

#: header cells recognised (lower case) in the first and second column of a label-map CSV
SOURCE_HEADERS = frozenset({"label", "labels", "source", "from", "dataset", "dataset_label", "query",
                            "query_label", "reference", "reference_label", "original", "cell_type", "celltype"})
TARGET_HEADERS = frozenset({"model", "model_label", "target", "to", "mapped", "mapped_label", "coarse", "fine",
                            "harmonised", "harmonized", "class", "model_class"})


class LabelMapError(ScGPTProtocolError, ValueError):
    """A label map that cannot be used: a missing column, conflicting entries, a class the model lacks."""


class LabelMapNotFoundError(ScGPTProtocolError, FileNotFoundError):
    """The label-map file does not exist."""


def _text(value: Any) -> str | None:
    """A map's cell as trimmed text; None for an empty cell, NaN or None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _add(mapping: dict[str, str | None], source: str, target: str | None, where: str) -> None:
    if source in mapping and mapping[source] != target:
        msg = (f"the label map gives {source!r} two different targets, {mapping[source]!r} and {target!r} "
               f"({where}); expected one target per label (many labels may share a target, not the reverse). "
               "Keep one of the two entries.")
        raise LabelMapError(msg)
    mapping[source] = target


def _read_csv(path: Path, header: bool | None) -> dict[str, str | None]:
    if not path.is_file():
        msg = (f"label map {str(path)!r} not found; expected a CSV file of two columns (the dataset's label, the "
               "model's label) or an inline mapping. Check the path (relative paths start from the working folder).")
        raise LabelMapNotFoundError(msg)
    table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True)
    if table.shape[1] < 2:
        msg = (f"label map {str(path)!r} has {table.shape[1]} column; a column is missing: expected two "
               "(the dataset's label, the model's label), separated by commas.")
        raise LabelMapError(msg)
    first = [str(v).strip().lower() for v in table.iloc[0, :2]] if len(table) else ["", ""]
    if header is None:
        header = first[0] in SOURCE_HEADERS and first[1] in TARGET_HEADERS
    rows = table.iloc[1:] if header else table
    mapping: dict[str, str | None] = {}
    for number, (raw_source, raw_target) in enumerate(rows.iloc[:, :2].itertuples(index=False),
                                                      start=2 if header else 1):
        source = _text(raw_source)
        if source is None:
            if _text(raw_target) is None:
                continue  # an empty line
            msg = (f"label map {str(path)!r}, line {number}: no label in the first column (target "
                   f"{raw_target!r}); every row needs the dataset's label first.")
            raise LabelMapError(msg)
        _add(mapping, source, _text(raw_target), f"{path.name}, line {number}")
    if not mapping:
        raise LabelMapError(f"label map {str(path)!r} has no entries; expected rows 'dataset label,model label'.")
    return mapping


def read_label_map(spec: str | Path | Mapping[str, Any] | None, *,
                   header: bool | None = None) -> dict[str, str | None]:
    """A label map from a CSV path or an inline mapping, as ``{dataset label: model label or None}``.

    Parameters
    ----------
    spec
        A CSV path (two columns: the dataset's label, the model's label; an empty second cell maps to
        nothing) or a mapping (from YAML; a value of None or ``""`` maps to nothing). None: an empty map.
    header
        Whether the CSV's first row is a header; None: recognised by its column names (see the module).

    Returns
    -------
    dict
        Trimmed labels; None = dropped from scoring.

    Raises
    ------
    LabelMapNotFoundError
        The file does not exist.
    LabelMapError
        Fewer than two columns, a row without a label, no entries, a target that is not text, or one label
        given two different targets.
    """
    if spec is None:
        return {}
    if isinstance(spec, (str, Path)):
        return _read_csv(Path(spec).expanduser(), header)
    if not isinstance(spec, Mapping):
        msg = (f"label_map is a {type(spec).__name__}; expected a CSV path or a mapping "
               "{dataset label: model label} (null or '' to drop a label).")
        raise LabelMapError(msg)
    mapping: dict[str, str | None] = {}
    for raw_source, raw_target in spec.items():
        source = _text(raw_source)
        if source is None:
            raise LabelMapError(f"the label map has an empty label (mapped to {raw_target!r}); remove that entry.")
        if raw_target is not None and not isinstance(raw_target, (str, int, float)):
            msg = (f"the label map maps {source!r} to a {type(raw_target).__name__} ({raw_target!r}); expected one "
                   "model label, or null / '' to drop it.")
            raise LabelMapError(msg)
        _add(mapping, source, _text(raw_target), "inline map")
    return mapping


@dataclass
class LabelMapResult:
    """What :func:`apply_label_map` made of a label column."""

    labels: pd.Series  # object dtype, same index; the model's label, or NaN for a dropped or missing label
    dropped: dict[str, int]  # dataset label -> cells dropped from scoring (mapped to nothing)
    unmapped: list[str]  # labels found that are not in the map, kept as they are
    mapping: dict[str, str | None] = field(default_factory=dict)  # the map applied
    n_missing: int = 0  # cells without a label in the input (left NaN)
    novel: list[str] = field(default_factory=list)  # labels after mapping that are none of model_classes
    renamed: dict[str, int] = field(default_factory=dict)  # label of the data given another name -> its cells

    @property
    def n_dropped(self) -> int:
        return int(sum(self.dropped.values()))


def _trimmed(labels: Any) -> tuple[pd.Series, np.ndarray]:
    series = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object))
    missing = missing_labels(series)
    text = series.astype(object).where(~missing)
    text[~missing] = clean_labels(text[~missing])
    return text, missing


def apply_label_map(labels: pd.Series, mapping: str | Path | Mapping[str, Any] | None, *,
                    model_classes: Sequence[str] | None = None) -> LabelMapResult:
    """The dataset's labels in the model's names: mapped, dropped (NaN) or kept as they are.

    Parameters
    ----------
    labels
        One label per cell (a Series keeps its index; missing labels stay NaN and are counted apart).
    mapping
        :func:`read_label_map`'s result, or anything it reads (a CSV path, an inline mapping).
    model_classes
        The classes the model predicts. When given, every target used by a label present is checked to be one
        of them, at least one mapped label must be one of them, and ``novel`` lists the others.

    Raises
    ------
    LabelMapError
        A label of the data mapped to a class the model lacks; no label left that the model knows.
    """
    table = read_label_map(mapping)
    text, missing = _trimmed(labels)
    present = pd.unique(text[~missing].to_numpy(dtype=object))
    counts = text[~missing].value_counts()
    classes = list(clean_labels(model_classes)) if model_classes is not None else None
    if classes is not None:
        wrong = {label: table[label] for label in present if table.get(label) is not None
                 and table[label] not in set(classes)}
        if wrong:
            shown = ", ".join(f"{k!r} -> {v!r}" for k, v in list(wrong.items())[:5])
            msg = (f"the label map sends {len(wrong)} label(s) of the data to a class the model lacks: {shown}; "
                   f"the model's classes are {format_keys(classes, limit=30)}. Map each to one of them, to nothing "
                   "(an empty cell / null) to drop its cells from scoring, or leave it out of the map to score it as "
                   "a novel type.")
            raise LabelMapError(msg)
    mapped = text.map(lambda v: table.get(v, v) if isinstance(v, str) else v)
    mapped = mapped.where(mapped.notna(), np.nan).astype(object)
    dropped = {str(label): int(counts[label]) for label in present if label in table and table[label] is None}
    unmapped = sorted(str(label) for label in present if label not in table)
    renamed = {str(label): int(counts[label]) for label in present if table.get(label) not in (None, label)}
    novel: list[str] = []
    if classes is not None:
        novel = novel_types(mapped, classes)
        shared = set(mapped.dropna()) & set(classes)
        if not shared:
            msg = (f"after the label map no cell has a label the model knows: the data's labels are "
                   f"{format_keys(sorted(set(mapped.dropna())), limit=30)} and the model's classes "
                   f"{format_keys(classes, limit=30)}. Map the data's labels to the model's names (label_map: a CSV "
                   "'dataset label,model label' or an inline mapping).")
            raise LabelMapError(msg)
    return LabelMapResult(labels=mapped, dropped=dropped, unmapped=unmapped, mapping=table,
                          n_missing=int(missing.sum()), novel=novel, renamed=renamed)


def novel_types(true_labels: Any, model_classes: Sequence[str]) -> list[str]:
    """The labels (trimmed, sorted) that match none of ``model_classes``: types the model never saw.

    Missing labels (NaN, dropped by a map) are not types.

    Examples
    --------
    >>> novel_types(["B", " T ", "HSC", None, "HSC"], ["B", "T"])
    ['HSC']
    """
    labels = true_labels if isinstance(true_labels, pd.Series) else pd.Series(np.asarray(true_labels, dtype=object))
    novel = ~missing_labels(labels) & ~shared_types(labels, model_classes)
    return sorted({str(v) for v in clean_labels(labels[novel])})


def map_obs_labels(adata: Any, label_key: str, mapping: str | Path | Mapping[str, Any] | None, *,
                   model_classes: Sequence[str] | None = None, what: str = "the data") -> LabelMapResult | None:
    """Apply a label map to ``adata.obs[label_key]`` **in place**; the labels as given stay in
    ``obs[label_key + "_original"]``. None (no map): nothing changes and None is returned.

    Cells whose label is mapped to nothing get a missing label (NaN), so that they are left out of training
    and of scoring; the result counts them (``dropped``). ``model_classes``: see :func:`apply_label_map`
    (a class the model lacks, or no shared label, is a :class:`LabelMapError`).
    """
    if mapping is None:
        return None
    if label_key not in adata.obs:
        msg = (f"label column {label_key!r} is not in the obs of {what} (columns: "
               f"{format_keys(list(adata.obs.columns))}); the label map translates that column.")
        raise KeyError(msg)
    result = apply_label_map(adata.obs[label_key], mapping, model_classes=model_classes)
    original = adata.obs[label_key]
    adata.obs[f"{label_key}_original"] = original.to_numpy()
    adata.obs[label_key] = pd.Categorical(result.labels.to_numpy(dtype=object))
    return result


def describe_label_map(result: LabelMapResult | None, what: str = "the data", *, left_out_of: str = "scoring") -> str:
    """One paragraph for a report: what the map did to ``what``'s labels (mapped, dropped, unmapped, novel).

    ``left_out_of``: what the cells mapped to nothing are left out of (``"training"`` in 01)."""
    if result is None:
        return f"No label map: {what}'s labels are used as they are."
    parts = [f"Label map on {what}: {len(result.renamed)} of its label(s) renamed"]
    if result.dropped:
        shown = ", ".join(f"{k!r} ({n:,})" for k, n in sorted(result.dropped.items()))
        parts.append(f"{result.n_dropped:,} cells left out of {left_out_of} (mapped to nothing: {shown})")
    if result.unmapped:
        parts.append(f"{len(result.unmapped)} label(s) not in the map kept as they are "
                     f"({format_keys(result.unmapped, limit=8)})")
    if result.novel:
        parts.append(f"novel types (none of the model's classes; scored apart): {format_keys(result.novel, limit=8)}")
    return "; ".join(parts) + "."


def label_map_record(result: LabelMapResult | None) -> dict[str, Any] | None:
    """What a map did, for a run's JSON records (``labels.json``, ``zeroshot/metrics.json``); None without a map.

    ``{"map": {label: model label or None}, "dropped": {label: cells}, "n_dropped", "unmapped": [labels of
    the data not in the map, kept as they are], "novel": [labels none of the model's classes], "n_missing":
    cells without a label in the input}``.
    """
    if result is None:
        return None
    return {"map": dict(result.mapping), "dropped": dict(result.dropped), "n_dropped": result.n_dropped,
            "unmapped": list(result.unmapped), "novel": list(result.novel), "n_missing": int(result.n_missing)}
