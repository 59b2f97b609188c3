"""Step 03's calibration figures: the expected calibration error and the reliability tables of scGPT and of the
baseline on the test cells, before and after temperature scaling (:mod:`~scgpt_protocol.annotate.calibration`).

The temperatures are fitted on the validation cells (scGPT's in 02, recorded in the model's manifest, or in 03
when the manifest has none; the baseline's in 03); the test cells measure them, so the ECE after is an honest
figure. A cell's prediction counts as right when the model's predicted class -- before abstention -- is its
label: calibration is about the probability of that class, whatever ``min_confidence`` then does with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from ..annotate.calibration import ECE_BINS, reliability_table, table_ece
from ..annotate.columns import COLUMNS, RAW_CONFIDENCE, TRUE_LABEL
from ..data.labels import missing_labels

if TYPE_CHECKING:
    from .baseline import BaselineResult
    from .scoring import EvalResult

__all__ = ["CalibrationReport", "calibration_report"]


@dataclass
class CalibrationReport:
    """What :func:`calibration_report` measured: ``record`` (``metrics.json["calibration"]``) and ``tables``
    (curve name -> reliability table, for :func:`~scgpt_protocol.pl.plot_reliability`: ``"scGPT raw"``,
    ``"scGPT calibrated"``, ``"baseline raw"``, ``"baseline calibrated"``)."""

    record: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _entry(confidence_raw: np.ndarray, confidence: np.ndarray, right: np.ndarray, temperature: float | None,
           fitted: Mapping[str, Any] | None, n_bins: int) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    before = reliability_table(confidence_raw, right, n_bins)
    entry: dict[str, Any] = {"temperature": temperature, "ece_before": table_ece(before), "ece_after": None,
                             "n_cells": len(right), "accuracy": float(np.mean(right))}
    tables = {"raw": before}
    if temperature is not None:
        after = reliability_table(confidence, right, n_bins)
        entry["ece_after"] = table_ece(after)
        tables["calibrated"] = after
    if fitted:
        entry["fitted_on"] = {k: fitted[k] for k in ("split", "n_cells", "source") if k in fitted}
    return entry, tables


def calibration_report(scgpt: EvalResult, baseline: BaselineResult | None = None, *,
                       fitted: Mapping[str, Any] | None = None, n_bins: int = ECE_BINS) -> CalibrationReport:
    """ECE before and after calibration, and the reliability tables, of scGPT (and the baseline) on the cells
    ``scgpt`` was scored on.

    Parameters
    ----------
    scgpt
        :func:`~scgpt_protocol.evaluate.scoring.evaluate_predictions` of a prediction made with a temperature
        (its table holds ``scgpt_label_confidence_raw``) or without one (then only "before" is measured).
    baseline
        :func:`~scgpt_protocol.evaluate.baseline.logistic_regression_baseline` on the same cells (with
        ``calibrate=True`` for an "after").
    fitted
        scGPT's fit record (``manifest["calibration"]`` or
        :func:`~scgpt_protocol.annotate.calibration.fit_model_temperature`, with ``source``); its ``temperature``
        is the one applied.

    Returns
    -------
    CalibrationReport
        ``record``: ``{"temperature", "ece_before", "ece_after", "n_cells", "split", "n_bins", "fitted_on",
        "baseline": {...}}`` (scGPT's figures at the top level; ``ece_after`` and ``temperature`` None when
        calibration is off).
    """
    frame = scgpt.predictions
    labelled = ~np.asarray(missing_labels(frame[TRUE_LABEL]), dtype=bool)
    truth = frame[TRUE_LABEL][labelled].astype(str).to_numpy()
    called = COLUMNS["predicted"] if COLUMNS["predicted"] in frame else COLUMNS["labels"]
    right = frame[called][labelled].astype(str).to_numpy() == truth
    confidence = frame[COLUMNS["confidence"]].to_numpy(dtype=np.float64)[labelled]
    calibrated_on = RAW_CONFIDENCE in frame
    raw = frame[RAW_CONFIDENCE].to_numpy(dtype=np.float64)[labelled] if calibrated_on else confidence
    temperature = float(fitted["temperature"]) if calibrated_on and fitted else None
    record, curves = _entry(raw, confidence, right, temperature, fitted if calibrated_on else None, n_bins)
    record.update(split="test", n_bins=int(n_bins))
    tables = {f"scGPT {when}": table for when, table in curves.items()}
    if baseline is not None:
        names = frame.index[labelled]
        position = baseline.predictions.index.get_indexer(names)
        if (position < 0).any():
            raise ValueError("the baseline was not scored on the cells scGPT was; give both the same test cells.")
        proba = np.asarray(baseline.probabilities, dtype=np.float64)[position]
        b_right = baseline.predictions.astype(str).to_numpy()[position] == truth
        b_raw = (np.asarray(baseline.raw_confidence, dtype=np.float64)[position]
                 if baseline.raw_confidence is not None else proba.max(axis=1))
        entry, curves = _entry(b_raw, proba.max(axis=1), b_right, baseline.temperature, baseline.calibration, n_bins)
        record["baseline"] = entry
        tables.update({f"baseline {when}": table for when, table in curves.items()})
    return CalibrationReport(record=record, tables=tables)
