"""What :func:`~scgpt_protocol.annotate.inference.predict` returns: per-cell labels, codes, confidence,
probabilities and embeddings (:class:`Prediction`), in the order of ``adata.obs_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["Prediction", "check_prediction"]


@dataclass
class Prediction:
    """Per-cell results of :func:`predict`, in the order of ``adata.obs_names``.

    After :func:`~scgpt_protocol.annotate.refinement.refine` (``min_confidence`` / ``majority_voting``), ``labels``
    is the per-cell call (``"Unknown"`` below ``min_confidence``) and the fields below it are filled;
    ``codes`` and ``confidence`` always describe the model's predicted class. With a calibration
    ``temperature`` (:mod:`~scgpt_protocol.annotate.calibration`), ``probabilities`` and ``confidence`` are the
    calibrated ones -- what ``min_confidence`` thresholds -- and ``raw_confidence`` keeps the raw softmax's.
    """

    labels: np.ndarray  # str [n]
    codes: np.ndarray  # int64 [n], index of the predicted class in categories
    confidence: np.ndarray  # float32 [n], the softmax probability of the predicted class
    probabilities: Any  # float32 [n, n_classes]: an array, or an h5py dataset with predict(out=...)
    embeddings: Any  # float32 [n, d], L2-normalised <cls> embeddings (an h5py dataset with out=...)
    categories: list[str]
    precision: str = "fp32"  # what the forward passes ran in: fp32, bf16 or fp16
    predicted: np.ndarray | None = None  # str [n], the predicted class before abstention (refine)
    unknown: np.ndarray | None = None  # bool [n], confidence below min_confidence (refine)
    over_clustering: np.ndarray | None = None  # str [n], over-cluster id (refine, majority voting)
    majority_voting: np.ndarray | None = None  # str [n], the over-cluster's majority label (refine)
    refinement: dict[str, Any] | None = None  # parameters of refine (min_confidence, resolution...)
    store: Path | None = None  # the HDF5 file holding probabilities and embeddings (predict(out=...))
    temperature: float | None = None  # the calibration temperature applied (None: raw softmax)
    raw_confidence: np.ndarray | None = None  # float32 [n], the raw softmax probability of the predicted class


def check_prediction(adata: AnnData, prediction: Prediction) -> None:
    """A clear error when ``prediction`` is not of the cells of ``adata`` (same number, same order)."""
    if len(prediction.labels) != adata.n_obs:
        msg = (
            f"the prediction holds {len(prediction.labels)} cells but adata has {adata.n_obs}; pass the "
            "same AnnData (same cells, same order) that predict() was called with."
        )
        raise ValueError(msg)
