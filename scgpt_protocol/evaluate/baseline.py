"""The logistic-regression baseline of step 03 (CellTypist's recipe): log1p-CP10k when the values are
counts, highly variable genes of the training cells, a sparse-aware scaler, fitted on the train split
and scored on the same test cells as scGPT (and on an external query).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import format_keys
from ..data.matrix import log1p_cp10k, read_rows
from ..metrics import BASELINE_METHOD, classification_metrics

if TYPE_CHECKING:
    from anndata import AnnData


logger = logging.getLogger(__name__)

__all__ = ["BaselineResult", "logistic_regression_baseline"]


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
) -> BaselineResult:
    """Fit a CellTypist-style logistic regression on the train cells and predict the test cells.

    The yardstick scGPT should beat: the same split, a simple linear model on log-normalised
    highly variable genes.

    1. Expression comes from ``adata.X`` (or ``layer``). If every value is a whole number it is
       taken as raw counts and normalised per cell to 10,000 counts, then ``log1p``; otherwise it
       is taken as already log-normalised and used as is. Negative values (scaled data) are refused.
    2. ``n_hvg`` highly variable genes are selected on the **train cells only**
       (``scanpy.pp.highly_variable_genes``, flavor ``"seurat"``); all genes when there are no more
       than ``n_hvg``.
    3. Genes are scaled to unit variance with a ``StandardScaler(with_mean=False)`` fitted on the train
       cells and clipped at 10. The matrix is never densified: without centring it stays sparse, and with
       ``lbfgs`` the intercept is not penalised, so centring would give the same linear model up to the clip.
    4. ``LogisticRegression(C=1.0, max_iter=1000, random_state=seed, class_weight=class_weight)`` is
       fitted on the train cells (float32 CSR, which ``lbfgs`` takes without a float64 copy). Pass
       ``class_weight="balanced"`` when scGPT was fine-tuned with a class-weighted loss, so that both see
       the classes weighted alike.
    5. With a ``query``, the same fitted normalisation, genes (by name; a gene the query lacks is 0),
       scaler and classifier predict its cells, scored against ``query.obs[query_label_key]``.

    Test cells are not used before prediction, so their labels and expression cannot change the
    model. Cells without a label are left out of fitting and of the metrics. Only the train and test rows
    are read, chunk by chunk, into one float32 CSR matrix (works on backed AnnData); memory is that CSR
    and its HVG columns, never a dense or float64 copy.

    Parameters
    ----------
    adata
        Cells x genes with non-negative expression and ``obs[label_key]``, ``obs[split_key]``.
    label_key
        ``obs`` column with the cell-type labels.
    split_key, train, test
        ``obs`` column and its values marking the train and test cells (``"validation"`` or other
        cells are ignored).
    n_hvg
        Number of highly variable genes.
    seed
        Seed of the classifier.
    layer
        ``adata.layers`` key with the expression (None: ``X``).
    class_weight
        ``None`` or ``"balanced"`` (inverse class frequency, as ``class_weighted=True`` in 02).
    query, query_label_key
        An external labelled AnnData to predict as well (``BaselineResult.query``); its label column
        (default ``label_key``). It must hold at least half of the classifier's genes
        (:func:`~scgpt_protocol.model.vocab.check_gene_overlap`).

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
    from ..data.matrix import check_expression

    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced'; got {class_weight!r}.")
    is_train, is_test, train_labels = _baseline_cells(adata, label_key=label_key, split_key=split_key,
                                                      train=train, test=test, n_hvg=n_hvg)
    labels = adata.obs[label_key]
    check_expression(adata, layer=layer)
    X_train, X_test, normalised = _baseline_matrices(adata, layer, is_train, is_test)
    model = _fit_baseline(X_train, train_labels, labels, np.asarray(adata.var_names.astype(str)), n_hvg=n_hvg,
                          seed=seed, class_weight=class_weight, normalised=normalised)
    del X_train
    predicted, proba, metrics = model.score(X_test[:, model.keep], adata.obs_names[is_test], labels[is_test],
                                            f"test (obs[{label_key!r}])")
    logger.info(
        "baseline: %d train cells, %d genes, %d classes%s -> test accuracy %.3f, macro F1 %.3f",
        model.n_train, int(model.keep.sum()), len(model.order), ", balanced class weights" if class_weight else "",
        metrics["accuracy"], metrics["macro_f1"],
    )
    query_result = None
    if query is not None:
        query_result = _baseline_on_query(model, query, query_label_key or label_key, layer)
    return model.result(predicted, proba, metrics, query=query_result)


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


def _baseline_matrices(adata: AnnData, layer: str | None, is_train: np.ndarray,
                       is_test: np.ndarray) -> tuple[Any, Any, bool]:
    """The train and test rows as float32 CSR, log1p-CP10k normalised when they look like counts (and whether)."""
    from ..data.matrix import get_matrix, value_kind

    matrix = get_matrix(adata, layer)
    rows = np.flatnonzero(is_train | is_test)
    X = read_rows(matrix, rows)  # float32 CSR of the train + test cells only (backed data: read by chunks)
    normalised = value_kind(X)[0] == "counts"
    if normalised:
        X = log1p_cp10k(X)
        logger.info("baseline: values look like raw counts -> normalised to 10,000 per cell + log1p")
    else:
        logger.info("baseline: values are not whole numbers -> used as log-normalised expression")
    in_train = is_train[rows]
    return X[in_train], X[is_test[rows]], normalised


