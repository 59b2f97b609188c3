"""Step 01's first look at the data: counts or log-normalised values, gene overlap with the vocabulary,
class sizes and unlabelled cells (:func:`inspect_adata`), written for the report (:func:`write_inspection`).
"""

from __future__ import annotations

import html
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..core.errors import InputDataError
from ..core.log import DETAIL
from ..data.label_map import LabelMapResult, describe_label_map, label_map_record
from ..data.labels import missing_labels, require_obs_key
from ..data.matrix import check_expression, get_matrix, value_kind
from ..model.vocab import case_hint, gene_symbols, match_genes
from .stages import checked_labels, mito_mask, repeated_names_message, warn_user

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
logger = logging.getLogger(__name__)

__all__ = ["Inspection", "inspect_adata", "write_inspection", "mt_gene_count", "MIN_MT_GENES"]

#: fewer measured ``MT-`` genes than this make the % mitochondrial of a cell meaningless (a targeted panel)
MIN_MT_GENES = 5


def mt_gene_count(adata: AnnData, gene_symbol_key: str | None = None) -> int:
    """How many ``MT-`` (mitochondrial) genes ``adata`` measures. Below :data:`MIN_MT_GENES` the % mitochondrial
    of a cell rests on too few genes to flag damaged cells (01's QC figure and report say so)."""
    return int(mito_mask(gene_symbols(adata, gene_symbol_key)).sum())


