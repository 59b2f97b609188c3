"""The logistic-regression baseline of step 03 (CellTypist's recipe): log1p-CP10k when the values are
counts, highly variable genes of the training cells, genes standardised (centred and scaled, the centring
carried by the model so that the matrix stays sparse) and clipped at 10, a one-vs-rest L2 logistic
regression fitted on the train split and scored on the same test cells as scGPT (and on an external query).
Cells are read chunk by chunk; the classifier is fitted on at most ``max_fit_cells`` train cells, so that
memory does not grow with the number of cells.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import format_keys
from ..data.matrix import iter_row_chunks, log1p_cp10k, read_rows
from ..metrics import BASELINE_METHOD, classification_metrics
from .linear import CentredLogisticOvR, GeneStats, standardise

if TYPE_CHECKING:
    from anndata import AnnData


logger = logging.getLogger(__name__)

__all__ = ["BaselineResult", "logistic_regression_baseline"]

#: train cells above which the classifier is fitted on a stratified sample of this many (memory flat in cells)
MAX_FIT_CELLS = 50_000
#: a class keeps at least this many of its train cells (all, if it has fewer) in that sample
MIN_FIT_CELLS_PER_CLASS = 100


# -- baseline -------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """Result of :func:`logistic_regression_baseline` on the test cells."""

    predictions: pd.Series  # predicted label per test cell, index = obs_names, categorical
    probabilities: np.ndarray  # float32 [n_test, n_categories], columns in the order of ``categories``
    categories: list[str]  # the classes seen in the train cells
    metrics: dict[str, Any]  # classification_metrics on the labelled test cells
    n_genes: int  # genes the classifier uses (HVGs of the train cells)
    genes: list[str] = field(default_factory=list)
    normalised: bool = False  # True: the input looked like raw counts and was log1p-CP10k normalised
    n_train: int = 0
    method: str = BASELINE_METHOD
    class_weight: str | None = None  # "balanced" when scGPT was trained with a class-weighted loss
    query: BaselineResult | None = None  # the same classifier on an external query, when one is given
    n_fit: int = 0  # train cells the classifier was fitted on (n_train, or a stratified sample above max_fit_cells)
    temperature: float | None = None  # calibration temperature fitted on the validation cells (calibrate=True)
    raw_confidence: np.ndarray | None = None  # float32 [n]: the uncalibrated probability of the predicted class
    calibration: dict[str, Any] | None = None  # the fit's record (annotate.calibration.calibration_record)


def logistic_regression_baseline(
    adata: AnnData,
    *,
    label_key: str,
    split_key: str = "split",
    train: str = "train",
    test: str = "test",
    n_hvg: int = 2000,
    seed: int = 0,
    layer: str | None = None,
    class_weight: str | None = None,
    query: AnnData | None = None,
    query_label_key: str | None = None,
    max_fit_cells: int = MAX_FIT_CELLS,
    chunk_size: int = 8192,
    calibrate: bool = False,
    validation: str = "val",
) -> BaselineResult:
    """Fit a CellTypist-style logistic regression on the train cells and predict the test cells.

    The yardstick scGPT should beat: the same split, CellTypist's default linear model on log-normalised
    highly variable genes.

    1. Expression comes from ``adata.X`` (or ``layer``). If every value of a sample of the train and test
       cells is a whole number it is taken as raw counts and normalised per cell to 10,000 counts, then
       ``log1p``; otherwise it is taken as already log-normalised and used as is. Negative values (scaled
       data) are refused.
    2. ``n_hvg`` highly variable genes are selected on the **train cells only** (scanpy's
       ``highly_variable_genes(flavor="seurat")``, from per-gene moments read chunk by chunk); all genes when
       there are no more than ``n_hvg``. CellTypist uses every gene expressed in the train cells.
    3. Each gene is standardised with the mean and standard deviation of the train cells (as
       ``StandardScaler``), and standardised values above 10 are clipped at 10, as CellTypist does. The
       matrix is never densified: it keeps the division by the standard deviation, and the centring is
       folded into the model (:class:`~scgpt_protocol.evaluate.linear.CentredLogisticOvR`), which gives the
       decision function of the dense standardised matrix.
    4. A one-vs-rest L2 logistic regression (``C=1``, L-BFGS, ``max_iter=1000``, ``tol=1e-4``, zero start:
       what CellTypist's ``LogisticRegression(multi_class="ovr")`` solves) is fitted on the train cells; above
       ``max_fit_cells`` train cells, on a stratified random sample of that many (each class keeps at least
       100 cells, or all it has; seeded by ``seed``). CellTypist fits on every cell (with the ``sag`` solver
       above 50,000). Pass ``class_weight="balanced"`` when scGPT was fine-tuned with a class-weighted loss,
       so that both see the classes weighted alike (each one-vs-rest problem weighs its two sides by their
       inverse frequency). Probabilities are the one-vs-rest sigmoids normalised to sum 1.
    5. With a ``query``, the same fitted normalisation, genes (by name), scaler and classifier predict its
       cells, scored against ``query.obs[query_label_key]``. A gene the query lacks is left out of the
       decision function (it counts as its training mean), as CellTypist does.

    Test cells are not used before prediction; cells without a label are not fitted or scored. Rows are read
    by chunks: memory holds the fitted cells' selected genes as CSR, one chunk, the test cells' probabilities.

    Parameters
    ----------
    adata
        Cells x genes with non-negative expression and ``obs[label_key]``, ``obs[split_key]``.
    label_key
        ``obs`` column with the cell-type labels.
    split_key, train, test
        ``obs`` column and its values marking the train and test cells (other cells are not scored).
    n_hvg, layer
        Number of highly variable genes; ``adata.layers`` key with the expression (None: ``X``).
    seed, class_weight
        Seed of the sample of train cells above ``max_fit_cells`` (the fit is deterministic); ``None`` or
        ``"balanced"`` (inverse class frequency, as ``class_weighted=True`` in 02).
    query, query_label_key
        An external labelled AnnData to predict as well (``BaselineResult.query``); its label column
        (default ``label_key``). It must hold at least half of the classifier's genes
        (:func:`~scgpt_protocol.model.vocab.check_gene_overlap`).
    max_fit_cells, chunk_size
        Most train cells the classifier is fitted on; rows read at a time.
    calibrate, validation
        Fit a temperature on the ``validation`` cells (as for scGPT); the test and query probabilities are then
        calibrated (``raw_confidence``: the predicted class's before). No labelled validation cell: raw.

    Returns
    -------
    BaselineResult
        Predictions, probabilities and metrics on the test cells (and ``.query`` on the query).

    Raises
    ------
    KeyError
        ``label_key`` or ``split_key`` not in ``obs``.
    ValueError
        No train or test cells, or fewer than two classes among the train cells.
    InputDataError
        Negative or NaN expression values.
    """
    from ..data.matrix import check_expression, get_matrix

    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced'; got {class_weight!r}.")
    if max_fit_cells < 2:
        raise ValueError(f"max_fit_cells must be at least 2; got {max_fit_cells}.")
    is_train, is_test, train_labels = _baseline_cells(adata, label_key=label_key, split_key=split_key,
                                                      train=train, test=test, n_hvg=n_hvg)
    labels = adata.obs[label_key]
    check_expression(adata, layer=layer)
    matrix = get_matrix(adata, layer)
    normalised = _looks_like_counts(matrix, np.flatnonzero(is_train | is_test))
    logger.info("baseline: %s", "values look like raw counts -> normalised to 10,000 per cell + log1p" if normalised
                else "values are not whole numbers -> used as log-normalised expression")
    reader = _Reader(matrix, normalised, chunk_size)
    model = _fit_baseline(reader, np.flatnonzero(is_train), train_labels, np.asarray(adata.var_names.astype(str)),
                          n_hvg=n_hvg, seed=seed, class_weight=class_weight, max_fit_cells=max_fit_cells)
    _set_class_order(model, labels)
    model.normalised = normalised
    predicted, proba, metrics = model.score(reader, np.flatnonzero(is_test), adata.obs_names[is_test],
                                            labels[is_test], f"test (obs[{label_key!r}])")
    logger.info(
        "baseline: %d train cells (%d fitted), %d genes, %d classes%s -> test accuracy %.3f, macro F1 %.3f",
        model.n_train, model.n_fit, int(model.keep.sum()), len(model.order),
        ", balanced class weights" if class_weight else "", metrics["accuracy"], metrics["macro_f1"],
    )
    query_result = None
    if query is not None:
        query_result = _baseline_on_query(model, query, query_label_key or label_key, layer, chunk_size)
    result = model.result(predicted, proba, metrics, query=query_result)
    if calibrate:
        _calibrate(result, model, reader, (adata.obs[split_key].astype(object) == validation).to_numpy(), labels)
    return result


def _calibrate(result: BaselineResult, model: _BaselineModel, reader: _Reader, is_val: np.ndarray,
               labels: pd.Series) -> None:
    """Fit the baseline's temperature on the validation cells; calibrate the test (and query) probabilities in place."""
    from ..annotate.calibration import calibrated, temperature_record
    from ..data.labels import clean_labels, missing_labels

    is_val = is_val & ~missing_labels(labels)
    val_rows, val_labels = np.flatnonzero(is_val), labels[is_val]

    position = {c: i for i, c in enumerate(model.order)}
    y = np.array([position.get(str(v), -1) for v in clean_labels(val_labels)], dtype=np.int64) if len(val_rows) else \
        np.zeros(0, dtype=np.int64)
    keep = y >= 0
    if not keep.any():
        logger.warning("baseline: no labelled validation cell of a trained class: its probabilities stay uncalibrated")
        return
    _, val_proba, _ = model.score(reader, val_rows[keep], pd.Index(np.arange(int(keep.sum())).astype(str)),
                                  val_labels[keep], "validation")
    result.calibration = temperature_record(val_proba, y[keep])
    temperature = result.calibration["temperature"]
    for part in (result, result.query):
        if part is not None:
            part.raw_confidence = part.probabilities.max(axis=1).astype(np.float32)
            part.probabilities = calibrated(part.probabilities, temperature)
            part.temperature = temperature
    logger.info("baseline: temperature %.3f fitted on %d validation cells", temperature, int(keep.sum()))


def _baseline_cells(adata: AnnData, *, label_key: str, split_key: str, train: str, test: str,
                    n_hvg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(is_train, is_test, train labels)`` of :func:`logistic_regression_baseline`; the checks of its arguments."""
    from ..data.labels import missing_labels

    for key, what in ((label_key, "label_key"), (split_key, "split_key")):
        if key not in adata.obs:
            msg = f"{what}={key!r} is not a column of adata.obs; columns: {format_keys(adata.obs.columns)}."
            raise KeyError(msg)
    if n_hvg < 1:
        raise ValueError(f"n_hvg must be a positive integer; got {n_hvg}.")
    split = adata.obs[split_key].astype(object)
    labels = adata.obs[label_key]
    is_train = (split == train).to_numpy() & ~missing_labels(labels)
    is_test = (split == test).to_numpy()
    for name, mask, value in (("train", is_train, train), ("test", is_test, test)):
        if not mask.any():
            msg = (
                f"no {name} cells: adata.obs[{split_key!r}] has no (labelled) cells equal to {value!r}; "
                f"found values {sorted(map(str, split.dropna().unique()))}. "
                f"Pass {name}=... with the right value."
            )
            raise ValueError(msg)
    train_labels = labels[is_train].astype(str).to_numpy()
    if len(set(train_labels)) < 2:
        msg = f"the train cells hold a single class ({train_labels[0]!r}); a classifier needs at least two."
        raise ValueError(msg)
    return is_train, is_test, train_labels


def _looks_like_counts(matrix: Any, rows: np.ndarray, n_rows: int = 2000) -> bool:
    """Whether a seeded sample of ``n_rows`` of ``rows`` holds whole numbers only (raw counts)."""
    from ..data.matrix import sample_rows, value_kind

    return value_kind(read_rows(matrix, sample_rows(rows, n_rows)))[0] == "counts"


@dataclass
class _Reader:
    """Rows of the expression matrix chunk by chunk: float32 CSR, log1p-CP10k when they are counts (per cell,
    over all its genes), then only the columns asked for."""

    matrix: Any
    normalised: bool
    chunk_size: int

    def chunks(self, rows: np.ndarray | None, cols: np.ndarray | None = None):
        for _, x in iter_row_chunks(self.matrix, self.chunk_size, rows=rows, dtype=np.float32):
            if self.normalised:
                x = log1p_cp10k(x)  # a fresh chunk: normalised in place
            yield x if cols is None else x[:, cols]


@dataclass
class _BaselineModel:
    """The baseline fitted on the train cells; it scores test and query cells alike."""

    keep: np.ndarray  # mask over the input genes: those the classifier uses
    genes: list[str]  # their names
    mean: np.ndarray  # per kept gene: mean and scale of the train cells (StandardScaler's)
    scale: np.ndarray
    clf: CentredLogisticOvR
    order: list[str] = field(default_factory=list)  # the classes, in the label column's order when it has one
    column: list[int] = field(default_factory=list)  # columns of clf.predict_proba in that order
    normalised: bool = False
    n_train: int = 0
    n_fit: int = 0
    class_weight: str | None = None

    def score(self, reader: _Reader, rows: np.ndarray | None, names: pd.Index, part_labels: pd.Series, what: str,
              cols: np.ndarray | None = None, present: np.ndarray | None = None) -> tuple:
        """``(predicted, probabilities, metrics)`` of the cells ``rows``, read by chunks; ``cols``: their columns
        of the classifier's genes (default: ``keep``); ``present``: which of those genes they have (default: all)."""
        from ..data.labels import clean_labels, missing_labels

        cols = np.flatnonzero(self.keep) if cols is None else cols
        mean, scale = (self.mean, self.scale) if present is None else (self.mean[present], self.scale[present])
        offset = self.mean / self.scale
        blocks = [self.clf.predict_proba(standardise(x, mean, scale), offset, present)
                  for x in reader.chunks(rows, cols)]
        proba = np.vstack(blocks)[:, self.column].astype(np.float32)
        order = self.order
        predicted = pd.Series(
            pd.Categorical(np.asarray(order, dtype=object)[proba.argmax(axis=1)], categories=order),
            index=names, name="baseline_label",
        )
        labelled = ~missing_labels(part_labels)
        if not labelled.any():
            msg = f"none of the {len(names)} {what} cells has a label."
            raise ValueError(msg)
        truth = clean_labels(part_labels[labelled])  # 'T cell ' is 'T cell', as in 01
        metrics = classification_metrics(truth, predicted[labelled], categories=order, proba=proba[labelled])
        if not labelled.all():
            metrics["notes"].append(f"{int((~labelled).sum())} {what} cells without a label were left out.")
        return predicted, proba, metrics

    def result(self, predicted: pd.Series, proba: np.ndarray, metrics: dict[str, Any],
               query: BaselineResult | None = None) -> BaselineResult:
        return BaselineResult(
            predictions=predicted,
            probabilities=proba,
            categories=self.order,
            metrics=metrics,
            n_genes=int(self.keep.sum()),
            genes=self.genes,
            normalised=self.normalised,
            n_train=self.n_train,
            class_weight=self.class_weight,
            query=query,
            n_fit=self.n_fit,
        )


def fit_sample(labels: np.ndarray, max_cells: int, seed: int,
               min_per_class: int = MIN_FIT_CELLS_PER_CLASS) -> np.ndarray:
    """Ascending positions of the cells to fit on: all when there are at most ``max_cells``, else a stratified
    random sample of about ``max_cells`` (classes in proportion, each keeping ``min_per_class`` cells or all)."""
    n = len(labels)
    if n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = np.minimum(counts, np.maximum(np.round(counts * (max_cells / n)).astype(np.int64), min_per_class))
    picks = [rng.choice(np.flatnonzero(inverse == k), quota[k], replace=False) for k in range(len(counts))]
    return np.sort(np.concatenate(picks))


def _select_genes(reader: _Reader, train_rows: np.ndarray, genes: np.ndarray,
                  n_hvg: int) -> tuple[np.ndarray, GeneStats]:
    """One pass over the train cells: the mask of highly variable genes (all when ``n_hvg`` covers them) and
    the per-gene sums of the scaler."""
    from ..pp.hvg import GeneMoments, seurat_hvg

    stats = GeneStats(len(genes))
    moments = GeneMoments(len(genes), 1) if n_hvg < len(genes) else None
    one_batch = np.zeros(0, dtype=np.int64)
    for x in reader.chunks(train_rows):
        stats.add(x)
        if moments is not None:
            if len(one_batch) != x.shape[0]:
                one_batch = np.zeros(x.shape[0], dtype=np.int64)
            moments.add(x, one_batch)
    if moments is None:
        return np.ones(len(genes), dtype=bool), stats
    hvg = seurat_hvg(moments, pd.Index(genes), n_hvg, None)
    return np.asarray(hvg["highly_variable"], dtype=bool), stats


def _fit_baseline(reader: _Reader, train_rows: np.ndarray, train_labels: np.ndarray, genes: np.ndarray, *,
                  n_hvg: int, seed: int, class_weight: str | None, max_fit_cells: int) -> _BaselineModel:
    """Highly variable genes and scaler of the train cells, the classifier fitted on (a sample of) them."""
    import scipy.sparse as sp

    keep, stats = _select_genes(reader, train_rows, genes, n_hvg)
    mean, scale = stats.mean_scale(keep)
    model = _BaselineModel(keep=keep, genes=genes[keep].tolist(), mean=mean, scale=scale,
                           clf=CentredLogisticOvR(C=1.0, max_iter=1000, tol=1e-4, class_weight=class_weight),
                           n_train=len(train_labels), class_weight=class_weight)
    picked = fit_sample(train_labels, max_fit_cells, seed)
    model.n_fit = len(picked)
    S = sp.vstack([standardise(x, mean, scale) for x in reader.chunks(train_rows[picked], np.flatnonzero(keep))],
                  format="csr")
    model.clf.fit(S, train_labels[picked], mean / scale)
    del S
    if not model.clf.converged_:
        logger.warning("baseline: the logistic regression did not converge in %d iterations", model.clf.max_iter)
    return model


def _set_class_order(model: _BaselineModel, labels: pd.Series) -> None:
    """The order of the model's classes: the label column's own when it has one (so that confusion matrices line
    up with scGPT's), else the classifier's."""
    classes = [str(c) for c in model.clf.classes_]
    if isinstance(labels.dtype, pd.CategoricalDtype):
        model.order = [str(c) for c in labels.cat.categories if str(c) in set(classes)]
    else:
        model.order = classes
    model.column = [classes.index(c) for c in model.order]


def _baseline_on_query(model: _BaselineModel, query: AnnData, query_key: str, layer: str | None,
                       chunk_size: int) -> BaselineResult:
    """The fitted baseline on an external query: same normalisation, genes by name (missing ones left out of the
    decision function: they count as their training mean), scaler."""
    from ..data.matrix import check_expression, get_matrix
    from ..model.vocab import check_gene_overlap

    if query_key not in query.obs:
        msg = (f"query_label_key={query_key!r} is not a column of the query's obs; columns: "
               f"{format_keys(query.obs.columns)}.")
        raise KeyError(msg)
    check_expression(query, layer=layer)
    genes_used = model.genes
    query_genes = pd.Index(np.asarray(query.var_names.astype(str)))
    check_gene_overlap(query_genes, genes_used, what="the query", against="the baseline's genes")
    matrix = get_matrix(query, layer)
    reader = _Reader(matrix, _looks_like_counts(matrix, np.arange(query.n_obs)), chunk_size)
    position = query_genes.get_indexer(genes_used)  # -1: the query lacks the gene
    present = position >= 0
    q_pred, q_proba, q_metrics = model.score(reader, None, query.obs_names, query.obs[query_key], "query",
                                             cols=position[present], present=None if present.all() else present)
    if not present.all():
        q_metrics["notes"].append(f"{int((~present).sum())} of the baseline's {len(genes_used)} genes are "
                                  "missing from the query and were left out of the classifier (as CellTypist does).")
    query_result = model.result(q_pred, q_proba, q_metrics)
    logger.info("baseline on the query: %d cells -> accuracy %.3f, macro F1 %.3f",
                query.n_obs, q_metrics["accuracy"], q_metrics["macro_f1"])
    return query_result
