"""Atlas scale for 03/04: backed reading, the on-disk output store, the sparse baseline (issue 12)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scgpt_protocol import load_model
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.data.backed import open_cells
from scgpt_protocol.data.matrix import BackedRows, get_matrix
from scgpt_protocol.data.store import create_store, open_store, subsample, take_rows
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.evaluate.scoring import evaluate_predictions
from scgpt_protocol.model.embedding import embed

CATS = ["a", "b", "c"]


@pytest.fixture()
def written(labelled_split, tmp_path):
    adata = labelled_split(240)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    path = tmp_path / "prepared.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_predict_backed_and_store_equal_in_memory(written, tiny_checkpoint, tmp_path):
    adata, path = written
    model = load_model(tiny_checkpoint, n_classes=len(CATS), device="cpu")
    kw = dict(categories=CATS, max_seq_len=32, precision="fp32", chunk_size=64)
    memory = predict(model, adata, **kw)
    backed = predict(model, ad.read_h5ad(path, backed="r"), **kw)
    stored = predict(model, open_cells(path), out=tmp_path / "pred.h5", **kw)
    assert stored.store == tmp_path / "pred.h5"
    for other in (backed, stored):
        np.testing.assert_array_equal(take_rows(other.probabilities), memory.probabilities)
        np.testing.assert_array_equal(take_rows(other.embeddings), memory.embeddings)
        np.testing.assert_array_equal(other.codes, memory.codes)
        np.testing.assert_array_equal(other.confidence, memory.confidence)
        np.testing.assert_array_equal(other.labels, memory.labels)
    datasets, attrs = open_store(stored.store)
    assert attrs["categories"] == CATS and datasets["probabilities"].shape == (240, len(CATS))
    # metrics from the on-disk probabilities read only the test rows, and equal the in-memory ones
    test = adata.obs["split"] == "test"
    a = evaluate_predictions(adata, memory, label_key="label", cells=test).metrics
    b = evaluate_predictions(adata, stored, label_key="label", cells=test).metrics
    assert a["macro_auroc"] == b["macro_auroc"] and a["accuracy"] == b["accuracy"]


def test_predict_backed_view_reads_rows_lazily(written, tiny_checkpoint, tmp_path):
    adata, path = written
    model = load_model(tiny_checkpoint, n_classes=len(CATS), device="cpu")
    test = (adata.obs["split"] == "test").to_numpy()
    view = ad.read_h5ad(path, backed="r")[test]
    reader = get_matrix(view)
    assert isinstance(reader, BackedRows)  # not view.X, which would read every row of the view at once
    assert (reader[5:9] != adata.X[np.flatnonzero(test)[5:9]]).nnz == 0
    kw = dict(categories=CATS, max_seq_len=32, precision="fp32")
    lazy = predict(model, view, out=tmp_path / "view.h5", **kw)
    memory = predict(model, adata[test].copy(), **kw)
    np.testing.assert_array_equal(lazy.probabilities[:], memory.probabilities)
    np.testing.assert_array_equal(lazy.labels, memory.labels)


def test_embed_store_equals_obsm(written, tiny_model, tmp_path):
    adata, path = written
    embed(adata, tiny_model, max_seq_len=32, precision="fp32", chunk_size=100)
    cells = open_cells(path)
    store = embed(cells, tiny_model, max_seq_len=32, precision="fp32", chunk_size=100, out=tmp_path / "emb.h5")
    datasets, attrs = open_store(store)
    np.testing.assert_array_equal(datasets["X_scgpt"][:], adata.obsm["X_scgpt"])
    assert attrs["params"]["max_seq_len"] == 32 and cells.uns["X_scgpt_params"]["store"] == str(store)
    backed = ad.read_h5ad(path, backed="r")
    embed(backed, tiny_model, max_seq_len=32, precision="fp32", chunk_size=100)
    np.testing.assert_array_equal(backed.obsm["X_scgpt"], adata.obsm["X_scgpt"])


def test_store_rows_and_subsample(tmp_path):
    writer = create_store(tmp_path / "s.h5", 10, {"x": 3}, chunk_rows=4)
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    writer.put(np.array([2, 0, 1, 3]), x=values[[2, 0, 1, 3]])
    writer.put(np.array([5, 4]), x=values[[5, 4]])
    with pytest.raises(ValueError, match="window"):
        writer.put(np.array([1]), x=values[[1]])
    with pytest.raises(ValueError, match="window"):  # rows of two windows in one call
        writer.put(np.array([7, 8]), x=values[[7, 8]])
    writer.put(np.array([7, 6]), x=values[[7, 6]])
    writer.put(np.array([9, 8]), x=values[[9, 8]])
    datasets, _ = open_store(writer.close())
    np.testing.assert_array_equal(datasets["x"][:], values)
    np.testing.assert_array_equal(take_rows(datasets["x"], [7, 2, 2], block=3), values[[7, 2, 2]])
    mask = np.arange(10) % 2 == 0
    np.testing.assert_array_equal(take_rows(datasets["x"], mask, block=4), values[mask])
    assert subsample(mask, None).sum() == 5 and subsample(mask, 10).sum() == 5
    sub = subsample(mask, 2, seed=1)
    assert sub.sum() == 2 and not (sub & ~mask).any()


def _dense_celltypist_reference(adata, class_weight=None):
    """CellTypist's recipe on a dense copy: centred StandardScaler, values above 10 clipped, one-vs-rest LR
    (float64, as the baseline computes; on a float32 copy rounding moves probabilities by about 1e-4)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    X = (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float64)
    split, labels = adata.obs["split"].to_numpy(), adata.obs["label"].astype(str).to_numpy()
    tr, te = split == "train", split == "test"
    scaler = StandardScaler().fit(X[tr])
    Z, Zt = scaler.transform(X[tr]), scaler.transform(X[te])
    Z[Z > 10], Zt[Zt > 10] = 10, 10
    clf = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight)).fit(Z, labels[tr])
    return list(clf.classes_), clf.predict_proba(Zt)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_baseline_sparse_never_densifies(pbmc, monkeypatch, class_weight):
    import scanpy as sc

    from scgpt_protocol.evaluate.linear import CentredLogisticOvR

    adata = pbmc.copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.obs["label"] = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
    adata.obs["split"] = np.random.default_rng(0).choice(["train", "val", "test"], adata.n_obs, p=[0.6, 0.2, 0.2])
    classes, reference = _dense_celltypist_reference(adata, class_weight)  # before the spies

    seen = []
    fit = CentredLogisticOvR.fit

    def spy(self, S, y, offset):
        seen.append((sp.issparse(S), S.dtype, S.shape))
        return fit(self, S, y, offset)

    def refusing(original):
        def densify(self, *args, **kwargs):
            if self.shape[1] >= 100:  # an expression matrix (metrics densify small label-by-label tables)
                raise AssertionError(f"the baseline densified a {self.shape} sparse matrix")
            return original(self, *args, **kwargs)

        return densify

    monkeypatch.setattr(CentredLogisticOvR, "fit", spy)
    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.csr_array, sp.csc_array, sp.coo_array):
        monkeypatch.setattr(cls, "toarray", refusing(cls.toarray))
        monkeypatch.setattr(cls, "todense", refusing(cls.todense))
    result = logistic_regression_baseline(adata, label_key="label", seed=0, class_weight=class_weight)
    n_train = int((adata.obs["split"] == "train").sum())
    assert seen == [(True, np.float64, (n_train, adata.n_vars))]
    # the centring folded into the model: CellTypist's dense standardised model, the same probabilities
    order = [classes.index(c) for c in result.categories]
    np.testing.assert_allclose(result.probabilities, reference[:, order], atol=1e-5)


