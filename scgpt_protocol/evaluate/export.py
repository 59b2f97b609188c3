"""Queryable result artifacts of 03, in CyteType's local layout (written here, nothing is uploaded).

``export/vars.h5``
    The normalised expression of the evaluated cells -- the values the model read, ``X`` of
    ``data/prepared.h5ad`` -- as a compressed CSR matrix, with the cells' names and ``var``. It is
    written chunk by chunk from the file opened in backed mode, so memory does not grow with the
    number of cells. The file follows AnnData's on-disk layout: ``anndata.read_h5ad`` and
    ``scanpy.read_h5ad`` open it, and so does plain ``h5py`` (``X/data``, ``X/indices``,
    ``X/indptr``, ``X.attrs["shape"]``, ``obs/_index``, ``var/_index``).
``export/obs.duckdb``
    A DuckDB database: table ``obs`` (one row per evaluated cell: ``cell``, ``row`` -- its row in
    ``vars.h5`` --, ``split``, ``true_label``, the call ``scgpt_label``, ``scgpt_prediction``,
    ``scgpt_label_confidence``, ``scgpt_unknown``, ``scgpt_over_clustering``,
    ``scgpt_majority_voting``, ``scgpt_label_confidence_raw`` -- the uncalibrated probability, the same as
    the confidence when calibration is off --, ``correct``, ``umap_1``, ``umap_2``), table ``metrics`` (one row per
    method and set of cells), ``per_class`` and ``coverage`` (the coverage-vs-accuracy curve).
    Query it with SQL: ``duckdb.connect("export/obs.duckdb", read_only=True).sql("select ...")``.

``require_artifacts=True`` (the default, CyteType's contract): a failure stops the step with an
:class:`~scgpt_protocol.core.errors.ArtifactError`; ``False``: a warning, and the step goes on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from ..annotate.columns import COLUMNS, CORRECT, OBS_COLUMNS, RAW_CONFIDENCE, SPLIT, TRUE_LABEL
from ..core.errors import ArtifactError
from ..core.io import atomic_write
from ..core.log import DETAIL
from ..data.labels import cell_mask
from ..data.matrix import get_matrix, iter_row_chunks
from ..data.read import opened_backed
from ..data.store import CSRWriter, begin_h5ad, write_elem
from ..metrics import headline_values

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
    from .scoring import EvalResult

logger = logging.getLogger(__name__)

__all__ = ["write_vars_h5", "write_duckdb", "evaluation_tables", "export_evaluation", "sql_duckdb"]

_TABLE_NAME = "^[a-z_][a-z0-9_]*$"


def write_vars_h5(
    source: AnnData | str | Path,
    path: str | Path,
    *,
    cells: Any = None,
    layer: str | None = None,
    chunk_size: int = 4096,
    description: str = "normalised expression (X of the source)",
) -> Path:
    """Write the expression of some cells and ``var`` as a compressed CSR ``vars.h5``, chunk by chunk.

    Parameters
    ----------
    source
        An AnnData (in memory or opened with ``backed="r"``) or the path of an ``.h5ad`` (opened backed).
    path
        Where to write (atomically: a reader never sees half a file).
    cells
        Which cells, in the source's order: a boolean mask, positions or obs names; None: all.
    layer
        Take the values from ``layers[layer]`` instead of ``X``.
    chunk_size
        Cells read at a time; memory beyond the output grows with it, not with the number of cells.
    description
        Stored in ``uns["values"]``: what the numbers are.

    Returns
    -------
    pathlib.Path
    """
    import h5py

    with opened_backed(source) as adata:
        mask = cell_mask(adata, cells)
        matrix = get_matrix(adata, layer)
        out = Path(path)
        stored = {"cells": int(mask.sum()), "values": 0}

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                begin_h5ad(f)
                writer = CSRWriter(f, "X", adata.n_vars, indptr_dtype=np.int64, value_chunks=True,
                                   compression={"compression": "gzip", "compression_opts": 4})
                for _, block in iter_row_chunks(matrix, chunk_size, rows=mask, dtype=np.float32):
                    block.sort_indices()
                    writer.append(block)
                stored["values"] = writer.nnz
                write_elem(f, "obs", pd.DataFrame(index=pd.Index(adata.obs_names[mask].astype(str), name=None)))
                var = adata.var.copy()
                var.index = var.index.astype(str)
                write_elem(f, "var", var)
                write_elem(f, "uns", {"values": description})

        atomic_write(out, write)
        n_vars = adata.n_vars
    logger.info("wrote %s: %d cells x %d genes, %d stored values", out, stored["cells"], n_vars, stored["values"],
                extra=DETAIL)
    return out


def _sql_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Categories as text and missing values as NULL, so that SQL compares plain strings."""
    out = frame.copy()
    for column in out.columns:
        if isinstance(out[column].dtype, pd.CategoricalDtype):
            out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def write_duckdb(path: str | Path, tables: Mapping[str, pd.DataFrame]) -> Path:
    """Write DataFrames as tables of a new DuckDB database, atomically (one table per entry)."""
    import re

    import duckdb

    out = Path(path)

    def write(tmp: Path) -> None:
        con = duckdb.connect(str(tmp))
        try:
            for name, frame in tables.items():
                if not re.match(_TABLE_NAME, name):
                    raise ValueError(f"table name {name!r} must be lower-case letters, digits and '_'.")
                con.register("frame_to_write", _sql_ready(frame))
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM frame_to_write')
                con.unregister("frame_to_write")
            con.execute("CHECKPOINT")
        finally:
            con.close()

    atomic_write(out, write, fresh=True, sidecars=(".wal",))
    logger.info("wrote %s: tables %s", out, ", ".join(f"{k} ({len(v)} rows)" for k, v in tables.items()),
                extra=DETAIL)
    return out


