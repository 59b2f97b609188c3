"""Calibration in the protocol's steps: 02 records the model's temperature (fitted on the validation cells) in
its manifest; 03 takes it from there -- or fits it when the manifest has none -- and shows the expected
calibration error before and after, for scGPT and the baseline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from ..core.log import DETAIL
from .tables import styled

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

    from ..core.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = ["record_temperature", "model_temperature", "calibration_display", "calibration_frame", "temperature_meaning"]

#: where a temperature came from
FROM_MANIFEST, FITTED_HERE = "model manifest (02)", "fitted in 03"


def _fit(model: Any, manifest: Mapping[str, Any], adata: Any, params: Any, max_seq_len: int) -> dict[str, Any]:
    from ..annotate.calibration import fit_model_temperature

    return fit_model_temperature(model, adata, categories=manifest["categories"], label_key=manifest["label_key"],
                                 cells=(adata.obs["split"] == "val").to_numpy(), genes=manifest.get("genes"),
                                 max_seq_len=max_seq_len, batch_size=params.batch_size, seed=params.seed,
                                 precision=getattr(params, "precision", "auto"))


def record_temperature(layout: RunLayout, params: Any) -> dict[str, Any]:
    """02: fit the fine-tuned model's temperature on the validation cells and record it in its manifest.

    Returns the record (``temperature``, ECE and NLL of the validation cells before and after).
    """
    from ..adapt.saved import load_finetuned, record_calibration, trained_max_seq_len
    from ..pp.io import read_prepared

    model, manifest = load_finetuned(layout.model_dir, device=params.device)
    adata = read_prepared(layout, backed=True)
    record = _fit(model, manifest, adata, params, trained_max_seq_len(manifest, None))
    record_calibration(layout.model_dir, record)
    logger.info("calibration: temperature %.3f fitted on %d validation cells (ECE %.3f -> %.3f)",
                record["temperature"], record["n_cells"], record["ece_before"], record["ece_after"],
                extra=DETAIL)  # the log only: the notebook prints it
    return record


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
        record = {**_fit(model, manifest, adata, params, max_seq_len), "source": FITTED_HERE}
    print(f"Calibration: temperature {record['temperature']:.3f} ({record['source']}, {record['n_cells']:,} "
          f"validation cells): {temperature_meaning(record['temperature'])}")
    return record


def temperature_meaning(temperature: float) -> str:
    """What a fitted temperature says of the raw softmax, in words."""
    if temperature > 1:
        return f"T > 1: the raw softmax was over-confident; the probabilities are softened (logits / {temperature:.2f})."
    if temperature < 1:
        return f"T < 1: the raw softmax was under-confident; the probabilities are sharpened (logits / {temperature:.2f})."
    return "T = 1: the raw softmax was as calibrated as a temperature can make it; the probabilities are unchanged."


def calibration_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method: temperature, ECE before and after, on which cells it was fitted and measured."""
    rows = {}
    from ..metrics import BASELINE_METHOD, SCGPT_METHOD

    for method, entry in ((SCGPT_METHOD, record), (BASELINE_METHOD, record.get("baseline"))):
        if not entry:
            continue
        fitted = entry.get("fitted_on") or {}
        rows[method] = {"temperature": entry.get("temperature"), "ECE before": entry.get("ece_before"),
                        "ECE after": entry.get("ece_after"),
                        "fitted on": (f"{fitted.get('n_cells', 0):,} validation cells"
                                      + (f", {fitted['source']}" if fitted.get("source") else "")) if fitted else "-",
                        "measured on": f"{entry.get('n_cells', 0):,} {record.get('split', 'test')} cells"}
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
    return frame.astype({c: float for c in ("temperature", "ECE before", "ECE after") if c in frame})


def calibration_display(record: Mapping[str, Any]) -> Styler:
    """The calibration table of 03: lower ECE is better; 0 means "0.9" is right 9 times in 10."""
    return styled(calibration_frame(record), text=["fitted on", "measured on"],
                  caption=f"expected calibration error ({record.get('n_bins', 15)} equal-width bins; lower is better)")
