"""Confidence that means what it says: temperature scaling and the expected calibration error.

A fine-tuned network's softmax is typically over-confident: among cells called with probability 0.9,
fewer than 9 in 10 are right, so a ``min_confidence`` threshold has no meaning a user can reason about.
Temperature scaling (Guo et al. 2017) divides the logits by one number ``T`` fitted on the validation
cells (minimising their negative log-likelihood): ``T > 1`` softens over-confident probabilities,
``T < 1`` sharpens under-confident ones, and the predicted class never changes.

* :func:`fit_temperature` fits ``T`` on validation logits (or log-probabilities) and true classes;
* :func:`calibrated` applies it to probabilities (what :class:`~scgpt_protocol.annotate.prediction.Prediction`
  keeps) or to logits;
* :func:`expected_calibration_error` and :func:`reliability_table` measure calibration over equal-width
  confidence bins (15 by default), before and after;
* :func:`calibration_record` is the ``calibration`` entry of ``metrics.json``;
* :func:`fit_model_temperature` predicts a fine-tuned model's validation cells and fits its temperature (02
  records it in the model's manifest; :func:`~scgpt_protocol.annotate.inference.predict` then applies it).

Probabilities and logits give the same result: softmax is unchanged by adding a constant to every logit
of a cell, and ``log softmax(z) = z - logsumexp(z)``, so ``softmax(log p / T) = softmax(z / T)`` when
``p = softmax(z)``. ``Prediction.probabilities`` therefore suffices; the logits need not be kept.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["TEMPERATURE_BOUNDS", "ECE_BINS", "fit_temperature", "calibrated", "negative_log_likelihood",
           "expected_calibration_error", "reliability_table", "table_ece", "calibration_record",
           "fit_model_temperature", "temperature_record", "fit_validation_temperature"]

#: the range searched by :func:`fit_temperature`
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: equal-width confidence bins of the expected calibration error
ECE_BINS = 15
#: probabilities are clipped at this value before their log is taken (a 0 would give -inf)
_TINY = 1e-12


def _logits_and_classes(logits: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` as float64 ``[n, C]`` and ``y`` as int64 ``[n]``, checked (clear errors otherwise)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        msg = (f"logits have shape {z.shape}; expected [cells, classes] with at least one cell and two classes "
               "(the validation cells' logits, or the log of their probabilities).")
        raise ValueError(msg)
    classes = np.asarray(y)
    if classes.shape != (z.shape[0],):
        msg = f"y has shape {classes.shape} but logits hold {z.shape[0]} cells; give one true class index per cell."
        raise ValueError(msg)
    if not np.issubdtype(classes.dtype, np.integer):
        msg = (f"y has dtype {classes.dtype}; expected integer class indices (the column of the true class). "
               "Turn labels into indices first, e.g. categories.index(label).")
        raise TypeError(msg)
    if classes.min() < 0 or classes.max() >= z.shape[1]:
        msg = f"y holds class indices outside 0..{z.shape[1] - 1}; logits have {z.shape[1]} columns."
        raise ValueError(msg)
    if not np.isfinite(z).all():
        msg = (f"logits hold {int((~np.isfinite(z)).sum())} NaN or infinite values; expected finite numbers "
               "(for probabilities, clip them away from 0 before taking the log, or use calibrated()).")
        raise ValueError(msg)
    return z, classes.astype(np.int64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: Any, y: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / temperature)``."""
    z, classes = _logits_and_classes(logits, y)
    return _nll(z, classes, float(temperature))


def _nll(z: np.ndarray, classes: np.ndarray, temperature: float) -> float:
    log_p = _log_softmax(z / temperature)
    return float(-log_p[np.arange(len(classes)), classes].mean())


