"""Demo and toy data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["load_demo", "make_toy_adata"]

DEMO_LABEL_KEY = "bulk_labels"


def load_demo() -> AnnData:
    """scanpy's bundled ``pbmc68k_reduced``: 700 PBMCs, 10 FACS-sorted populations in ``obs["bulk_labels"]``.

    ``X`` of the bundled file is z-scored (negative values); the log-normalised expression of its
    765 genes, which scGPT can use, is in ``.raw`` and is returned here as ``X``.
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    demo = adata.raw.to_adata()
    demo.obs = adata.obs.copy()
    demo.uns["scgpt_protocol_demo"] = "scanpy.datasets.pbmc68k_reduced(), .raw (log-normalised), FACS bulk_labels"
    return demo


def make_toy_adata(
    n_cells: int = 200, n_genes: int = 100, n_labels: int = 3, n_batches: int = 2, seed: int = 0
) -> AnnData:
    """Synthetic counts with label-specific expression (for fast tests and doctests).

    Genes are named ``GENE0``...; each label over-expresses its own block of genes, so a classifier
    can learn it. ``obs`` has ``cell_type`` and ``batch``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_cells)
    rate = np.full((n_cells, n_genes), 0.5)
    block = max(n_genes // (2 * n_labels), 1)
    for k in range(n_labels):
        rate[labels == k, k * block : (k + 1) * block] = 5.0
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{k}" for k in labels]),
            "batch": pd.Categorical([f"batch_{k}" for k in rng.integers(0, n_batches, n_cells)]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)]))
