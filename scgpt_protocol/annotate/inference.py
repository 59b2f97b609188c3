"""Class predictions of a fine-tuned model for every cell (:func:`predict`, chunk by chunk, optionally to
an on-disk store) and writing them into an AnnData in place (:func:`annotate`, like scanpy's ``tl``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch

from ..core.device import autocast, resolve_precision
from ..core.log import progress
from ..core.renamed import renamed_arguments
from ..data.matrix import check_expression
from ..model.embedding import iter_batches
from ..model.scgpt import ScGPT
from .prediction import Prediction, check_prediction

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["annotate", "predict"]


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
    out: str | Path | None = None,
    chunk_size: int = 4096,
    temperature: float | str | None = "auto",
) -> Prediction:
    """Predict cell types with a model that has a classification head.

    ``categories[i]`` is the label of class ``i`` (saved with the fine-tuned model). ``genes`` (the
    model's training genes, ``manifest["genes"]``) keeps the input to the genes it was trained on; data
    holding less than half of them is refused (:class:`~scgpt_protocol.core.errors.GeneMatchError`). ``<cls>``
    carries ``model.cls_value``, the value the classifier was fine-tuned with (0, as published; set by
    :func:`~scgpt_protocol.adapt.saved.load_finetuned` and :func:`~scgpt_protocol.load_model`).
    ``precision`` is ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``
    (:func:`~scgpt_protocol.core.device.resolve_precision`); the one used is ``Prediction.precision``.

    ``min_confidence`` > 0 or ``majority_voting`` applies :func:`~scgpt_protocol.annotate.refinement.refine` to all
    the cells of ``adata``: cells whose probability is below ``min_confidence`` get the label
    ``"Unknown"``; majority voting over-clusters the fine-tuned embeddings and fills
    ``majority_voting``.

    ``out`` (a path): the per-cell matrices that grow with the number of cells, ``probabilities``
    ``[n, C]`` and ``embeddings`` ``[n, d]``, are written to this HDF5 file chunk by chunk
    (:mod:`~scgpt_protocol.data.store`; datasets ``probabilities`` and ``embeddings``, attribute
    ``categories``) and the returned fields are read-only h5py datasets of it (rows by
    :func:`~scgpt_protocol.data.store.take_rows`); only ``labels``, ``codes`` and ``confidence`` are in memory,
    so the memory of predicting every cell of a backed AnnData (``read_h5ad(path, backed="r")``) does not
    grow with the number of cells beyond these vectors. The numbers are the same as without ``out``.
    ``chunk_size``: cells tokenised at a time (and rows written at a time).

    ``temperature``: calibration (:mod:`~scgpt_protocol.annotate.calibration`). ``"auto"``: the temperature
    fitted on the validation cells after fine-tuning (``model.temperature``, which
    :func:`~scgpt_protocol.adapt.saved.load_finetuned` sets from the manifest), none when the model has none;
    a number: that one; None: the raw softmax. The probabilities, ``confidence`` and so ``min_confidence`` are
    then ``softmax(logits / T)``; ``raw_confidence`` keeps the raw softmax's probability of the predicted
    class, which a temperature never changes.
    """
    if min_confidence:
        from .refinement import check_min_confidence

        check_min_confidence(min_confidence)
    n_classes = _head_classes(model, categories)
    temperature = _temperature(model, temperature)
    check_expression(adata, layer=layer)
    device = next(model.parameters()).device
    used = resolve_precision(precision, device)
    cats = list(categories)
    sink = _PredictionSink(adata.n_obs, n_classes, model.config.d_model, cats, used, out=out, chunk_size=chunk_size,
                           temperature=temperature)
    was_training = model.training
    model.eval()
    batches = iter_batches(adata, model, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed,
                           layer=layer, gene_symbol_key=gene_symbol_key, genes=genes, chunk_size=chunk_size)
    try:
        with torch.inference_mode(), autocast(device, used):
            for batch in progress(batches, total=adata.n_obs, desc=desc, unit="cells", size=lambda b: len(b.index)):
                batch = batch.to(device)
                cell = model.cell_embedding(batch.gene_ids, batch.values, batch.padding_mask)
                logits = model.cls_decoder(cell).float()
                raw = torch.softmax(logits, dim=1).cpu().numpy()
                p = raw if temperature is None else torch.softmax(logits / temperature, dim=1).cpu().numpy()
                e = torch.nn.functional.normalize(cell.float(), dim=1).cpu().numpy()
                sink.put(batch.index, p, e, raw)
    except BaseException:
        sink.abort()
        raise
    finally:
        model.train(was_training)
    prediction = sink.prediction()
    if min_confidence or majority_voting:
        from .refinement import refine

        prediction = refine(prediction, min_confidence=min_confidence, majority_voting=majority_voting, seed=seed)
    return prediction


def _temperature(model: ScGPT, temperature: float | str | None) -> float | None:
    """The temperature :func:`predict` divides the logits by (None: none), checked."""
    if isinstance(temperature, str):
        if temperature != "auto":
            msg = f"temperature={temperature!r}; expected 'auto' (the model's own), a positive number or None (raw)."
            raise ValueError(msg)
        temperature = getattr(model, "temperature", None)
    if temperature is None:
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        msg = f"temperature={temperature!r}; expected a positive number (from fit_temperature), 'auto' or None."
        raise ValueError(msg)
    return float(temperature)


def _head_classes(model: ScGPT, categories: Sequence[str]) -> int:
    """The classes of the model's classification head, one per category (else a clear error)."""
    if model.cls_decoder is None:
        msg = "the model has no classification head; fine-tune it first (02_finetune) or load a fine-tuned checkpoint."
        raise ValueError(msg)
    n_classes = model.cls_decoder.out_layer.out_features
    if len(categories) != n_classes:
        msg = f"{len(categories)} categories given but the model's head has {n_classes} classes."
        raise ValueError(msg)
    return n_classes


class _PredictionSink:
    """Where :func:`predict` puts each batch's results: codes and confidences in memory, probabilities and
    embeddings in memory or in the HDF5 store ``out``."""

    def __init__(self, n: int, n_classes: int, d_model: int, cats: list[str], precision: str, *,
                 out: str | Path | None, chunk_size: int, temperature: float | None = None) -> None:
        self.cats, self.precision, self.temperature = cats, precision, temperature
        self.codes = np.zeros(n, dtype=np.int64)
        self.confidence = np.zeros(n, dtype=np.float32)
        self.raw = np.zeros(n, dtype=np.float32) if temperature is not None else None
        self.writer = None
        if out is None:
            self.probs = np.zeros((n, n_classes), dtype=np.float32)
            self.embs = np.zeros((n, d_model), dtype=np.float32)
        else:
            from ..data.store import create_store

            self.writer = create_store(out, n, {"probabilities": n_classes, "embeddings": d_model},
                                       attrs={"categories": cats, "precision": precision}, chunk_rows=chunk_size)

    def put(self, index: np.ndarray, p: np.ndarray, e: np.ndarray, raw: np.ndarray | None = None) -> None:
        """One batch: class probabilities ``p`` (calibrated, with a temperature; ``raw``: the raw softmax) and
        normalised embeddings ``e`` of the cells ``index``."""
        best = (raw if raw is not None else p).argmax(axis=1)  # a temperature never changes the call
        self.codes[index] = best
        self.confidence[index] = p[np.arange(len(best)), best]
        if self.raw is not None and raw is not None:
            self.raw[index] = raw[np.arange(len(best)), best]
        if self.writer is None:
            self.probs[index] = p
            self.embs[index] = e
        else:
            self.writer.put(index, probabilities=p, embeddings=e)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def prediction(self) -> Prediction:
        """The :class:`Prediction` of every cell (closing the store: its arrays are then datasets of it)."""
        store = None
        probs, embs = (self.probs, self.embs) if self.writer is None else (None, None)
        if self.writer is not None:
            from ..data.store import open_store

            store = self.writer.close()
            datasets, _ = open_store(store)
            probs, embs = datasets["probabilities"], datasets["embeddings"]
        return Prediction(
            labels=np.asarray(self.cats, dtype=object)[self.codes],
            codes=self.codes,
            confidence=self.confidence,
            probabilities=probs,
            embeddings=embs,
            categories=self.cats,
            precision=self.precision,
            store=store,
            temperature=self.temperature,
            raw_confidence=self.raw,
        )


@renamed_arguments(obs_key="key_added", embedding_key="embedding_key_added")
def annotate(
    adata: AnnData,
    prediction: Prediction,
    *,
    key_added: str = "scgpt_label",
    embedding_key_added: str | None = "X_scgpt",
) -> None:
    """Write a prediction into ``adata`` **in place** (like scanpy's ``tl`` functions).

    Writes ``obs[key_added]`` (categorical with the model's categories, so colours and orders stay
    stable), ``obs[key_added + "_confidence"]`` (float32 probability of the predicted class; calibrated when the
    prediction is, the raw one then in ``obs[key_added + "_confidence_raw"]``),
    ``obs[key_added + "_code"]`` (int64 index of the predicted class) and ``obsm[embedding_key_added]`` (the
    fine-tuned ``<cls>`` embeddings; skipped when ``embedding_key_added`` is None; a prediction made with
    ``predict(out=...)`` keeps them in its HDF5 store and ``uns[embedding_key_added + "_store"]`` names it).
    A prediction refined by
    :func:`~scgpt_protocol.annotate.refinement.refine` also writes ``obs["scgpt_prediction"]`` (the class before
    abstention; ``obs[key_added]`` then holds ``"Unknown"`` below ``min_confidence``),
    ``obs["scgpt_unknown"]``, ``obs["scgpt_over_clustering"]`` / ``obs["scgpt_majority_voting"]`` (with
    majority voting) and ``uns["scgpt_annotation"]`` (the parameters); with another ``key_added`` these
    are named ``<key_added>_predicted``, ``_unknown``, ``_over_clustering``, ``_majority_voting``.

    Parameters
    ----------
    adata
        The AnnData ``prediction`` was made on (same cells, same order).
    prediction
        The result of :func:`~scgpt_protocol.annotate.inference.predict`.
    key_added
        The ``obs`` column of the labels (and the prefix of the others), as in scanpy.
    embedding_key_added
        The ``obsm`` key of the embeddings (None: not written).

    Examples
    --------
    >>> annotate(adata, predict(model, adata, categories=cats))  # doctest: +SKIP
    >>> sc.pl.umap(adata, color="scgpt_label")  # doctest: +SKIP
    """
    check_prediction(adata, prediction)
    from ..annotate.columns import columns_for
    from ..annotate.refinement import as_refinement, write_annotation

    categories = [str(c) for c in prediction.categories]
    refined = as_refinement(prediction)
    if refined is not None:  # abstention / majority voting: the call, the prediction, the flag, the clusters
        write_annotation(adata, refined, columns=columns_for(key_added), categories=categories)
    else:
        labels = np.asarray(prediction.labels, dtype=object).astype(str)
        adata.obs[key_added] = pd.Categorical(labels, categories=categories)
        adata.obs[f"{key_added}_confidence"] = np.asarray(prediction.confidence, dtype=np.float32)
    if prediction.raw_confidence is not None:  # calibrated: the raw softmax's probability beside it
        adata.obs[f"{key_added}_confidence_raw"] = np.asarray(prediction.raw_confidence, dtype=np.float32)
    adata.obs[f"{key_added}_code"] = np.asarray(prediction.codes, dtype=np.int64)
    if embedding_key_added is not None and getattr(prediction, "store", None) is not None:
        # predict(out=...): the embeddings stay in the store (all cells would not fit flat in memory)
        adata.uns[f"{embedding_key_added}_store"] = str(prediction.store)
    elif embedding_key_added is not None:
        adata.obsm[embedding_key_added] = np.asarray(prediction.embeddings, dtype=np.float32)