def _metric_row(method: str, cells: str, metrics: Mapping[str, Any], coverage: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "cells": cells, **headline_values(metrics, missing=None)}
    row["n_cells"] = metrics.get("n_cells")
    row["coverage"] = coverage
    return row


def evaluation_tables(
    result: EvalResult,
    *,
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    embedding: AnnData | None = None,
    basis: str = "X_umap_scgpt",
) -> dict[str, pd.DataFrame]:
    """The tables of ``obs.duckdb`` from an evaluation: ``obs``, ``metrics``, ``per_class``, ``coverage``.

    Parameters
    ----------
    result
        :func:`~scgpt_protocol.evaluate.scoring.evaluate_predictions` (refined or not).
    methods
        Method name -> metrics (e.g. scGPT and the baseline, as in ``metrics.json``); None: scGPT only.
    embedding
        An AnnData of (a superset of) the evaluated cells with 2-D coordinates in ``obsm[basis]``
        (03's UMAP); cells without coordinates get NULL.
    """
    from ..metrics import SCGPT_METHOD

    pred = result.predictions
    obs = pd.DataFrame({"cell": pred.index.astype(str), "row": np.arange(len(pred), dtype=np.int64)})
    obs[SPLIT] = pred[SPLIT].astype(str).to_numpy() if SPLIT in pred else None
    obs[TRUE_LABEL] = pred[TRUE_LABEL].astype(object).to_numpy()
    for column in (*COLUMNS.values(), CORRECT):
        if column in pred:
            values = pred[column]
            obs[column] = (values.astype(object).where(values.notna(), None).to_numpy()
                           if column != COLUMNS["confidence"] else values.to_numpy(dtype=np.float64))
    raw = pred[RAW_CONFIDENCE] if RAW_CONFIDENCE in pred else pred[COLUMNS["confidence"]]  # uncalibrated: the same
    obs[RAW_CONFIDENCE] = raw.to_numpy(dtype=np.float64)
    if COLUMNS["predicted"] not in obs:  # not refined: the call is the prediction, nothing abstained
        obs[COLUMNS["predicted"]] = obs[COLUMNS["labels"]]
        obs[COLUMNS["unknown"]] = False
    for column in (COLUMNS["over_clustering"], COLUMNS["majority_voting"]):
        if column not in obs:
            obs[column] = pd.Series([None] * len(obs), dtype=object)
    obs[COLUMNS["unknown"]] = obs[COLUMNS["unknown"]].astype(bool)
    obs[CORRECT] = pd.array(pred[CORRECT].to_numpy(), dtype="boolean")
    coords = np.full((len(pred), 2), np.nan)
    if embedding is not None:
        if basis not in embedding.obsm:
            raise KeyError(f"the embedding AnnData has no obsm[{basis!r}]; compute the UMAP first.")
        position = pd.Index(embedding.obs_names.astype(str)).get_indexer(obs["cell"])
        found = position >= 0
        coords[found] = np.asarray(embedding.obsm[basis])[position[found], :2]
    obs["umap_1"], obs["umap_2"] = coords[:, 0], coords[:, 1]
    obs = obs[list(OBS_COLUMNS)]

    methods = dict(methods) if methods else {SCGPT_METHOD: result.metrics}
    refined = result.metrics.get("refinement")
    metric_rows, class_rows = [], []

    def add(method: str, cells: str, metrics: Mapping[str, Any] | None, coverage: float | None) -> None:
        if metrics is None:
            return
        metric_rows.append(_metric_row(method, cells, metrics, coverage))
        class_rows.extend({"method": method, "cells": cells, **row} for row in metrics.get("per_class", []))

    for method, metrics in methods.items():
        metrics = getattr(metrics, "metrics", metrics)
        own = metrics is result.metrics or method == SCGPT_METHOD
        add(method, "all", metrics, refined["coverage"] if own and refined else 1.0)
        if own and refined:
            add(method, "assigned", refined["assigned"], refined["coverage"])
            mv = refined["majority_voting"]
            add(method, "majority_voting", mv, None if mv is None else mv.get("coverage"))
    curve = pd.DataFrame(refined["curve"]) if refined else pd.DataFrame(
        columns=["threshold", "coverage", "n_assigned", "accuracy_assigned", "macro_f1_assigned", "accuracy_all"])
    return {"obs": obs, "metrics": pd.DataFrame(metric_rows), "per_class": pd.DataFrame(class_rows),
            "coverage": curve}


