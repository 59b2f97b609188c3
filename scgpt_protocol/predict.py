"""Class predictions of a fine-tuned model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .device import autocast, resolve_precision
from .embedding import iter_batches
from .log import progress
from .model import ScGPT
from .tokenize import check_expression

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["Prediction", "predict"]


@dataclass
class Prediction:
    """Per-cell results of :func:`predict`, in the order of ``adata.obs_names``.

    After :func:`~scgpt_protocol.refine.refine` (``min_confidence`` / ``majority_voting``), ``labels``
    is the per-cell call (``"Unknown"`` below ``min_confidence``) and the fields below it are filled;
    ``codes`` and ``confidence`` always describe the model's predicted class.
    """

    labels: np.ndarray  # str [n]
    codes: np.ndarray  # int64 [n], index of the predicted class in categories
    confidence: np.ndarray  # float32 [n], the softmax probability of the predicted class
    probabilities: np.ndarray  # float32 [n, n_classes]
    embeddings: np.ndarray  # float32 [n, d], L2-normalised <cls> embeddings of the fine-tuned model
    categories: list[str]
    precision: str = "fp32"  # what the forward passes ran in: fp32, bf16 or fp16
    predicted: np.ndarray | None = None  # str [n], the predicted class before abstention (refine)
    unknown: np.ndarray | None = None  # bool [n], confidence below min_confidence (refine)
    over_clustering: np.ndarray | None = None  # str [n], over-cluster id (refine, majority voting)
    majority_voting: np.ndarray | None = None  # str [n], the over-cluster's majority label (refine)
    refinement: dict[str, Any] | None = None  # parameters of refine (min_confidence, resolution...)


def predict(
    model: ScGPT,
    adata: AnnData,
    *,
    categories: Sequence[str],
    batch_size: int = 64,
    max_seq_len: int = 1200,
    seed: int = 0,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    desc: str = "predicting",
    genes: Sequence[str] | None = None,
    precision: str = "auto",
    min_confidence: float = 0.0,
    majority_voting: bool = False,
) -> Prediction:
    """Predict cell types with a model that has a classification head.

    ``categories[i]`` is the label of class ``i`` (saved with the fine-tuned model). ``genes`` (the
    model's training genes, ``manifest["genes"]``) keeps the input to the genes it was trained on; data
    holding less than half of them is refused (:class:`~scgpt_protocol.errors.GeneMatchError`). ``<cls>``
    carries ``model.cls_value``, the value the classifier was fine-tuned with (0, as published; set by
    :func:`~scgpt_protocol.train.load_finetuned` and :func:`~scgpt_protocol.load_model`).
    ``precision`` is ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``
    (:func:`~scgpt_protocol.device.resolve_precision`); the one used is ``Prediction.precision``.

    ``min_confidence`` > 0 or ``majority_voting`` applies :func:`~scgpt_protocol.refine.refine` to all
    the cells of ``adata``: cells whose probability is below ``min_confidence`` get the label
    ``"Unknown"``; majority voting over-clusters the fine-tuned embeddings and fills
    ``majority_voting``.
    """
    if min_confidence:
        from .refine import _check_threshold

        _check_threshold(min_confidence)
    if model.cls_decoder is None:
        msg = "the model has no classification head; fine-tune it first (02_finetune) or load a fine-tuned checkpoint."
        raise ValueError(msg)
    n_classes = model.cls_decoder.out_layer.out_features
    if len(categories) != n_classes:
        msg = f"{len(categories)} categories given but the model's head has {n_classes} classes."
        raise ValueError(msg)
    check_expression(adata, layer=layer)
    device = next(model.parameters()).device
    used = resolve_precision(precision, device)
    probs = np.zeros((adata.n_obs, n_classes), dtype=np.float32)
    embs = np.zeros((adata.n_obs, model.config.d_model), dtype=np.float32)
    was_training = model.training
    model.eval()
    batches = iter_batches(adata, model, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed,
                           layer=layer, gene_symbol_key=gene_symbol_key, genes=genes)
    try:
        with torch.inference_mode(), autocast(device, used):
            for batch in progress(batches, total=adata.n_obs, desc=desc, unit="cells", size=lambda b: len(b.index)):
                batch = batch.to(device)
                cell = model.cell_embedding(batch.gene_ids, batch.values, batch.padding_mask)
                logits = model.cls_decoder(cell).float()
                probs[batch.index] = torch.softmax(logits, dim=1).cpu().numpy()
                embs[batch.index] = torch.nn.functional.normalize(cell.float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    codes = probs.argmax(axis=1)
    cats = list(categories)
    prediction = Prediction(
        labels=np.asarray(cats, dtype=object)[codes],
        codes=codes.astype(np.int64),
        confidence=probs[np.arange(len(codes)), codes],
        probabilities=probs,
        embeddings=embs,
        categories=cats,
        precision=used,
    )
    if min_confidence or majority_voting:
        from .refine import refine

        prediction = refine(prediction, min_confidence=min_confidence, majority_voting=majority_voting, seed=seed)
    return prediction