def fit_temperature(logits: Any, y: Any, *, max_iter: int = 100,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(logits / T)`` on validation cells.

    A bounded scalar search (Brent's method) on ``log T`` within ``bounds``: deterministic, no random start,
    one pass over ``[n, C]`` per step. When the best ``T`` found does not lower the NLL below that of ``T = 1``
    (already calibrated, or too few cells to tell), 1.0 is returned: the probabilities are left as they are.

    Parameters
    ----------
    logits
        ``[n_cells, n_classes]`` float: the validation cells' logits, or the log of their probabilities
        (``numpy.log(np.clip(p, 1e-12, 1))``: the same fit, see the module's docstring).
    y
        ``[n_cells]`` integer: the column of each cell's true class.
    max_iter
        Iterations of the search (its tolerance is 1e-4 on ``log T``).
    bounds
        ``(lowest, highest)`` temperature searched, both positive.

    Returns
    -------
    float
        ``T`` (> 1: the model was over-confident; < 1: under-confident).

    Raises
    ------
    ValueError
        No cells, shapes that do not match, class indices outside the columns, NaN logits, bad bounds.

    Examples
    --------
    >>> z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 0.0]])
    >>> t = fit_temperature(z, np.array([0, 1, 1, 0]))
    >>> t > 1
    True
    """
    from scipy.optimize import minimize_scalar

    z, classes = _logits_and_classes(logits, y)
    low, high = (float(b) for b in bounds)
    if not 0 < low < high:
        msg = f"bounds={bounds!r}: expected (lowest, highest) temperatures with 0 < lowest < highest, e.g. (0.05, 20)."
        raise ValueError(msg)
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter}.")
    found = minimize_scalar(lambda log_t: _nll(z, classes, math.exp(log_t)), bounds=(math.log(low), math.log(high)),
                            method="bounded", options={"maxiter": int(max_iter), "xatol": 1e-4})
    temperature = float(math.exp(found.x))
    if not np.isfinite(found.fun) or _nll(z, classes, temperature) >= _nll(z, classes, 1.0):
        return 1.0
    return temperature


def calibrated(values: Any, temperature: float, *, logits: bool = False) -> np.ndarray:
    """Probabilities after temperature scaling: ``softmax(log p / T)``, or ``softmax(z / T)`` with ``logits=True``.

    Parameters
    ----------
    values
        ``[n_cells, n_classes]``: probabilities (rows summing to 1, as ``Prediction.probabilities`` and the
        baseline's ``BaselineResult.probabilities``; the default) or logits (``logits=True``). Both give the
        same result for the same model (see the module's docstring).
    temperature
        From :func:`fit_temperature`; 1.0 returns the probabilities unchanged (up to rounding).

    Returns
    -------
    numpy.ndarray
        float32 ``[n_cells, n_classes]``, rows summing to 1, the same argmax as ``values``.
    """
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        msg = f"temperature={temperature!r}; expected a positive number (from fit_temperature; 1.0 = unchanged)."
        raise ValueError(msg)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values have shape {v.shape}; expected [cells, classes].")
    if not logits:
        if (v < 0).any() or not np.isfinite(v).all():
            msg = ("values hold negative, NaN or infinite numbers; expected probabilities (or pass logits=True "
                   "for logits).")
            raise ValueError(msg)
        v = np.log(np.clip(v, _TINY, None))
    return np.exp(_log_softmax(v / t)).astype(np.float32)


def _confidence_and_correct(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    right = np.asarray(correct).ravel()
    if conf.shape != right.shape:
        msg = f"confidence holds {conf.size} values but correct {right.size}; give one of each per cell."
        raise ValueError(msg)
    if conf.size == 0:
        raise ValueError("no cells: confidence and correct are empty.")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        msg = "confidence must be probabilities in [0, 1] (the predicted class's probability), without NaN."
        raise ValueError(msg)
    return conf, right.astype(bool)


def _bin_of(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins ``(lower, upper]`` on [0, 1]; the first one also holds 0."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins}.")
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_table(confidence: Any, correct: Any, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Accuracy against confidence over ``n_bins`` equal-width bins of [0, 1] (a reliability diagram's data).

    Returns
    -------
    pandas.DataFrame
        One row per bin, empty ones too: ``bin`` (0-based), ``lower``, ``upper`` (the bin is ``(lower, upper]``;
        the first also holds 0), ``n`` (cells), ``mean_confidence`` and ``accuracy`` (NaN in empty bins).
    """
    conf, right = _confidence_and_correct(confidence, correct)
    which = _bin_of(conf, n_bins)
    n = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / n
        accuracy = np.bincount(which, weights=right.astype(np.float64), minlength=n_bins) / n
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "n": n,
                         "mean_confidence": mean_conf, "accuracy": accuracy})


