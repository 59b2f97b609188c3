"""Step 01: load, inspect, filter, normalise, select genes and split the cells.

The functions here back the ``01_preprocess`` notebook::

    adata = open_adata(params.adata_path)        # obs/var/uns in memory, the matrix on disk
    ckpt = resolve_checkpoint(params.checkpoint, layout, gene_symbols(adata, params.gene_symbol_key))
    vocab = read_vocab(ckpt / "vocab.json")
    inspection = inspect_adata(adata, label_key=params.label_key, vocab=vocab, ...)
    write_inspection(inspection, layout)
    fig = plot_qc(adata)                         # per-cell numbers, chunk by chunk
    prepared = prepare_file(params, vocab, layout)   # writes prepared.h5ad and labels.json

:func:`prepare_file` (in :mod:`scgpt_protocol.preprocess_stream`) streams the matrix in row chunks with
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

import html
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputDataError, format_keys
from .log import DETAIL
from .plotting import label_palette, mark_categories
from .tokenize import check_expression, gene_symbols, get_matrix, iter_row_chunks, match_genes, value_kind

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure

    from .layout import RunLayout
    from .params import PreprocessParams

__all__ = [
    "SPLITS",
    "Inspection",
    "PreparedData",
    "read_adata",
    "open_backed",
    "read_prepared_cells",
    "resolve_checkpoint",
    "read_checkpoint_record",
    "inspect_adata",
    "write_inspection",
    "prepare",
    "write_prepared",
    "read_prepared",
    "read_labels",
    "plot_qc",
    "plot_class_counts",
    "prepare_file",
    "open_adata",
    "choose_chunked",
]

logger = logging.getLogger(__name__)

STEP = "01_preprocess"
#: the values of ``obs["split"]``, in this order
SPLITS = ("train", "val", "test")


def _warn(message: str, collect: list[str] | None = None, stacklevel: int = 3) -> None:
    """A soft problem: a ``UserWarning`` and a log line (and kept in ``collect``)."""
    logger.warning("%s", message)
    if collect is not None:
        collect.append(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


# -- reading --------------------------------------------------------------------------------
def read_adata(path: str) -> AnnData:
    """Read the input data.

    Parameters
    ----------
    path : str
        An ``.h5ad`` file, or ``"demo"`` for scanpy's bundled ``pbmc68k_reduced``
        (:func:`scgpt_protocol.data.load_demo`).

    Returns
    -------
    AnnData
        The data, read fully into memory.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message gives the current working directory, against
        which a relative path is resolved).
    ValueError
        The file name does not end in ``.h5ad``.
    InputDataError
        The file cannot be read as an ``.h5ad`` file (truncated, another format).
    """
    if str(path) == "demo":
        from .data import load_demo

        adata = load_demo()
        logger.info("read the demo data (scanpy's pbmc68k_reduced): %s cells x %s genes",
                    f"{adata.n_obs:,}", f"{adata.n_vars:,}")
        return adata
    file = _check_h5ad_path(path)
    import anndata

    try:
        adata = anndata.read_h5ad(file)
    except (OSError, KeyError, ValueError, TypeError) as err:  # h5py / anndata errors name no path
        raise _unreadable(file, err) from err
    logger.info("read %s: %s cells x %s genes", file, f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return adata


def _unreadable(file: Path, err: Exception) -> InputDataError:
    """The error for an ``.h5ad`` file that h5py / anndata cannot read."""
    return InputDataError(
        f"adata_path {str(file)!r} could not be read as an .h5ad file ({type(err).__name__}: {err}). It is "
        f"{file.stat().st_size:,} bytes: a truncated copy or download, or another format with an .h5ad "
        "name. Copy or write it again (adata.write_h5ad) and check that it opens with anndata.read_h5ad."
    )


def _check_h5ad_path(path: str | Path) -> Path:
    """``path`` as a Path: an existing ``.h5ad`` file, or a clear error (see :func:`read_adata`)."""
    file = Path(path).expanduser()
    if file.suffix.lower() != ".h5ad":
        msg = (
            f"adata_path {str(path)!r} is not an .h5ad file (suffix {file.suffix or 'none'!r}). "
            "Convert the data to AnnData first (e.g. sc.read_10x_mtx, sc.read_10x_h5, sc.read_csv, "
            "sc.read_loom), then adata.write_h5ad('data.h5ad') and set adata_path to that file; "
            "or use 'demo'."
        )
        raise ValueError(msg)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        msg = (
            f"adata_path {str(path)!r} {what} (resolved to {file.absolute()}; the current working "
            f"directory is {Path.cwd()}). Give the path of an .h5ad file, absolute or relative to that "
            "directory, or 'demo'."
        )
        raise FileNotFoundError(msg)
    return file


# -- checkpoint -----------------------------------------------------------------------------
def resolve_checkpoint(spec: str, layout: RunLayout, genes: Sequence[str]) -> Path:
    """Find (or make) the pretrained checkpoint the run uses and record it.

    Parameters
    ----------
    spec : str
        ``"demo"``: a tiny randomly initialised checkpoint whose vocabulary is ``genes``, written to
        ``layout.demo_checkpoint_dir`` (for trying the protocol out; its results mean nothing);
        ``"whole-human"`` (or another name of
        :data:`~scgpt_protocol.download.KNOWN_CHECKPOINTS`): the released model, downloaded once
        into the cache; anything else: a checkpoint folder.
    layout : RunLayout
        The run; the record goes to ``layout.checkpoint_record``.
    genes : sequence of str
        The data's gene symbols (:func:`gene_symbols`); used only for ``"demo"``.

    Returns
    -------
    Path
        The checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).

    Raises
    ------
    CheckpointNotFoundError
        The folder, or one of its files, does not exist.
    CheckpointError
        The checkpoint does not load (a truncated file, weights that do not match args.json).
    """
    from .checkpoint import load_model, locate_checkpoint
    from .download import sha256_file

    path, kind = locate_checkpoint(spec, demo_dir=layout.demo_checkpoint_dir, demo_genes=genes)
    if kind == "demo":
        logger.warning(
            "checkpoint='demo': using a tiny RANDOMLY INITIALISED model written to %s. It has never seen a "
            "cell: everything it produces (embeddings, predictions, metrics) is for trying the protocol out "
            "and means nothing biologically. Set checkpoint='whole-human' (or a checkpoint folder) for real "
            "results.", path, extra=DETAIL,  # notebooks show report.checkpoint_banner instead
        )
    else:
        logger.info("checkpoint %r (%s): %s", spec, kind, path)
        # load it once now: a truncated or mismatched checkpoint fails here, not after 01 has finished
        load_model(path, device="cpu")
    record = {"checkpoint": str(path), "kind": kind, "sha256": sha256_file(path / "best_model.pt")}
    layout.write_json(layout.checkpoint_record, record)
    return path


def read_checkpoint_record(layout: RunLayout) -> dict[str, Any]:
    """The record :func:`resolve_checkpoint` wrote: ``checkpoint``, ``kind``, ``sha256``.

    Raises
    ------
    FileNotFoundError
        Step ``01_preprocess`` has not run with this ``run_dir``.
    """
    return layout.read_json(layout.checkpoint_record, step=STEP)


def describe_checkpoint(record: dict[str, Any]) -> str:
    """One plain sentence on which pretrained model a run uses, for reports."""
    if record.get("kind") == "demo":
        return (
            "This run uses the tiny RANDOMLY INITIALISED demo checkpoint: its numbers show that the "
            "protocol runs end to end, not what scGPT can do. Set checkpoint='whole-human' in 01_preprocess "
            "for real results."
        )
    return f"This run uses the pretrained checkpoint {record.get('checkpoint')} (sha256 {str(record.get('sha256'))[:12]}...)."


def subset_split(adata: AnnData, split: str | Sequence[str], *, split_key: str = "split") -> AnnData:
    """A copy of the cells of one or more splits (``"train"``, ``"val"``, ``"test"``)."""
    if split_key not in adata.obs:
        msg = f"{split_key!r} not in adata.obs (columns: {format_keys(adata.obs.columns)}); run 01_preprocess first."
        raise KeyError(msg)
    wanted = [split] if isinstance(split, str) else list(split)
    bad = sorted(set(wanted) - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split(s) {bad}; splits are {list(SPLITS)}.")
    return adata[adata.obs[split_key].isin(wanted).to_numpy()].copy()


# -- inspection -----------------------------------------------------------------------------
#: label strings that mean "no label" (a column written from pandas with NaN turned to text, empty cells)
MISSING_LABEL_STRINGS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})


def missing_labels(labels: pd.Series) -> np.ndarray:
    """Cells without a label: NaN / None, and the strings ``'nan'``, ``''``, ``'None'``, ``'NA'`` ...

    Such strings come from a column converted to text with its missing values; kept as they are they
    would become a class named ``'nan'``.
    """
    missing = labels.isna().to_numpy()
    text = labels[~missing].astype(str).str.strip().str.lower()
    missing[np.flatnonzero(~missing)[text.isin(MISSING_LABEL_STRINGS).to_numpy()]] = True
    return missing


def _require_obs_key(adata: AnnData, key: str, name: str) -> None:
    if key not in adata.obs.columns:
        msg = (
            f"{name} {key!r} not in adata.obs; available: {format_keys(adata.obs.columns)}. "
            f"Set {name} in the parameters cell or YAML."
        )
        raise KeyError(msg)


def _mito_mask(symbols: Sequence[str]) -> np.ndarray:
    return np.array([s.upper().startswith("MT-") for s in symbols], dtype=bool)


def _pct_mito(matrix: Any, mito: np.ndarray, kind: str) -> np.ndarray:
    """Per-cell percentage of the (count-scale) signal in the mitochondrial genes."""
    x = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if kind == "log-normalised":
        x.data = np.expm1(x.data)  # back to the normalised scale
    total = np.asarray(x.sum(axis=1)).ravel()
    mt = np.asarray(x[:, np.flatnonzero(mito)].sum(axis=1)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 100.0 * mt / np.where(total > 0, total, 1.0), 0.0)


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
        }


def inspect_adata(
    adata: AnnData,
    *,
    label_key: str,
    vocab: dict[str, int],
    batch_key: str | None = None,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    min_cells_per_class: int = 5,
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
    _require_obs_key(adata, label_key, "label_key")
    if batch_key is not None:
        _require_obs_key(adata, batch_key, "batch_key")
    matrix = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    check_expression(adata, layer=layer)

    labels = adata.obs[label_key]
    missing = missing_labels(labels)
    class_counts = labels[~missing].astype(str).value_counts().sort_values(ascending=False)
    class_counts.name = "cells"
    if len(class_counts) < 2:
        msg = (
            f"obs[{label_key!r}] has {len(class_counts)} class(es) "
            f"({list(class_counts.index)}) among the labelled cells; a classifier needs at least two. "
            "Is label_key the column with the cell types?"
        )
        raise InputDataError(msg)
    if missing.any():
        _warn(f"{int(missing.sum()):,} of {adata.n_obs:,} cells have no label in obs[{label_key!r}] (NaN, or "
              "text such as 'nan', '' or 'None'); prepare drops them.", found)

    kind, vmax = value_kind(matrix)
    if kind == "other":
        _warn(f"{where} holds non-integer values up to {vmax:.4g}: neither raw counts nor log1p-normalised "
              "values. If these are normalised values (CPM, TPM), set normalize='yes'; better, give the raw "
              "counts (layer=...).", found)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        match = match_genes(adata, vocab, gene_symbol_key=gene_symbol_key, min_overlap=0.0, min_genes=0)
    for w in caught:
        _warn(str(w.message), found)
    if match.fraction < 0.1 or match.n_matched == 0:
        _warn(f"only {match.n_matched:,}/{match.n_total:,} genes of {match.source} are in the checkpoint "
              "vocabulary (prepare needs at least 10%). Are these gene symbols of the checkpoint's species? "
              "For Ensembl ids set gene_symbol_key.", found)

    rare = class_counts[class_counts < min_cells_per_class]
    if len(rare):
        _warn(f"{len(rare)} class(es) have fewer than {min_cells_per_class} cells and will stay in the "
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
        n_missing_labels=int(missing.sum()),
        batch_key=batch_key,
        batches=batches,
        warnings=found,
    )
    for line in str(inspection).splitlines():
        logger.info("%s", line, extra=DETAIL)  # the notebook displays it as a table
    return inspection


def write_inspection(inspection: Inspection, layout: RunLayout) -> Path:
    """Write ``inspection.to_dict()`` to ``layout.inspection``; returns the path."""
    return layout.write_json(layout.inspection, inspection.to_dict())


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
        The run's colour of each class (:func:`~scgpt_protocol.plotting.label_palette`), also in
        ``adata.uns[f"{label_key}_colors"]`` and ``labels.json``: every figure of every step uses it.
    """

    adata: AnnData
    categories: list[str]
    split_counts: pd.DataFrame
    rare_classes: list[str]
    log: list[str]
    colors: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

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