def test_baseline_backed_equals_in_memory(labelled_split, tmp_path):
    adata = labelled_split(300)
    counts = sp.csr_matrix(np.round(np.expm1(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X))),
                           dtype=np.float32)
    adata.X = counts
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    memory = logistic_regression_baseline(adata, label_key="label", n_hvg=200)
    backed = logistic_regression_baseline(ad.read_h5ad(path, backed="r"), label_key="label", n_hvg=200)
    assert memory.normalised and backed.normalised and memory.genes == backed.genes
    np.testing.assert_array_equal(memory.probabilities, backed.probabilities)


def test_refine_majority_voting_on_stored_embeddings(written, tiny_checkpoint, tmp_path):
    from scgpt_protocol.annotate.refinement import refine

    adata, path = written
    model = load_model(tiny_checkpoint, n_classes=len(CATS), device="cpu")
    kw = dict(categories=CATS, max_seq_len=32, precision="fp32")
    memory = predict(model, adata, **kw)
    stored = predict(model, open_cells(path), out=tmp_path / "pred.h5", **kw)
    groups = adata.obs["split"]
    a = refine(memory, min_confidence=0.4, majority_voting=True, groups=groups)
    b = refine(stored, min_confidence=0.4, majority_voting=True, groups=groups)
    np.testing.assert_array_equal(a.over_clustering, b.over_clustering)
    np.testing.assert_array_equal(a.majority_voting, b.majority_voting)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_cells_for_plot_caps_and_reads_the_store(written, tiny_checkpoint, tmp_path):
    from scgpt_protocol.annotate.inference import annotate
    from scgpt_protocol.pl.embedding import cells_for_plot

    adata, path = written
    model = load_model(tiny_checkpoint, n_classes=len(CATS), device="cpu")
    backed = ad.read_h5ad(path, backed="r")
    stored = predict(model, backed, out=tmp_path / "pred.h5", categories=CATS, max_seq_len=32, precision="fp32")
    annotate(backed, stored)
    assert "X_scgpt" not in backed.obsm and backed.uns["X_scgpt_store"] == str(stored.store)
    test = (backed.obs["split"] == "test").to_numpy()
    every = cells_for_plot(backed, test, max_cells=None, prediction=stored)
    assert list(every.obs_names) == list(backed.obs_names[test]) and "scgpt_label" in every.obs
    np.testing.assert_array_equal(every.obsm["X_scgpt"], stored.embeddings[:][test])
    few = cells_for_plot(backed, test, max_cells=10, seed=3, prediction=stored)
    assert few.n_obs == 10 and set(few.obs_names) <= set(every.obs_names)
    np.testing.assert_array_equal(few.obsm["X_scgpt"], every[few.obs_names].obsm["X_scgpt"])