def expected_calibration_error(confidence: Any, correct: Any, *, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b n_b / n * |accuracy_b - mean confidence_b|`` over equal-width bins.

    ``confidence``: the probability of each cell's predicted class; ``correct``: whether that prediction is
    right. 0 is perfect calibration; a model that says 0.9 and is right half the time scores 0.4.

    Examples
    --------
    >>> round(expected_calibration_error([0.9, 0.9, 0.9, 0.9], [True, False, True, False]), 3)
    0.4
    """
    return table_ece(reliability_table(confidence, correct, n_bins))


def table_ece(table: pd.DataFrame) -> float:
    """The expected calibration error of a :func:`reliability_table` (NaN when every bin is empty)."""
    filled = table[table["n"] > 0]
    if filled.empty:
        return float("nan")
    gap = (filled["accuracy"] - filled["mean_confidence"]).abs()
    return float((gap * filled["n"]).sum() / filled["n"].sum())


def calibration_record(temperature: float, ece_before: float, ece_after: float, n_cells: int,
                       split: str = "validation", *, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """The ``calibration`` entry of ``metrics.json``: the temperature, the ECE before and after, and on what.

    ``n_cells`` and ``split`` say which cells the temperature was fitted on (and the ECE measured on, unless
    the caller says otherwise in ``split``); ``n_bins``: the bins of the ECE.
    """
    for name, value in (("temperature", temperature), ("ece_before", ece_before), ("ece_after", ece_after)):
        if not np.isfinite(float(value)):
            raise ValueError(f"{name}={value!r}; expected a finite number.")
    return {"temperature": float(temperature), "ece_before": float(ece_before), "ece_after": float(ece_after),
            "n_cells": int(n_cells), "split": str(split), "n_bins": int(n_bins)}


#: at most this many validation cells (a seeded sample) are predicted to fit the temperature
MAX_FIT_CELLS = 20_000


def fit_model_temperature(model: Any, adata: Any, *, categories: Sequence[str], label_key: str, cells: Any,
                          genes: Sequence[str] | None = None, max_seq_len: int = 1200, batch_size: int = 64,
                          seed: int = 0, precision: str = "auto", max_cells: int = MAX_FIT_CELLS) -> dict[str, Any]:
    """Fit a fine-tuned model's temperature on its validation cells: predict them (raw softmax), minimise NLL.

    Parameters
    ----------
    model, categories, genes
        The fine-tuned model, its classes and training genes (the manifest's ``categories`` / ``genes``).
    adata, label_key, cells
        The cells to fit on (``cells``: a boolean mask over ``adata``, e.g. ``obs["split"] == "val"``) and their
        labels; cells without a label or of a class the model lacks are left out. Above ``max_cells`` of them,
        a seeded random sample of that many (a single number is fitted: a few thousand cells pin it).

    Returns
    -------
    dict
        :func:`calibration_record` of the fit (``split="val"``) plus ``nll_before`` / ``nll_after``: the
        temperature, and the ECE of the fitted cells before and after.

    Raises
    ------
    ValueError
        No fit cell with a label the model knows (the run has no validation split?).
    """
    from ..data.labels import clean_labels, missing_labels
    from ..data.matrix import sample_rows
    from .inference import predict

    mask = np.asarray(cells, dtype=bool)
    classes = [str(c) for c in categories]
    truth = adata.obs[label_key].astype(object).to_numpy()
    known = ~np.asarray(missing_labels(pd.Series(truth)), dtype=bool)
    code = np.full(len(truth), -1, dtype=np.int64)
    position = {c: i for i, c in enumerate(classes)}
    code[known] = [position.get(v, -1) for v in clean_labels(truth[known])]
    rows = np.flatnonzero(mask & (code >= 0))
    if len(rows) == 0:
        msg = (f"no validation cell with a label the model knows ({int(mask.sum())} cells selected); the temperature "
               "is fitted on the validation split of 01. Rerun 01 (val_size > 0), or set calibrate=False.")
        raise ValueError(msg)
    rows = sample_rows(rows, max_cells, seed)
    subset = adata[rows]
    subset = subset.to_memory() if getattr(subset, "isbacked", False) else subset
    prediction = predict(model, subset, categories=classes, genes=genes, batch_size=batch_size,
                         max_seq_len=max_seq_len, seed=seed, precision=precision, desc="calibrating",
                         temperature=None)
    return temperature_record(prediction.probabilities, code[rows])


def temperature_record(probabilities: Any, y: Any, split: str = "val") -> dict[str, Any]:
    """Fit a temperature on predicted probabilities and their true class codes, as a record.

    The one rule of the package for scGPT and the baseline alike: minimise the NLL of
    ``softmax(log p / T)`` (:func:`fit_temperature`), then :func:`calibration_record` (ECE of the same cells
    before and after, :data:`ECE_BINS` bins) plus ``nll_before`` / ``nll_after``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    log_p = np.log(np.clip(probabilities, _TINY, None))
    temperature = fit_temperature(log_p, y)
    after = calibrated(probabilities, temperature)
    right = probabilities.argmax(axis=1) == y
    record = calibration_record(temperature, expected_calibration_error(probabilities.max(axis=1), right),
                                expected_calibration_error(after.max(axis=1), right), n_cells=len(y), split=split)
    record.update(nll_before=negative_log_likelihood(log_p, y),
                  nll_after=negative_log_likelihood(log_p, y, temperature))
    return record


def fit_validation_temperature(model: Any, adata: Any, manifest: Mapping[str, Any], params: Any,
                               max_seq_len: int) -> dict[str, Any]:
    """The temperature of a fine-tuned model, fitted the one way the package does it (02, 03 and
    :class:`~scgpt_protocol.tl.AnnotationRunner`): on ``adata``'s validation cells (``obs["split"] == "val"``),
    with the manifest's ``categories``, ``label_key`` and ``genes``, and the step's ``batch_size``, ``seed`` and
    ``precision`` (fp32 when the step has ``amp`` off). Returns :func:`fit_model_temperature`'s record."""
    precision = getattr(params, "precision", "auto") if getattr(params, "amp", True) else "fp32"
    return fit_model_temperature(model, adata, categories=manifest["categories"], label_key=manifest["label_key"],
                                 cells=(adata.obs["split"] == "val").to_numpy(), genes=manifest.get("genes"),
                                 max_seq_len=max_seq_len, batch_size=params.batch_size, seed=params.seed,
                                 precision=precision)
