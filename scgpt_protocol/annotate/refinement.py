"""Annotation beyond the argmax: abstention (``Unknown``) and majority voting over an over-clustering.

Two refinements of a per-cell classifier's call, for every model of the protocol (the fine-tuned
classifier of 03 and the zero-shot kNN transfer of 04):

**Abstention.** A cell whose confidence is below ``min_confidence`` gets the label :data:`UNKNOWN`
instead of the predicted class; its prediction and confidence stay in their own columns. The
confidence is the softmax probability of the predicted class (03) or the share of the ``k``
neighbours that vote for the label (04). ``min_confidence=0`` (the default) keeps every call.
Metrics are then reported on all cells (``Unknown`` counts as an error), on the assigned cells,
and with the *coverage* (the share of cells assigned); :func:`coverage_curve` gives both over a
range of thresholds so that a user can pick one.

**Majority voting** (as CellTypist offers it). The cells are over-clustered -- a kNN graph on the
model's embedding (:func:`~scgpt_protocol.data.graph.neighbors`, 10 neighbours) and Leiden at a high
resolution -- and every cell of a cluster gets the cluster's most frequent per-cell label (after
abstention, so a cluster of mostly unsure cells is ``Unknown``). Like CellTypist's heuristic, the
resolution grows with the number of cells: 5, 10, 15, 20, 25 and 30 for fewer than 5k, 20k, 40k, 100k,
200k cells and more (CellTypist's documented default of ``over_cluster``; there the graph is built on a
PCA of the expression, here on the model's embedding). Leiden runs through scanpy with the ``igraph``
backend (``flavor="igraph"``, 2 iterations, undirected; scanpy's announced future default).

Per-cell results land under scanpy-style keys: ``obs["scgpt_label"]`` (the call, with
``Unknown``), ``obs["scgpt_prediction"]`` (before abstention), ``obs["scgpt_label_confidence"]``,
``obs["scgpt_unknown"]``, ``obs["scgpt_over_clustering"]``, ``obs["scgpt_majority_voting"]`` and
the parameters in ``uns["scgpt_annotation"]``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.log import DETAIL
from ..core.renamed import renamed_arguments
from ..data.graph import EXACT_UP_TO
from ..data.labels import UNKNOWN
from ..metrics import coverage_curve
from .columns import COLUMNS

if TYPE_CHECKING:
    from anndata import AnnData

    from .prediction import Prediction

logger = logging.getLogger(__name__)

__all__ = ["UNKNOWN", "Refinement", "overclustering_resolution", "abstain", "over_cluster", "majority_vote",
    "refine_labels", "refine", "as_refinement", "refinement_metrics", "write_annotation"]

#: (cells below, resolution): CellTypist's documented default resolution of its over-clustering
_RESOLUTION_STEPS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))
_RESOLUTION_MAX = 30.0
#: neighbours of the over-clustering graph (CellTypist builds its graph with 10)
OVERCLUSTER_NEIGHBORS = 10
# -- the pieces -----------------------------------------------------------------------------
def overclustering_resolution(n_cells: int) -> float:
    """Leiden resolution of the over-clustering for ``n_cells`` cells (CellTypist's rule).

    5 below 5,000 cells, 10 below 20,000, 15 below 40,000, 20 below 100,000, 25 below 200,000,
    30 from there on.

    Examples
    --------
    >>> overclustering_resolution(700), overclustering_resolution(25_000), overclustering_resolution(10**6)
    (5.0, 15.0, 30.0)
    """
    for below, resolution in _RESOLUTION_STEPS:
        if n_cells < below:
            return resolution
    return _RESOLUTION_MAX


def check_min_confidence(min_confidence: Any) -> float:
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float, np.number)):
        msg = f"min_confidence must be a number in [0, 1]; got {min_confidence!r}. 0 turns abstention off."
        raise TypeError(msg)
    value = float(min_confidence)
    if not 0.0 <= value <= 1.0:
        msg = (
            f"min_confidence={value!r} is outside [0, 1]; it is compared with a probability (03) or a share "
            "of neighbours (04). 0 turns abstention off."
        )
        raise ValueError(msg)
    return value


def abstain(labels: Any, confidence: Any, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels with :data:`UNKNOWN` where ``confidence < min_confidence``.

    Returns
    -------
    labels, unknown
        An object array of ``str`` and the boolean mask of the abstained cells.

    Examples
    --------
    >>> labels, unknown = abstain(["B", "T", "NK"], [0.9, 0.4, 0.6], 0.5)
    >>> labels.tolist(), unknown.tolist()
    (['B', 'Unknown', 'NK'], [False, True, False])
    """
    threshold = check_min_confidence(min_confidence)
    out = np.asarray(labels, dtype=object).astype(str).astype(object)
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != out.shape:
        msg = f"confidence has shape {conf.shape} but labels {out.shape}; give one confidence per cell."
        raise ValueError(msg)
    if np.isnan(conf).any():
        msg = f"confidence holds {int(np.isnan(conf).sum())} NaN values; expected a number per cell."
        raise ValueError(msg)
    unknown = conf < threshold
    out[unknown] = UNKNOWN
    return out, unknown


def over_cluster(
    embedding: Any,
    *,
    resolution: float | None = None,
    n_neighbors: int = OVERCLUSTER_NEIGHBORS,
    seed: int = 0,
) -> np.ndarray:
    """Over-cluster cells on an embedding: kNN graph + Leiden at a high resolution.

    Parameters
    ----------
    embedding
        ``[n_cells, d]``, e.g. ``adata.obsm["X_scgpt"]``.
    resolution
        Leiden resolution; None: :func:`overclustering_resolution` of the number of cells.
    n_neighbors
        Neighbours of the graph (capped at ``n_cells - 1``).
    seed
        Random state of the neighbour search and of Leiden (same seed, same clusters).

    Returns
    -------
    numpy.ndarray
        One cluster id per cell, as ``str`` (``"0"``, ``"1"``...; ``"0"`` is the largest cluster).
    """
    import anndata as ad
    import scanpy as sc

    from ..data.graph import neighbors

    emb = np.asarray(embedding, dtype=np.float32)
    if emb.ndim != 2:
        msg = f"embedding has shape {emb.shape}; expected [cells, dimensions], e.g. adata.obsm['X_scgpt']."
        raise ValueError(msg)
    if not np.isfinite(emb).all():
        raise ValueError("embedding holds NaN or infinite values; re-embed those cells or drop them.")
    n = emb.shape[0]
    if n < 3:  # no graph to speak of: one cluster
        return np.full(n, "0", dtype=object)
    light = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)), obsm={"X_emb": emb})
    neighbors(light, use_rep="X_emb", n_neighbors=n_neighbors, seed=seed)
    res = overclustering_resolution(n) if resolution is None else float(resolution)
    sc.tl.leiden(light, resolution=res, flavor="igraph", n_iterations=2, directed=False, random_state=seed,
                 key_added="over_clustering")
    return light.obs["over_clustering"].astype(str).to_numpy(dtype=object)


