"""Highly variable genes by scanpy's ``flavor="seurat"`` from per-gene moments accumulated chunk by chunk
(per batch with ``batch_key``), so that the streamed step 01 selects the genes scanpy selects in memory.
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
