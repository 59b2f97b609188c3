"""Step 01: reading, inspection, preparation (filters, normalisation, genes, split), writing, plots."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure

from scgpt_protocol import pl, pp
from scgpt_protocol.core.errors import CheckpointNotFoundError, GeneMatchError, InputDataError
from scgpt_protocol.core.io import sha256_file
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import PreprocessParams
from scgpt_protocol.data.demo import load_demo, make_toy_adata
from scgpt_protocol.model.checkpoint import load_model, read_vocab
from scgpt_protocol.model.vocab import SPECIAL_TOKENS, gene_symbols

RARE = "CD4+/CD45RA+/CD25- Naive T"  # the 8-cell class of the demo data


def _vocab(genes) -> dict[str, int]:
    return {g: i for i, g in enumerate([*map(str, genes), *SPECIAL_TOKENS])}


def _toy_params(**kw) -> PreprocessParams:
    return PreprocessParams(label_key="cell_type", **kw)


@pytest.fixture(scope="module")
def demo() -> ad.AnnData:
    return load_demo()


@pytest.fixture(scope="module")
def demo_vocab(demo) -> dict[str, int]:
    return _vocab(demo.var_names)


@pytest.fixture(scope="module")
def toy() -> ad.AnnData:
    return make_toy_adata(n_cells=200, n_genes=100)


@pytest.fixture(scope="module")
def toy_vocab(toy) -> dict[str, int]:
    return _vocab(toy.var_names)


@pytest.fixture(scope="module")
def prepared_demo(demo, demo_vocab) -> pp.PreparedData:
    with pytest.warns(UserWarning, match="min_cells_per_class=10"):
        return pp.prepare(demo, PreprocessParams(min_cells_per_class=10), demo_vocab)


# -- read_adata -----------------------------------------------------------------------------
def test_read_adata_demo_and_h5ad(tmp_path, toy):
    demo = pp.read_adata("demo")
    assert demo.shape == (700, 765)
    path = tmp_path / "toy.h5ad"
    toy.write_h5ad(path)
    back = pp.read_adata(str(path))
    assert back.shape == toy.shape
    assert list(back.obs_names) == list(toy.obs_names)


def test_read_adata_missing_file_names_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        pp.read_adata("nope/data.h5ad")
    assert "nope/data.h5ad" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_read_adata_rejects_other_formats(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"not an \.h5ad file.*'\.csv'"):
        pp.read_adata(str(path))


# -- inspect_adata --------------------------------------------------------------------------
def test_inspect_demo(demo, demo_vocab, tmp_path):
    ins = pp.inspect_adata(demo, label_key="bulk_labels", vocab=demo_vocab)
    assert (ins.n_cells, ins.n_genes) == (700, 765)
    assert ins.value_kind == "log-normalised"
    assert (ins.genes_matched, ins.genes_total, ins.fraction_matched) == (765, 765, 1.0)
    assert ins.n_classes == 10
    assert isinstance(ins.class_counts, pd.Series)
    assert ins.class_counts["Dendritic"] == 240 and ins.class_counts[RARE] == 8
    assert ins.min_class_count == 8
    assert ins.batches is None and ins.warnings == []
    text = str(ins)
    assert "765/765" in text and "log-normalised" in text and "Dendritic (240)" in text
    html = ins._repr_html_()
    assert html.startswith("<table>") and "765/765" in html and "CD14+ Monocyte" in html
    layout = RunLayout(tmp_path / "run")
    path = pp.write_inspection(ins, layout)
    assert path == layout.inspection
    record = json.loads(path.read_text())
    assert record["value_kind"] == "log-normalised"
    assert record["class_counts"][RARE] == 8 and record["n_classes"] == 10
    assert demo.n_obs == 700 and "scgpt_token_id" not in demo.var  # input untouched


def test_inspect_toy_counts_and_batches(toy, toy_vocab):
    ins = pp.inspect_adata(toy, label_key="cell_type", vocab=toy_vocab, batch_key="batch")
    assert ins.value_kind == "counts"
    assert ins.value_max == float(toy.X.max())
    assert ins.n_classes == 3
    assert ins.batches is not None and ins.batches.sum() == 200 and len(ins.batches) == 2
    assert json.loads(json.dumps(ins.to_dict()))["batches"] == {k: int(v) for k, v in ins.batches.items()}


def test_inspect_missing_label_key_lists_columns(toy, toy_vocab):
    with pytest.raises(KeyError, match=r"label_key 'celltype' not in adata.obs.*'cell_type', 'batch'"):
        pp.inspect_adata(toy, label_key="celltype", vocab=toy_vocab)


def test_inspect_missing_batch_key_lists_columns(toy, toy_vocab):
    with pytest.raises(KeyError, match=r"batch_key 'sample'.*'cell_type'"):
        pp.inspect_adata(toy, label_key="cell_type", vocab=toy_vocab, batch_key="sample")


def test_inspect_one_class_is_an_error(toy, toy_vocab):
    one = toy.copy()
    one.obs["cell_type"] = "T cell"
    with pytest.raises(InputDataError, match="at least two"):
        pp.inspect_adata(one, label_key="cell_type", vocab=toy_vocab)


def test_inspect_negative_values_are_an_error(toy, toy_vocab):
    scaled = toy.copy()
    scaled.X = toy.X.toarray() - 1.0
    with pytest.raises(InputDataError, match="negative"):
        pp.inspect_adata(scaled, label_key="cell_type", vocab=toy_vocab)


def test_inspect_nan_labels_and_low_overlap_warn(toy):
    adata = toy.copy()
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[:5] = np.nan
    adata.obs["cell_type"] = labels
    vocab = _vocab(toy.var_names[:3])
    with pytest.warns(UserWarning) as record:
        ins = pp.inspect_adata(adata, label_key="cell_type", vocab=vocab)
    messages = [str(w.message) for w in record]
    assert any("5 of 200 cells have no label" in m and "drops" in m for m in messages)
    assert any("only 3/100 genes" in m for m in messages)
    assert ins.n_missing_labels == 5 and ins.class_counts.sum() == 195
    assert ins.genes_matched == 3 and len(ins.warnings) == 2


# -- prepare on the demo ------------------------------------------------------------------
def test_prepare_demo_split_sizes_and_categories(prepared_demo, demo):
    out = prepared_demo.adata
    assert out is not demo and out.shape == (700, 765)
    assert list(out.obs["split"].cat.categories) == ["train", "val", "test"]
    sizes = out.obs["split"].value_counts()
    assert abs(sizes["test"] - 0.2 * 700) <= 3
    assert abs(sizes["val"] - 0.1 * 700) <= 3
    assert sizes.sum() == 700
    assert prepared_demo.categories == sorted(demo.obs["bulk_labels"].astype(str).unique())
    assert list(prepared_demo.split_counts.columns) == ["train", "val", "test"]
    assert list(prepared_demo.split_counts.index) == prepared_demo.categories
    assert prepared_demo.split_counts.to_numpy().sum() == 700
    # the codes index the categories
    codes = out.obs["scgpt_label_code"].to_numpy()
    names = np.array(prepared_demo.categories)[codes]
    assert (names == out.obs["bulk_labels"].astype(str).to_numpy()).all()
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    assert (out.var["scgpt_token_id"].to_numpy() == np.arange(765)).all()


def test_prepare_demo_is_stratified(prepared_demo):
    counts = prepared_demo.split_counts.drop(index=prepared_demo.rare_classes)
    n_test, n_common = counts["test"].sum(), counts.to_numpy().sum()
    expected = counts.sum(axis=1) * n_test / n_common
    assert (np.abs(counts["test"] - expected) <= 1.0).all()
    assert (counts > 0).all().all()  # every non-rare class in train, val and test


def test_prepare_demo_rare_class_train_only(prepared_demo, demo, demo_vocab):
    assert prepared_demo.rare_classes == [RARE]
    row = prepared_demo.split_counts.loc[RARE]
    assert (row["train"], row["val"], row["test"]) == (8, 0, 0)
    obs = prepared_demo.adata.obs
    assert set(obs.loc[obs["bulk_labels"] == RARE, "split"]) == {"train"}
    with pytest.warns(UserWarning, match=r"fewer than min_cells_per_class=10.*Naive T' \(8\)"):
        pp.prepare(demo, PreprocessParams(min_cells_per_class=10, seed=3), demo_vocab)


def test_prepare_demo_is_not_renormalised(prepared_demo, demo):
    out = prepared_demo.adata
    assert "counts" not in out.layers
    assert "log1p" not in out.uns
    assert np.allclose(out.X.toarray(), demo[out.obs_names, out.var_names].X.toarray())
    record = out.uns["scgpt_protocol"]["preprocess"]
    assert not record["normalised"]
    assert record["input"]["value_kind"] == "log-normalised"
    assert record["params"]["min_cells_per_class"] == 10
    assert any("not normalised" in line for line in prepared_demo.log)


def test_prepare_does_not_mutate_input(demo, demo_vocab):
    before_obs, before_x = demo.obs.copy(), demo.X.copy()
    pp.prepare(demo, PreprocessParams(), demo_vocab)
    pd.testing.assert_frame_equal(demo.obs, before_obs)
    assert (demo.X != before_x).nnz == 0
    assert "split" not in demo.obs and "scgpt_protocol" not in demo.uns


def test_prepare_split_is_deterministic_per_seed(prepared_demo, demo, demo_vocab):
    with pytest.warns(UserWarning, match="min_cells_per_class"):
        again = pp.prepare(demo, PreprocessParams(min_cells_per_class=10), demo_vocab)
        other = pp.prepare(demo, PreprocessParams(min_cells_per_class=10, seed=1), demo_vocab)
    first = prepared_demo.adata.obs["split"].to_numpy()
    assert (again.adata.obs["split"].to_numpy() == first).all()
    assert (other.adata.obs["split"].to_numpy() != first).any()
    sizes = prepared_demo.adata.obs["split"].value_counts()
    assert (other.adata.obs["split"].value_counts() == sizes).all()


def test_prepare_small_classes_appear_in_every_split(toy, toy_vocab):
    adata = toy.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[:3] = "tiny"  # 3 cells: the smallest class that is not rare with min_cells_per_class=3
    adata.obs["cell_type"] = pd.Categorical(labels)
    prepared = pp.prepare(adata, _toy_params(min_cells_per_class=3), toy_vocab)
    assert prepared.rare_classes == []
    assert (prepared.split_counts > 0).all().all()
    assert prepared.split_counts.loc["tiny"].tolist() == [1, 1, 1]


# -- prepare: normalisation, genes ---------------------------------------------------------
def test_prepare_auto_normalises_counts_and_keeps_them(toy, toy_vocab):
    prepared = pp.prepare(toy, _toy_params(), toy_vocab)
    out = prepared.adata
    assert "counts" in out.layers
    assert np.array_equal(out.layers["counts"].toarray(), toy.X.toarray())
    totals = np.expm1(out.X.toarray()).sum(axis=1)
    assert np.allclose(totals, 1e4, rtol=1e-3)
    assert out.uns["scgpt_protocol"]["preprocess"]["normalised"]
    assert any("normalize_total" in line for line in prepared.log)


def test_prepare_normalize_no_keeps_values(toy, toy_vocab):
    out = pp.prepare(toy, _toy_params(normalize="no"), toy_vocab).adata
    assert np.array_equal(out.X.toarray(), toy.X.toarray())


def test_prepare_normalize_yes_on_log_data_warns(demo, demo_vocab):
    with pytest.warns(UserWarning, match="already look log-normalised"):
        out = pp.prepare(demo, PreprocessParams(normalize="yes"), demo_vocab).adata
    assert np.allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)


def test_prepare_uses_the_layer(toy, toy_vocab):
    adata = toy.copy()
    adata.layers["raw"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()) + 0.5)  # not what the model should see
    out = pp.prepare(adata, _toy_params(layer="raw"), toy_vocab).adata
    assert np.array_equal(out.layers["counts"].toarray(), toy.X.toarray())
    assert list(out.layers) == ["counts"]


def test_prepare_hvg_with_and_without_batch(toy, toy_vocab):
    plain = pp.prepare(toy, _toy_params(n_hvg=20), toy_vocab).adata
    batched = pp.prepare(toy, _toy_params(n_hvg=20, batch_key="batch"), toy_vocab).adata
    assert plain.n_vars == 20 and batched.n_vars == 20
    assert "highly_variable_nbatches" in batched.var and "highly_variable_nbatches" not in plain.var
    assert plain.var["highly_variable"].all()
    # the token ids follow the genes that were kept
    assert (plain.var["scgpt_token_id"].to_numpy() == [toy_vocab[g] for g in plain.var_names]).all()
    assert pp.prepare(toy, _toy_params(n_hvg=500), toy_vocab).adata.n_vars == 100


def test_prepare_gene_symbol_key(toy):
    adata = toy.copy()
    adata.var["symbol"] = list(adata.var_names)
    adata.var_names = [f"ENSG{j:011d}" for j in range(adata.n_vars)]
    vocab = _vocab([f"GENE{j}" for j in range(0, 100, 2)])  # half the genes
    out = pp.prepare(adata, _toy_params(gene_symbol_key="symbol"), vocab).adata
    assert out.n_vars == 50
    assert list(out.var_names) == [f"GENE{j}" for j in range(0, 100, 2)]
    assert list(out.var["original_var_name"]) == [f"ENSG{j:011d}" for j in range(0, 100, 2)]
    assert (out.var["scgpt_token_id"].to_numpy() == np.arange(50)).all()
    assert list(adata.var_names[:1]) == ["ENSG00000000000"]  # input untouched


def test_prepare_too_few_genes_matched(toy):
    with pytest.raises(GeneMatchError, match="only 5/100 genes"):
        pp.prepare(toy, _toy_params(), _vocab(toy.var_names[:5]))


def test_prepare_errors(toy, toy_vocab):
    with pytest.raises(KeyError, match=r"label_key 'celltype' not in adata.obs.*'cell_type'"):
        pp.prepare(toy, PreprocessParams(label_key="celltype"), toy_vocab)
    one = toy.copy()
    one.obs["cell_type"] = "B"
    with pytest.raises(InputDataError, match="at least two"):
        pp.prepare(one, _toy_params(), toy_vocab)
    negative = toy.copy()
    negative.X = -toy.X
    with pytest.raises(InputDataError, match="negative"):
        pp.prepare(negative, _toy_params(), toy_vocab)
    with pytest.raises(KeyError, match="layer 'spliced' not in adata.layers"):
        pp.prepare(toy, _toy_params(layer="spliced"), toy_vocab)


def test_prepare_drops_unlabelled_cells(toy, toy_vocab):
    adata = toy.copy()
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[[0, 5, 9]] = np.nan
    adata.obs["cell_type"] = labels
    with pytest.warns(UserWarning, match="dropped 3 cells without a label"):
        prepared = pp.prepare(adata, _toy_params(), toy_vocab)
    assert prepared.adata.n_obs == 197
    assert "cell0" not in prepared.adata.obs_names
    assert "200 -> 197 cells" in prepared.log[0]


def test_prepare_filters(toy, toy_vocab):
    adata = toy.copy()
    names = list(adata.var_names)
    names[-3:] = ["MT-CO1", "MT-ND1", "MT-ATP6"]
    adata.var_names = names
    x = adata.X.toarray()
    x[:10, -3:] = 200  # ten cells dominated by mitochondrial counts
    adata.X = sp.csr_matrix(x)
    vocab = _vocab(names)
    prepared = pp.prepare(adata, _toy_params(max_pct_mito=50.0, min_genes=1, min_cells=1), vocab)
    assert prepared.adata.n_obs == 190
    assert not set(adata.obs_names[:10]) & set(prepared.adata.obs_names)
    assert any("max_pct_mito=50.0 (3 MT- genes): 200 -> 190 cells" in line for line in prepared.log)
    with pytest.warns(UserWarning, match="no gene name starts with 'MT-'"):
        skipped = pp.prepare(toy, _toy_params(max_pct_mito=5.0), toy_vocab)
    assert skipped.adata.n_obs == 200


# -- writing --------------------------------------------------------------------------------
def test_labels_json_records_grey_unknown(prepared_demo, tmp_path):
    from scgpt_protocol.data.colors import run_palette
    from scgpt_protocol.data.labels import UNKNOWN, UNKNOWN_COLOR

    layout = RunLayout(tmp_path / "run")
    pp.write_prepared(prepared_demo, layout, "bulk_labels")
    colors = json.loads(layout.labels.read_text())["colors"]
    assert colors[UNKNOWN] == UNKNOWN_COLOR
    assert set(colors) == set(prepared_demo.categories) | {UNKNOWN}
    assert UNKNOWN_COLOR not in {colors[c] for c in prepared_demo.categories}
    assert run_palette(layout)[UNKNOWN] == UNKNOWN_COLOR


def test_write_prepared_round_trip(prepared_demo, tmp_path):
    layout = RunLayout(tmp_path / "run")
    paths = pp.write_prepared(prepared_demo, layout, "bulk_labels")
    assert paths == {"prepared_adata": layout.prepared_adata, "labels": layout.labels}
    # nothing else (no temporary files) is left behind
    assert sorted(p.name for p in layout.data_dir.iterdir()) == ["labels.json", "prepared.h5ad"]

    back = ad.read_h5ad(layout.prepared_adata)
    assert back.shape == prepared_demo.adata.shape
    assert list(back.obs["split"].cat.categories) == ["train", "val", "test"]
    assert (back.obs["split"].to_numpy() == prepared_demo.adata.obs["split"].to_numpy()).all()
    codes = prepared_demo.adata.obs["scgpt_label_code"].to_numpy()
    assert (back.obs["scgpt_label_code"].to_numpy() == codes).all()
    assert list(back.obs["bulk_labels"].cat.categories) == prepared_demo.categories
    assert back.uns["scgpt_protocol"]["preprocess"]["params"]["label_key"] == "bulk_labels"

    labels = pp.read_labels(layout)
    assert labels["label_key"] == "bulk_labels"
    assert labels["categories"] == prepared_demo.categories
    assert labels["class_counts"]["Dendritic"] == 240 and sum(labels["class_counts"].values()) == 700
    assert labels["split_counts"]["train"][RARE] == 8 and labels["split_counts"]["test"][RARE] == 0
    assert sum(labels["split_counts"]["test"].values()) == prepared_demo.split_counts["test"].sum()
    assert labels["rare_classes"] == [RARE]
    assert pp.read_prepared(layout).shape == back.shape


def test_write_prepared_failure_leaves_no_partial_file(prepared_demo, tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "run")

    def broken(self, path, *args, **kwargs):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        pp.write_prepared(prepared_demo, layout, "bulk_labels")
    assert list(layout.data_dir.iterdir()) == []


def test_read_before_step_01_says_which_step(tmp_path):
    layout = RunLayout(tmp_path / "empty")
    for reader in (pp.read_labels, pp.read_checkpoint_record, pp.read_prepared):
        with pytest.raises(FileNotFoundError, match="01_preprocess"):
            reader(layout)


# -- checkpoint -----------------------------------------------------------------------------
def test_resolve_checkpoint_demo(demo, tmp_path, caplog):
    layout = RunLayout(tmp_path / "run")
    genes = gene_symbols(demo)
    with caplog.at_level("WARNING", logger="scgpt_protocol.pp.io"):
        path = pp.resolve_checkpoint("demo", layout, genes)
    assert "RANDOMLY INITIALISED" in caplog.text and "means nothing biologically" in caplog.text
    assert path == layout.demo_checkpoint_dir
    vocab = read_vocab(path / "vocab.json")
    assert all(g in vocab for g in genes)
    model = load_model(path, device="cpu")
    assert model.vocab == vocab
    record = pp.read_checkpoint_record(layout)
    assert record == {"checkpoint": str(path), "kind": "demo", "sha256": sha256_file(path / "best_model.pt")}

    # the same folder given by path is a "folder" checkpoint
    assert pp.resolve_checkpoint(str(path), layout, []) == path
    assert pp.read_checkpoint_record(layout)["kind"] == "folder"


def test_resolve_checkpoint_missing_folder(tmp_path):
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match="not an existing folder.*'whole-human'"):
        pp.resolve_checkpoint(str(tmp_path / "nowhere"), layout, [])
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "args.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="lacks vocab.json, best_model.pt"):
        pp.resolve_checkpoint(str(tmp_path / "partial"), layout, [])
    assert not layout.checkpoint_record.exists()


# -- plots ----------------------------------------------------------------------------------
def test_plots_return_figures(demo, toy, prepared_demo, tmp_path):
    qc = pl.plot_qc(demo)  # demo has MT-ND3: three panels
    assert isinstance(qc, Figure) and len(qc.axes) == 3
    assert len(pl.plot_qc(toy).axes) == 2  # no MT- genes
    bars = pl.plot_class_counts(prepared_demo)
    assert isinstance(bars, Figure)
    labels = [t.get_text() for t in bars.axes[0].get_yticklabels()]
    assert f"{RARE} (train only)" in labels and len(labels) == 10
    layout = RunLayout(tmp_path / "run")
    from scgpt_protocol.pl.figure import save_figure

    path = save_figure(bars, layout, "class_counts")
    assert path._repr_png_() == path.read_bytes()  # shows as the image in a notebook
    assert path == layout.figure("class_counts")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