#: groups with more cells are over-clustered on a sample of this many (:func:`refine_labels`)
MAX_CLUSTER_CELLS = 200_000


def _over_cluster_rows(emb: Any, rows: np.ndarray, *, resolution: float, n_neighbors: int, seed: int,
                       max_cells: int | None, block: int = 65536) -> np.ndarray:
    """Over-cluster ``emb[rows]``; above ``max_cells`` rows, a sample of them, the rest by nearest sampled cell."""
    from sklearn.neighbors import NearestNeighbors

    from ..data.store import subsample, take_rows

    if max_cells is None or len(rows) <= max_cells:
        return over_cluster(take_rows(emb, rows), resolution=resolution, n_neighbors=n_neighbors, seed=seed)
    if max_cells < 1:
        raise ValueError(f"max_cluster_cells must be a positive integer or None; got {max_cells!r}.")
    sampled = subsample(np.ones(len(rows), dtype=bool), max_cells, seed=seed)
    sample_emb = take_rows(emb, rows[sampled])
    ids = np.empty(len(rows), dtype=object)
    ids[sampled] = over_cluster(sample_emb, resolution=resolution, n_neighbors=n_neighbors, seed=seed)
    nearest = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(sample_emb)
    sample_ids, rest = ids[sampled], np.flatnonzero(~sampled)
    for lo in range(0, len(rest), block):
        part = rest[lo : lo + block]
        hit = nearest.kneighbors(take_rows(emb, rows[part]), return_distance=False)[:, 0]
        ids[part] = sample_ids[hit]
    logger.info("over-clustered a sample of %d of %d cells; the others joined their nearest sampled cell",
                int(max_cells), len(rows), extra=DETAIL)
    return ids


