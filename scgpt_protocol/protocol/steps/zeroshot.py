"""Step 04's glue to its run folder: which reference and query it maps, in which label names
(:func:`zeroshot_inputs`; its novel types are then scored by :func:`~scgpt_protocol.evaluate.novel.zeroshot_novel`,
beside 03's), and which cells of a query trained the model (:func:`training_overlap`, also for 03's query).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...core.errors import format_keys
from ...data.labels import missing_labels

if TYPE_CHECKING:
    from anndata import AnnData

    from ...annotate.atlas import AtlasIndex

    from ...core.layout import RunLayout
    from ...data.label_map import LabelMapResult
    from ...data.overlap import Overlap

logger = logging.getLogger(__name__)

__all__ = ["zeroshot_inputs", "ZeroshotLabelMaps", "training_overlap"]


def _input_path(layout: RunLayout) -> str | None:
    """The ``adata_path`` 01 read (its parameters in ``params/preprocess.yaml``), None when unknown."""
    import yaml

    path = layout.step_params("preprocess")
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text()) or {}
    return values.get("adata_path") if isinstance(values, dict) else None


def training_overlap(layout: RunLayout, prepared: AnnData, query: AnnData, query_path: str | None) -> Overlap:
    """Which cells of a 03 query are train or validation cells of the run (by cell name), and whether the query
    is the file 01 read (by sha256): pass it to ``evaluate_query(..., overlap=...)``."""
    from ...data.overlap import find_overlap

    split = prepared.obs["split"].to_numpy() if "split" in prepared.obs else np.array([], dtype=object)
    trained = prepared.obs_names[np.isin(split, ["train", "val"])]
    return find_overlap(query.obs_names, trained, what="the query", against="the run's train and validation cells",
                        path=query_path, other_path=_input_path(layout))


@dataclass
class ZeroshotLabelMaps:
    """What 04's ``label_map`` did to the reference's and the query's labels (:func:`zeroshot_inputs`).

    ``reference`` and ``query`` are :class:`~scgpt_protocol.data.label_map.LabelMapResult` (None: no map, or no
    labelled query); reference cells mapped to nothing are left out of the reference (not even embedded);
    the query's ``novel`` lists its labels that none of the reference's classes (after the map) matches.
    """

    reference: LabelMapResult | None = None
    query: LabelMapResult | None = None

    def describe(self) -> str:
        """One paragraph per dataset for the report (:func:`~scgpt_protocol.data.label_map.describe_label_map`)."""
        from ...data.label_map import describe_label_map

        if self.reference is None and self.query is None:
            return "No label map: the reference's and the query's labels are used as they are."
        return "\n".join(describe_label_map(r, what) for r, what in ((self.reference, "the reference"),
                                                                     (self.query, "the query")) if r is not None)

    def record(self) -> dict[str, Any] | None:
        """``metrics.json``'s ``label_map``: ``{"reference": ..., "query": ...}``
        (:func:`~scgpt_protocol.data.label_map.label_map_record`); None without a map."""
        from ...data.label_map import label_map_record

        if self.reference is None and self.query is None:
            return None
        return {"reference": label_map_record(self.reference), "query": label_map_record(self.query)}


def _relabel(adata: AnnData, label_key: str, result: LabelMapResult, rows: np.ndarray | None) -> None:
    """Write the mapped labels into ``adata.obs[label_key]`` (of ``rows`` only, when given), keeping the labels
    as given in ``obs[label_key + "_original"]`` (a backed AnnData's ``obs`` is in memory: this works on it)."""
    labels = adata.obs[label_key]
    if f"{label_key}_original" not in adata.obs:
        adata.obs[f"{label_key}_original"] = labels.astype(object).to_numpy()
    values = labels.astype(object).to_numpy().copy()
    values[slice(None) if rows is None else rows] = result.labels.to_numpy(dtype=object)
    adata.obs[label_key] = pd.Categorical(values)


def _map_labels(label_map: Any, label_key: str, ref: tuple[AnnData, np.ndarray | None],
                query: tuple[AnnData, np.ndarray | None]) -> tuple[ZeroshotLabelMaps, np.ndarray | None]:
    """Apply one label map to the reference's and the query's labels (each an AnnData and the rows that are that
    dataset, None: all), in place; the query is checked against the reference's classes after the map.

    Returns the maps and the reference rows left (those mapped to nothing are left out; None: all)."""
    from ...data.label_map import LabelMapError, apply_label_map, read_label_map

    table = read_label_map(label_map)
    (ref_data, ref_rows), (query_data, query_rows) = ref, query
    if label_key not in ref_data.obs:
        raise KeyError(f"label column {label_key!r} is not in the obs of the reference (columns: "
                       f"{format_keys(list(ref_data.obs.columns))}); the label map translates that column.")
    ref_labels = ref_data.obs[label_key] if ref_rows is None else ref_data.obs[label_key][ref_rows]
    maps = ZeroshotLabelMaps(reference=apply_label_map(ref_labels, table))
    classes = sorted({str(v) for v in maps.reference.labels.dropna()})
    if label_key in query_data.obs:  # an unlabelled query has nothing to map
        query_labels = query_data.obs[label_key] if query_rows is None else query_data.obs[label_key][query_rows]
        try:
            maps.query = apply_label_map(query_labels, table, model_classes=classes)
        except LabelMapError as err:  # in 04 "the model's classes" are the reference's labels
            raise LabelMapError(f"the query's labels against the reference's (04 transfers the reference's labels, "
                                f"after the map): {err}") from err
    _relabel(ref_data, label_key, maps.reference, ref_rows)
    if maps.query is not None:
        _relabel(query_data, label_key, maps.query, query_rows)
    left_out = maps.reference.labels.isna().to_numpy() & ~missing_labels(ref_labels)
    if not left_out.any():
        return maps, ref_rows
    logger.info("label map: %d reference cells mapped to nothing are left out of the reference", int(left_out.sum()))
    rows = np.arange(ref_data.n_obs) if ref_rows is None else np.flatnonzero(ref_rows)
    mask = np.zeros(ref_data.n_obs, dtype=bool)
    mask[rows[~left_out]] = True
    return maps, mask


def zeroshot_inputs(layout: RunLayout, params: Any) -> tuple[AnnData | AtlasIndex, AnnData, str, ZeroshotLabelMaps]:
    """Reference, query, label key and label maps of step 04 (:class:`~scgpt_protocol.core.params.ZeroshotParams`).

    Without paths, the reference is the train + validation cells of the run's prepared data and the
    query its test cells, so zero-shot and fine-tuned results are measured on the same cells. The
    prepared data are read backed (``X`` stays on disk): both are views of it, to embed with
    ``zeroshot_annotate(..., store_dir=...)``. Files given by path are read into memory. With
    ``params.reference_index`` the reference is that saved index (:func:`~scgpt_protocol.annotate.atlas.load_index`):
    nothing of it is embedded again, and ``zeroshot_annotate`` maps the query onto it.

    ``params.label_map`` (a CSV path or a mapping holding both datasets' names) renames the reference's and
    the query's labels in ``obs[label_key]`` (the labels as given stay in ``obs[label_key + "_original"]``):
    reference cells mapped to nothing are left out of the reference (an index's do not vote); the query is
    checked against the reference's classes after the map, and its labels that match none of them are novel
    types, scored apart (:func:`zeroshot_novel`). A bad map fails here, before any embedding.

    Raises
    ------
    LabelMapError
        A map file with a missing column, a query label mapped to a class the reference lacks, no query label
        left that the reference has.
    """
    from ...data.overlap import same_file
    from ...pp.io import read_labels, read_prepared

    label_key = params.label_key
    index_path = getattr(params, "reference_index", None)
    if (params.reference_path is None and index_path is None) or params.query_path is None:
        prepared = read_prepared(layout, backed=True)
        split = prepared.obs["split"].to_numpy() if "split" in prepared.obs else None
        if split is None:
            msg = (f"'split' not in the obs of {layout.prepared_adata} (columns: {format_keys(prepared.obs.columns)}); "
                   "run 01_preprocess first.")
            raise KeyError(msg)
    if label_key is None and layout.labels.is_file():  # the run's label column, also for external files
        label_key = read_labels(layout)["label_key"]
    if label_key is None:
        msg = ("label_key is not set and the run has no labels record (data/labels.json, written by 01) to "
               "take it from; set label_key to the label column of the reference and query.")
        raise ValueError(msg)
    if params.label_map is not None:
        from ...data.label_map import read_label_map

        read_label_map(params.label_map)  # a missing file or column fails before the data are read
    symbols = getattr(params, "gene_symbol_key", None)
    from ...data.read import read_with_symbols

    if index_path is not None:
        ref_data, ref_rows = _index_reference(index_path, label_key), None
    else:
        ref_data, ref_rows = ((read_with_symbols(params.reference_path, symbols, what="the reference",
                                                 name="gene_symbol_key"), None) if params.reference_path
                              else (prepared, np.isin(split, ["train", "val"])))
    query_data, query_rows = ((read_with_symbols(params.query_path, symbols, what="the query", name="gene_symbol_key"),
                               None) if params.query_path else (prepared, split == "test"))
    if params.reference_path and same_file(params.reference_path, params.query_path):
        msg = (f"reference_path and query_path are the same file ({params.query_path}, by sha256): every query "
               "cell finds itself among its neighbours. Its cells are scored apart as 'seen cells'; give a "
               "query the reference does not hold for an honest number.")
        logger.warning("%s", msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    maps = ZeroshotLabelMaps()
    if params.label_map is not None:
        maps, ref_rows = _map_labels(params.label_map, label_key, (ref_data, ref_rows), (query_data, query_rows))
    if index_path is not None:
        if ref_rows is not None:
            ref_data.leave_out(~ref_rows)  # mapped to nothing: in the index, but no vote
        reference = ref_data
    else:
        reference = ref_data if ref_rows is None else ref_data[ref_rows]
        if reference.is_view and not reference.isbacked:
            reference = reference.copy()  # a file's cells less those mapped to nothing
    query = query_data if query_rows is None else query_data[query_rows]
    return reference, query, label_key, maps


def _index_reference(path: str, label_key: str) -> AtlasIndex:
    """The saved reference index of ``reference_index``, its labels of ``label_key`` checked (logged)."""
    from ...annotate.atlas import load_index

    index = load_index(path)
    index.label_column(label_key)  # an unknown label column fails here, before any embedding
    logger.info("%s", index.describe())
    return index