def _h5ad_safe(obj: Any) -> Any:
    """JSON-like values that every anndata version writes (None becomes the string 'None')."""
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_h5ad_safe(v) for v in obj]
    if obj is None:
        return "None"
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return str(obj)


def _split_cells(
    labels: np.ndarray, rare: np.ndarray, test_size: float, val_size: float, seed: int
) -> tuple[np.ndarray, list[str]]:
    """``split[i]`` in SPLITS for each cell; rare cells go to train. Returns the split and notes."""
    from sklearn.model_selection import train_test_split

    n_total = len(labels)
    split = np.full(n_total, "train", dtype=object)
    idx = np.flatnonzero(~rare)
    y = labels[idx]
    classes = np.unique(y)
    n_test = max(int(round(test_size * n_total)), len(classes))
    n_val = max(int(round(val_size * n_total)), len(classes))
    if len(idx) - n_test - n_val < len(classes):
        msg = (
            f"{len(idx):,} cells in {len(classes)} classes are too few for a test split of {n_test:,} and a "
            f"validation split of {n_val:,} cells with every class in train, val and test. Lower test_size / "
            "val_size, or raise min_cells_per_class so that small classes stay in train only."
        )
        raise InputDataError(msg)
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    y_rest = labels[rest]
    # a class with one cell left cannot be stratified; it stays in train and is repaired below
    left = pd.Series(y_rest).value_counts()
    single = np.isin(y_rest, left.index[left < 2].to_numpy())
    train, val = train_test_split(
        rest[~single], test_size=n_val, stratify=y_rest[~single], random_state=seed + 1
    )
    split[test], split[val] = "test", "val"

    # every non-rare class in every split: move single cells from the split that has the most
    notes = []
    rng = np.random.default_rng(seed)
    for label in classes:
        members = np.flatnonzero((labels == label) & ~rare)
        for target in SPLITS:
            if (split[members] == target).any():
                continue
            counts = {s: int((split[members] == s).sum()) for s in SPLITS}
            donor = max(counts, key=counts.get)
            pick = rng.choice(members[split[members] == donor])
            split[pick] = target
            notes.append(f"moved 1 cell of {label!r} from {donor} to {target} so that the class is in "
                         "every split")
    return split, notes


