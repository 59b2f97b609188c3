"""Result artifacts of 03: export/vars.h5 (expression, CSR) and export/obs.duckdb (SQL), and their contract."""

from __future__ import annotations

import anndata as ad
import duckdb
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from scgpt_protocol.annotate.columns import OBS_COLUMNS
from scgpt_protocol.annotate.refinement import refine
from scgpt_protocol.core.errors import ArtifactError
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.evaluate.export import export_evaluation, sql_duckdb, write_vars_h5
from scgpt_protocol.evaluate.scoring import evaluate_predictions
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD


@pytest.fixture(scope="module")
def run(pbmc, tiny_checkpoint, tmp_path_factory):
    """A run folder with data/prepared.h5ad (sparse X) and a refined evaluation of its test cells."""
    import scanpy as sc

    from scgpt_protocol.annotate.inference import predict
    from scgpt_protocol.model.checkpoint import load_model

    layout = RunLayout(tmp_path_factory.mktemp("export") / "run").make_dirs()
    adata = pbmc[:150].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    labels = sc.datasets.pbmc68k_reduced().obs["bulk_labels"]
    adata.obs["label"] = labels.to_numpy()[:150]
    adata.obs["split"] = np.where(np.arange(150) % 3 == 0, "test", "train")
    adata.var["gene_symbol"] = adata.var_names.str.upper()
    adata.write_h5ad(layout.prepared_adata)
    categories = [str(c) for c in labels.cat.categories]
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    prediction = predict(model, adata, categories=categories, max_seq_len=64, seed=0)
    threshold = float(np.median(prediction.confidence))
    prediction = refine(prediction, min_confidence=threshold, majority_voting=True, groups=adata.obs["split"])
    result = evaluate_predictions(adata, prediction, label_key="label", cells=adata.obs["split"] == "test")
    test = adata[adata.obs["split"] == "test"].copy()
    test.obsm["X_umap_scgpt"] = np.random.default_rng(0).normal(size=(test.n_obs, 2)).astype(np.float32)
    methods = {SCGPT_METHOD: result.metrics, BASELINE_METHOD: result.metrics["refinement"]["assigned"]}
    written = export_evaluation(layout, result, methods=methods, embedding=test)
    return layout, adata, result, test, written


def test_obs_duckdb_answers_sql_with_one_row_per_evaluated_cell(run):
    layout, adata, result, test, written = run
    assert written == {"vars_h5": layout.vars_h5, "obs_duckdb": layout.obs_duckdb}
    n_test = int((adata.obs["split"] == "test").sum())
    con = duckdb.connect(str(layout.obs_duckdb), read_only=True)
    try:
        assert con.sql("select count(*) from obs").fetchall()[0][0] == n_test == len(result.predictions)
        assert [c[0] for c in con.sql("describe obs").fetchall()] == list(OBS_COLUMNS)
        n_unknown = con.sql("select count(*) from obs where scgpt_label = 'Unknown'").fetchall()[0][0]
        assert n_unknown == con.sql("select count(*) from obs where scgpt_unknown").fetchall()[0][0]
        assert n_unknown == int(result.predictions["scgpt_unknown"].sum()) > 0
        assert con.sql("select count(distinct split) from obs").fetchall()[0][0] == 1
        # one majority label per over-cluster
        assert con.sql("select max(n) from (select count(distinct scgpt_majority_voting) as n from obs "
                       "group by scgpt_over_clustering)").fetchall()[0][0] == 1
        accuracy = con.sql("select avg(correct::int) from obs").fetchall()[0][0]
        assert accuracy == pytest.approx(result.metrics["accuracy"])
        cells = [r[0] for r in con.sql("select cell from obs order by row").fetchall()]
        assert cells == list(result.predictions.index)
        umap = np.array(con.sql("select umap_1, umap_2 from obs order by row").fetchall())
        np.testing.assert_allclose(umap, test.obsm["X_umap_scgpt"], rtol=1e-6)
        metrics = con.sql("select method, cells, accuracy, coverage from metrics").df()
        assert set(metrics["cells"]) == {"all", "assigned", "majority_voting"}
        refined = result.metrics["refinement"]
        assigned = metrics[(metrics["method"] == SCGPT_METHOD) & (metrics["cells"] == "assigned")]
        assert assigned["accuracy"].item() == pytest.approx(refined["assigned"]["accuracy"])
        assert assigned["coverage"].item() == pytest.approx(refined["coverage"])
        per_class = con.execute("select count(*) from per_class where method = ? and cells = 'all'",
                                [SCGPT_METHOD]).fetchall()[0][0]
        assert per_class == len(result.metrics["per_class"])
        assert con.sql("select count(*) from coverage").fetchall()[0][0] == len(refined["curve"])
    finally:
        con.close()
    by_label = sql_duckdb(layout.obs_duckdb, "select scgpt_label, count(*) as n from obs group by 1")
    assert by_label["n"].sum() == n_test


