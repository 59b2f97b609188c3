"""The protocol's kNN graph at any size (issue 27): scanpy's graph, on every pynndescent the project allows."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scgpt_protocol.data.graph import EXACT_BELOW, EXACT_UP_TO, neighbors, search_of


class _CsrArrayKnn:
    """Stands in for pynndescent 0.7's ``PyNNDescentTransformer``: exact neighbours, returned as ``csr_array``."""

    calls = 0

    def __init__(self, n_neighbors=30, **kwds):
        from sklearn.neighbors import KNeighborsTransformer

        self.n_neighbors, self.kwds = n_neighbors, kwds
        self._knn = KNeighborsTransformer(n_neighbors=n_neighbors - 1, mode="distance", algorithm="brute")

    def get_params(self, deep=True):
        return {"n_neighbors": self.n_neighbors, **self.kwds}

    def fit_transform(self, x, y=None):
        type(self).calls += 1
        return sp.csr_array(self._knn.fit_transform(x))


def _cells(n: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 10)) * 4
    x = (centers[rng.integers(0, 8, n)] + rng.normal(size=(n, 10))).astype(np.float32)
    return ad.AnnData(obs={"i": np.arange(n).astype(str)}, obsm={"X_emb": x})


def _neighbour_sets(adata: ad.AnnData) -> list[set[int]]:
    """Each cell's neighbours but itself (a search may keep the cell as its own neighbour at distance 0)."""
    d = sp.csr_matrix(adata.obsp["distances"])
    return [set(d.indices[d.indptr[i] : d.indptr[i + 1]].tolist()) - {i} for i in range(d.shape[0])]


def test_large_graphs_survive_a_search_that_returns_csr_array(monkeypatch):
    """Above EXACT_UP_TO cells, scanpy 1.11 + pynndescent 0.7 fail (``'csr_array' has no attribute 'getnnz'``);
    the protocol's graph is the one the search gives, whatever sparse type it returns."""
    import pynndescent
    import scanpy as sc

    from scgpt_protocol.data import graph

    monkeypatch.setattr(pynndescent, "PyNNDescentTransformer", _CsrArrayKnn)
    monkeypatch.setattr(graph, "EXACT_UP_TO", EXACT_BELOW)  # the approximate path at a size a test affords
    _CsrArrayKnn.calls = 0
    adata = _cells(EXACT_BELOW + 1)
    neighbors(adata, use_rep="X_emb", n_neighbors=10, seed=0)
    assert _CsrArrayKnn.calls == 1  # the approximate path ran (here: its stand-in, an exact search)
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 10
    exact = _cells(EXACT_BELOW + 1)
    sc.pp.neighbors(exact, use_rep="X_emb", n_neighbors=10, transformer="sklearn")
    assert _neighbour_sets(adata) == _neighbour_sets(exact)
    np.testing.assert_allclose(adata.obsp["connectivities"].sum(), exact.obsp["connectivities"].sum(), rtol=1e-5)


def test_mid_sized_graphs_are_exact_without_pynndescent(monkeypatch):
    import pynndescent

    monkeypatch.setattr(pynndescent, "PyNNDescentTransformer", _CsrArrayKnn)
    _CsrArrayKnn.calls = 0
    adata = _cells(EXACT_BELOW)
    neighbors(adata, use_rep="X_emb", n_neighbors=10, seed=0)
    assert _CsrArrayKnn.calls == 0
    from sklearn.neighbors import NearestNeighbors

    x = adata.obsm["X_emb"]
    truth = NearestNeighbors(n_neighbors=10, algorithm="brute").fit(x).kneighbors(x, return_distance=False)
    assert _neighbour_sets(adata) == [set(row.tolist()) - {i} for i, row in enumerate(truth)]
    assert [search_of(n) for n in (EXACT_BELOW - 1, EXACT_BELOW, EXACT_UP_TO, EXACT_UP_TO + 1)] == [
        "scanpy", "exact", "exact", "pynndescent"]


def test_small_graphs_are_scanpys_own(monkeypatch):
    import pynndescent
    import scanpy as sc

    monkeypatch.setattr(pynndescent, "PyNNDescentTransformer", _CsrArrayKnn)
    _CsrArrayKnn.calls = 0
    ours, theirs = _cells(500), _cells(500)
    neighbors(ours, use_rep="X_emb", n_neighbors=15, seed=3)
    sc.pp.neighbors(theirs, use_rep="X_emb", n_neighbors=15, random_state=3)
    assert _CsrArrayKnn.calls == 0
    assert (ours.obsp["connectivities"] != theirs.obsp["connectivities"]).nnz == 0
    tiny = _cells(4)
    neighbors(tiny, use_rep="X_emb", n_neighbors=15)  # capped at n - 1
    assert tiny.uns["neighbors"]["params"]["n_neighbors"] == 3
    with pytest.raises(ValueError, match="at least 3 cells"):
        neighbors(_cells(2), use_rep="X_emb")


@pytest.mark.slow
def test_the_approximate_graph_is_the_one_scanpy_builds(monkeypatch):
    """With the installed pynndescent, the approximate path gives scanpy's own graph to the last entry (same
    search, same settings, same seed), where scanpy can read that pynndescent's output."""
    import scanpy as sc

    from scgpt_protocol.data import graph

    n = EXACT_BELOW + 500  # scanpy's own call takes pynndescent from here on
    monkeypatch.setattr(graph, "EXACT_UP_TO", EXACT_BELOW)
    ours, theirs = _cells(n, seed=4), _cells(n, seed=4)
    neighbors(ours, use_rep="X_emb", n_neighbors=15, seed=5)
    try:
        sc.pp.neighbors(theirs, use_rep="X_emb", n_neighbors=15, random_state=5)
    except AttributeError as err:  # the break the protocol routes around (pynndescent >= 0.7, scanpy <= 1.11.5)
        pytest.skip(f"scanpy cannot read this pynndescent's distances: {err}")
    assert (ours.obsp["distances"] != theirs.obsp["distances"]).nnz == 0
    assert (ours.obsp["connectivities"] != theirs.obsp["connectivities"]).nnz == 0


@pytest.mark.slow
def test_the_approximate_graph_of_an_atlas_with_the_installed_pynndescent():
    """Above EXACT_UP_TO cells the graph comes from pynndescent (whichever release is installed), as majority
    voting builds it for an atlas: over_cluster on 60,000 cells. About 95 s on a fresh environment, most of it
    numba compiling pynndescent; make test-latest runs it on the newest releases."""
    from scgpt_protocol.annotate.refinement import over_cluster

    n = 60_000
    assert search_of(n) == "pynndescent"
    rng = np.random.default_rng(0)
    types = rng.integers(0, 8, n)
    emb = (rng.normal(size=(8, 32)) * 4)[types] + rng.normal(size=(n, 32))
    clusters = over_cluster(emb.astype(np.float32), seed=0)
    assert len(clusters) == n and len(set(clusters)) > 8
    # over-clusters nest in the types: nearly every cluster is one type
    pure = sum(np.bincount(types[clusters == c]).max() for c in set(clusters)) / n
    assert pure > 0.99, pure
