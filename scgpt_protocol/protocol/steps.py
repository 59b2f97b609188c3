"""Glue of the notebooks to the run's files that belongs to no lower layer: which reference and query
step 04 maps (:func:`zeroshot_inputs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import format_keys

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout

__all__ = ["zeroshot_inputs"]


def zeroshot_inputs(layout: RunLayout, params: Any) -> tuple[AnnData, AnnData, str]:
    """Reference, query and label key of step 04 (:class:`~scgpt_protocol.core.params.ZeroshotParams`).

    Without paths, the reference is the train + validation cells of the run's prepared data and the
    query its test cells, so zero-shot and fine-tuned results are measured on the same cells. The
    prepared data are read backed (``X`` stays on disk): both are views of it, to embed with
    ``zeroshot_annotate(..., store_dir=...)``. Files given by path are read into memory.
    """
    from ..data.read import read_adata
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
    reference = (read_adata(params.reference_path) if params.reference_path
                 else prepared[np.isin(split, ["train", "val"])])
    query = read_adata(params.query_path) if params.query_path else prepared[split == "test"]
    return reference, query, label_key