def majority_vote(labels: Any, clusters: Any, confidence: Any | None = None) -> np.ndarray:
    """Every cell gets the most frequent label of its cluster.

    Ties go to the label with the larger summed ``confidence`` in the cluster (when given), then to
    the alphabetically first one, so the result is deterministic.

    Examples
    --------
    >>> majority_vote(["B", "B", "T", "T", "T"], ["0", "0", "0", "1", "1"]).tolist()
    ['B', 'B', 'B', 'T', 'T']
    """
    lab = pd.Series(np.asarray(labels, dtype=object).astype(str))
    clu = pd.Series(np.asarray(clusters, dtype=object).astype(str))
    if len(lab) != len(clu):
        msg = f"labels has {len(lab)} entries but clusters {len(clu)}; give one cluster per cell."
        raise ValueError(msg)
    conf = np.ones(len(lab)) if confidence is None else np.asarray(confidence, dtype=np.float64)
    table = pd.DataFrame({"cluster": clu, "label": lab, "confidence": conf})
    votes = table.groupby(["cluster", "label"], sort=True).agg(n=("label", "size"), weight=("confidence", "sum"))
    votes = votes.reset_index().sort_values(["cluster", "n", "weight", "label"],
                                            ascending=[True, False, False, True], kind="mergesort")
    winner = votes.drop_duplicates("cluster").set_index("cluster")["label"]
    return clu.map(winner).to_numpy(dtype=object)


# -- the whole refinement -------------------------------------------------------------------
@dataclass
class Refinement:
    """Result of :func:`refine_labels`, one entry per cell.

    Attributes
    ----------
    labels
        The per-cell call: the predicted label, or :data:`UNKNOWN` below ``min_confidence``.
    predicted
        The classifier's label before abstention.
    confidence
        The confidence of ``predicted``.
    unknown
        Boolean mask of the abstained cells.
    over_clustering, majority_voting
        Cluster id and the cluster's majority label (None without majority voting).
    params
        ``min_confidence``, ``majority_voting``, ``coverage``, ``n_unknown`` and, with majority
        voting, ``resolution`` (per group), ``n_clusters``, ``n_neighbors``, ``seed``.
    """

    labels: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    unknown: np.ndarray
    over_clustering: np.ndarray | None = None
    majority_voting: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def subset(self, mask: Any) -> Refinement:
        """The same refinement restricted to the cells of a boolean mask or integer positions."""
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask]

        return Refinement(self.labels[mask], self.predicted[mask], self.confidence[mask], self.unknown[mask],
                          take(self.over_clustering), take(self.majority_voting), dict(self.params))

    def frame(self, columns: Mapping[str, str] | None = None, index: Any = None) -> pd.DataFrame:
        """The per-cell columns as a DataFrame, named by ``columns`` (default :data:`COLUMNS`): the call,
        the prediction, its confidence, the Unknown flag and, with majority voting, the over-cluster and
        its majority label."""
        names = {**COLUMNS, **(columns or {})}
        data: dict[str, Any] = {
            names["labels"]: self.labels, names["predicted"]: self.predicted,
            names["confidence"]: self.confidence.astype(np.float32), names["unknown"]: self.unknown,
        }
        if self.majority_voting is not None:
            data[names["over_clustering"]] = self.over_clustering
            data[names["majority_voting"]] = self.majority_voting
        return pd.DataFrame(data, index=index)


