"""Step 03's glue to its run folder: the external query read with its gene symbols and its labels translated to
the model's names by ``query_label_map`` before any prediction (:func:`read_query`: scGPT and the baseline score
the same labels, and a bad map fails before minutes of work), and the temperature to predict with
(:func:`model_temperature`: 02's, from the model's manifest, or fitted here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..display.calibration import temperature_meaning

if TYPE_CHECKING:
    from anndata import AnnData

    from ...core.layout import RunLayout
    from ...data.label_map import LabelMapResult

__all__ = ["read_query", "model_temperature", "FROM_MANIFEST", "FITTED_HERE"]

#: where a temperature came from
FROM_MANIFEST, FITTED_HERE = "model manifest (02)", "fitted in 03"


def read_query(params: Any, manifest: Mapping[str, Any]) -> tuple[AnnData | None, LabelMapResult | None]:
    """``(query, what the label map did)`` of :class:`~scgpt_protocol.core.params.EvaluateParams`; ``(None, None)``
    without ``query_path``.

    The query's label column is ``query_label_key`` (None: the run's). With ``query_label_map`` its labels are
    mapped in place (the labels as given stay in ``obs[<key>_original]``); a label mapped to a class the model
    lacks, or a map that leaves no label the model knows, is a :class:`~scgpt_protocol.data.label_map.LabelMapError`.
    """
    from ...data.label_map import describe_label_map, map_obs_labels
    from ...data.read import read_with_symbols

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


def model_temperature(layout: RunLayout, model: Any, manifest: Mapping[str, Any], adata: Any,
                      params: Any, max_seq_len: int) -> dict[str, Any] | None:
    """03: the temperature to predict with, as a record with its ``source``; None when ``params.calibrate`` is
    False. The model's manifest's (02) when it has one, else fitted here on the validation cells (not written
    to the manifest: 03 does not change the model)."""
    if not params.calibrate:
        print("calibrate=False: the probabilities are the raw softmax's.")
        return None
    record = manifest.get("calibration")
    if record and record.get("temperature") is not None:
        record = {**record, "source": FROM_MANIFEST}
    else:
        from ...annotate.calibration import fit_validation_temperature

        record = {**fit_validation_temperature(model, adata, manifest, params, max_seq_len), "source": FITTED_HERE}
    print(f"Calibration: temperature {record['temperature']:.3f} ({record['source']}, {record['n_cells']:,} "
          f"validation cells): {temperature_meaning(record['temperature'])}")
    return record
