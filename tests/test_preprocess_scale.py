"""Step 01 with bounded memory: prepare_file (in memory or chunked) writes what prepare + write_prepared write."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scgpt_protocol import pl, pp
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import PreprocessParams
from scgpt_protocol.data.demo import load_demo, make_toy_adata
from scgpt_protocol.model.vocab import SPECIAL_TOKENS
from scgpt_protocol.pp.hvg import GeneMoments, seurat_hvg


def _vocab(genes) -> dict[str, int]:
    return {g: i for i, g in enumerate([*map(str, genes), *SPECIAL_TOKENS])}


def _toy_file(tmp_path, n_cells=300, n_genes=120, seed=0):
    """Counts with MT- genes, a string column, cells without label, an empty cell and a layer that must not be used."""
    toy = make_toy_adata(n_cells=n_cells, n_genes=n_genes, seed=seed)
    names = list(toy.var_names)
    names[:3] = ["MT-CO1", "MT-ND1", "MT-ATP6"]
    toy.var_names = names
    toy.var["symbol"] = [f"SYM{i}" if i >= 3 else n for i, n in enumerate(names)]
    labels = toy.obs["cell_type"].astype(str).to_numpy().copy()
    labels[[5, 17]] = "nan"
    toy.obs["cell_type"] = labels
    toy.obs["donor"] = np.where(np.arange(n_cells) % 3 == 0, "d1", "d2")
    x = toy.X.tolil()
    x[7, :] = 0
    toy.X = x.tocsr()
    toy.layers["other"] = toy.X.copy()
    toy.obsm["X_fake"] = np.arange(n_cells * 2, dtype=np.float32).reshape(n_cells, 2)
    path = tmp_path / "toy.h5ad"
    toy.write_h5ad(path)
    return path, toy


def _assert_same(a: ad.AnnData, b: ad.AnnData, *, hvg_tol: bool = False) -> None:
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert a.X.dtype == b.X.dtype == np.float32
    assert (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        assert (sp.csr_matrix(a.layers[k]) != sp.csr_matrix(b.layers[k])).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    hv_cols = ["means", "dispersions", "dispersions_norm"]
    pd.testing.assert_frame_equal(a.var.drop(columns=hv_cols, errors="ignore"),
                                  b.var.drop(columns=hv_cols, errors="ignore"))
    for c in hv_cols:
        if c in a.var:
            np.testing.assert_allclose(a.var[c].to_numpy(float), b.var[c].to_numpy(float), rtol=1e-4, atol=1e-5)
    assert set(a.uns) == set(b.uns)
    np.testing.assert_equal(a.uns["scgpt_protocol"]["preprocess"], b.uns["scgpt_protocol"]["preprocess"])
    np.testing.assert_equal(a.uns.get("log1p"), b.uns.get("log1p"))
    np.testing.assert_equal(a.uns.get("hvg"), b.uns.get("hvg"))
    assert set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[k]), np.asarray(b.obsm[k]))


def _both(tmp_path, path, params, vocab, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_layout = RunLayout(tmp_path / "ref").make_dirs()
        ref = pp.prepare(pp.read_adata(str(path)), params, vocab)
        pp.write_prepared(ref, ref_layout, params.label_key)
        outs = []
        for name, chunked in (("mem", False), ("chunk", True)):
            layout = RunLayout(tmp_path / name).make_dirs()
            got = pp.prepare_file(params, vocab, layout, chunked=chunked, **kw)
            outs.append((got, ad.read_h5ad(layout.prepared_adata), layout))
    return ref, ad.read_h5ad(ref_layout.prepared_adata), ref_layout, outs


@pytest.mark.parametrize("extra", [
    {},
    {"min_genes": 50, "min_cells": 110, "max_pct_mito": 4.0},
    {"max_pct_mito": 4.0, "n_hvg": 40},
    {"n_hvg": 40, "batch_key": "batch", "gene_symbol_key": "symbol", "min_genes": 50},
    {"normalize": "no", "min_cells": 100},
    {"vocab_genes": 70, "n_hvg": 30, "normalize": "yes"},
])
def test_prepare_file_equals_prepare(tmp_path, extra):
    """Same file content from both paths (tiny chunks) as from prepare + write_prepared, for each step's options."""
    path, toy = _toy_file(tmp_path)
    extra = dict(extra)
    n_vocab = extra.pop("vocab_genes", None)
    params = PreprocessParams(adata_path=str(path), label_key="cell_type", min_cells_per_class=3, **extra)
    key = extra.get("gene_symbol_key")
    vocab = _vocab((toy.var[key] if key else toy.var_names)[:n_vocab])
    ref, ref_file, ref_layout, outs = _both(tmp_path, path, params, vocab, chunk_size=37)
    for got, written, layout in outs:
        _assert_same(ref_file, written)
        assert got.categories == ref.categories and got.log == ref.log and got.rare_classes == ref.rare_classes
        pd.testing.assert_frame_equal(got.split_counts, ref.split_counts)
        assert layout.labels.read_text() == ref_layout.labels.read_text()
        assert got.adata.X is None and got.adata.n_obs == ref.adata.n_obs
        assert got.files == {"prepared_adata": layout.prepared_adata, "labels": layout.labels}
        with h5py.File(layout.prepared_adata) as mine, h5py.File(ref_layout.prepared_adata) as theirs:
            for key in ("X/data", "X/indices", "X/indptr"):
                assert mine[key].dtype == theirs[key].dtype, key


