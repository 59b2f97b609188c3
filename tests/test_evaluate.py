"""Metrics, the logistic-regression baseline, scoring scGPT predictions, result files and figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from scgpt_protocol.annotate.inference import annotate
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.evaluate.scoring import evaluate_predictions, write_results
from scgpt_protocol.metrics import (
    BASELINE_METHOD,
    HEADLINE_METRICS,
    METRIC_DESCRIPTIONS,
    SCGPT_METHOD,
    classification_metrics,
    confusion,
    metrics_table,
)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Multi-threaded OpenBLAS slows tiny fits down ~10x on a busy 2-core machine; the result is the same."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def demo():
    """pbmc68k_reduced (700 cells, 10 classes) with a stratified 80/20 split in obs['split']."""
    from sklearn.model_selection import train_test_split

    from scgpt_protocol.data.demo import load_demo

    adata = load_demo()
    _, test = train_test_split(
        adata.obs_names, test_size=0.2, stratify=adata.obs["bulk_labels"], random_state=0
    )
    adata.obs["split"] = pd.Categorical(np.where(adata.obs_names.isin(test), "test", "train"))
    return adata


@pytest.fixture(scope="module")
def baseline(demo):
    return logistic_regression_baseline(demo, label_key="bulk_labels", seed=0)


@pytest.fixture(scope="module")
def categories(demo):
    return [str(c) for c in demo.obs["bulk_labels"].cat.categories]


@pytest.fixture(scope="module")
def test_cells(demo):
    return demo[demo.obs["split"] == "test"].copy()


@pytest.fixture(scope="module")
def prediction(test_cells, tiny_checkpoint, categories):
    """A tiny random-weight model with a fresh 10-class head: random-ish but well-formed predictions."""
    from scgpt_protocol.annotate.inference import predict
    from scgpt_protocol.model.checkpoint import load_model

    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    return predict(model, test_cells, categories=categories, batch_size=64, max_seq_len=128, seed=0)


# -- classification_metrics -----------------------------------------------------------------
def test_metrics_of_a_hand_made_example():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    assert m["accuracy"] == 0.75 and m["n_cells"] == 4 and m["n_classes"] == 2
    rows = {r["label"]: r for r in m["per_class"]}
    assert rows["a"] == {"label": "a", "precision": pytest.approx(2 / 3), "recall": 1.0,
                         "f1": pytest.approx(0.8), "support": 2}
    assert rows["b"] == {"label": "b", "precision": 1.0, "recall": 0.5,
                         "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # p_o = 0.75, p_e = (2*3 + 2*1) / 16 = 0.5 -> kappa = 0.5
    assert m["cohen_kappa"] == pytest.approx(0.5)
    assert m["cohen_kappa"] == pytest.approx(cohen_kappa_score(["a", "a", "b", "b"], ["a", "a", "b", "a"]))
    assert m["macro_auroc"] is None and any("no predicted probabilities" in n for n in m["notes"])


def test_macro_and_weighted_f1_differ_when_classes_are_imbalanced():
    y_true = ["common"] * 8 + ["rare"] * 2
    y_pred = ["common"] * 10  # the rare class is never found
    m = classification_metrics(y_true, y_pred)
    f1_common = 2 * 0.8 * 1.0 / 1.8
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx(f1_common / 2)  # every class counts the same
    assert m["weighted_f1"] == pytest.approx(0.8 * f1_common)  # weighted by support
    assert m["weighted_f1"] > m["macro_f1"] + 0.2
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["cohen_kappa"] == pytest.approx(0.0)


def test_perfect_prediction():
    y = np.array(["x", "y", "z", "x", "y", "z", "x"])
    proba = (y[:, None] == np.array(["x", "y", "z"])[None, :]).astype(np.float32)
    m = classification_metrics(y, y, categories=["x", "y", "z"], proba=proba)
    for key in HEADLINE_METRICS:
        assert m[key] == pytest.approx(1.0), key
    assert m["notes"] == []


def test_auroc_with_probabilities_matches_one_vs_rest_mean():
    rng = np.random.default_rng(0)
    cats = ["a", "b", "c", "d"]  # "d" has no true cells: left out of the AUROC, with a note
    y_true = rng.choice(["a", "b", "c"], size=60)
    proba = rng.dirichlet(np.ones(4), size=60)
    proba[np.arange(60), [cats.index(t) for t in y_true]] += 0.3  # informative but imperfect
    proba /= proba.sum(axis=1, keepdims=True)
    y_pred = np.asarray(cats)[proba.argmax(axis=1)]
    m = classification_metrics(y_true, y_pred, categories=cats, proba=proba)
    expected = np.mean([roc_auc_score(y_true == c, proba[:, i]) for i, c in enumerate(cats[:3])])
    assert m["macro_auroc"] == pytest.approx(expected)
    assert 0.5 < m["macro_auroc"] < 1.0
    assert any("left out" in n and "'d'" in n for n in m["notes"])


def test_auroc_is_none_with_a_note_for_a_single_true_class():
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    m = classification_metrics(["a", "a", "a"], ["a", "a", "b"], categories=["a", "b"], proba=proba)
    assert m["macro_auroc"] is None
    assert any("single class" in n and "macro_auroc" in n for n in m["notes"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_kappa_undefined_for_one_class_everywhere_is_none_with_note():
    m = classification_metrics(["a"] * 3, ["a"] * 3)
    assert m["accuracy"] == 1.0 and m["cohen_kappa"] is None
    assert any("cohen_kappa is undefined" in n for n in m["notes"])


def test_labels_outside_the_categories_are_scored():
    cats = ["a", "b", "d"]  # "d": neither in y_true nor predicted
    y_true = ["a", "a", "b", "c", "c"]  # "c": the model does not know it
    y_pred = ["a", "z", "b", "a", "b"]  # "z": a prediction outside the categories
    proba = np.full((5, 3), 1 / 3)
    m = classification_metrics(y_true, y_pred, categories=cats, proba=proba)
    labels = [r["label"] for r in m["per_class"]]
    assert labels == ["a", "b", "d", "c", "z"]  # categories first, then the others
    rows = {r["label"]: r for r in m["per_class"]}
    assert rows["c"]["support"] == 2 and rows["c"]["recall"] == 0.0
    assert rows["z"]["support"] == 0 and rows["z"]["precision"] == 0.0
    assert m["accuracy"] == pytest.approx(2 / 5)
    # "d" (absent everywhere) is not averaged as F1 = 0: sklearn's default label set
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert any("not among the model's categories" in n and "'c'" in n for n in m["notes"])
    assert any("predicted label(s) are not among" in n and "'z'" in n for n in m["notes"])
    assert m["macro_auroc"] == pytest.approx(0.5)  # uniform probabilities


def test_metrics_are_json_serialisable_plain_numbers():
    m = classification_metrics(pd.Categorical(["a", "b", "b"]), np.array(["a", "b", "a"]))
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert isinstance(m["n_cells"], int) and isinstance(m["per_class"][0]["support"], int)
    assert all(isinstance(m[k], float) for k in ("accuracy", "macro_f1", "weighted_f1"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"y_true": ["a", "b"], "y_pred": ["a"]}, ValueError, "2 labels but y_pred has 1"),
        ({"y_true": ["a", None], "y_pred": ["a", "b"]}, ValueError, "1 missing labels"),
        ({"y_true": [], "y_pred": []}, ValueError, "empty"),
        ({"y_true": ["a", "b"], "y_pred": ["a", "b"], "categories": ["a", "b"], "proba": np.ones((2, 3))},
         ValueError, r"shape \(2, 3\); expected \(2, 2\)"),
        ({"y_true": ["a", "b"], "y_pred": ["a", "b"], "proba": np.ones((2, 2))},
         ValueError, "needs categories"),
    ],
)
def test_bad_input_is_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        classification_metrics(**kwargs)


def test_every_metric_has_a_one_line_description():
    for key in (*HEADLINE_METRICS, "n_cells", "per_class"):
        assert METRIC_DESCRIPTIONS[key].startswith(f"{key}: ") and "\n" not in METRIC_DESCRIPTIONS[key]
    assert "macro" not in METRIC_DESCRIPTIONS["weighted_f1"]


# -- confusion / metrics_table --------------------------------------------------------------
def test_confusion_is_row_normalised_with_true_labels_as_rows():
    cm = confusion(["a", "a", "a", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert list(cm.index) == list(cm.columns) == ["a", "b", "c"]
    assert cm.loc["a", "a"] == pytest.approx(1 / 3) and cm.loc["a", "b"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(cm.loc[["a", "b"]].sum(axis=1), 1.0)
    assert cm.loc["c"].isna().all()  # no true cells: NaN, not a row of zeros
    assert cm.attrs["support"] == {"a": 3, "b": 1, "c": 0}
    counts = confusion(["a", "a", "a", "b"], ["a", "b", "b", "b"], ["a", "b", "c"], normalize=None)
    assert counts.loc["a", "b"] == 2 and counts.to_numpy().sum() == 4
    with pytest.raises(ValueError, match="normalize='rows'"):
        confusion(["a"], ["a"], ["a"], normalize="rows")


def test_metrics_table_puts_methods_side_by_side(baseline):
    scgpt = classification_metrics(["a", "b", "b"], ["a", "b", "a"])
    table = metrics_table({SCGPT_METHOD: scgpt, BASELINE_METHOD: baseline})
    assert list(table.index) == [SCGPT_METHOD, BASELINE_METHOD] and table.index.name == "method"
    assert list(table.columns) == [*HEADLINE_METRICS, "n_cells"]
    assert np.isnan(table.loc[SCGPT_METHOD, "macro_auroc"])  # None -> NaN
    assert table.loc[BASELINE_METHOD, "accuracy"] == pytest.approx(baseline.metrics["accuracy"])
    assert table.loc[SCGPT_METHOD, "n_cells"] == 3


# -- baseline -------------------------------------------------------------------------------
def test_baseline_beats_chance_on_the_demo(baseline, demo):
    test = demo.obs_names[demo.obs["split"] == "test"]
    assert baseline.predictions.index.equals(test)
    assert baseline.n_genes == 765 and not baseline.normalised  # 765 < 2000 genes; .raw is log-normalised
    assert baseline.n_train == 560 and len(baseline.categories) == 10
    assert baseline.probabilities.shape == (140, 10)
    np.testing.assert_allclose(baseline.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # measured: accuracy 0.88, macro F1 0.70, macro AUROC 0.99; the largest class is 34% of cells
    assert baseline.metrics["accuracy"] > 0.75
    assert baseline.metrics["macro_f1"] > 0.55
    assert baseline.metrics["macro_auroc"] > 0.9
    assert baseline.metrics["n_cells"] == 140


def test_baseline_fits_on_train_cells_only(demo):
    first = logistic_regression_baseline(demo, label_key="bulk_labels", n_hvg=300)
    assert first.n_genes == 300
    is_test = (demo.obs["split"] == "test").to_numpy()

    relabelled = demo.copy()  # test labels scrambled: same model, same predictions
    labels = relabelled.obs["bulk_labels"].astype(str).to_numpy()
    labels[is_test] = np.random.default_rng(1).permutation(labels[is_test])
    labels[np.flatnonzero(is_test)[:5]] = "never seen in training"
    relabelled.obs["bulk_labels"] = pd.Categorical(labels)
    second = logistic_regression_baseline(relabelled, label_key="bulk_labels", n_hvg=300)
    assert second.predictions.astype(str).equals(first.predictions.astype(str))
    columns = [second.categories.index(c) for c in first.categories]  # the new column sorts labels
    np.testing.assert_array_equal(second.probabilities[:, columns], first.probabilities)
    assert second.metrics["accuracy"] < first.metrics["accuracy"]
    assert "never seen in training" not in second.categories

    reexpressed = demo.copy()  # test expression changed: the same genes are selected
    X = reexpressed.X.toarray()
    X[is_test] = np.random.default_rng(2).gamma(0.5, 4.0, size=(is_test.sum(), X.shape[1]))
    reexpressed.X = X
    third = logistic_regression_baseline(reexpressed, label_key="bulk_labels", n_hvg=300)
    assert third.genes == first.genes


def test_baseline_normalises_raw_counts():
    from scgpt_protocol.data.demo import make_toy_adata

    toy = make_toy_adata(n_cells=200, n_genes=100, n_labels=3, seed=0)
    toy.obs["split"] = np.where(np.arange(toy.n_obs) % 4 == 0, "test", "train")
    result = logistic_regression_baseline(toy, label_key="cell_type", n_hvg=50)
    assert result.normalised and result.n_genes == 50
    assert result.metrics["accuracy"] > 0.9
    assert result.categories == ["type_0", "type_1", "type_2"]


def test_baseline_errors_say_what_to_fix(demo):
    with pytest.raises(KeyError, match="split_key='fold' is not a column"):
        logistic_regression_baseline(demo, label_key="bulk_labels", split_key="fold")
    with pytest.raises(ValueError, match=r"no test cells.*found values \['test', 'train'\]"):
        logistic_regression_baseline(demo, label_key="bulk_labels", test="holdout")


def _sparse_counts(n_cells, n_genes, seed):
    """Sparse non-negative values with a few large ones (so that the clip at 10 bites) and 3 classes."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.3, random_state=seed, format="csr", dtype=np.float64,
                  data_rvs=lambda k: rng.gamma(1.0, 1.0, k))
    y = rng.integers(0, 3, n_cells)
    X = sp.csr_matrix(X + sp.csr_matrix((np.full(n_cells, 4.0), (np.arange(n_cells), y)), shape=X.shape))
    X.data[rng.random(X.nnz) < 0.01] *= 60  # outliers: centred values above 10
    return X, np.asarray(["a", "b", "c"])[y]


