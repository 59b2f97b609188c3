"""Demo and toy data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["load_demo", "make_toy_adata", "make_real_size_demo"]

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


def make_real_size_demo(n_cells: int = 25_000, n_genes: int = 2_400, *, n_batches: int = 2, seed: int = 0,
                        chunk: int = 4_096) -> AnnData:
    """The demo's cells at a real size: raw counts of ``n_cells`` cells resampled from ``pbmc68k_reduced``.

    For checking the protocol past every small-data shortcut of scanpy and scikit-learn (exact neighbours below
    8,192 cells, dense paths) in seconds, without storing a large file. Each cell is a demo cell drawn with
    replacement (its FACS label in ``obs["bulk_labels"]``) mixed with another of the same label (a random share
    of each), its 765 genes turned back into counts: Poisson draws of the mixed CP10k values at a library size
    of about 3,000 counts, so no two cells are equal and each type is a cloud, not 700 islands of near-copies.
    Genes ``SYN00000``... fill up to ``n_genes``: sparse counts (mean 0.05), a block of them over-expressed (mean 1) by
    each label. ``obs["batch"]`` is a random batch of ``n_batches``. ``X`` is float32 CSR counts.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    demo = load_demo()
    if n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer; got {n_cells!r}.")
    if n_genes < demo.n_vars:
        raise ValueError(f"n_genes must be at least the demo's {demo.n_vars} genes; got {n_genes!r}.")
    rng = np.random.default_rng(seed)
    labels = demo.obs[DEMO_LABEL_KEY]
    codes, n_labels = labels.cat.codes.to_numpy(), len(labels.cat.categories)
    cp10k = np.expm1(demo.X.toarray() if sp.issparse(demo.X) else np.asarray(demo.X)).astype(np.float64)
    n_extra = n_genes - demo.n_vars
    block = max(n_extra // (2 * n_labels), 1) if n_extra else 0
    drawn = rng.integers(0, demo.n_obs, n_cells)
    # a second cell of the same label for each: the new cell lies between the two, so that resampled cells fill
    # each type instead of piling up as near-copies of the 700 originals (islands of a kNN graph)
    partner = np.empty(n_cells, dtype=np.int64)
    for k in range(n_labels):
        of_k = codes[drawn] == k
        partner[of_k] = rng.choice(np.flatnonzero(codes == k), size=int(of_k.sum()))
    weight = rng.uniform(0.0, 1.0, size=(n_cells, 1))
    parts = []
    for lo in range(0, n_cells, chunk):
        rows, mix = drawn[lo : lo + chunk], weight[lo : lo + chunk]
        profile = mix * cp10k[rows] + (1.0 - mix) * cp10k[partner[lo : lo + chunk]]
        size = rng.lognormal(np.log(3_000 / 10_000), 0.3, size=(len(rows), 1))
        real = rng.poisson(profile * size)
        rate = np.full((len(rows), n_extra), 0.05)
        for k in range(n_labels):
            rate[codes[rows] == k, k * block : (k + 1) * block] = 1.0
        parts.append(sp.csr_matrix(np.hstack([real, rng.poisson(rate)]).astype(np.float32)))
    obs = pd.DataFrame(
        {
            DEMO_LABEL_KEY: pd.Categorical.from_codes(codes[drawn], categories=labels.cat.categories),
            "batch": pd.Categorical([f"batch_{b}" for b in rng.integers(0, n_batches, n_cells)]),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([*map(str, demo.var_names), *(f"SYN{j:05d}" for j in range(n_extra))]))
    adata = ad.AnnData(sp.vstack(parts, format="csr"), obs=obs, var=var)
    adata.uns["scgpt_protocol_demo"] = (f"{n_cells} cells resampled from scanpy.datasets.pbmc68k_reduced() as counts, "
                                        f"{n_extra} synthetic genes; make_real_size_demo(seed={seed})")
    return adata
