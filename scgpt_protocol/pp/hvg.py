"""Step 01 with bounded memory: :func:`prepare_file` streams the expression matrix in row chunks.

:func:`scgpt_protocol.preprocess.prepare` works on an AnnData held in memory and copies it along
the way (several times the size of ``X`` at its peak). :func:`prepare_file` gives the same
``prepared.h5ad`` (same ``X``, ``layers["counts"]``, ``obs``, ``var``, ``uns``; see the tests) while
holding at most the input matrix plus one chunk:

* the matrix is either read into memory once (the *in-memory* path) or read from the ``.h5ad`` chunk
  by chunk (the *chunked* path, for data larger than memory); ``obs``, ``var``, ``uns``, ``obsm`` ...
  are always read whole;
* every row operation of :func:`prepare` (float32, duplicates summed, zeros dropped,
  ``filter_cells``, the mitochondrial share, ``normalize_total(1e4)``, ``log1p``) is applied to each
  chunk of rows with the same scanpy / scipy calls, so the values are the same bits;
* per-gene quantities are accumulated over the chunks: the cells per gene of ``filter_genes`` (exact
  integers), and the sums and sums of squares of ``expm1(X)`` per gene (and per batch) for the
  ``flavor="seurat"`` highly-variable genes, whose binning and dispersion normalisation are then
  done as scanpy does them (the means and variances agree with scanpy's to rounding, so the genes
  selected are the same unless two normalised dispersions tie at the cut-off);
* the prepared rows are appended to ``X`` and ``layers["counts"]`` of the output file as they are
  made; ``obs``, ``var`` and ``uns`` are written at the end (anndata's ``write_elem``).

scanpy itself has no chunked path for these steps without dask, which is not a dependency here.

The path is chosen by size (:func:`choose_chunked`): the chunked path when the stored matrix is
larger than a quarter of the memory available now; ``PreprocessParams.chunked`` forces either.

Limits: the chunked path reads rows of a CSR matrix; a CSC matrix on disk is read by rows too, but
each chunk then reads the whole file (convert it to CSR once: ``adata.X = adata.X.tocsr()``), and a
dense matrix on disk is read into memory whole.

Measured (synthetic counts, 20,000 genes, 1,000 expressed per cell, 2 CPU cores): 200k cells
(1.6 GB of CSR) take about 40 s at a peak of 2.3 GB RSS in memory (1.4x the CSR, including 0.45 GB
of imported libraries) and 0.7 GB chunked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["seurat_hvg"]


# -- highly variable genes ----------------------------------------------------------------------
class GeneMoments:
    """Per-gene count, sum and sum of squares of ``expm1(X)`` per batch (one batch without batch_key)."""

    def __init__(self, n_genes: int, n_batches: int) -> None:
        self.n = np.zeros(n_batches, dtype=np.int64)
        self.s1 = np.zeros((n_batches, n_genes))
        self.s2 = np.zeros((n_batches, n_genes))
        self.nz = np.zeros((n_batches, n_genes), dtype=np.int64)

    def add(self, x: sp.csr_matrix, batch: np.ndarray) -> None:
        for b in np.unique(batch):
            rows = x[np.flatnonzero(batch == b)] if len(np.unique(batch)) > 1 else x
            v = np.expm1(rows.data).astype(np.float64)
            idx = rows.indices
            self.n[b] += rows.shape[0]
            self.s1[b] += np.bincount(idx, weights=v, minlength=self.s1.shape[1])
            self.s2[b] += np.bincount(idx, weights=v * v, minlength=self.s1.shape[1])
            self.nz[b] += np.bincount(idx[v > 0], minlength=self.s1.shape[1])

    def mean_var(self, b: int, genes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = self.n[b]
        s1, s2 = (self.s1[b], self.s2[b]) if genes is None else (self.s1[b][genes], self.s2[b][genes])
        mean = s1 / n
        var = (s2 / n - mean**2) * (n / (n - 1)) if n > 1 else np.zeros_like(mean)
        return mean, np.maximum(var, 0.0)


def _seurat_one(mean: np.ndarray, var: np.ndarray, names: pd.Index, n_top: int,
                n_bins: int = 20) -> pd.DataFrame:
    """scanpy's ``flavor="seurat"`` dispersions and top-``n_top`` selection from per-gene mean, variance."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()  # one gene in its bin: its normalised dispersion becomes 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - stats["avg"]) / stats["dev"]
    norm = df["dispersions_norm"].to_numpy()
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    n = min(n_top, len(names), finite.size)
    cut = finite[n - 1] if n else np.inf
    df["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cut
    df.index = names
    return df.drop(columns="mean_bin")


def seurat_hvg(moments: GeneMoments, names: pd.Index, n_top: int, batches: list[str] | None) -> pd.DataFrame:
    """What `sc.pp.highly_variable_genes(flavor="seurat", n_top_genes=n_top, batch_key=...)` puts in var."""
    if batches is None:
        mean, var = moments.mean_var(0)
        return _seurat_one(mean, var, names, n_top)
    dfs = []
    for b in range(len(batches)):
        expressed = moments.nz[b] >= 1  # scanpy drops the genes a batch does not express
        mean, var = moments.mean_var(b, expressed)
        df = _seurat_one(mean, var, names[expressed], n_top)
        if (~expressed).any():
            missing = pd.DataFrame(np.zeros((int((~expressed).sum()), len(df.columns))), columns=df.columns)
            missing["highly_variable"] = missing["highly_variable"].astype(bool)
            missing.index = names[~expressed]
            df = pd.concat([df, missing]).loc[names]
        dfs.append(df)
    df = pd.concat(dfs, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"})
    df["highly_variable_nbatches"] = df["highly_variable"]
    df["highly_variable_intersection"] = df["highly_variable_nbatches"] == len(batches)
    df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last",
                   inplace=True)
    df["highly_variable"] = np.arange(df.shape[0]) < n_top
    return df.loc[names]