@pytest.mark.parametrize("n_classes, class_weight", [(3, None), (3, "balanced"), (2, None)])
def test_centring_folded_into_the_model_equals_dense_standardisation(n_classes, class_weight):
    """CentredLogisticOvR on sparse S = X / sd (clipped) has the decision function of scikit-learn's one-vs-rest
    logistic regression on the dense standardised matrix, clipped at 10 (CellTypist's recipe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from scgpt_protocol.evaluate.linear import CentredLogisticOvR, GeneStats, standardise

    X, y = _sparse_counts(300, 40, seed=n_classes)
    keep = np.isin(y, ["a", "b", "c"][:n_classes])
    X, y = X[keep], y[keep]
    train, test = X[:200], X[200:]
    stats = GeneStats(X.shape[1])
    stats.add(train[:77])
    stats.add(train[77:])  # two chunks: the same sums
    mean, scale = stats.mean_scale()
    scaler = StandardScaler().fit(train.toarray())
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-10)
    np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-10)
    Z, Zt = scaler.transform(train.toarray()), scaler.transform(test.toarray())
    assert (Z > 10).any()  # the clip matters here
    Z[Z > 10], Zt[Zt > 10] = 10, 10
    reference = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight)).fit(Z, y[:200])

    S, St = standardise(train, mean, scale), standardise(test, mean, scale)
    assert S.nnz == train.nnz and St.nnz == test.nnz  # still sparse, same pattern
    offset = mean / scale
    np.testing.assert_allclose(S.toarray() - offset, Z, atol=1e-12)  # clip at 10 of the centred value
    model = CentredLogisticOvR(class_weight=class_weight).fit(S, y[:200], offset)
    assert list(model.classes_) == list(reference.classes_)
    np.testing.assert_allclose(model.decision_function(St, offset).squeeze(), reference.decision_function(Zt),
                               atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(St, offset), reference.predict_proba(Zt), atol=1e-7)

    # a gene the data lack counts as its training mean (standardised 0): CellTypist drops it from the model
    present = np.arange(X.shape[1]) % 5 != 0
    Zt_missing = Zt.copy()
    Zt_missing[:, ~present] = 0.0
    np.testing.assert_allclose(model.decision_function(standardise(test[:, present], mean[present], scale[present]),
                                                       offset, present).squeeze(),
                               reference.decision_function(Zt_missing), atol=1e-6)


def test_fit_sample_is_stratified_and_keeps_rare_classes():
    from scgpt_protocol.evaluate.baseline import fit_sample

    labels = np.repeat(np.array(["big", "mid", "rare"]), [9000, 900, 30])
    assert np.array_equal(fit_sample(labels, 10_000, seed=0), np.arange(len(labels)))
    picked = fit_sample(labels, 1000, seed=0)
    assert np.all(np.diff(picked) > 0)
    counts = pd.Series(labels[picked]).value_counts()
    assert counts["big"] == 906 and counts["mid"] == 100 and counts["rare"] == 30  # proportional, floor 100 / all
    assert not np.array_equal(picked, fit_sample(labels, 1000, seed=1))


def test_baseline_streams_chunks_and_caps_the_fitted_cells(demo, baseline):
    import scanpy as sc

    chunked = logistic_regression_baseline(demo, label_key="bulk_labels", seed=0, chunk_size=97)
    np.testing.assert_allclose(chunked.probabilities, baseline.probabilities, atol=1e-6)
    assert baseline.n_fit == baseline.n_train == 560

    capped = logistic_regression_baseline(demo, label_key="bulk_labels", seed=0, max_fit_cells=200)
    assert capped.n_train == 560 and 200 <= capped.n_fit < 560  # every class keeps min(100, all) cells
    assert capped.categories == baseline.categories and capped.metrics["accuracy"] > 0.7

    # the highly variable genes, from moments read chunk by chunk, are scanpy's on the train cells
    hvg300 = logistic_regression_baseline(demo, label_key="bulk_labels", n_hvg=300, chunk_size=101)
    train = demo[demo.obs["split"] == "train"]
    expected = sc.pp.highly_variable_genes(train.copy(), flavor="seurat", n_top_genes=300, inplace=False)
    assert hvg300.genes == list(train.var_names[expected["highly_variable"].to_numpy()])


# -- scGPT predictions ----------------------------------------------------------------------
def test_prediction_of_a_tiny_model_is_well_formed(prediction, test_cells, categories):
    n = test_cells.n_obs
    assert prediction.labels.shape == prediction.codes.shape == prediction.confidence.shape == (n,)
    assert set(prediction.labels) <= set(categories)
    assert ((prediction.confidence >= 0) & (prediction.confidence <= 1)).all()
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(prediction.confidence, prediction.probabilities.max(axis=1))


def test_evaluate_predictions(prediction, test_cells, categories):
    result = evaluate_predictions(test_cells, prediction, label_key="bulk_labels")
    frame = result.predictions
    assert frame.index.equals(test_cells.obs_names)
    assert list(frame.columns) == ["true_label", "scgpt_label", "scgpt_label_confidence", "split", "correct"]
    assert (frame["split"] == "test").all()
    expected = frame["true_label"].to_numpy() == frame["scgpt_label"].astype(str).to_numpy()
    np.testing.assert_array_equal(frame["correct"].to_numpy(dtype=bool), expected)
    m = result.metrics
    assert m["n_cells"] == test_cells.n_obs and m["accuracy"] == pytest.approx(expected.mean())
    assert m["macro_auroc"] is not None and 0.0 <= m["macro_auroc"] <= 1.0
    assert [r["label"] for r in m["per_class"]] == categories
    assert result.confusion.shape == (10, 10)
    np.testing.assert_allclose(result.confusion.sum(axis=1), 1.0)  # the stratified test split has every class

    first_50 = test_cells.obs_names[:50]
    subset = evaluate_predictions(test_cells, prediction, label_key="bulk_labels", cells=first_50)
    assert subset.metrics["n_cells"] == 50 and subset.predictions.index.equals(first_50)


def test_evaluate_predictions_leaves_out_unlabelled_cells(prediction, test_cells):
    adata = test_cells.copy()
    labels = adata.obs["bulk_labels"].astype(object).to_numpy()
    labels[:4] = None
    adata.obs["bulk_labels"] = pd.Categorical(labels)
    result = evaluate_predictions(adata, prediction, label_key="bulk_labels")
    assert result.metrics["n_cells"] == adata.n_obs - 4
    assert result.predictions["correct"].isna().sum() == 4 and len(result.predictions) == adata.n_obs
    assert any("4 cells without a label" in n for n in result.metrics["notes"])


def test_evaluate_predictions_refuses_other_cells(prediction, demo):
    with pytest.raises(ValueError, match="prediction holds 140 cells but adata has 700"):
        evaluate_predictions(demo, prediction, label_key="bulk_labels")


def test_annotate_writes_obs_and_obsm_in_place(prediction, test_cells, categories):
    adata = test_cells.copy()
    assert annotate(adata, prediction) is None
    assert list(adata.obs["scgpt_label"].cat.categories) == categories
    written = adata.obs["scgpt_label"].astype(str).to_numpy()
    np.testing.assert_array_equal(written, prediction.labels.astype(str))
    assert adata.obs["scgpt_label_confidence"].dtype == np.float32
    np.testing.assert_array_equal(adata.obs["scgpt_label_code"].to_numpy(), prediction.codes)
    assert adata.obsm["X_scgpt"].shape == (adata.n_obs, 32)
    annotate(adata, prediction, key_added="pred", embedding_key_added=None)
    assert "pred" in adata.obs and "pred_confidence" in adata.obs


def test_write_results_round_trip(tmp_path, prediction, test_cells, baseline):
    layout = RunLayout(tmp_path / "run")
    result = evaluate_predictions(test_cells, prediction, label_key="bulk_labels")
    metrics = {"test": result.metrics, "baseline": baseline.metrics, "label_key": "bulk_labels"}
    paths = write_results(layout, predictions=result.predictions, metrics=metrics)
    assert paths == {"predictions": layout.predictions, "metrics": layout.metrics}

    back = pd.read_csv(layout.predictions, index_col=0)
    assert back.index.tolist() == result.predictions.index.tolist()
    assert back["scgpt_label"].tolist() == result.predictions["scgpt_label"].astype(str).tolist()
    np.testing.assert_allclose(
        back["scgpt_label_confidence"], result.predictions["scgpt_label_confidence"], rtol=1e-6
    )
    assert back["correct"].tolist() == result.predictions["correct"].tolist()

    record = json.loads(layout.metrics.read_text())
    assert record["test"] == json.loads(json.dumps(result.metrics))
    assert record["baseline"]["accuracy"] == pytest.approx(baseline.metrics["accuracy"])
    assert record["descriptions"]["macro_f1"] == METRIC_DESCRIPTIONS["macro_f1"]
    assert set(record["descriptions"]) >= set(HEADLINE_METRICS)
    assert not list(tmp_path.rglob("*.partial"))


# -- figures --------------------------------------------------------------------------------
def test_plot_confusion(baseline, demo):
    from scgpt_protocol.pl.metrics import plot_confusion

    truth = demo.obs.loc[baseline.predictions.index, "bulk_labels"]
    cm = confusion(truth, baseline.predictions, baseline.categories)
    fig = plot_confusion(cm, title="baseline")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == baseline.categories
    assert ax.get_yticklabels()[0].get_text().endswith(f"(n={cm.attrs['support'][baseline.categories[0]]})")
    assert len(ax.texts) > 10  # values written into the cells with 10 classes

    many = [f"type {i}" for i in range(20)]
    rng = np.random.default_rng(0)
    big = confusion(rng.choice(many, 200), rng.choice(many, 200), many)
    assert len(plot_confusion(big).axes[0].texts) == 0  # too many classes to write values


def test_plot_embedding_reuses_and_stores_colours(demo):
    from scgpt_protocol.pl.embedding import plot_embedding

    adata = demo.copy()
    colours = list(adata.uns["bulk_labels_colors"])
    fig = plot_embedding(adata, basis="X_umap", color=["bulk_labels", "n_genes", "phase"])
    assert isinstance(fig, Figure)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["bulk_labels", "n_genes", "phase"]
    assert list(adata.uns["bulk_labels_colors"]) == colours  # reused, not replaced
    legend = panels[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == 10
    assert "phase_colors" not in demo.uns  # categorical without colours: scanpy's palette, stored
    assert len(adata.uns["phase_colors"]) == len(adata.obs["phase"].cat.categories)
    with pytest.raises(KeyError, match="not in adata.obsm"):
        plot_embedding(adata, basis="X_tsne", color="bulk_labels")


def test_compute_umap_then_plot(prediction, test_cells):
    from scgpt_protocol.pl.embedding import compute_umap, plot_embedding

    adata = test_cells[:100].copy()
    annotate(adata, _first(prediction, 100))
    before_uns, before_obsp = set(adata.uns), set(adata.obsp)
    compute_umap(adata, use_rep="X_scgpt", key_added="X_umap_scgpt", seed=0, method="gauss")
    assert adata.obsm["X_umap_scgpt"].shape == (100, 2) and np.isfinite(adata.obsm["X_umap_scgpt"]).all()
    assert set(adata.uns) == before_uns and set(adata.obsp) == before_obsp  # only the obsm key is written
    fig = plot_embedding(adata, basis="X_umap_scgpt", color=["bulk_labels", "scgpt_label"])
    assert isinstance(fig, Figure)
    assert "scgpt_label_colors" in adata.uns


@pytest.mark.slow
def test_compute_umap_default_method_is_seeded(prediction, test_cells):
    from scgpt_protocol.pl.embedding import compute_umap

    adata = test_cells[:100].copy()
    annotate(adata, _first(prediction, 100))
    compute_umap(adata, seed=0)
    first = adata.obsm["X_umap_scgpt"].copy()
    compute_umap(adata, seed=0)
    np.testing.assert_allclose(adata.obsm["X_umap_scgpt"], first, atol=1e-5)


def _first(prediction, n):
    from scgpt_protocol.annotate.prediction import Prediction

    return Prediction(
        labels=prediction.labels[:n], codes=prediction.codes[:n], confidence=prediction.confidence[:n],
        probabilities=prediction.probabilities[:n], embeddings=prediction.embeddings[:n],
        categories=prediction.categories,
    )


def test_plot_per_class_f1(prediction, test_cells, baseline):
    from scgpt_protocol.pl.metrics import plot_per_class_f1

    scgpt = evaluate_predictions(test_cells, prediction, label_key="bulk_labels")
    fig = plot_per_class_f1({SCGPT_METHOD: scgpt.metrics, BASELINE_METHOD: baseline})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 10
    assert any("macro F1" in t.get_text() for t in fig.legends[0].get_texts())  # below the bars
    with pytest.raises(ValueError, match="no 'per_class' entry"):
        plot_per_class_f1({"x": {"accuracy": 1.0}})


def test_plot_training_curves_marks_the_best_epoch():
    from scgpt_protocol.pl.training import plot_training_curves

    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [2.0, 1.2, 0.8, 0.6],
            "val_loss": [1.9, 1.3, 1.1, 1.2],
            "val_macro_f1": [0.3, 0.5, 0.62, 0.6],
            "val_accuracy": [0.4, 0.6, 0.7, 0.69],
            "lr": [1e-4, 9e-5, 8.1e-5, 7.3e-5],
            "best": [True, True, True, False],
        }
    )
    fig = plot_training_curves(history)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    losses, scores = fig.axes
    assert len(losses.get_lines()) == 3 and len(scores.get_lines()) == 3  # 2 curves + the best-epoch line
    assert losses.get_lines()[-1].get_xdata()[0] == 3
    assert any("best epoch 3" in t.get_text() for t in scores.texts)
    assert isinstance(plot_training_curves(history.drop(columns="best")), Figure)
    with pytest.raises(ValueError, match="needs an 'epoch' column"):
        plot_training_curves(history.drop(columns="epoch"))


def test_save_figure_and_style(tmp_path):
    import matplotlib as mpl

    from scgpt_protocol.pl.figure import save_figure, set_style
    from scgpt_protocol.pl.training import plot_training_curves

    with mpl.rc_context():
        set_style()
        assert mpl.rcParams["axes.spines.top"] is False
        fig = plot_training_curves(pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5]}))
    layout = RunLayout(tmp_path / "run")
    path = save_figure(fig, layout, "training_curves", pdf=True)
    assert path == layout.figure("training_curves") and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    assert not list(layout.figures_dir.glob(".*"))
    with pytest.raises(ValueError, match="plain file stem"):
        save_figure(fig, layout, "../escape")


def test_prediction_store_switch(tmp_path):
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.evaluate.scoring import STORE_OUTPUTS_CELLS, prediction_store

    layout = RunLayout(tmp_path / "run")
    assert prediction_store(layout, 2_700) is None  # demo size: in memory
    assert prediction_store(layout, STORE_OUTPUTS_CELLS + 1) == layout.prediction_store
    assert prediction_store(layout, 10, True) == layout.prediction_store
    assert prediction_store(layout, STORE_OUTPUTS_CELLS + 1, False) is None
    assert layout.prediction_store in layout.step_artifacts("03_evaluate")
