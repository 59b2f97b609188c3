"""03's external query: read with its gene symbols, its labels translated to the model's names by
``query_label_map``, before any prediction (so scGPT and the baseline score the same labels, and a bad map fails
before minutes of work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from anndata import AnnData

    from ..data.label_map import LabelMapResult

__all__ = ["read_query"]


def read_query(params: Any, manifest: Mapping[str, Any]) -> tuple[AnnData | None, LabelMapResult | None]:
    """``(query, what the label map did)`` of :class:`~scgpt_protocol.core.params.EvaluateParams`; ``(None, None)``
    without ``query_path``.

    The query's label column is ``query_label_key`` (None: the run's). With ``query_label_map`` its labels are
    mapped in place (the labels as given stay in ``obs[<key>_original]``); a label mapped to a class the model
    lacks, or a map that leaves no label the model knows, is a :class:`~scgpt_protocol.data.label_map.LabelMapError`.
    """
    from ..data.label_map import describe_label_map, map_obs_labels
    from .steps import read_with_symbols

    if not params.query_path:
        if params.query_label_map is not None:
            print("query_label_map is set but query_path is not: the map is not used (the test split has the "
                  "model's names).")
        return None, None
    query = read_with_symbols(params.query_path, params.query_gene_symbol_key, what="the query",
                              name="query_gene_symbol_key")
    key = params.query_label_key or manifest["label_key"]
    mapped = map_obs_labels(query, key, params.query_label_map, model_classes=manifest["categories"],
                            what="the query")
    if mapped is not None:
        print(describe_label_map(mapped, what="the query"))
    return query, mapped