def export_evaluation(
    layout: RunLayout,
    result: EvalResult,
    *,
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    embedding: AnnData | None = None,
    basis: str = "X_umap_scgpt",
    source: AnnData | str | Path | None = None,
    require: bool = True,
) -> dict[str, Path]:
    """Write ``export/vars.h5`` and ``export/obs.duckdb`` of an evaluation (03).

    Parameters
    ----------
    layout
        The run's :class:`~scgpt_protocol.core.layout.RunLayout` (paths ``layout.vars_h5``, ``layout.obs_duckdb``).
    result, methods, embedding, basis
        See :func:`evaluation_tables`.
    source
        The expression to export (default: ``layout.prepared_adata``, read in backed mode).
    require
        True: a failure raises :class:`~scgpt_protocol.core.errors.ArtifactError`. False: it is a warning
        and the artifacts that could be written are returned.

    Returns
    -------
    dict
        ``{"vars_h5": path, "obs_duckdb": path}`` (what was written).
    """
    import duckdb

    written: dict[str, Path] = {}
    cells = result.predictions.index.astype(str)
    jobs = (
        ("vars_h5", layout.vars_h5, lambda: write_vars_h5(source if source is not None else layout.prepared_adata,
                                                          layout.vars_h5, cells=cells)),
        ("obs_duckdb", layout.obs_duckdb, lambda: write_duckdb(layout.obs_duckdb, evaluation_tables(
            result, methods=methods, embedding=embedding, basis=basis))),
    )
    for name, path, job in jobs:
        try:
            written[name] = job()
        except (OSError, ValueError, KeyError, RuntimeError, duckdb.Error) as err:
            msg = (
                f"could not write the result artifact {path}: {type(err).__name__}: {err}. Check that "
                f"{path.parent} can be created and written (free space, permissions, not a file), or set "
                "require_artifacts=False to go on without the artifacts (or export=False to skip them)."
            )
            if require:
                raise ArtifactError(msg) from err
            warnings.warn(msg, UserWarning, stacklevel=2)
            logger.warning("%s", msg)
    return written


def sql_duckdb(path: str | Path, sql: str) -> pd.DataFrame:
    """Run one SQL statement on a DuckDB file (opened read-only) and return the result as a DataFrame.

    Examples
    --------
    >>> sql_duckdb(layout.obs_duckdb, "select scgpt_label, count(*) from obs group by 1")  # doctest: +SKIP
    """
    import duckdb

    if not Path(path).is_file():
        msg = f"{path} does not exist; export the results first (export=True in 03)."
        raise FileNotFoundError(msg)
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.sql(sql).df()
    finally:
        con.close()
