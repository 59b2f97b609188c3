"""Zero-shot reference mapping: label query cells by their nearest reference cells.

This is the scGPT reference-mapping recipe without fine-tuning: embed the reference and the query
with the pretrained model, L2-normalise, find the ``k`` nearest reference cells of every query cell
(``k = 10`` in the official tutorials) and take the majority label. The tutorials use faiss
``IndexFlatL2``; this module uses exact brute-force neighbours from scikit-learn, which give the
same neighbours. On L2-normalised vectors Euclidean and cosine neighbours are the same, since
``|a - b|^2 = 2 - 2 cos(a, b)``.

Two votes are reported for every query cell:

``knn_vote``
    The label most frequent among the ``k`` neighbours (the tutorials' answer). Ties are broken by
    the smaller summed distance of the tied labels' neighbours, then alphabetically.
``knn_weighted``
    Every neighbour votes with weight ``1 / (d + eps)`` (``d``: its Euclidean distance to the
    query cell, ``eps = 1e-6``), so a few very close neighbours can outvote more distant ones.
    Ties (weight sums equal to 1e-9 relative) are broken the same way.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import format_keys
from ..core.log import DETAIL
from ..core.renamed import renamed_arguments
from ..data.labels import clean_labels, missing_labels, shared_types
from ..metrics import classification_metrics
from .columns import PREDICTION_COLUMNS, ZEROSHOT_COLUMNS
from .atlas import AtlasIndex, load_index
from .knn import LabelTransfer, transfer_blocks

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
    from ..model.scgpt import ScGPT

logger = logging.getLogger(__name__)

__all__ = ["ZeroShotResult", "zeroshot_annotate", "write_zeroshot"]


# --------------------------------------------------------------------------- AnnData level
@dataclass
class ZeroShotResult:
    """Result of :func:`zeroshot_annotate`.

    Attributes
    ----------
    predictions
        Indexed by the query's ``obs_names``; columns :data:`PREDICTION_COLUMNS` and, when the
        query has it, the true label column ``label_key``.
    metrics
        ``{"knn_vote": {...}, "knn_weighted": {...}, "notes": [...]}`` with ``accuracy``, ``macro_f1``,
        ``weighted_f1``, ``balanced_accuracy`` and ``n_cells`` each, over the labelled query cells of a
        type the reference has (the **shared types**: cells of a query label the reference lacks, a novel
        type, are left out and noted); ``None`` when the query has no ``label_key`` column, no labelled cell
        or no cell of a shared type.
    reference_embedding, query_embedding
        The embeddings used: every reference cell (also unlabelled ones) and every query cell, in
        ``obs_names`` order. ``reference_embedding`` is None for a reference index (its sample of cells:
        :meth:`~scgpt_protocol.annotate.atlas.AtlasIndex.sample_adata`).
    transfer
        The underlying :class:`LabelTransfer` (neighbour indices refer to the *labelled*
        reference cells, ``reference_used``).
    reference_used
        Boolean mask of the reference cells that took part (those with a label).
    notes
        Remarks on the data (dropped reference cells, query labels unknown to the reference...).
    params
        The parameters of the run (``k``, ``label_key``, cell counts...).
    """

    predictions: pd.DataFrame
    metrics: dict[str, Any] | None
    reference_embedding: np.ndarray | None
    query_embedding: np.ndarray
    transfer: LabelTransfer
    reference_used: np.ndarray
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def _obs_labels(adata: AnnData | AtlasIndex, label_key: str, what: str) -> pd.Series:
    if isinstance(adata, AtlasIndex):
        return adata.label_column(label_key)
    if label_key not in adata.obs.columns:
        msg = (
            f"label_key={label_key!r} is not a column of the {what}'s obs; found columns "
            f"{format_keys(adata.obs.columns)}. Pass the column that holds the cell-type labels."
        )
        raise KeyError(msg)
    return adata.obs[label_key]


def _get_embedding(
    adata: AnnData, model: ScGPT, what: str, *, reuse: bool, embedding_key: str, embed_kwargs: dict,
    out: Path | None = None,
) -> tuple[Any, bool, str | None]:
    """``(embedding, reused, precision)``: an in-memory array, or with ``out`` the on-disk (h5py) dataset
    that :func:`~scgpt_protocol.model.embedding.embed` streamed to that file."""
    from ..model.embedding import embed

    d_model = model.config.d_model
    if reuse and embedding_key in adata.obsm:
        emb = np.asarray(adata.obsm[embedding_key])
        if emb.ndim != 2 or emb.shape[1] != d_model:
            msg = (
                f"{what}.obsm[{embedding_key!r}] has shape {emb.shape} but the model embeds into "
                f"{d_model} dimensions; it was computed with another model. Use reuse_embeddings=False "
                "to embed again."
            )
            raise ValueError(msg)
        logger.info("reusing %s.obsm[%r] (%d x %d)", what, embedding_key, *emb.shape)
        return emb, True, adata.uns.get(f"{embedding_key}_params", {}).get("precision")
    if out is None:
        embed(adata, model, key_added=embedding_key, **embed_kwargs)
        return np.asarray(adata.obsm[embedding_key]), False, adata.uns[f"{embedding_key}_params"]["precision"]
    from ..data.store import open_store

    embed(adata, model, key_added=embedding_key, out=out, **embed_kwargs)
    datasets, attrs = open_store(out)
    return datasets[embedding_key], False, attrs.get("precision")


def _check_shared_genes(reference: AnnData, query: AnnData, model: ScGPT, gene_symbol_key: str | None) -> None:
    """The package's one gene-overlap rule between query and reference (genes the checkpoint knows).

    Embeddings of cells measured on disjoint genes are not comparable: their neighbours would be noise.
    """
    from ..model.vocab import check_gene_overlap, gene_symbols, match_genes

    def known(adata: AnnData) -> np.ndarray:
        symbols = np.asarray(gene_symbols(adata, gene_symbol_key), dtype=object)
        return symbols[match_genes(adata, model.vocab, gene_symbol_key=gene_symbol_key).token_ids >= 0]

    check_gene_overlap(known(query), known(reference), what="the query",
                       against="the reference (genes the checkpoint knows)")


@renamed_arguments(embedding_key="key_added")
def zeroshot_annotate(
    reference: AnnData | AtlasIndex | str | Path,
    query: AnnData,
    model: ScGPT,
    *,
    label_key: str,
    k: int = 10,
    max_seq_len: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    key_added: str = "X_scgpt",
    reuse_embeddings: bool = False,
    precision: str = "auto",
    min_confidence: float = 0.0,
    majority_voting: bool = False,
    resolution: float | None = None,
    store_dir: str | Path | None = None,
) -> ZeroShotResult:
    """Annotate ``query`` from ``reference`` with the pretrained model, without fine-tuning.

    Both datasets are embedded with :func:`~scgpt_protocol.model.embedding.embed`, then every query cell
    receives the labels of :func:`transfer_labels` (majority and distance-weighted vote of its
    ``k`` nearest reference cells). A reference saved once as an index
    (:func:`~scgpt_protocol.annotate.atlas_build.build_index`) is not embedded again: only the query is, and its
    neighbours are searched in the index (exact for a flat index: the same labels as the reference itself gives).

    The inputs are modified in one way only: ``obsm[key_added]`` (and ``embed``'s record
    ``uns[key_added + "_params"]``) is written to ``reference`` and ``query``, so the
    embeddings can be reused, e.g. for :func:`joint_embedding`. Nothing else is added to them,
    unless ``min_confidence`` or ``majority_voting`` is set: then the query also gets
    ``obs["scgpt_zeroshot_label"]`` (the call: ``"Unknown"`` below ``min_confidence``),
    ``obs["scgpt_zeroshot_prediction"]``, ``obs["scgpt_zeroshot_confidence"]``,
    ``obs["scgpt_zeroshot_unknown"]``, with majority voting ``obs["scgpt_over_clustering"]`` and
    ``obs["scgpt_majority_voting"]``, and ``uns["scgpt_zeroshot_annotation"]`` (the parameters).

    Parameters
    ----------
    reference
        Labelled cells; or a reference index (:func:`~scgpt_protocol.annotate.atlas.load_index`, or its folder),
        which must have been built with the same checkpoint, ``max_seq_len`` and ``<cls>`` value
        (``precision="auto"`` takes the index's; the official scGPT layout records none of these: a warning).
        Cells without a label (NaN, or text such as ``'nan'``, ``''``, ``'None'``: the one rule
        of :func:`~scgpt_protocol.data.labels.missing_labels`) are embedded but left out of the vote, with a
        warning; query cells without a true label are not scored.
    query
        Cells to annotate. If it has the column ``label_key`` too, the predictions are scored.
    model
        A pretrained model from :func:`~scgpt_protocol.load_model`.
    label_key
        ``obs`` column with the reference labels (and the query's true labels, if any).
    k
        Number of nearest reference cells that vote (10 in the scGPT tutorials).
    max_seq_len, batch_size, seed, layer, gene_symbol_key, precision
        Passed to :func:`~scgpt_protocol.model.embedding.embed`, identically for both datasets.
    key_added
        ``obsm`` key the embeddings are written to (and read from with ``reuse_embeddings``).
    reuse_embeddings
        Use ``obsm[key_added]`` where it is already present instead of embedding again. Only
        use it for embeddings computed by the same model with the same settings: this is not checked
        beyond the dimension.
    min_confidence
        Abstention (:mod:`scgpt_protocol.annotate.refinement`): a query cell where fewer than this share of the
        ``k`` neighbours vote for the majority label is ``"Unknown"`` in ``scgpt_zeroshot_label``
        (the kNN label stays in ``scgpt_zeroshot_prediction``). 0: off. The weighted vote is left as
        it is.
    majority_voting
        Over-cluster the query on its embedding (CellTypist's resolution rule unless ``resolution``
        is given) and give every cell its cluster's majority call: ``scgpt_majority_voting``.
    store_dir
        A folder: the embeddings are streamed to ``reference_embeddings.h5`` and ``query_embeddings.h5``
        there (:func:`~scgpt_protocol.model.embedding.embed` with ``out=``) instead of ``obsm``, so that
        ``reference`` and ``query`` may be backed AnnData (views of ``read_h5ad(path, backed="r")``) of any
        size. Memory then holds the labelled reference embeddings (``n_ref x d`` float32, what the
        neighbour search needs) and one block of 65,536 query cells at a time; ``query_embedding`` and
        ``reference_embedding`` of the result are the on-disk (h5py) datasets. The labels are the same
        as without it. A backed view of the query is not annotated in place (its ``obs`` cannot be
        written); the refinement columns are in ``predictions``.

    Returns
    -------
    ZeroShotResult
        ``predictions`` (one row per query cell), ``metrics`` (``None`` without true labels),
        the embeddings, and ``notes``.

    Raises
    ------
    KeyError
        ``label_key`` is not a column of ``reference.obs`` (the message lists the columns).
    ValueError
        Fewer than two distinct labels in the reference, or ``k`` larger than the number of
        labelled reference cells.
    GeneMatchError
        The query holds less than half of the reference's genes (that the checkpoint knows).
    AtlasIndexError
        A reference index built with another checkpoint or other embedding settings (the message names both).

    Examples
    --------
    >>> import scgpt_protocol as sp  # doctest: +SKIP
    >>> from scgpt_protocol.annotate.zeroshot import zeroshot_annotate  # doctest: +SKIP
    >>> model = sp.load_model("whole-human")  # doctest: +SKIP
    >>> res = zeroshot_annotate(ref, query, model, label_key="cell_type")  # doctest: +SKIP
    >>> res.metrics["knn_vote"]["accuracy"]  # doctest: +SKIP
    """
    settings = _ZeroShotSettings(
        label_key=label_key, k=k, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, layer=layer,
        gene_symbol_key=gene_symbol_key, embedding_key=key_added, reuse_embeddings=reuse_embeddings,
        precision=precision, min_confidence=min_confidence, majority_voting=majority_voting,
        resolution=resolution, store_dir=store_dir)
    return _zeroshot(reference, query, model, settings)


@dataclass(frozen=True)
class _ZeroShotSettings:
    """The keyword arguments of :func:`zeroshot_annotate` (documented there)."""

    label_key: str
    k: int
    max_seq_len: int
    batch_size: int
    seed: int
    layer: str | None
    gene_symbol_key: str | None
    embedding_key: str
    reuse_embeddings: bool
    precision: str
    min_confidence: float
    majority_voting: bool
    resolution: float | None
    store_dir: str | Path | None

    @property
    def folder(self) -> Path | None:
        return None if self.store_dir is None else Path(self.store_dir)


def _zeroshot(reference: AnnData | AtlasIndex, query: AnnData, model: ScGPT, s: _ZeroShotSettings) -> ZeroShotResult:
    """:func:`zeroshot_annotate`: check, embed both datasets (or the query only, onto an index), vote, refine,
    score."""
    from ..data.store import take_rows
    from .refinement import refine_labels

    reference = _reference_source(reference)
    indexed = isinstance(reference, AtlasIndex)
    used, ref_str, distinct, notes = _voting_reference(reference, s.label_key, s.k)
    if indexed:  # embedded once, when the index was built: check that the query is embedded the same way
        s = replace(s, precision=reference.check_model(model, max_seq_len=s.max_seq_len, precision=s.precision))
        reference.check_genes(query, model, s.gene_symbol_key)
        ref_emb, ref_reused, ref_precision = None, True, s.precision
    else:
        _check_shared_genes(reference, query, model, s.gene_symbol_key)
        ref_emb, ref_reused, ref_precision = _zeroshot_embedding(reference, model, "reference", s)
    query_emb, query_reused, query_precision = _zeroshot_embedding(query, model, "query", s)
    transfer = (reference.transfer(query_emb, used, ref_str, k=s.k, device=next(model.parameters()).device)
                if indexed else transfer_blocks(take_rows(ref_emb, used), ref_str, query_emb, k=s.k))
    refined = refine_labels(transfer.majority, transfer.confidence_majority, query_emb,
                            min_confidence=s.min_confidence, majority_voting=s.majority_voting,
                            resolution=s.resolution, categories=distinct.tolist(), seed=s.seed)
    predictions = _zeroshot_predictions(query, transfer, refined, distinct,
                                        refining=bool(s.min_confidence) or bool(s.majority_voting))
    metrics = _score_zeroshot(query, s, predictions, transfer, refined, distinct, notes)
    _score_overlap(reference, query, used, s, refined, metrics, notes, distinct)
    folder, n_used = s.folder, int(used.sum())
    params = {
        "label_key": s.label_key, "k": int(s.k), "embedding_key": s.embedding_key,
        "max_seq_len": s.max_seq_len, "seed": s.seed,
        "n_reference": n_used, "n_reference_total": int(reference.n_obs), "n_query": int(query.n_obs),
        "n_labels_reference": int(distinct.size), "vote_weights": "1 / (distance + 1e-6)",
        "min_confidence": float(s.min_confidence), "majority_voting": bool(s.majority_voting),
        "reused_embeddings": {"reference": ref_reused, "query": query_reused},
        "checkpoint": str(getattr(getattr(model, "load_report", None), "checkpoint_dir", "")),
        "precision": {"reference": ref_precision, "query": query_precision},
        "store": None if folder is None else str(folder),
        "reference_index": ({"path": str(reference.path), "layout": reference.layout, "kind": reference.kind,
                             "nprobe": reference.nprobe, "n_cells": reference.n_obs} if indexed else None),
    }
    if metrics is not None:
        logger.info("zero-shot (k=%d): %d query cells, kNN vote accuracy %.3f, macro F1 %.3f (%d cells of the "
                    "reference's types scored)", s.k, query.n_obs, metrics["knn_vote"]["accuracy"],
                    metrics["knn_vote"]["macro_f1"], metrics["knn_vote"]["n_cells"])
    else:
        logger.info("zero-shot (k=%d): annotated %d query cells (no true labels to score)", s.k, query.n_obs)
    return ZeroShotResult(
        predictions=predictions, metrics=metrics, reference_embedding=ref_emb, query_embedding=query_emb,
        transfer=transfer, reference_used=used, notes=notes, params=params,
    )


def _reference_source(reference: Any) -> AnnData | AtlasIndex:
    """The reference as given, or the index loaded from a folder."""
    if isinstance(reference, (str, Path)):
        return load_index(reference)
    if reference is None:
        msg = ("reference is None; pass the labelled reference: an AnnData to embed, or a reference index "
               "(load_index(folder), or its folder) built once with build_index / scgpt-protocol index build.")
        raise TypeError(msg)
    return reference


def _voting_reference(reference: AnnData | AtlasIndex, label_key: str,
                      k: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(used, labels of the used cells, distinct labels, notes)``: the labelled reference cells, which vote.

    Checks ``k`` against them; warns about reference cells without a label."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        msg = f"k must be a positive integer; got {k!r}. The scGPT tutorials use k=10."
        raise ValueError(msg)
    ref_labels = _obs_labels(reference, label_key, "reference")
    used = ~missing_labels(ref_labels)
    notes: list[str] = []
    left_out = reference.left_out if isinstance(reference, AtlasIndex) else None
    if left_out is not None:  # an index's cells a label map sent to nothing: no vote, no warning
        used &= ~left_out
    n_dropped = int((~used).sum()) - (0 if left_out is None else int(left_out.sum()))
    if n_dropped:
        msg = (
            f"{n_dropped:,} of {reference.n_obs:,} reference cells have no {label_key!r} label (NaN, or text such as "
            "'nan', '' or 'None'); "
            "they do not vote. Fill or drop them to silence this warning."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)  # the caller of zeroshot_annotate
        notes.append(f"{n_dropped} reference cells without a label were left out of the vote")
    ref_str = ref_labels.to_numpy(dtype=object)[used].astype(str)
    distinct = np.unique(ref_str)
    if distinct.size < 2:
        msg = (
            f"the reference has {distinct.size} distinct label(s) in obs[{label_key!r}] "
            f"({distinct.tolist()}); label transfer needs at least 2. Check label_key or use a more "
            "diverse reference."
        )
        raise ValueError(msg)
    n_used = int(used.sum())
    if k > n_used:
        msg = (
            f"k={k} neighbours requested but the reference has only {n_used} labelled cells; use "
            f"k <= {n_used} or a larger reference."
        )
        raise ValueError(msg)
    return used, ref_str, distinct, notes


def _zeroshot_embedding(adata: AnnData, model: ScGPT, what: str, s: _ZeroShotSettings) -> tuple[Any, bool, str | None]:
    """:func:`_get_embedding` of the reference or the query (``what``) with the settings of the run."""
    embed_kwargs = dict(max_seq_len=s.max_seq_len, batch_size=s.batch_size, seed=s.seed, layer=s.layer,
                        gene_symbol_key=s.gene_symbol_key, precision=s.precision)
    folder = s.folder
    return _get_embedding(adata, model, what, reuse=s.reuse_embeddings, embedding_key=s.embedding_key,
                          embed_kwargs=embed_kwargs, out=None if folder is None else folder / f"{what}_embeddings.h5")


def _zeroshot_predictions(query: AnnData, transfer: LabelTransfer, refined: Any, distinct: np.ndarray, *,
                          refining: bool) -> pd.DataFrame:
    """One row per query cell: the votes and, when refining, the refinement columns (also written to the query)."""
    from .refinement import write_annotation

    predictions = pd.DataFrame(
        {
            PREDICTION_COLUMNS[0]: transfer.majority,
            PREDICTION_COLUMNS[1]: transfer.confidence_majority,
            PREDICTION_COLUMNS[2]: transfer.weighted,
            PREDICTION_COLUMNS[3]: transfer.confidence_weighted,
        },
        index=pd.Index(query.obs_names.astype(str), name="cell"),
    )
    if refining:  # the call (with Unknown) replaces the majority label; the prediction and the vote beside it
        frame = refined.frame(ZEROSHOT_COLUMNS, index=predictions.index)
        predictions[PREDICTION_COLUMNS[0]] = frame.pop(ZEROSHOT_COLUMNS["labels"])
        frame = frame.drop(columns=[ZEROSHOT_COLUMNS["confidence"]])
        predictions = pd.concat([predictions, frame], axis=1)
        if not (query.is_view and query.isbacked):  # a backed view's obs cannot be written
            write_annotation(query, refined, columns=ZEROSHOT_COLUMNS, categories=distinct.tolist(),
                             key_added="scgpt_zeroshot_annotation")
    return predictions


def _score_zeroshot(query: AnnData, s: _ZeroShotSettings, predictions: pd.DataFrame, transfer: LabelTransfer,
                    refined: Any, distinct: np.ndarray, notes: list[str]) -> dict[str, Any] | None:
    """Metrics of the shared types against the query's true labels (None without any); adds the truth to
    ``predictions``, remarks to ``notes`` (which the metrics hold too).

    A query label that is no reference label is a **novel type**: the reference has no cell to vote for it, so
    its cells are left out of these metrics (noted; :func:`~scgpt_protocol.protocol.steps.zeroshot_novel` scores
    them apart)."""
    from .refinement import UNKNOWN, refinement_metrics

    label_key = s.label_key
    if label_key not in query.obs.columns:
        notes.append(f"the query has no {label_key!r} column: no metrics")
        return None
    truth = query.obs[label_key].to_numpy(dtype=object)
    predictions[label_key] = truth
    shared = _shared_types(truth, distinct, notes)
    if not shared.any():
        return None
    y_true = clean_labels(truth[shared]).astype(str)  # trimmed, as in 01
    return {
        "knn_vote": classification_metrics(y_true, refined.labels[shared],
                                           unassigned=UNKNOWN if s.min_confidence else None),
        "knn_weighted": classification_metrics(y_true, transfer.weighted[shared]),
        "refinement": refinement_metrics(y_true, refined.subset(shared)),
        "notes": notes,
    }


def _shared_types(truth: np.ndarray, distinct: np.ndarray, notes: list[str]) -> np.ndarray:
    """The query cells to score: labelled, of a type the reference has. Notes (and logs) the others: cells without
    a label, and novel types (query labels absent from the reference, with a hint for labels in another case)."""
    labelled = ~missing_labels(truth)
    if not labelled.all():
        notes.append(f"{int((~labelled).sum())} query cells without a true label were not scored")
    if not labelled.any():
        notes.append("no query cell has a true label: no metrics")
        return labelled
    text = np.where(labelled, clean_labels(truth), "")
    shared = shared_types(truth, distinct)
    novel = pd.Series(text[labelled & ~shared]).value_counts()
    if len(novel):
        from ..data.labels import case_matches

        listed = ", ".join(f"{lab!r} ({n} cells)" for lab, n in novel.items())
        pairs = case_matches(novel.index, distinct)
        hint = ("; these are reference labels in another case: "
                + ", ".join(f"{q!r} ~ {c!r}" for q, c in list(pairs.items())[:5])
                + " (write them as the reference does, or map them with label_map, to score them)") if pairs else ""
        notes.append(f"query labels absent from the reference (novel types), left out of the kNN metrics and scored "
                     f"apart: {listed}{hint}")
        logger.warning("query labels absent from the reference (novel types, scored apart): %s%s", listed, hint)
    if not shared.any():
        notes.append("no query cell has a label of the reference: no shared-type metrics (a label_map can give "
                     "the query's labels the reference's names)")
    return shared


def _score_overlap(reference: AnnData, query: AnnData, used: np.ndarray, s: _ZeroShotSettings, refined: Any,
                   metrics: dict[str, Any] | None, notes: list[str], transfer_classes: np.ndarray) -> None:
    """Query cells that are also voting reference cells (by name): a warning, and their majority-vote metrics
    apart from the others' in ``metrics["overlap"]`` (a cell's nearest neighbour is then itself)."""
    from ..data.overlap import find_overlap, scored_apart
    from .refinement import UNKNOWN

    if reference.obs_names is None:  # an index without cell names (the official layout)
        return
    overlap = find_overlap(query.obs_names, np.asarray(reference.obs_names)[used], what="the query",
                           against="the voting reference cells")
    if not overlap:
        return
    overlap.warn()
    notes.append(overlap.message())
    if metrics is None:
        return
    truth = query.obs[s.label_key].to_numpy(dtype=object)
    text = clean_labels(truth)
    scored = shared_types(truth, transfer_classes)  # as in the metrics
    calls = np.asarray(refined.labels, dtype=object)

    def score(mask: np.ndarray) -> dict[str, Any] | None:
        cells = mask & scored
        return {"knn_vote": classification_metrics(text[cells].astype(str), calls[cells],
                                                   unassigned=UNKNOWN if s.min_confidence else None)} \
            if cells.any() else None

    metrics["overlap"] = {**overlap.to_dict(), "methods": scored_apart(score, overlap)}


def write_zeroshot(layout: RunLayout, result: ZeroShotResult) -> dict[str, Path]:
    """Write ``zeroshot/predictions.csv`` and ``zeroshot/metrics.json`` of a run, atomically.

    The CSV is ``result.predictions`` with the index column ``cell``. The JSON holds ``params``,
    ``notes`` and ``knn_vote`` / ``knn_weighted`` (``null`` without true labels): the vote of the ``k``
    neighbours, plain and distance-weighted (not "majority voting", which is the over-cluster vote), on the
    query cells of the reference's types; and, when the metrics have them, ``overlap`` (query cells that are
    reference cells, apart), ``novel`` (the novel types, :func:`~scgpt_protocol.protocol.steps.zeroshot_novel`)
    and ``label_map`` (what the label map did to the reference and the query).

    Returns
    -------
    dict
        ``{"predictions": path, "metrics": path}``.
    """
    pred_path = layout.write_csv(result.predictions, layout.zeroshot_predictions)
    metrics = result.metrics or {}
    record = {
        "params": result.params,
        "notes": result.notes,
        "knn_vote": metrics.get("knn_vote"),
        "knn_weighted": metrics.get("knn_weighted"),
        "refinement": metrics.get("refinement"),
    }
    for key in ("overlap", "novel", "label_map"):  # seen cells and novel types scored apart; what a label map did
        if metrics.get(key):
            record[key] = metrics[key]
    metrics_path = layout.write_json(layout.zeroshot_metrics, record)
    logger.info("wrote %s and %s", pred_path, metrics_path, extra=DETAIL)  # the notebook shows report.files_table
    return {"predictions": pred_path, "metrics": metrics_path}