def _no_mito_genes(params: PreprocessParams, log: list[str]) -> None:
    _warn(f"max_pct_mito={params.max_pct_mito} is set but no gene name starts with 'MT-'; the "
          "mitochondrial filter was skipped.", stacklevel=4)
    log.append("mitochondrial filter skipped: no MT- genes")


def _check_left(n_obs: int, n_vars: int, params: PreprocessParams) -> None:
    """A clear error when the filters left no cell or no gene."""
    if n_obs == 0 or n_vars == 0:
        msg = (
            f"no {'cells' if n_obs == 0 else 'genes'} left after filtering "
            f"(min_genes={params.min_genes}, min_cells={params.min_cells}, "
            f"max_pct_mito={params.max_pct_mito}). Relax these filters."
        )
        raise InputDataError(msg)


def _normalisation(params: PreprocessParams, kind: str, vmax: float, record: Any) -> tuple[bool, bool]:
    """``(is_counts, normalise)`` for ``params.normalize`` and the values' kind; warns and records the choice."""
    is_counts = kind == "counts"
    normalise = {"yes": True, "no": False, "auto": is_counts}[params.normalize]
    if normalise:
        if kind == "log-normalised":
            _warn("normalize='yes' but the values already look log-normalised (non-integer, "
                  f"max {vmax:.3g}); they are normalised and log-transformed again. Use "
                  "normalize='auto' unless this is intended.", stacklevel=4)
        record("normalised: normalize_total(target_sum=1e4) + log1p"
               + ("; raw counts kept in layers['counts']" if is_counts else ""))
    else:
        if params.normalize == "auto" and kind == "other":
            _warn(f"values are neither raw counts nor log-normalised (non-integer, max {vmax:.4g}) and were "
                  "left as they are (normalize='auto'). Set normalize='yes' for CPM/TPM values, or give "
                  "the raw counts (layer=...).", stacklevel=4)
        record(f"not normalised (normalize={params.normalize!r}, values: {kind})"
               + ("; counts also in layers['counts']" if is_counts else ""))
    return is_counts, normalise