def test_prepare_file_demo_data(tmp_path):
    """pbmc68k_reduced (log-normalised, with .raw dropped, obsm/obsp/varm kept): both paths equal prepare."""
    demo = load_demo()
    path = tmp_path / "demo.h5ad"
    demo.write_h5ad(path)
    params = PreprocessParams(adata_path=str(path), min_cells_per_class=10, n_hvg=300)
    ref, ref_file, _, outs = _both(tmp_path, path, params, _vocab(demo.var_names), chunk_size=101)
    for got, written, _ in outs:
        _assert_same(ref_file, written)


def test_prepare_file_leaves_input_and_chooses_path(tmp_path, monkeypatch):
    path, _ = _toy_file(tmp_path)
    before = path.read_bytes()
    from scgpt_protocol.pp import stream as ps

    assert ps.choose_chunked(path, None, True) and not ps.choose_chunked(path, None, False)
    assert not ps.choose_chunked(path)  # a small file: in memory
    monkeypatch.setattr(ps, "available_memory", lambda: 4 * ps.stored_matrix_bytes(path) - 4)
    assert ps.choose_chunked(path)
    layout = RunLayout(tmp_path / "run").make_dirs()
    opened = pp.open_lazy(str(path))  # the notebook keeps its handle open while prepare_file reads the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.prepare_file(PreprocessParams(adata_path=str(path), label_key="cell_type", min_cells_per_class=3),
                        _vocab(ad.read_h5ad(path).var_names), layout)
    assert path.read_bytes() == before and opened.n_obs == 300
    assert ad.read_h5ad(layout.prepared_adata).n_obs > 0


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_seurat_hvg_matches_scanpy(batch_key):
    """Accumulated moments + our binning select the genes scanpy's flavor='seurat' selects (real PBMC data)."""
    demo = load_demo()
    demo.obs["batch"] = pd.Categorical(np.where(np.arange(demo.n_obs) % 2 == 0, "a", "b"))
    want = sc.pp.highly_variable_genes(demo, n_top_genes=200, flavor="seurat", batch_key=batch_key,
                                       inplace=False)
    codes = demo.obs["batch"].cat.codes.to_numpy() if batch_key else np.zeros(demo.n_obs, dtype=int)
    moments = GeneMoments(demo.n_vars, 2 if batch_key else 1)
    x = sp.csr_matrix(demo.X, dtype=np.float32)
    for start in range(0, demo.n_obs, 64):  # chunks
        moments.add(x[start:start + 64], codes[start:start + 64])
    got = seurat_hvg(moments, demo.var_names, 200, ["a", "b"] if batch_key else None)
    np.testing.assert_array_equal(got["highly_variable"].to_numpy(), want["highly_variable"].to_numpy())
    np.testing.assert_allclose(got["means"], want["means"], rtol=1e-5)
    np.testing.assert_allclose(got["dispersions_norm"].fillna(0), want["dispersions_norm"].fillna(0),
                               rtol=1e-4, atol=1e-5)
    if batch_key:
        np.testing.assert_array_equal(got["highly_variable_nbatches"], want["highly_variable_nbatches"])


