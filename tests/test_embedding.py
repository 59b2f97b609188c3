"""Cell embeddings on scanpy's bundled pbmc68k_reduced with a tiny checkpoint."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from scgpt_protocol.core.errors import GeneMatchError, InputDataError
from scgpt_protocol.model.embedding import embed


@pytest.fixture(scope="module")
def embedded(pbmc, tiny_checkpoint):
    from scgpt_protocol import load_model

    adata = pbmc.copy()
    # fp32: "auto" runs bf16 on CPUs with bf16 units, where padding to another length moves the last digits
    embed(adata, load_model(tiny_checkpoint, device="cpu"), batch_size=32, seed=0, precision="fp32")
    return adata


def test_shape_and_unit_norm(embedded, tiny_model):
    emb = embedded.obsm["X_scgpt"]
    assert emb.shape == (embedded.n_obs, tiny_model.config.d_model) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.unique(emb.round(4), axis=0).shape[0] == embedded.n_obs  # cells differ
    params = embedded.uns["X_scgpt_params"]
    assert params["genes_matched"] == 765 and params["seed"] == 0


def test_same_seed_same_embeddings_other_seed_differs(embedded, pbmc, tiny_model):
    again = pbmc.copy()
    embed(again, tiny_model, batch_size=32, seed=0, precision="fp32")
    assert np.array_equal(again.obsm["X_scgpt"], embedded.obsm["X_scgpt"])
    other = pbmc.copy()
    embed(other, tiny_model, batch_size=32, seed=1, key_added="X_other", precision="fp32")
    assert "X_other" in other.obsm and not np.allclose(other.obsm["X_other"], embedded.obsm["X_scgpt"])


def test_batch_size_does_not_change_embeddings(embedded, pbmc, tiny_model):
    again = pbmc.copy()
    embed(again, tiny_model, batch_size=7, seed=0, max_tokens=None, precision="fp32")
    np.testing.assert_allclose(again.obsm["X_scgpt"], embedded.obsm["X_scgpt"], atol=1e-5)


def test_backed_mode_gives_the_same_embeddings(embedded, pbmc, tiny_model, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    embed(backed, tiny_model, batch_size=32, seed=0, chunk_size=100, precision="fp32")  # several chunks
    np.testing.assert_allclose(backed.obsm["X_scgpt"], embedded.obsm["X_scgpt"], atol=1e-6)
    backed.file.close()


def test_dense_matrix_gives_the_same_embeddings(embedded, pbmc, tiny_model):
    dense = pbmc.copy()
    dense.X = dense.X.toarray()
    embed(dense, tiny_model, batch_size=32, seed=0, precision="fp32")
    np.testing.assert_allclose(dense.obsm["X_scgpt"], embedded.obsm["X_scgpt"], atol=1e-6)


def test_scaled_data_is_refused_and_adata_untouched(tiny_model):
    scaled = sc.datasets.pbmc68k_reduced()  # X is z-scored: negative values
    with pytest.raises(InputDataError, match=r"negative values in 700 cells.*adata\.raw\.to_adata\(\)"):
        embed(scaled, tiny_model)
    assert "X_scgpt" not in scaled.obsm


def test_cells_without_matched_genes_get_cls_only_embedding(pbmc, tiny_model):
    adata = pbmc[:20].copy()
    X = adata.X.tolil()
    X[:3] = 0
    adata.X = X.tocsr()
    with pytest.warns(UserWarning, match="3 cells express none of the matched genes"):
        embed(adata, tiny_model)
    emb = adata.obsm["X_scgpt"]
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # <cls> alone: the same for every empty cell


def test_unmatched_genes_are_an_error(pbmc, tiny_model):
    adata = pbmc.copy()
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    with pytest.raises(GeneMatchError, match=r"only 0/765 genes.*gene_symbol_key"):
        embed(adata, tiny_model)