def refine_labels(
    labels: Any,
    confidence: Any,
    embedding: Any | None = None,
    *,
    min_confidence: float = 0.0,
    majority_voting: bool = False,
    resolution: float | None = None,
    groups: Any | None = None,
    categories: Sequence[str] | None = None,
    n_neighbors: int = OVERCLUSTER_NEIGHBORS,
    seed: int = 0,
    max_cluster_cells: int | None = MAX_CLUSTER_CELLS,
) -> Refinement:
    """Abstention and majority voting on plain arrays (see the module's description).

    Parameters
    ----------
    labels, confidence
        The classifier's label and its confidence, one per cell.
    embedding
        ``[n_cells, d]``: the model's embedding of the same cells; needed for ``majority_voting``.
    min_confidence
        Cells with ``confidence < min_confidence`` are :data:`UNKNOWN`; 0 turns abstention off.
    majority_voting
        Over-cluster on ``embedding`` and give every cell its cluster's majority label.
    resolution
        Leiden resolution; None: CellTypist's rule for the number of cells of each group.
    groups
        One group per cell (e.g. ``obs["split"]``): each group is over-clustered on its own, so that
        a cluster never mixes, say, test cells with training cells. Cluster ids are then
        ``"<group>-<id>"``. None: all cells together.
    categories
        The classes the model can predict; one named :data:`UNKNOWN` is refused when abstaining
        (the two could not be told apart).
    n_neighbors, seed
        Of the over-clustering graph and Leiden.
    max_cluster_cells
        A group with more cells is over-clustered on a seeded random sample of this many cells
        (:func:`~scgpt_protocol.data.store.subsample`; the resolution follows the group's size all the
        same); every other cell joins the cluster of its nearest sampled cell (Euclidean on the
        embedding, read in blocks), so that the graph, Leiden and the embedding in memory stay
        bounded at atlas scale. None: every cell is in the graph. Groups at or below the cap (the
        demo, most data) are clustered whole, as before.

    Returns
    -------
    Refinement

    Raises
    ------
    ValueError
        ``min_confidence`` outside [0, 1], majority voting without an embedding, shapes that do not
        fit, or a class named ``Unknown`` when abstaining.
    """
    threshold = check_min_confidence(min_confidence)
    predicted = np.asarray(labels, dtype=object).astype(str).astype(object)
    conf = np.asarray(confidence, dtype=np.float64)
    if threshold > 0 and (UNKNOWN in set(predicted.tolist()) or (categories is not None and UNKNOWN in
                                                                   {str(c) for c in categories})):
        msg = (
            f"the model has a class named {UNKNOWN!r}, the label abstention gives to unsure cells; the two could "
            f"not be told apart. Rename that class in the training labels, or keep min_confidence=0."
        )
        raise ValueError(msg)
    final, unknown = abstain(predicted, conf, threshold)
    n = len(final)
    params: dict[str, Any] = {
        "min_confidence": threshold, "majority_voting": bool(majority_voting), "unknown_label": UNKNOWN,
        "n_cells": int(n), "n_unknown": int(unknown.sum()),
        "coverage": float(1.0 - unknown.mean()) if n else None,
    }
    clusters = voted = None
    if majority_voting:
        if embedding is None:
            raise ValueError("majority_voting needs the model's embedding of the cells (embedding=...).")
        # an on-disk (h5py) embedding of predict(out=...) is read one group of cells at a time
        emb = embedding if hasattr(embedding, "id") and hasattr(embedding, "shape") else np.asarray(embedding)
        if len(emb.shape) != 2 or emb.shape[0] != n:
            msg = f"embedding has shape {emb.shape}; expected ({n}, d): one row per cell."
            raise ValueError(msg)
        group = (np.full(n, "", dtype=object) if groups is None
                 else np.asarray(groups, dtype=object).astype(str))
        if group.shape != (n,):
            msg = f"groups has {group.size} entries; expected {n}, one per cell."
            raise ValueError(msg)
        clusters = np.empty(n, dtype=object)
        resolutions: dict[str, float] = {}
        for name in pd.unique(group):
            rows = np.flatnonzero(group == name)
            res = overclustering_resolution(len(rows)) if resolution is None else float(resolution)
            ids = _over_cluster_rows(emb, rows, resolution=res, n_neighbors=n_neighbors, seed=seed,
                                     max_cells=max_cluster_cells)
            clusters[rows] = ids if groups is None else np.asarray([f"{name}-{i}" for i in ids], dtype=object)
            resolutions[str(name)] = res
        voted = majority_vote(final, clusters, conf)
        params.update({
            "resolution": resolutions[""] if groups is None else resolutions,
            "resolution_rule": "CellTypist: 5, 10, 15, 20, 25, 30 for < 5k, 20k, 40k, 100k, 200k cells and more"
                               if resolution is None else "given",
            "n_clusters": int(len(set(clusters.tolist()))), "n_neighbors": int(n_neighbors), "seed": int(seed),
            "max_cluster_cells": None if max_cluster_cells is None else int(max_cluster_cells),
            "graph": f"kNN on the model's embedding (scgpt_protocol.data.neighbors: exact up to {EXACT_UP_TO:,} "
                     "cells, pynndescent above), Leiden (igraph, 2 iterations)",
        })
        logger.info("majority voting: %d cells in %d over-clusters", n, params["n_clusters"], extra=DETAIL)
    if threshold > 0:
        logger.info("abstention: %d of %d cells below min_confidence=%.2f are %r (coverage %.3f)",
                    params["n_unknown"], n, threshold, UNKNOWN, params["coverage"] or 0.0, extra=DETAIL)
    return Refinement(final, predicted, conf, unknown, clusters, voted, params)