def _vocabulary_genes(out: AnnData, vocab: dict[str, int], params: PreprocessParams,
                      record: Any) -> tuple[AnnData, Any]:
    """``out`` restricted to the genes of the vocabulary (token ids in ``var``), and the gene match
    (:func:`~scgpt_protocol.tokenize.match_genes`; ``match.columns`` are the columns kept)."""
    before = out.n_vars
    match = match_genes(out, vocab, gene_symbol_key=params.gene_symbol_key)
    cols = match.columns
    symbols = gene_symbols(out, params.gene_symbol_key)
    out = out[:, cols].copy()
    out.var["scgpt_token_id"] = match.token_ids[cols].astype(np.int64)
    if params.gene_symbol_key is not None:
        out.var["original_var_name"] = np.asarray(out.var_names, dtype=str)
        out.var_names = pd.Index([symbols[j] for j in cols], dtype=str)
    record(f"kept the genes in the checkpoint vocabulary ({match.source}): "
           f"{before:,} -> {out.n_vars:,} genes ({match.fraction:.1%})")
    return out, match


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
    import scanpy as sc

    log: list[str] = []

    def record(message: str) -> None:
        log.append(message)
        logger.info("%s", message)

    label_key, batch_key = params.label_key, params.batch_key
    _require_obs_key(adata, label_key, "label_key")
    if batch_key is not None:
        _require_obs_key(adata, batch_key, "batch_key")
    get_matrix(adata, params.layer)
    check_expression(adata, layer=params.layer)
    n_cells_in, n_genes_in = int(adata.n_obs), int(adata.n_vars)

    # labels; the metadata is copied without the matrices (the chosen one is copied once below, the
    # other layers and .raw not at all)
    import anndata

    meta = anndata.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns, obsm=dict(adata.obsm),
                           varm=dict(adata.varm), obsp=dict(adata.obsp), varp=dict(adata.varp))
    missing = missing_labels(adata.obs[label_key])
    if missing.any():
        out = meta[~missing].copy()
        _warn(f"dropped {int(missing.sum()):,} cells without a label in obs[{label_key!r}]: "
              f"{n_cells_in:,} -> {out.n_obs:,} cells")
        log.append(f"dropped cells without a label: {n_cells_in:,} -> {out.n_obs:,} cells")
        matrix = get_matrix(adata, params.layer)[np.flatnonzero(~missing)]  # a new matrix of these rows
    else:
        out = meta.copy()
        matrix = get_matrix(adata, params.layer)
    del meta

    # matrix
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
    record(f"expression from {where} as float32 CSR"
           + (f" (dropped {', '.join(dropped)})" if dropped else ""))
    kind, vmax = value_kind(out.X)
    record(f"values look like {kind} (max {vmax:.4g} in a sample of cells)")

    # filters
    if params.min_genes > 0:
        before = out.n_obs
        sc.pp.filter_cells(out, min_genes=params.min_genes)
        record(f"filter_cells(min_genes={params.min_genes}): {before:,} -> {out.n_obs:,} cells")
    if params.min_cells > 0:
        before = out.n_vars
        sc.pp.filter_genes(out, min_cells=params.min_cells)
        record(f"filter_genes(min_cells={params.min_cells}): {before:,} -> {out.n_vars:,} genes")
    if params.max_pct_mito is not None:
        mito = _mito_mask(gene_symbols(out, params.gene_symbol_key))
        if not mito.any():
            _no_mito_genes(params, log)
        else:
            pct = _pct_mito(out.X, mito, kind)
            before = out.n_obs
            out.obs["pct_mito"] = pct.astype(np.float32)
            out = out[pct <= params.max_pct_mito].copy()
            record(f"max_pct_mito={params.max_pct_mito} ({int(mito.sum())} MT- genes): "
                   f"{before:,} -> {out.n_obs:,} cells")
    _check_left(out.n_obs, out.n_vars, params)

    # normalisation
    is_counts, normalise = _normalisation(params, kind, vmax, record)
    if is_counts:
        out.layers["counts"] = out.X.copy()
    if normalise:
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)

    # genes of the vocabulary
    out, match = _vocabulary_genes(out, vocab, params, record)

    # highly variable genes
    if params.n_hvg is not None:
        if params.n_hvg >= out.n_vars:
            record(f"n_hvg={params.n_hvg} >= {out.n_vars:,} genes: no highly-variable-gene selection")
        else:
            before = out.n_vars
            sc.pp.highly_variable_genes(out, n_top_genes=params.n_hvg, batch_key=batch_key, flavor="seurat")
            out = out[:, out.var["highly_variable"].to_numpy()].copy()
            per = f", per batch of obs[{batch_key!r}]" if batch_key else ""
            record(f"highly variable genes (seurat{per}): {before:,} -> {out.n_vars:,} genes")

    # cells with nothing left for the model
    empty = np.asarray(out.X.getnnz(axis=1) == 0)
    if empty.any():
        before = out.n_obs
        out = out[~empty].copy()
        _warn(f"dropped {int(empty.sum()):,} cells with no expressed gene among the {out.n_vars:,} selected "
              f"genes: {before:,} -> {out.n_obs:,} cells")
        log.append(f"dropped cells with no expressed selected gene: {before:,} -> {out.n_obs:,} cells")

    return _finish(out, adata, params, log, record, input_record={"n_cells": n_cells_in, "n_genes": n_genes_in,
                   "matrix": where, "value_kind": kind, "value_max": vmax}, normalise=normalise,
                   is_counts=is_counts, match_fraction=match.fraction)