def test_qc_plot_on_backed_data(tmp_path):
    path, toy = _toy_file(tmp_path)
    backed = pp.open_lazy(str(path))
    assert not isinstance(backed.X, np.ndarray) and not sp.issparse(backed.X)  # rows read on demand
    fig = pl.plot_qc(backed)
    assert len(fig.axes) == 3 and fig.axes[0].patches
    with pytest.warns(UserWarning, match="no label"):
        inspection = pp.inspect_adata(backed, label_key="cell_type", vocab=_vocab(toy.var_names),
                                      min_cells_per_class=3)
    assert inspection.n_cells == toy.n_obs and inspection.value_kind == "counts"


def test_prepare_leaves_the_callers_anndata_alone(tmp_path):
    """prepare copies the chosen matrix once (duplicates, explicit zeros, int counts) and never changes the input."""
    toy = make_toy_adata(n_cells=120, n_genes=60)
    x = sp.csr_matrix(toy.X, dtype=np.float32)
    x.data[::7] = 0  # explicit zeros, kept as stored values
    toy.X = x
    toy.layers["int_counts"] = sp.csr_matrix(toy.X, dtype=np.int64)
    toy.raw = toy.copy()
    for layer in (None, "int_counts"):
        before = toy.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pp.prepare(toy, PreprocessParams(label_key="cell_type", layer=layer, min_genes=10, n_hvg=20,
                                                   min_cells_per_class=3), _vocab(toy.var_names)).adata
        assert (toy.X != before.X).nnz == 0 and toy.X.nnz == before.X.nnz  # explicit zeros still stored
        assert (toy.layers["int_counts"] != before.layers["int_counts"]).nnz == 0
        pd.testing.assert_frame_equal(toy.obs, before.obs)
        pd.testing.assert_frame_equal(toy.var, before.var)
        assert set(toy.uns) == set(before.uns) and toy.raw is not None
        assert not np.shares_memory(out.X.data, toy.X.data) and out.raw is None and list(out.layers) == ["counts"]


def test_prepare_file_bad_inputs(tmp_path):
    """The typed errors of read_adata / prepare, from the file path too."""
    from scgpt_protocol.core.errors import InputDataError

    layout = RunLayout(tmp_path / "run").make_dirs()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pp.prepare_file(PreprocessParams(adata_path=str(tmp_path / "nope.h5ad")), {}, layout)
    fake = tmp_path / "fake.h5ad"
    fake.write_text("not hdf5")
    for chunked in (None, True, False):
        with pytest.raises(InputDataError, match="could not be read as an .h5ad file"):
            pp.prepare_file(PreprocessParams(adata_path=str(fake)), {}, layout, chunked=chunked)
    path, toy = _toy_file(tmp_path)
    vocab = _vocab(toy.var_names)
    for chunked in (True, False):
        with pytest.raises(KeyError, match="label_key 'nope' not in adata.obs"):
            pp.prepare_file(PreprocessParams(adata_path=str(path), label_key="nope"), vocab, layout, chunked=chunked)
        with pytest.raises(KeyError, match="layer 'missing' not in adata.layers"):
            pp.prepare_file(PreprocessParams(adata_path=str(path), label_key="cell_type", layer="missing"), vocab,
                            layout, chunked=chunked)
    assert not layout.prepared_adata.exists()


def test_open_backed_leaves_layers_on_disk_and_reads_obs_as_anndata_does(tmp_path):
    """02 opens prepared.h5ad with open_backed: X and layers stay on disk (anndata's backed mode would load
    layers["counts"], as large as X), obs equals anndata's (names decoded a slice at a time)."""
    import anndata as ad

    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.data.read import open_backed

    adata = make_toy_adata(n_cells=300, n_genes=20)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["n"] = np.arange(adata.n_obs)
    adata.obs.index.name = "barcode"
    path = tmp_path / "prepared.h5ad"
    adata.write_h5ad(path)
    backed, reference = open_backed(path), ad.read_h5ad(path)
    assert backed.isbacked and list(backed.layers.keys()) == []
    pd.testing.assert_frame_equal(backed.obs, reference.obs)
    pd.testing.assert_frame_equal(backed.var, reference.var)
    assert (backed.X[10:20].toarray() == reference.X[10:20].toarray()).all()
    backed.file.close()
