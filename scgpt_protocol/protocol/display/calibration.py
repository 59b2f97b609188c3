"""How the reports show calibration: the temperature in words, and 03's table of the expected calibration error
before and after, for scGPT and the baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from ...annotate.calibration import ECE_BINS
from ...metrics import BASELINE_METHOD, SCGPT_METHOD
from .tables import styled

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

__all__ = ["calibration_display", "calibration_frame", "temperature_meaning"]


def temperature_meaning(temperature: float) -> str:
    """What a fitted temperature says of the raw softmax, in words."""
    if temperature > 1:
        return (f"T > 1: the raw softmax was over-confident; the probabilities are softened "
                f"(logits / {temperature:.2f}).")
    if temperature < 1:
        return (f"T < 1: the raw softmax was under-confident; the probabilities are sharpened "
                f"(logits / {temperature:.2f}).")
    return "T = 1: the raw softmax was as calibrated as a temperature can make it; the probabilities are unchanged."


def calibration_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method: temperature, ECE before and after, on which cells it was fitted and measured."""
    rows = {}
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
                  caption=(f"expected calibration error ({record.get('n_bins', ECE_BINS)} equal-width bins; "
                           "lower is better)"))