def _finish(out: AnnData, source: Any, params: PreprocessParams, log: list[str], record: Any, *,
            input_record: dict[str, Any], normalise: bool, is_counts: bool, match_fraction: float) -> PreparedData:
    """The classes, the split and the record of :func:`prepare` (shared with :func:`prepare_file`).

    ``out`` holds the filtered cells and genes (``X`` may be absent); ``source`` is the input, for its colours.
    """
    label_key = params.label_key
    # classes and split
    labels = out.obs[label_key].astype(str).to_numpy()
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
            f"min_cells_per_class={params.min_cells_per_class} cells ({dict(class_counts)}); nothing "
            "could be evaluated. Lower min_cells_per_class."
        )
        raise InputDataError(msg)
    if rare_classes:
        listed = ", ".join(f"{k!r} ({v})" for k, v in rare_counts.items())
        _warn(f"{len(rare_classes)} class(es) have fewer than "
              f"min_cells_per_class={params.min_cells_per_class} cells and stay in the training split only "
              f"(they cannot be evaluated): {listed}")
    split, notes = _split_cells(labels, np.isin(labels, rare_classes), params.test_size, params.val_size,
                                params.seed)
    for note in notes:
        record(note)
    out.obs["split"] = pd.Categorical(split, categories=list(SPLITS))

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
    record(f"split (seed {params.seed}, stratified by {label_key!r}): "
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
    previous = out.uns.get("scgpt_protocol")
    out.uns["scgpt_protocol"] = {**(dict(previous) if isinstance(previous, dict) else {}),
                                 "preprocess": _h5ad_safe(record_uns)}
    colors = label_palette(categories, adata=source, label_key=label_key)  # the input's own colours when valid
    out.uns[f"{label_key}_colors"] = [colors[c] for c in categories]
    return PreparedData(adata=out, categories=categories, split_counts=split_counts,
                        rare_classes=rare_classes, log=log, colors=colors)


# -- writing --------------------------------------------------------------------------------
def write_prepared(prepared: PreparedData, layout: RunLayout, label_key: str) -> dict[str, Path]:
    """Write the prepared AnnData and the label record of the run.

    Parameters
    ----------
    prepared : PreparedData
        The result of :func:`prepare`.
    layout : RunLayout
        The run.
    label_key : str
        The label column (recorded for the later steps).

    Returns
    -------
    dict of str to Path
        ``{"prepared_adata": layout.prepared_adata, "labels": layout.labels}``.

    Notes
    -----
    The h5ad is written under a temporary name next to its target and renamed once complete, so
    an interrupted write never leaves a half-written ``prepared.h5ad``. ``labels.json`` holds
    ``label_key``, ``categories``, ``class_counts``, ``split_counts`` (``{split: {label: n}}``) and
    ``rare_classes``.
    """
    path = layout.write_h5ad(prepared.adata, layout.prepared_adata)
    _write_labels(prepared, layout, label_key)
    logger.info("wrote %s (%s cells x %s genes) and %s", path, f"{prepared.adata.n_obs:,}",
                f"{prepared.adata.n_vars:,}", layout.labels, extra=DETAIL)  # the notebook shows report.files_table
    return {"prepared_adata": path, "labels": layout.labels}


def _write_labels(prepared: PreparedData, layout: RunLayout, label_key: str) -> Path:
    """Write ``layout.labels`` (see :func:`write_prepared`)."""
    counts = prepared.split_counts
    labels = {
        "label_key": label_key,
        "categories": list(prepared.categories),
        "class_counts": {str(k): int(v) for k, v in counts.sum(axis=1).items()},
        "split_counts": {s: {str(k): int(v) for k, v in counts[s].items()} for s in SPLITS},
        "rare_classes": list(prepared.rare_classes),
        "colors": dict(prepared.colors) or label_palette(prepared.categories),  # one palette for every figure
    }
    return layout.write_json(layout.labels, labels)


def read_prepared(layout: RunLayout, *, backed: bool = False) -> AnnData:
    """Read ``layout.prepared_adata`` (a clear error if step 01 has not run); ``backed``: open it read-only
    with ``X`` and ``layers`` left on disk (:func:`open_backed`), for data larger than memory."""
    import anndata

    path = layout.require(layout.prepared_adata, step=STEP)
    return open_backed(path) if backed else anndata.read_h5ad(path)


def read_prepared_cells(layout: RunLayout) -> Any:
    """The run's ``prepared.h5ad`` for fine-tuning, with ``X`` and ``obs`` left on disk
    (:class:`~scgpt_protocol.backed.BackedCells`; a clear error before step 01).
    :func:`~scgpt_protocol.train.finetune` reads its label and split columns and the cell names from the file
    by slices, so that its memory does not grow with the number of cells (benchmarks/bench_scale.py)."""
    from .backed import read_backed

    return read_backed(layout.require(layout.prepared_adata, step=STEP))


def open_backed(path: str | Path) -> AnnData:
    """An ``.h5ad`` file as a read-only backed AnnData with only ``obs``, ``var`` and ``uns`` in memory.

    ``anndata.read_h5ad(path, backed="r")`` leaves ``X`` on disk but reads every layer, ``obsm`` and
    ``obsp`` into memory: for a prepared file, ``layers["counts"]`` is as large as ``X`` (measured at
    200,000 cells x 20,000 genes: 1.86 GiB peak just to open it, against 0.13 GiB here). The AnnData
    returned reads rows of ``X`` from the file on demand; its layers, ``obsm`` and ``obsp`` are not loaded
    (read them with ``anndata.io.read_elem`` if needed). Close it with ``adata.file.close()``.
    """
    import anndata
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    with h5py.File(path, "r") as f:
        parts = {key: read_elem(f[key]) for key in ("var", "uns") if key in f}
        parts["obs"] = _read_obs(f["obs"])
    return anndata.AnnData(**parts, filename=path, filemode="r")


def _read_obs(group: Any, step: int = 65536) -> pd.DataFrame:
    """``obs`` of an open ``.h5ad``, its index (cell names) decoded a slice at a time: read whole, the names
    pass through a second full copy (bytes, then str) that doubles their peak memory."""
    from anndata.io import read_elem

    index_key = group.attrs["_index"]
    names = group[index_key]
    if names.dtype.kind != "O":  # not variable-length strings: anndata's own reader
        return read_elem(group)
    index = np.empty(names.shape[0], dtype=object)
    for start in range(0, len(index), step):
        index[start : start + step] = names.asstr()[start : start + step]
    columns = [str(c) for c in group.attrs.get("column-order", [])]
    obs = pd.DataFrame({c: read_elem(group[c]) for c in columns}, index=pd.Index(index, name=None))
    return obs if index_key == "_index" else obs.rename_axis(index_key)


def read_labels(layout: RunLayout) -> dict[str, Any]:
    """Read ``layout.labels`` (a clear error if step 01 has not run)."""
    return layout.read_json(layout.labels, step=STEP)


# -- plots ----------------------------------------------------------------------------------
def plot_qc(adata: AnnData, *, layer: str | None = None, gene_symbol_key: str | None = None) -> Figure:
    """Histograms of genes per cell, total counts per cell and (when MT- genes exist) % mitochondrial.

    Parameters
    ----------
    adata : AnnData
        Input or prepared data.
    layer : str, optional
        The layer to summarise (None: ``X``).
    gene_symbol_key : str, optional
        ``var`` column with gene symbols, to find the ``MT-`` genes.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot: display it as the last expression of a cell (or ``display(fig)``),
        save it with :func:`scgpt_protocol.plotting.save_figure`.
    """
    from matplotlib.figure import Figure

    matrix = get_matrix(adata, layer)
    kind, _ = value_kind(matrix)
    where = f"layers[{layer!r}]" if layer else "X"
    mito = _mito_mask(gene_symbols(adata, gene_symbol_key))
    # per-cell numbers chunk by chunk: the matrix may be on disk (open_adata) or larger than a copy can be
    n_genes = np.zeros(adata.n_obs, dtype=np.int64)
    totals = np.zeros(adata.n_obs, dtype=np.float32)
    pct = np.zeros(adata.n_obs, dtype=np.float64)
    for start, chunk in iter_row_chunks(matrix, 8192):
        x = sp.csr_matrix(chunk, dtype=np.float32)
        end = start + x.shape[0]
        n_genes[start:end] = np.asarray((x != 0).sum(axis=1)).ravel()  # explicit zeros are not genes
        totals[start:end] = np.asarray(x.sum(axis=1)).ravel()
        if mito.any():
            pct[start:end] = _pct_mito(x, mito, kind)
    panels = [
        (n_genes, "expressed genes per cell", "genes"),
        (totals, f"total {'counts' if kind == 'counts' else 'of values'} per cell ({where})",
         "counts" if kind == "counts" else "sum of values"),
    ]
    if mito.any():
        panels.append((pct, f"% mitochondrial ({int(mito.sum())} MT- genes)", "%"))
    fig = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (values, title, xlabel) in zip(axes, panels):
        ax.hist(values, bins=50, color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cells")
    fig.suptitle(f"{adata.n_obs:,} cells x {adata.n_vars:,} genes", fontsize=11)
    return fig


def plot_class_counts(prepared: PreparedData) -> Figure:
    """Horizontal bars: cells per class, stacked by split (rare classes marked "train only").

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot (see :func:`plot_qc`).
    """
    from matplotlib.figure import Figure

    counts = prepared.split_counts.reindex(columns=list(SPLITS), fill_value=0)
    counts = counts.loc[counts.sum(axis=1).sort_values(ascending=True).index]
    names = [f"{c} (train only)" if c in prepared.rare_classes else str(c) for c in counts.index]
    fig = Figure(figsize=(7.0, max(2.5, 0.35 * len(counts) + 1.2)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(counts))
    colours = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
    for split in SPLITS:
        values = counts[split].to_numpy(dtype=float)
        ax.barh(names, values, left=left, label=f"{split} ({int(values.sum()):,})", color=colours[split])
        left += values
    mark_categories(ax, [prepared.colors.get(str(c)) for c in counts.index])  # the run's class colours
    ax.set_xlabel("cells")
    ax.set_title(f"cells per class and split ({len(counts)} classes)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


# the bounded-memory path (prepare_file) and its reader live in preprocess_stream
from .preprocess_stream import choose_chunked, open_adata, prepare_file  # noqa: E402
