"""Step 01: load, inspect, filter, normalise, select genes and split the cells.

The functions here back the ``01_preprocess`` notebook::

    adata = open_lazy(params.adata_path)        # obs/var/uns in memory, the matrix on disk
    ckpt = resolve_checkpoint(params.checkpoint, layout, gene_symbols(adata, params.gene_symbol_key))
    vocab = read_vocab(ckpt / "vocab.json")
    inspection = inspect_adata(adata, label_key=params.label_key, vocab=vocab, ...)
    write_inspection(inspection, layout)
    fig = plot_qc(adata)                         # per-cell numbers, chunk by chunk
    prepared = prepare_file(params, vocab, layout)   # writes prepared.h5ad and labels.json

:func:`prepare_file` (in :mod:`scgpt_protocol.pp.stream`) streams the matrix in row chunks with
bounded memory, in memory or from the file; :func:`prepare` + :func:`write_prepared` do the same on an
AnnData held in memory (for scripts and small data; they copy it). Both give the same ``prepared.h5ad``.

Every step function takes an AnnData and returns a new one; the input is never modified.

What :func:`prepare` leaves in the prepared AnnData
----------------------------------------------------
``X``
    float32 CSR, log-normalised values of the genes the checkpoint knows (the model input).
``layers["counts"]``
    the raw counts, only when the input held counts.
``var["scgpt_token_id"]``
    the vocabulary id of each gene.
``obs[label_key]``
    the labels as a categorical of strings (categories sorted).
``obs["scgpt_label_code"]``
    the integer class of each cell (index into ``categories``).
``obs["split"]``
    ``"train"``, ``"val"`` or ``"test"`` (categorical, in that order).
``uns["scgpt_protocol"]["preprocess"]``
    the parameters and a record of what was done.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.errors import InputDataError
from ..core.io import json_safe
from ..data.colors import label_palette
from ..data.label_map import label_map_record
from ..data.labels import SPLITS, missing_labels, require_obs_key
from ..data.matrix import check_expression, get_matrix, log1p_cp10k, value_kind
from ..model.vocab import gene_symbols
from .stages import (
    check_cells_left,
    checked_labels,
    choose_normalisation,
    map_training_labels,
    mito_mask,
    percent_mito,
    report_unlabelled,
    split_cells,
    unique_cell_names,
    vocabulary_genes,
    warn_no_mito_genes,
    warn_user,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.params import PreprocessParams
logger = logging.getLogger(__name__)

__all__ = ["PreparedData", "prepare"]


# -- prepare --------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """The result of :func:`prepare`.

    Attributes
    ----------
    adata : AnnData
        The prepared data (see the module docstring for its keys).
    categories : list of str
        The classes; ``obs["scgpt_label_code"]`` indexes this list.
    split_counts : pandas.DataFrame
        Cells per class (rows, in ``categories`` order) and split (columns train, val, test).
    rare_classes : list of str
        Classes with fewer than ``min_cells_per_class`` cells, kept in train only.
    log : list of str
        What was done, with counts before -> after.
    files : dict of str to Path
        What :func:`prepare_file` wrote: ``{"prepared_adata": ..., "labels": ...}`` (empty after :func:`prepare`).
    colors : dict of str to str
        The run's colour of each class (:func:`~scgpt_protocol.data.colors.label_palette`), also in
        ``adata.uns[f"{label_key}_colors"]`` and ``labels.json``: every figure of every step uses it.
    label_map : dict, optional
        What ``params.label_map`` did to the labels
        (:func:`~scgpt_protocol.data.label_map.label_map_record`; also in ``labels.json``); None without a map.
    """

    adata: AnnData
    categories: list[str]
    split_counts: pd.DataFrame
    rare_classes: list[str]
    log: list[str]
    colors: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    label_map: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"PreparedData({self.adata.n_obs:,} cells x {self.adata.n_vars:,} genes, "
            f"{len(self.categories)} classes, split {self._split_totals()})"
        )

    def _split_totals(self) -> dict[str, int]:
        return {s: int(self.split_counts[s].sum()) for s in SPLITS}

    def __str__(self) -> str:
        lines = [repr(self), *(f"  {line}" for line in self.log)]
        if self.rare_classes:
            lines.append(f"  train only (rare): {', '.join(self.rare_classes)}")
        return "\n".join(lines)


def prepare(adata: AnnData, params: PreprocessParams, vocab: dict[str, int]) -> PreparedData:
    """Filter, normalise, select the checkpoint's genes and split the cells into train/val/test.

    Parameters
    ----------
    adata : AnnData
        The input data (not modified).
    params : PreprocessParams
        ``label_key``, ``batch_key``, ``layer``, ``gene_symbol_key``, ``min_genes``, ``min_cells``,
        ``max_pct_mito``, ``normalize``, ``n_hvg``, ``test_size``, ``val_size``,
        ``min_cells_per_class`` and ``seed`` are used.
    vocab : dict of str to int
        The checkpoint's vocabulary.

    Returns
    -------
    PreparedData
        The new AnnData (keys in the module docstring), the classes, the cells per class and
        split, the rare classes and a log of every step with counts before -> after.

    Notes
    -----
    In order: drop cells without label; put the chosen matrix (``layer`` or ``X``) into ``X`` as
    float32 CSR (other layers and ``.raw`` are dropped); ``sc.pp.filter_cells(min_genes)``,
    ``sc.pp.filter_genes(min_cells)`` and the mitochondrial filter (genes starting with ``MT-``);
    ``normalize_total(1e4) + log1p`` (``"auto"``: only when the values are integer counts, which are
    kept in ``layers["counts"]``); keep the genes of the vocabulary; ``n_hvg`` highly variable genes
    (``flavor="seurat"``, per batch with ``batch_key``); drop cells with no expressed gene left;
    a stratified split in which test and val hold ``test_size`` and ``val_size`` of all cells,
    classes with fewer than ``min_cells_per_class`` cells stay in train, and every other class has
    cells in train, val and test.

    Raises
    ------
    KeyError
        ``label_key`` / ``batch_key`` / ``layer`` / ``gene_symbol_key`` not found.
    InputDataError
        Negative or NaN values, fewer than two classes, no cells left after filtering, too few cells
        to split.
    GeneMatchError
        Fewer than 10% of the genes are in the vocabulary.
    """

    log: list[str] = []

    def note(message: str) -> None:
        log.append(message)
        logger.info("%s", message)

    label_key, batch_key = params.label_key, params.batch_key
    require_obs_key(adata, label_key, "label_key")
    if batch_key is not None:
        require_obs_key(adata, batch_key, "batch_key")
    get_matrix(adata, params.layer)
    check_expression(adata, layer=params.layer)
    n_cells_in, n_genes_in = int(adata.n_obs), int(adata.n_vars)
    out, where, mapped = _labelled_expression(adata, params, log, note)
    kind, vmax = value_kind(out.X)
    note(f"values look like {kind} (max {vmax:.4g} in a sample of cells)")

    # filters
    out = _filter_cells_genes(out, params, note)
    if params.max_pct_mito is not None:
        mito = mito_mask(gene_symbols(out, params.gene_symbol_key))
        if not mito.any():
            warn_no_mito_genes(params, log)
        else:
            out = _filter_mito(out, params, mito, kind, note)
    check_cells_left(out.n_obs, out.n_vars, params)

    # normalisation
    is_counts, normalise = choose_normalisation(params, kind, vmax, note)
    if is_counts:
        out.layers["counts"] = out.X.copy()
    if normalise:
        if (np.asarray(out.X.sum(axis=1)).ravel() == 0).any():
            warnings.warn("Some cells have zero counts", UserWarning, stacklevel=2)  # as scanpy\'s own call said
        out.X = log1p_cp10k(out.X)
        out.uns["log1p"] = {"base": None}  # what sc.pp.log1p records

    # genes of the vocabulary, highly variable genes, cells with nothing left for the model
    out, match = vocabulary_genes(out, vocab, params, note)
    if params.n_hvg is not None:
        out = _highly_variable(out, params, note)
    out = _drop_empty_cells(out, log)

    return finish_prepared(out, adata, params, log, note, input_record={"n_cells": n_cells_in, "n_genes": n_genes_in,
                   "matrix": where, "value_kind": kind, "value_max": vmax}, normalise=normalise,
                   is_counts=is_counts, match_fraction=match.fraction, label_map=mapped)


def _labelled_expression(adata: AnnData, params: PreprocessParams, log: list[str],
                         note: Any) -> tuple[AnnData, str, Any]:
    """The labelled cells (after the label map) with the chosen matrix as float32 CSR in ``X`` (other layers and
    .raw dropped), where the matrix came from, and the label map's result (None without one). The metadata is
    copied without the matrices; the chosen one is copied once."""
    import anndata

    label_key = params.label_key
    n_cells_in = int(adata.n_obs)
    obs, mapped = map_training_labels(adata.obs, params)  # the caller's obs is not changed
    meta = anndata.AnnData(obs=obs, var=adata.var, uns=adata.uns, obsm=dict(adata.obsm),
                           varm=dict(adata.varm), obsp=dict(adata.obsp), varp=dict(adata.varp))
    missing = missing_labels(obs[label_key])
    report_unlabelled(label_key, n_cells_in, int((~missing).sum()), mapped, log, stacklevel=4)  # prepare's caller
    if missing.any():
        out = meta[~missing].copy()
        matrix = get_matrix(adata, params.layer)[np.flatnonzero(~missing)]  # a new matrix of these rows
    else:
        out = meta.copy()
        matrix = get_matrix(adata, params.layer)
    del meta

    where = f"adata.layers[{params.layer!r}]" if params.layer else "adata.X"
    x = sp.csr_matrix(matrix, dtype=np.float32)
    if x is matrix or (sp.issparse(matrix) and any(
            np.shares_memory(getattr(x, k), getattr(matrix, k)) for k in ("data", "indices", "indptr")
            if hasattr(matrix, k))):
        x = x.copy()  # sum_duplicates / eliminate_zeros work in place: never on the caller's arrays
    del matrix
    x.sum_duplicates()
    x.eliminate_zeros()
    dropped = [f"layers[{k!r}]" for k in adata.layers.keys()] + (["raw"] if adata.raw is not None else [])
    out.X = x
    note(f"expression read from {where} (kept sparse, 32-bit)"
           + (f" (dropped {', '.join(dropped)})" if dropped else ""))
    return out, where, mapped


def _filter_cells_genes(out: AnnData, params: PreprocessParams, note: Any) -> AnnData:
    """``sc.pp.filter_cells(min_genes)`` and ``sc.pp.filter_genes(min_cells)``, where set."""
    import scanpy as sc

    if params.min_genes > 0:
        before = out.n_obs
        sc.pp.filter_cells(out, min_genes=params.min_genes)
        note(f"filter_cells(min_genes={params.min_genes}): {before:,} -> {out.n_obs:,} cells")
    if params.min_cells > 0:
        before = out.n_vars
        sc.pp.filter_genes(out, min_cells=params.min_cells)
        note(f"filter_genes(min_cells={params.min_cells}): {before:,} -> {out.n_vars:,} genes")
    return out


def _filter_mito(out: AnnData, params: PreprocessParams, mito: np.ndarray, kind: str, note: Any) -> AnnData:
    """The cells with at most ``max_pct_mito`` % of their expression in the genes ``mito``."""
    pct = percent_mito(out.X, mito, kind)
    before = out.n_obs
    out.obs["pct_mito"] = pct.astype(np.float32)
    out = out[pct <= params.max_pct_mito].copy()
    note(f"max_pct_mito={params.max_pct_mito} ({int(mito.sum())} MT- genes): "
           f"{before:,} -> {out.n_obs:,} cells")
    return out


def _highly_variable(out: AnnData, params: PreprocessParams, note: Any) -> AnnData:
    """The ``n_hvg`` highly variable genes (seurat flavour, per batch with ``batch_key``); all when not fewer."""
    import scanpy as sc

    batch_key = params.batch_key
    if params.n_hvg >= out.n_vars:
        note(f"n_hvg={params.n_hvg} >= {out.n_vars:,} genes: no highly-variable-gene selection")
        return out
    before = out.n_vars
    sc.pp.highly_variable_genes(out, n_top_genes=params.n_hvg, batch_key=batch_key, flavor="seurat")
    out = out[:, out.var["highly_variable"].to_numpy()].copy()
    per = f", per batch of obs[{batch_key!r}]" if batch_key else ""
    note(f"highly variable genes (seurat{per}): {before:,} -> {out.n_vars:,} genes")
    return out


def _drop_empty_cells(out: AnnData, log: list[str]) -> AnnData:
    """Without the cells that have no expressed gene left for the model (warns)."""
    empty = np.asarray(out.X.getnnz(axis=1) == 0)
    if empty.any():
        before = out.n_obs
        out = out[~empty].copy()
        warn_user(f"dropped {int(empty.sum()):,} cells with no expressed gene among the {out.n_vars:,} selected "
              f"genes: {before:,} -> {out.n_obs:,} cells", stacklevel=4)  # points at prepare's caller
        log.append(f"dropped cells with no expressed selected gene: {before:,} -> {out.n_obs:,} cells")
    return out


def finish_prepared(out: AnnData, source: Any, params: PreprocessParams, log: list[str], note: Any, *,
            input_record: dict[str, Any], normalise: bool, is_counts: bool, match_fraction: float,
            label_map: Any = None) -> PreparedData:
    """The classes, the split and the record of :func:`prepare` (shared with :func:`prepare_file`).

    ``out`` holds the filtered cells and genes (``X`` may be absent); ``source`` is the input, for its colours;
    ``label_map`` the :class:`~scgpt_protocol.data.label_map.LabelMapResult` applied to the labels (None: none).
    """
    label_key = params.label_key
    unique_cell_names(out, log)
    labels = checked_labels(out.obs, label_key, log)
    class_counts = pd.Series(labels).value_counts()
    if len(class_counts) < 2:
        msg = (
            f"obs[{label_key!r}] has {len(class_counts)} class(es) ({list(class_counts.index)}) after "
            f"filtering ({out.n_obs:,} cells left); a classifier needs at least two. Relax the filters or "
            "check label_key."
        )
        raise InputDataError(msg)
    rare_counts = class_counts[class_counts < params.min_cells_per_class].sort_values()
    rare_classes = sorted(rare_counts.index.astype(str))
    if len(rare_counts) == len(class_counts):
        msg = (
            f"every class of obs[{label_key!r}] has fewer than "
            f"min_cells_per_class={params.min_cells_per_class} cells ({len(class_counts):,} classes, "
            f"e.g. {', '.join(f'{k!r} ({v})' for k, v in class_counts.head(5).items())}); nothing "
            "could be evaluated. Lower min_cells_per_class."
        )
        raise InputDataError(msg)
    if rare_classes:
        listed = ", ".join(f"{k!r} ({v})" for k, v in rare_counts.items())
        warn_user(f"{len(rare_classes)} class(es) have fewer than "
              f"min_cells_per_class={params.min_cells_per_class} cells and stay in the training split only "
              f"(they cannot be evaluated): {listed}")
    split, notes = split_cells(labels, np.isin(labels, rare_classes), params.test_size, params.val_size,
                                params.seed)
    for remark in notes:
        note(remark)
    out.obs["split"] = pd.Categorical(split, categories=list(SPLITS))
    test_classes = sorted({str(v) for v in labels[split == "test"]})
    if len(test_classes) == 1:
        warn_user(f"the test split holds one class only ({test_classes[0]!r}; the others have fewer than "
                  f"min_cells_per_class={params.min_cells_per_class} cells and stay in train): 03's scores will "
                  "say nothing about telling cell types apart. Lower min_cells_per_class or add cells.", log)

    categories = sorted(class_counts.index.astype(str))
    out.obs[label_key] = pd.Categorical(labels, categories=categories)
    out.obs["scgpt_label_code"] = out.obs[label_key].cat.codes.to_numpy().astype(np.int64)
    split_counts = (
        pd.crosstab(out.obs[label_key], out.obs["split"], dropna=False)
        .reindex(index=categories, columns=list(SPLITS), fill_value=0)
        .astype(int)
    )
    split_counts.index.name, split_counts.columns.name = "label", "split"
    totals = {s: int(split_counts[s].sum()) for s in SPLITS}
    note(f"split (seed {params.seed}, stratified by {label_key!r}): "
           + ", ".join(f"{s} {n:,}" for s, n in totals.items())
           + (f"; {len(rare_classes)} rare class(es) in train only" if rare_classes else ""))

    record_uns = {
        "params": params.to_dict(),
        "input": input_record,
        "normalised": bool(normalise),
        "counts_layer": bool(is_counts),
        "n_cells": int(out.n_obs),
        "n_genes": int(out.n_vars),
        "genes_matched_fraction": float(match_fraction),
        "categories": categories,
        "rare_classes": rare_classes,
        "split_totals": totals,
        "log": list(log),
    }
    map_record = label_map_record(label_map)
    if map_record is not None:
        record_uns["label_map"] = map_record
    previous = out.uns.get("scgpt_protocol")
    out.uns["scgpt_protocol"] = {**(dict(previous) if isinstance(previous, dict) else {}),
                                 "preprocess": json_safe(record_uns, h5ad=True)}
    colors = label_palette(categories, adata=source, label_key=label_key)  # the input's own colours when valid
    out.uns[f"{label_key}_colors"] = [colors[c] for c in categories]
    return PreparedData(adata=out, categories=categories, split_counts=split_counts,
                        rare_classes=rare_classes, log=log, colors=colors, label_map=map_record)
