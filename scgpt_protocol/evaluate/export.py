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
    ``scgpt_majority_voting``, ``correct``, ``umap_1``, ``umap_2``), table ``metrics`` (one row per
    method and set of cells), ``per_class`` and ``coverage`` (the coverage-vs-accuracy curve).
    Query it with SQL: ``duckdb.connect("export/obs.duckdb", read_only=True).sql("select ...")``.

``require_artifacts=True`` (the default, CyteType's contract): a failure stops the step with an
:class:`~scgpt_protocol.errors.ArtifactError`; ``False``: a warning, and the step goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from ..core.errors import ArtifactError
from ..core.log import DETAIL
from ..metrics import HEADLINE_METRICS

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
    from .scoring import EvalResult

logger = logging.getLogger(__name__)

__all__ = ["write_vars_h5", "write_duckdb", "evaluation_tables", "export_evaluation", "query_duckdb", "OBS_COLUMNS"]

#: the columns of table ``obs`` of ``obs.duckdb``, in order
OBS_COLUMNS = (
    "cell", "row", "split", "true_label", "scgpt_label", "scgpt_prediction", "scgpt_label_confidence",
    "scgpt_unknown", "scgpt_over_clustering", "scgpt_majority_voting", "correct", "umap_1", "umap_2",
)
_TABLE_NAME = "^[a-z_][a-z0-9_]*$"


def _temporary(path: Path) -> Path:
    """A fresh, non-existent path beside ``path`` (for a write that is renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


def _write_elem(group: Any, key: str, value: Any) -> None:
    """anndata's writer of one element (``anndata.io`` from 0.11, ``anndata.experimental`` before)."""
    import anndata

    writer = getattr(getattr(anndata, "io", None), "write_elem", None)
    if writer is None:  # anndata < 0.11
        from anndata.experimental import write_elem as writer
    writer(group, key, value)


def _open(source: AnnData | str | Path) -> tuple[Any, bool]:
    """``source`` as an AnnData (a path is opened backed, read-only); True when we opened it."""
    if isinstance(source, (str, Path)):
        import anndata as ad

        if not Path(source).is_file():
            msg = f"{source} does not exist; expected the .h5ad file whose expression vars.h5 exports."
            raise FileNotFoundError(msg)
        return ad.read_h5ad(source, backed="r"), True
    return source, False


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
        Which cells, in the source's order: a boolean mask or obs names; None: all.
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
    import scipy.sparse as sp

    adata, opened = _open(source)
    try:
        n_obs = adata.n_obs
        if cells is None:
            mask = np.ones(n_obs, dtype=bool)
        else:
            values = np.asarray(cells)
            if values.dtype == bool:
                if values.shape != (n_obs,):
                    raise ValueError(f"cells is a mask of shape {values.shape}; expected ({n_obs},).")
                mask = values
            else:
                names = pd.Index(values.astype(str))
                missing = names.difference(adata.obs_names)
                if len(missing):
                    msg = f"{len(missing)} of the cells are not in the source's obs_names, e.g. {list(missing[:3])}."
                    raise KeyError(msg)
                mask = adata.obs_names.isin(names)
        matrix = adata.X if layer is None else adata.layers[layer]
        n_vars = adata.n_vars
        out = Path(path)
        tmp = _temporary(out)
        nnz = 0
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["encoding-type"] = "anndata"
                f.attrs["encoding-version"] = "0.1.0"
                group = f.create_group("X")
                group.attrs["encoding-type"] = "csr_matrix"
                group.attrs["encoding-version"] = "0.1.0"
                group.attrs["shape"] = np.array([int(mask.sum()), n_vars], dtype=np.int64)
                opts = {"compression": "gzip", "compression_opts": 4, "chunks": True}
                data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, **opts)
                index_type = np.int32 if n_vars < 2**31 else np.int64
                indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=index_type, **opts)
                indptr = [np.zeros(1, dtype=np.int64)]
                for start in range(0, n_obs, chunk_size):
                    keep = mask[start:start + chunk_size]
                    if not keep.any():
                        continue
                    block = matrix[start:start + chunk_size]
                    block = sp.csr_matrix(block.toarray() if hasattr(block, "toarray") and not sp.issparse(block)
                                          else block, dtype=np.float32)[keep]
                    block.sort_indices()
                    n = block.nnz
                    data.resize((nnz + n,))
                    indices.resize((nnz + n,))
                    data[nnz:] = block.data
                    indices[nnz:] = block.indices.astype(index_type, copy=False)
                    indptr.append(block.indptr[1:].astype(np.int64) + nnz)
                    nnz += n
                group.create_dataset("indptr", data=np.concatenate(indptr), **opts)
                _write_elem(f, "obs", pd.DataFrame(index=pd.Index(adata.obs_names[mask].astype(str), name=None)))
                var = adata.var.copy()
                var.index = var.index.astype(str)
                _write_elem(f, "var", var)
                _write_elem(f, "uns", {"values": description})
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        if opened:
            adata.file.close()
    logger.info("wrote %s: %d cells x %d genes, %d stored values", out, int(mask.sum()), n_vars, nnz,
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
    tmp = _temporary(out)
    try:
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
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    logger.info("wrote %s: tables %s", out, ", ".join(f"{k} ({len(v)} rows)" for k, v in tables.items()),
                extra=DETAIL)
    return out


def _metric_row(method: str, cells: str, metrics: Mapping[str, Any], coverage: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "cells": cells}
    row.update({k: (None if metrics.get(k) is None else float(metrics[k])) for k in HEADLINE_METRICS})
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
        :func:`~scgpt_protocol.evaluate.evaluate_predictions` (refined or not).
    methods
        Method name -> metrics (e.g. scGPT and the baseline, as in ``metrics.json``); None: scGPT only.
    embedding
        An AnnData of (a superset of) the evaluated cells with 2-D coordinates in ``obsm[basis]``
        (03's UMAP); cells without coordinates get NULL.
    """
    from ..annotate.refine import COLUMNS
    from ..metrics import SCGPT_METHOD

    pred = result.predictions
    obs = pd.DataFrame({"cell": pred.index.astype(str), "row": np.arange(len(pred), dtype=np.int64)})
    obs["split"] = pred["split"].astype(str).to_numpy() if "split" in pred else None
    obs["true_label"] = pred["true_label"].astype(object).to_numpy()
    for column in ("scgpt_label", "scgpt_prediction", "scgpt_label_confidence", "scgpt_unknown",
                   "scgpt_over_clustering", "scgpt_majority_voting", "correct"):
        if column in pred:
            values = pred[column]
            obs[column] = (values.astype(object).where(values.notna(), None).to_numpy()
                           if column != "scgpt_label_confidence" else values.to_numpy(dtype=np.float64))
    if "scgpt_prediction" not in obs:  # not refined: the call is the prediction, nothing abstained
        obs["scgpt_prediction"] = obs["scgpt_label"]
        obs["scgpt_unknown"] = False
    for column in (COLUMNS["over_clustering"], COLUMNS["majority_voting"]):
        if column not in obs:
            obs[column] = pd.Series([None] * len(obs), dtype=object)
    obs["scgpt_unknown"] = obs["scgpt_unknown"].astype(bool)
    obs["correct"] = pd.array(pred["correct"].to_numpy(), dtype="boolean")
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
        The run's :class:`~scgpt_protocol.layout.RunLayout` (paths ``layout.vars_h5``, ``layout.obs_duckdb``).
    result, methods, embedding, basis
        See :func:`evaluation_tables`.
    source
        The expression to export (default: ``layout.prepared_adata``, read in backed mode).
    require
        True: a failure raises :class:`~scgpt_protocol.errors.ArtifactError`. False: it is a warning
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


def query_duckdb(path: str | Path, sql: str) -> pd.DataFrame:
    """Run one SQL query on a DuckDB file (opened read-only) and return the result as a DataFrame.

    Examples
    --------
    >>> query_duckdb(layout.obs_duckdb, "select scgpt_label, count(*) from obs group by 1")  # doctest: +SKIP
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