def refine(
    prediction: Prediction,
    *,
    min_confidence: float = 0.0,
    majority_voting: bool = False,
    resolution: float | None = None,
    groups: Any | None = None,
    seed: int = 0,
    max_cluster_cells: int | None = MAX_CLUSTER_CELLS,
) -> Prediction:
    """A :class:`~scgpt_protocol.annotate.prediction.Prediction` with abstention and majority voting applied.

    Returns a new prediction (the input is left as it is) whose ``labels`` are the per-cell calls
    (:data:`UNKNOWN` below ``min_confidence``, the softmax probability of the predicted class);
    ``predicted``, ``unknown``, ``over_clustering``, ``majority_voting`` and ``refinement`` (the
    parameters) are filled. Over-clustering uses the prediction's fine-tuned embeddings. See
    :func:`refine_labels` for the parameters; in 03 ``groups=adata.obs["split"]`` keeps the test
    cells' clusters free of training cells. A prediction made with ``predict(out=...)`` is read from
    its store one group (or, above ``max_cluster_cells``, one block) of cells at a time.

    Examples
    --------
    >>> pred = refine(predict(model, adata, categories=cats),  # doctest: +SKIP
    ...               min_confidence=0.5, majority_voting=True)
    >>> (pred.labels == "Unknown").mean()  # doctest: +SKIP
    """
    base = prediction.predicted if prediction.predicted is not None else prediction.labels
    done = refine_labels(base, prediction.confidence, prediction.embeddings, min_confidence=min_confidence,
                         majority_voting=majority_voting, resolution=resolution, groups=groups,
                         categories=prediction.categories, seed=seed, max_cluster_cells=max_cluster_cells)
    return dataclasses.replace(prediction, labels=done.labels, predicted=done.predicted, unknown=done.unknown,
                               over_clustering=done.over_clustering, majority_voting=done.majority_voting,
                               refinement=done.params)


def as_refinement(prediction: Prediction) -> Refinement | None:
    """The :class:`Refinement` a refined prediction carries (None when :func:`refine` was not applied)."""
    if prediction.predicted is None:
        return None
    n = len(prediction.labels)
    return Refinement(
        labels=np.asarray(prediction.labels, dtype=object), predicted=np.asarray(prediction.predicted, dtype=object),
        confidence=np.asarray(prediction.confidence, dtype=np.float64),
        unknown=np.zeros(n, dtype=bool) if prediction.unknown is None else np.asarray(prediction.unknown, dtype=bool),
        over_clustering=prediction.over_clustering, majority_voting=prediction.majority_voting,
        params=dict(prediction.refinement or {}),
    )


