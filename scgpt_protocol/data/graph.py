"""The kNN graph under every UMAP and every over-clustering of the protocol: :func:`neighbors`.

It is ``scanpy.pp.neighbors``, with the search chosen by size:

- below :data:`EXACT_BELOW` cells (8,192), scanpy's own call: exact neighbours with dense distances;
- up to :data:`EXACT_UP_TO` cells (50,000), exact neighbours too, by scikit-learn's brute-force search in
  chunks (scanpy's ``transformer="sklearn"``), where scanpy would switch to pynndescent's approximate search;
- above, pynndescent with the settings scanpy gives it (umap's), its distances handed to scanpy as a
  ``scipy.sparse.csr_matrix``.

Why: pynndescent 0.7 returns its distances as a ``csr_array``, which scanpy 1.11 reads with ``csr_matrix``
methods (``getnnz``), so every ``sc.pp.neighbors`` of 8,192 cells or more fails with
``AttributeError: 'csr_array' object has no attribute 'getnnz'``. The conversion routes around that whatever
pynndescent is installed (``pyproject.toml`` also keeps it below 0.7, for a ``sc.pp.neighbors`` of the user's own
in the same environment). The exact search of mid-sized data is the other half: pynndescent compiles its
numba code in every new process (about 28 s on 2 cores, most of it not cached), and each notebook is a new
process, while an exact search of 25,000 cells x 64 dimensions takes 6 s and of 50,000 x 512 (the full model's
embedding) 33 s, the cost of pynndescent's compilation alone (2 cores, 2026-12-06). Exact neighbours are also the
better graph.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.log import DETAIL

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["neighbors", "EXACT_BELOW", "EXACT_UP_TO", "search_of", "knn_transformer"]

#: scanpy's rule for a Euclidean graph: exact neighbours (dense distances) below this many cells
EXACT_BELOW = 8192
#: exact neighbours (scikit-learn, brute force in chunks) up to this many cells, pynndescent above
EXACT_UP_TO = 50_000

logger = logging.getLogger(__name__)


class _CsrMatrixDistances:
    """A kNN transformer (scikit-learn's interface) whose distances come back as ``scipy.sparse.csr_matrix``.

    Wraps pynndescent's ``PyNNDescentTransformer``; scanpy reads ``get_params()["n_neighbors"]`` and the
    fitted ``index_`` (its random-projection forest, kept for later queries) through it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return self.inner.get_params(deep=deep)

    def fit(self, x: Any, y: Any = None) -> _CsrMatrixDistances:
        self.inner.fit(x)
        return self

    def transform(self, x: Any) -> Any:
        return _as_csr_matrix(self.inner.transform(x))

    def fit_transform(self, x: Any, y: Any = None) -> Any:
        return _as_csr_matrix(self.inner.fit_transform(x))

    @property
    def index_(self) -> Any:
        return getattr(self.inner, "index_", None)


def _as_csr_matrix(distances: Any) -> Any:
    import scipy.sparse as sp

    return distances if isinstance(distances, sp.csr_matrix) else sp.csr_matrix(distances)


def knn_transformer(n_cells: int, *, n_neighbors: int, seed: int = 0) -> Any:
    """The approximate kNN search scanpy picks for ``n_cells`` cells (Euclidean), returning ``csr_matrix``.

    pynndescent with umap's ``nearest_neighbors`` settings (trees and iterations grow with the number of cells),
    seeded, on scanpy's number of threads.
    """
    import scanpy as sc
    from pynndescent import PyNNDescentTransformer

    inner = PyNNDescentTransformer(
        n_neighbors=n_neighbors,
        metric="euclidean",
        metric_kwds={},
        random_state=seed,
        n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_cells**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_cells))),
    )
    return _CsrMatrixDistances(inner)


def search_of(n_cells: int) -> str:
    """The neighbour search :func:`neighbors` runs on ``n_cells`` cells: ``"scanpy"`` (scanpy's own exact path),
    ``"exact"`` (scikit-learn brute force) or ``"pynndescent"`` (approximate)."""
    if n_cells < EXACT_BELOW:
        return "scanpy"
    return "exact" if n_cells <= EXACT_UP_TO else "pynndescent"


def neighbors(adata: AnnData, *, use_rep: str | None = None, n_neighbors: int = 15, seed: int = 0,
              method: str = "umap") -> None:
    """``sc.pp.neighbors(adata, use_rep=..., n_neighbors=..., random_state=seed, method=...)``, at any size.

    Writes ``adata.uns["neighbors"]`` and ``adata.obsp["distances"]`` / ``["connectivities"]`` as scanpy does.
    ``n_neighbors`` counts the cell itself, as in scanpy, and is capped at ``n_cells - 1``. The search depends
    on the number of cells (:func:`search_of`; see the module's description for why).
    """
    import scanpy as sc

    n = int(adata.n_obs)
    if n < 3:
        raise ValueError(f"a neighbour graph needs at least 3 cells; adata has {n}.")
    k = int(min(n_neighbors, n - 1))
    search = search_of(n)
    if search == "pynndescent":
        transformer: Any = knn_transformer(n, n_neighbors=k, seed=seed)
    else:  # None: scanpy's own choice (exact below EXACT_BELOW); "sklearn": its exact brute-force search
        transformer = None if search == "scanpy" else "sklearn"
    logger.info("neighbour graph of %d cells: %s search, %d neighbours", n, search, k, extra=DETAIL)
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=k, random_state=seed, method=method, transformer=transformer)