@dataclass
class Inspection:
    """What :func:`inspect_adata` found in the input data (displays as a table in notebooks)."""

    n_cells: int
    n_genes: int
    value_kind: str
    value_max: float
    matrix: str
    label_key: str
    genes_matched: int
    genes_total: int
    fraction_matched: float
    gene_source: str
    class_counts: pd.Series
    min_class_count: int
    n_missing_labels: int = 0
    batch_key: str | None = None
    label_map: dict[str, Any] | None = None  # label_map_record of the map applied to the labels (None: no map)
    label_map_text: str | None = None  # describe_label_map of it
    batches: pd.Series | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(len(self.class_counts))

    def _rows(self) -> list[tuple[str, str]]:
        kind_note = {
            "counts": "raw counts (integers): normalize='auto' log-normalises them",
            "log-normalised": "log-normalised (non-integer): normalize='auto' keeps them",
            "other": "neither counts nor log1p values: check the layer / normalize",
        }[self.value_kind]
        classes = ", ".join(f"{k} ({v:,})" for k, v in self.class_counts.items())
        rows = [
            ("cells", f"{self.n_cells:,}"),
            ("genes", f"{self.n_genes:,}"),
            ("values", f"{self.matrix}: {kind_note}; max {self.value_max:.4g}"),
            ("genes in vocabulary",
             f"{self.genes_matched:,}/{self.genes_total:,} ({self.fraction_matched:.1%}) "
             f"of {self.gene_source}"),
            (f"classes ({self.label_key})", f"{self.n_classes}: {classes}"),
            ("smallest class", f"{self.min_class_count:,} cells"),
        ]
        if self.label_map_text:
            rows.append(("label map", self.label_map_text))
        if self.n_missing_labels:
            rows.append(("cells without label", f"{self.n_missing_labels:,} (dropped in prepare)"))
        if self.batches is not None:
            listed = ", ".join(f"{k} ({v:,})" for k, v in self.batches.items())
            rows.append((f"batches ({self.batch_key})", f"{len(self.batches)}: {listed}"))
        for w in self.warnings:
            rows.append(("warning", w))
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(["Input data"] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left{';color:#b00' if k == 'warning' else ''}'>{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return f"<table><caption style='text-align:left'><b>Input data</b></caption>{cells}</table>"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (written to ``layout.inspection``)."""
        return {
            "n_cells": int(self.n_cells),
            "n_genes": int(self.n_genes),
            "value_kind": self.value_kind,
            "value_max": float(self.value_max),
            "matrix": self.matrix,
            "label_key": self.label_key,
            "genes_matched": int(self.genes_matched),
            "genes_total": int(self.genes_total),
            "fraction_matched": float(self.fraction_matched),
            "gene_source": self.gene_source,
            "n_classes": self.n_classes,
            "class_counts": {str(k): int(v) for k, v in self.class_counts.items()},
            "min_class_count": int(self.min_class_count),
            "n_missing_labels": int(self.n_missing_labels),
            "batch_key": self.batch_key,
            "batches": None if self.batches is None else {str(k): int(v) for k, v in self.batches.items()},
            "warnings": list(self.warnings),
            "label_map": self.label_map,
        }


def _class_counts(adata: AnnData, label_key: str, label_map: LabelMapResult | None,
                  found: list[str]) -> tuple[pd.Series, int]:
    """Cells per class (largest first) and the number of cells without a label (not counting those a label map
    mapped to nothing); warns (into ``found``) about repeated cell names and unlabelled cells."""
    labels = adata.obs[label_key]
    missing = missing_labels(labels)
    n_unlabelled = int(missing.sum()) - (label_map.n_dropped if label_map is not None else 0)
    repeated = repeated_names_message(adata.obs_names)
    if repeated:
        warn_user(f"{repeated}; prepare makes them unique by appending '-1', '-2', ... If the names matter (to "
                  "match cells to another table), make them unique in the input file first.", found, stacklevel=4)
    class_counts = pd.Series(checked_labels(adata.obs[~missing], label_key, found)).value_counts()
    class_counts = class_counts.sort_values(ascending=False)
    class_counts.name = "cells"
    if len(class_counts) < 2:
        msg = (
            f"obs[{label_key!r}] has {len(class_counts)} class(es) "
            f"({list(class_counts.index)}) among the labelled cells; a classifier needs at least two. "
            "Is label_key the column with the cell types?"
        )
        raise InputDataError(msg)
    if n_unlabelled:
        warn_user(f"{n_unlabelled:,} of {adata.n_obs:,} cells have no label in obs[{label_key!r}] (NaN, or "
              "text such as 'nan', '' or 'None'); prepare drops them.", found, stacklevel=4)
    return class_counts, n_unlabelled


def inspect_adata(
    adata: AnnData,
    *,
    label_key: str,
    vocab: dict[str, int],
    batch_key: str | None = None,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    min_cells_per_class: int = 5,
    label_map: LabelMapResult | None = None,
) -> Inspection:
    """Look at the input data before anything is changed, and fail early on what cannot work.

    Parameters
    ----------
    adata : AnnData
        The input data (not modified).
    label_key : str
        ``obs`` column with the cell-type labels.
    vocab : dict of str to int
        The checkpoint's vocabulary (``read_vocab(checkpoint / "vocab.json")``).
    batch_key : str, optional
        ``obs`` column with batches.
    layer : str, optional
        The layer with the expression values (None: ``X``).
    gene_symbol_key : str, optional
        ``var`` column with gene symbols (None: ``var_names``).
    min_cells_per_class : int
        Classes with fewer cells are reported (:func:`prepare` keeps them in train only).
    label_map : LabelMapResult, optional
        What :func:`~scgpt_protocol.data.label_map.map_obs_labels` did to ``obs[label_key]`` (already in the
        model's names): the cells it left without a label (mapped to nothing) are counted apart from the cells
        that had none, and the table says what the map did.

    Returns
    -------
    Inspection
        Sizes, value kind, gene overlap, class and batch counts, warnings (each also issued as a
        ``UserWarning``). Write it with :func:`write_inspection`.

    Raises
    ------
    KeyError
        ``label_key`` or ``batch_key`` is not an ``obs`` column, or ``layer`` / ``gene_symbol_key``
        does not exist.
    InputDataError
        Fewer than two classes, or negative / NaN expression values.
    """
    found: list[str] = []
    require_obs_key(adata, label_key, "label_key")
    if batch_key is not None:
        require_obs_key(adata, batch_key, "batch_key")
    matrix = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    check_expression(adata, layer=layer)

    class_counts, n_unlabelled = _class_counts(adata, label_key, label_map, found)

    kind, vmax = value_kind(matrix)
    if kind == "other":
        warn_user(f"{where} holds non-integer values up to {vmax:.4g}: neither raw counts nor log1p-normalised "
              "values. If these are normalised values (CPM, TPM), set normalize='yes'; better, give the raw "
              "counts (layer=...).", found)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        match = match_genes(adata, vocab, gene_symbol_key=gene_symbol_key, min_overlap=0.0, min_genes=0)
    for w in caught:
        warn_user(str(w.message), found)
    if match.fraction < 0.1 or match.n_matched == 0:
        warn_user(f"only {match.n_matched:,}/{match.n_total:,} genes of {match.source} are in the checkpoint "
              "vocabulary (prepare needs at least 10%). Are these gene symbols of the checkpoint's species? "
              "For Ensembl ids set gene_symbol_key." + case_hint(gene_symbols(adata, gene_symbol_key), vocab), found)

    rare = class_counts[class_counts < min_cells_per_class]
    if len(rare):
        warn_user(f"{len(rare)} class(es) have fewer than {min_cells_per_class} cells and will stay in the "
              f"training split only: {', '.join(f'{k} ({v})' for k, v in rare.items())}.", found)

    batches = None
    if batch_key is not None:
        batches = adata.obs[batch_key].astype(str).value_counts().sort_index()
        batches.name = "cells"

    inspection = Inspection(
        n_cells=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        value_kind=kind,
        value_max=vmax,
        matrix=where,
        label_key=label_key,
        genes_matched=match.n_matched,
        genes_total=match.n_total,
        fraction_matched=match.fraction,
        gene_source=match.source,
        class_counts=class_counts,
        min_class_count=int(class_counts.min()),
        n_missing_labels=n_unlabelled,
        batch_key=batch_key,
        label_map=label_map_record(label_map),
        label_map_text=(None if label_map is None
                        else describe_label_map(label_map, "the input", left_out_of="training")),
        batches=batches,
        warnings=found,
    )
    for line in str(inspection).splitlines():
        logger.info("%s", line, extra=DETAIL)  # the notebook displays it as a table
    return inspection


def write_inspection(inspection: Inspection, layout: RunLayout) -> Path:
    """Write ``inspection.to_dict()`` to ``layout.inspection``; returns the path."""
    return layout.write_json(layout.inspection, inspection.to_dict())