def refinement_metrics(
    y_true: Any,
    refinement: Refinement,
    *,
    categories: Sequence[str] | None = None,
    proba: np.ndarray | None = None,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Metrics of the refined calls of labelled cells, as JSON-ready numbers.

    Parameters
    ----------
    y_true
        True labels of the cells of ``refinement`` (no missing values: subset first).
    refinement
        :func:`refine_labels` (or ``Refinement.subset``) of the same cells.
    categories, proba
        As for :func:`~scgpt_protocol.metrics.classification_metrics`; ``proba`` (rows of the same
        cells) adds the macro AUROC of the assigned cells.

    Returns
    -------
    dict
        ``min_confidence``, ``coverage`` (share of the labelled cells assigned), ``n_cells``,
        ``n_assigned``, ``n_unknown``; ``argmax``: :func:`classification_metrics` of the predicted class of
        every cell (no abstention); ``unknown_by_class``: abstained cells per true label; ``assigned``:
        :func:`classification_metrics` of the assigned cells (None when none is); ``majority_voting``: of the
        majority-voted labels on all cells (``Unknown`` counted as an error; with ``coverage`` and ``n_clusters``, the
        over-clusters these cells fall in; None without majority voting); ``curve``:
        :func:`coverage_curve` as a list of rows; ``params``: the refinement's parameters.
    """
    from ..core.io import json_safe
    from ..metrics import classification_metrics

    true = np.asarray(y_true, dtype=object).astype(str)
    if len(true) != len(refinement.labels):
        msg = f"y_true has {len(true)} labels but the refinement {len(refinement.labels)} cells."
        raise ValueError(msg)
    assigned = ~refinement.unknown
    n_assigned = int(assigned.sum())
    out: dict[str, Any] = {
        "min_confidence": refinement.params.get("min_confidence", 0.0),
        "coverage": n_assigned / len(true) if len(true) else None,
        "n_cells": int(len(true)), "n_assigned": n_assigned, "n_unknown": int(len(true) - n_assigned),
        "assigned": None, "majority_voting": None,
        # every cell labelled with its predicted class: the same cells without the abstention rule
        "argmax": classification_metrics(true, refinement.predicted, categories=categories, proba=proba),
        # abstained cells per true class (the per-class table tells abstained from misclassified)
        "unknown_by_class": {str(k): int(v) for k, v in
                             pd.Series(true[refinement.unknown]).value_counts(sort=False).items()},
    }
    if n_assigned:
        out["assigned"] = classification_metrics(
            true[assigned], refinement.predicted[assigned], categories=categories,
            proba=None if proba is None else np.asarray(proba)[assigned],
        )
        out["assigned"]["coverage"] = out["coverage"]
    if refinement.majority_voting is not None:
        out["majority_voting"] = classification_metrics(true, refinement.majority_voting, categories=categories,
                                                        unassigned=UNKNOWN if out["min_confidence"] else None)
        out["majority_voting"]["coverage"] = float(np.mean(refinement.majority_voting != UNKNOWN))
        out["majority_voting"]["n_clusters"] = int(len(set(refinement.over_clustering.tolist())))
    out["curve"] = json_safe(coverage_curve(true, refinement.predicted, refinement.confidence, thresholds)
                          .to_dict(orient="records"))
    out["params"] = json_safe(refinement.params)
    return out


@renamed_arguments(uns_key="key_added")
def write_annotation(adata: AnnData, refinement: Refinement, *, columns: Mapping[str, str] | None = None,
                     categories: Sequence[str] | None = None, key_added: str = "scgpt_annotation") -> None:
    """Write a refinement into ``adata`` **in place**, scanpy style.

    ``obs["scgpt_label"]`` (categorical: ``categories``, then :data:`UNKNOWN`), ``obs["scgpt_prediction"]``,
    ``obs["scgpt_label_confidence"]``, ``obs["scgpt_unknown"]`` and, with majority voting,
    ``obs["scgpt_over_clustering"]`` and ``obs["scgpt_majority_voting"]`` (names: :data:`COLUMNS`, or
    ``columns``); the parameters go to ``uns[key_added]``.
    """
    from ..core.io import json_safe

    if len(refinement.labels) != adata.n_obs:
        msg = f"the refinement holds {len(refinement.labels)} cells but adata has {adata.n_obs}."
        raise ValueError(msg)
    names = {**COLUMNS, **(columns or {})}
    cats = [str(c) for c in categories] if categories is not None else sorted(set(refinement.predicted.tolist()))
    with_unknown = cats + ([UNKNOWN] if UNKNOWN not in cats else [])
    frame = refinement.frame(names, index=adata.obs_names)
    kinds = {names["labels"]: with_unknown, names["majority_voting"]: with_unknown, names["predicted"]: cats}
    for column in frame.columns:
        values = frame[column].to_numpy()
        if column in kinds:
            values = pd.Categorical(values.astype(str), categories=kinds[column])
        elif column == names["over_clustering"]:
            values = pd.Categorical(values.astype(str))
        adata.obs[column] = values
    adata.uns[key_added] = json_safe(refinement.params)