def test_vars_h5_reads_back_to_the_same_matrix(run):
    layout, adata, result, _, _ = run
    test = adata[result.predictions.index]
    back = ad.read_h5ad(layout.vars_h5)
    assert list(back.obs_names) == list(result.predictions.index) and list(back.var_names) == list(adata.var_names)
    assert sp.issparse(back.X) and back.X.dtype == np.float32
    np.testing.assert_array_equal(back.X.toarray(), test.X.toarray())
    assert list(back.var["gene_symbol"]) == list(adata.var["gene_symbol"])
    with h5py.File(layout.vars_h5, "r") as f:  # plain HDF5, CSR
        assert f["X"].attrs["encoding-type"] == "csr_matrix" and tuple(f["X"].attrs["shape"]) == test.shape
        assert f["X/data"].compression == "gzip"
        raw = sp.csr_matrix((f["X/data"][:], f["X/indices"][:], f["X/indptr"][:]), shape=tuple(f["X"].attrs["shape"]))
    assert (raw != test.X).nnz == 0


def test_vars_h5_is_written_in_chunks_from_backed_data(run, tmp_path):
    layout, adata, _, _, _ = run
    backed = ad.read_h5ad(layout.prepared_adata, backed="r")
    cells = adata.obs_names[5:140:7]
    try:
        write_vars_h5(backed, tmp_path / "vars.h5", cells=cells, chunk_size=16)  # 10 chunks
    finally:
        backed.file.close()
    back = ad.read_h5ad(tmp_path / "vars.h5")
    np.testing.assert_array_equal(back.X.toarray(), adata[cells].X.toarray())
    dense = adata.copy()
    dense.X = dense.X.toarray()
    write_vars_h5(dense, tmp_path / "dense.h5", chunk_size=64)  # dense input, all cells
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "dense.h5").X.toarray(), dense.X)


def _blocked(tmp_path) -> RunLayout:
    """A run whose export/ folder cannot be created: a file is in the way."""
    layout = RunLayout(tmp_path / "run")
    layout.run_dir.mkdir(parents=True)
    layout.export_dir.write_text("a file where the folder should be")
    return layout


def test_require_artifacts_stops_with_a_typed_error(run, tmp_path):
    source, _, result, test, _ = run
    layout = _blocked(tmp_path)
    with pytest.raises(ArtifactError, match=r"could not write the result artifact .*vars\.h5.*require_artifacts=False"):
        export_evaluation(layout, result, embedding=test, source=source.prepared_adata)
    assert isinstance(ArtifactError("x"), OSError)


def test_without_require_artifacts_a_failure_warns_and_goes_on(run, tmp_path):
    source, _, result, test, _ = run
    layout = _blocked(tmp_path)
    with pytest.warns(UserWarning, match=r"could not write the result artifact") as caught:
        written = export_evaluation(layout, result, embedding=test, source=source.prepared_adata, require=False)
    assert written == {} and len(caught) == 2  # both artifacts, one warning each
    assert layout.export_dir.is_file()  # nothing was half-written


def test_evaluation_without_refinement_exports_too(run, tmp_path):
    """A prediction that was never refined: nothing is Unknown, majority vote and over-cluster are NULL."""
    from scgpt_protocol.annotate.prediction import Prediction

    source, adata, refined_result, test, _ = run
    layout = RunLayout(tmp_path / "run")
    base = refined_result  # rebuild a plain prediction from the refined one's table
    n = adata.n_obs
    cats = sorted(set(adata.obs["label"].astype(str)))
    labels = np.asarray(cats, dtype=object)[np.arange(n) % len(cats)]
    plain = Prediction(labels=labels, codes=np.arange(n) % len(cats), confidence=np.ones(n, np.float32),
                       probabilities=np.eye(len(cats), dtype=np.float32)[np.arange(n) % len(cats)],
                       embeddings=np.zeros((n, 4), np.float32), categories=cats)
    result = evaluate_predictions(adata, plain, label_key="label", cells=base.predictions.index)
    export_evaluation(layout, result, embedding=test, source=source.prepared_adata)
    row = sql_duckdb(layout.obs_duckdb, "select count(*) as n, sum(scgpt_unknown::int) as unknown, "
                                          "count(scgpt_majority_voting) as voted from obs").iloc[0]
    assert (row["n"], row["unknown"], row["voted"]) == (len(base.predictions), 0, 0)
