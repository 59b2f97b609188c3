"""Glue of the notebooks to the run's files that belongs to no lower layer: which reference and query
step 04 maps (:func:`zeroshot_inputs`), which cells of a 03 query trained the model (:func:`training_overlap`),
the gene symbols of an external file (:func:`read_with_symbols`).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import format_keys

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
    from ..data.overlap import Overlap

logger = logging.getLogger(__name__)

__all__ = ["zeroshot_inputs", "training_overlap", "read_with_symbols"]


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
    from ..data.overlap import find_overlap

    split = prepared.obs["split"].to_numpy() if "split" in prepared.obs else np.array([], dtype=object)
    trained = prepared.obs_names[np.isin(split, ["train", "val"])]
    return find_overlap(query.obs_names, trained, what="the query", against="the run's train and validation cells",
                        path=query_path, other_path=_input_path(layout))


def read_with_symbols(path: str, gene_symbol_key: str | None, *, what: str, name: str) -> AnnData:
    """An external .h5ad read into memory, its ``var_names`` set to the gene symbols of
    ``var[gene_symbol_key]`` (the old names kept in ``var["original_var_name"]``) when a key is given."""
    from ..core.errors import InputDataError
    from ..data.read import read_adata

    adata = read_adata(path)
    if gene_symbol_key is None:
        return adata
    if gene_symbol_key not in adata.var.columns:
        msg = (f"{name}={gene_symbol_key!r} is not a column of the var of {what} ({path}); columns: "
               f"{format_keys(adata.var.columns)}. Set {name} to the column with gene symbols (or None when "
               "var_names are symbols).")
        raise InputDataError(msg)
    symbols = adata.var[gene_symbol_key].astype(object)
    original = np.asarray(adata.var_names, dtype=str)
    text = symbols.where(symbols.notna(), "").astype(str).str.strip().to_numpy()
    adata.var["original_var_name"] = original
    adata.var_names = pd.Index(np.where(text != "", text, original), dtype=str)  # no symbol: keep the id
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def zeroshot_inputs(layout: RunLayout, params: Any) -> tuple[AnnData, AnnData, str]:
    """Reference, query and label key of step 04 (:class:`~scgpt_protocol.core.params.ZeroshotParams`).

    Without paths, the reference is the train + validation cells of the run's prepared data and the
    query its test cells, so zero-shot and fine-tuned results are measured on the same cells. The
    prepared data are read backed (``X`` stays on disk): both are views of it, to embed with
    ``zeroshot_annotate(..., store_dir=...)``. Files given by path are read into memory.
    """
    from ..pp.io import read_labels, read_prepared

    label_key = params.label_key
    if params.reference_path is None or params.query_path is None:
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
    symbols = getattr(params, "gene_symbol_key", None)
    reference = (read_with_symbols(params.reference_path, symbols, what="the reference", name="gene_symbol_key")
                 if params.reference_path else prepared[np.isin(split, ["train", "val"])])
    query = (read_with_symbols(params.query_path, symbols, what="the query", name="gene_symbol_key")
             if params.query_path else prepared[split == "test"])
    from ..data.overlap import same_file

    if params.reference_path and same_file(params.reference_path, params.query_path):
        msg = (f"reference_path and query_path are the same file ({params.query_path}, by sha256): every query "
               "cell finds itself among its neighbours. Its cells are scored apart as 'seen cells'; give a "
               "query the reference does not hold for an honest number.")
        logger.warning("%s", msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return reference, query, label_key