@dataclass
class _BaselineModel:
    """The baseline fitted on the train cells; it scores test and query cells alike."""

    keep: np.ndarray  # mask over the input genes: those the classifier uses
    genes: list[str]  # their names
    scaler: Any  # StandardScaler(with_mean=False) fitted on the train cells
    clf: Any  # the fitted LogisticRegression
    order: list[str]  # the classes, in the label column's order when it has one
    column: list[int]  # columns of clf.predict_proba in that order
    normalised: bool
    n_train: int
    class_weight: str | None

    def scaled(self, part: Any, fit: bool = False) -> Any:
        """Unit variance without centring (the data stay sparse), float32, values clipped at 10."""
        import scipy.sparse as sp

        values = self.scaler.fit_transform(part) if fit else self.scaler.transform(part)
        values = sp.csr_matrix(values, dtype=np.float32)
        np.minimum(values.data, 10, out=values.data)
        return values

    def score(self, X_part: Any, names: pd.Index, part_labels: pd.Series, what: str) -> tuple:
        """``(predicted, probabilities, metrics)`` of cells with the classifier's genes (``X_part``, unscaled)."""
        from ..data.labels import clean_labels, missing_labels

        order = self.order
        proba = self.clf.predict_proba(self.scaled(X_part))[:, self.column].astype(np.float32)
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
        )


def _fit_baseline(X_train: Any, train_labels: np.ndarray, labels: pd.Series, genes: np.ndarray, *, n_hvg: int,
                  seed: int, class_weight: str | None, normalised: bool) -> _BaselineModel:
    """Highly variable genes of the train cells, the scaler and the logistic regression fitted on them."""
    import anndata as ad
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if n_hvg < len(genes):
        hvg = sc.pp.highly_variable_genes(
            ad.AnnData(X_train, var=pd.DataFrame(index=genes)),
            flavor="seurat", n_top_genes=n_hvg, inplace=False,
        )
        keep = np.asarray(hvg["highly_variable"], dtype=bool)
    else:
        keep = np.ones(len(genes), dtype=bool)
    # sparse-aware scaling: unit variance without centring (the data stay sparse; with lbfgs the intercept
    # is not penalised, so centring would only shift it), values clipped at 10
    model = _BaselineModel(keep=keep, genes=genes[keep].tolist(), scaler=StandardScaler(with_mean=False),
                           clf=LogisticRegression(C=1.0, max_iter=1000, random_state=seed, class_weight=class_weight),
                           order=[], column=[], normalised=normalised, n_train=len(train_labels),
                           class_weight=class_weight)
    model.clf.fit(model.scaled(X_train[:, keep], fit=True), train_labels)
    classes = [str(c) for c in model.clf.classes_]
    # the label column's own order when it has one (so that confusion matrices line up with scGPT's)
    if isinstance(labels.dtype, pd.CategoricalDtype):
        model.order = [str(c) for c in labels.cat.categories if str(c) in set(classes)]
    else:
        model.order = classes
    model.column = [classes.index(c) for c in model.order]
    return model


def _baseline_on_query(model: _BaselineModel, query: AnnData, query_key: str, layer: str | None) -> BaselineResult:
    """The fitted baseline on an external query: same normalisation, genes by name (missing ones 0), scaler."""
    import scipy.sparse as sp

    from ..data.matrix import check_expression, get_matrix, value_kind
    from ..model.vocab import check_gene_overlap

    if query_key not in query.obs:
        msg = f"query_label_key={query_key!r} is not a column of the query's obs; columns: {format_keys(query.obs.columns)}."
        raise KeyError(msg)
    check_expression(query, layer=layer)
    genes_used = model.genes
    query_genes = pd.Index(np.asarray(query.var_names.astype(str)))
    check_gene_overlap(query_genes, genes_used, what="the query", against="the baseline's genes")
    Xq = read_rows(get_matrix(query, layer), np.arange(query.n_obs))
    if value_kind(Xq)[0] == "counts":
        Xq = log1p_cp10k(Xq)
    position = query_genes.get_indexer(genes_used)  # -1: the query lacks the gene -> zeros
    present = position >= 0
    aligned = sp.csr_matrix(Xq[:, np.where(present, position, 0)] @ sp.diags(present.astype(np.float32)))
    q_pred, q_proba, q_metrics = model.score(aligned, query.obs_names, query.obs[query_key], "query")
    if not present.all():
        q_metrics["notes"].append(f"{int((~present).sum())} of the baseline's {len(genes_used)} genes are "
                                  "missing from the query and were set to 0.")
    query_result = model.result(q_pred, q_proba, q_metrics)
    logger.info("baseline on the query: %d cells -> accuracy %.3f, macro F1 %.3f",
                query.n_obs, q_metrics["accuracy"], q_metrics["macro_f1"])
    return query_result
