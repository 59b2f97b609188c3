"""Zero-shot reference mapping: kNN label transfer, AnnData wrapper, joint embedding, run files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.annotate.columns import PREDICTION_COLUMNS
from scgpt_protocol.annotate.knn import transfer_labels
from scgpt_protocol.annotate.zeroshot import write_zeroshot, zeroshot_annotate
from scgpt_protocol.pl.embedding import joint_embedding

EPS = 1e-6


# --------------------------------------------------------------------------- transfer_labels
def test_two_separated_clusters_are_recovered():
    rng = np.random.default_rng(0)
    a = rng.normal([5.0, 0.0], 0.3, size=(40, 2))
    b = rng.normal([0.0, 5.0], 0.3, size=(40, 2))
    ref = np.vstack([a, b])
    labels = ["A"] * 40 + ["B"] * 40
    query = np.vstack([rng.normal([5.0, 0.0], 0.3, size=(15, 2)), rng.normal([0.0, 5.0], 0.3, size=(15, 2))])
    out = transfer_labels(ref, labels, query, k=10)
    expected = ["A"] * 15 + ["B"] * 15
    assert out.majority.tolist() == expected and out.weighted.tolist() == expected
    np.testing.assert_array_equal(out.confidence_majority, 1.0)
    np.testing.assert_allclose(out.confidence_weighted, 1.0)
    assert out.neighbors.shape == out.distances.shape == (30, 10)
    assert (out.neighbors[:15] < 40).all() and (out.neighbors[15:] >= 40).all()
    assert (np.diff(out.distances, axis=1) >= 0).all()
    assert out.categories == ["A", "B"]


def test_majority_and_weighted_votes_disagree_with_exact_confidences():
    # query at the origin: 3 "A" cells at distance 1, 2 "B" cells at distance 0.01
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.01, 0.0], [0.0, -0.01], [9.0, 9.0]])
    labels = ["A", "A", "A", "B", "B", "C"]
    out = transfer_labels(ref, labels, np.zeros((1, 2)), k=5, normalize=False)
    assert out.majority.tolist() == ["A"]
    assert out.weighted.tolist() == ["B"]
    assert out.confidence_majority[0] == 0.6
    w_a, w_b = 3 / (1 + EPS), 2 / (0.01 + EPS)
    assert out.confidence_weighted[0] == pytest.approx(w_b / (w_a + w_b), rel=1e-12)
    assert sorted(out.neighbors[0].tolist()) == [0, 1, 2, 3, 4]  # C (far away) is not a neighbour
    np.testing.assert_allclose(out.distances[0], [0.01, 0.01, 1, 1, 1], rtol=1e-12)


def test_count_ties_go_to_the_closer_label():
    # 2 "a" at distance 1 vs 2 "b" at distance 0.5: "b" wins although "a" is alphabetically first
    ref = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    out = transfer_labels(ref, ["a", "a", "b", "b"], np.zeros((1, 2)), k=4, normalize=False)
    assert out.majority.tolist() == ["b"] and out.weighted.tolist() == ["b"]
    assert out.confidence_majority[0] == 0.5


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_full_ties_go_to_the_alphabetically_first_label_whatever_the_order(order):
    # four equidistant points: same count, same summed distance, same weights -> "a"
    ref = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = np.array(["b", "b", "a", "a"])
    out = transfer_labels(ref[order], labels[order], np.zeros((1, 2)), k=4, normalize=False)
    assert out.majority.tolist() == ["a"] and out.weighted.tolist() == ["a"]
    assert out.confidence_majority[0] == 0.5 and out.confidence_weighted[0] == pytest.approx(0.5)


def test_labels_are_compared_as_strings_and_returned_as_str():
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    out = transfer_labels(ref, pd.Categorical([3, 3, 7, 7]), np.array([[0.05, 1.0]]), k=3)
    assert out.majority.tolist() == ["7"] and isinstance(out.majority[0], str)


def test_normalisation_makes_the_vector_length_irrelevant():
    rng = np.random.default_rng(1)
    ref, query = rng.normal(size=(60, 8)), rng.normal(size=(20, 8))
    labels = rng.choice(["x", "y", "z"], 60)
    a = transfer_labels(ref, labels, query, k=5)
    b = transfer_labels(ref * rng.uniform(0.1, 10, (60, 1)), labels, query * 3.0, k=5)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_array_equal(a.majority, b.majority)
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-12)


def _brute_force(ref, labels, query, k):
    """Cosine similarity + argsort + Counter, with the documented tie rules."""
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = q @ r.T
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    dists = np.sqrt(np.maximum(2 - 2 * np.take_along_axis(sims, nbrs, axis=1), 0))
    majority, conf = [], []
    for row, d in zip(nbrs, dists):
        counts = Counter(labels[row])
        dsum = {lab: d[labels[row] == lab].sum() for lab in counts}
        best = max(counts.values())
        winner = sorted((dsum[lab], lab) for lab, c in counts.items() if c == best)[0][1]
        majority.append(winner)
        conf.append(counts[winner] / k)
    return nbrs, dists, np.array(majority), np.array(conf)


@pytest.mark.parametrize("k", [1, 7, 25])
def test_matches_a_brute_force_cosine_implementation(k):
    rng = np.random.default_rng(k)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    query = rng.normal(size=(57, 16)).astype(np.float32)
    labels = rng.choice(["t1", "t2", "t3", "t4"], 300)
    out = transfer_labels(ref, labels, query, k=k, chunk_size=10)  # several chunks
    nbrs, dists, majority, conf = _brute_force(ref.astype(np.float64), labels, query.astype(np.float64), k)
    np.testing.assert_array_equal(np.sort(out.neighbors, axis=1), np.sort(nbrs, axis=1))
    np.testing.assert_allclose(out.distances, dists, atol=1e-5)
    assert out.majority.tolist() == majority.tolist()
    np.testing.assert_array_equal(out.confidence_majority, conf)
    assert ((out.confidence_weighted > 0) & (out.confidence_weighted <= 1 + 1e-12)).all()
    whole = transfer_labels(ref, labels, query, k=k, chunk_size=10_000)
    np.testing.assert_array_equal(whole.neighbors, out.neighbors)
    assert whole.weighted.tolist() == out.weighted.tolist()


def test_k_larger_than_the_reference_is_an_error():
    with pytest.raises(ValueError, match=r"k=5 neighbours requested but the reference has only 4 cells"):
        transfer_labels(np.eye(4), list("aabb"), np.eye(4)[:1], k=5)
    with pytest.raises(ValueError, match="positive integer"):
        transfer_labels(np.eye(4), list("aabb"), np.eye(4)[:1], k=0)


def test_nan_zero_and_mismatched_inputs_are_errors():
    ref = np.eye(4)
    bad = ref.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"ref_emb has 1 rows with NaN or infinite values \(first: row 2\)"):
        transfer_labels(bad, list("aabb"), ref[:1], k=2)
    with pytest.raises(ValueError, match="query_emb has 1 rows with NaN"):
        transfer_labels(ref, list("aabb"), np.array([[np.inf, 0, 0, 0]]), k=2)
    with pytest.raises(ValueError, match=r"query_emb has 1 all-zero rows"):
        transfer_labels(ref, list("aabb"), np.zeros((1, 4)), k=2)
    with pytest.raises(ValueError, match="ref_emb has 4 dimensions but query_emb has 3"):
        transfer_labels(ref, list("aabb"), np.ones((1, 3)), k=2)
    with pytest.raises(ValueError, match="ref_labels has 3 entries but ref_emb has 4 rows"):
        transfer_labels(ref, list("aab"), ref[:1], k=2)
    with pytest.raises(ValueError, match="ref_labels has 1 missing values"):
        transfer_labels(ref, ["a", None, "b", "b"], ref[:1], k=2)


def test_empty_query_gives_empty_results():
    out = transfer_labels(np.eye(3), list("abc"), np.zeros((0, 3)), k=2)
    assert out.majority.shape == (0,) and out.neighbors.shape == (0, 2)


def test_metrics_count_unknown_labels_as_errors():
    from scgpt_protocol.metrics import classification_metrics

    m = classification_metrics(["a", "a", "b", "new"], ["a", "a", "b", "b"])
    assert m["accuracy"] == 0.75 and m["n_cells"] == 4
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 1 + 1 * (2 / 3) + 1 * 0) / 4)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


# --------------------------------------------------------------------------- on the demo data
@pytest.fixture(scope="module")
def demo_split():
    from sklearn.model_selection import train_test_split

    from scgpt_protocol.data.demo import DEMO_LABEL_KEY, load_demo

    demo = load_demo()
    ref_idx, query_idx = train_test_split(
        np.arange(demo.n_obs), train_size=0.7, stratify=demo.obs[DEMO_LABEL_KEY], random_state=0
    )
    return demo[np.sort(ref_idx)].copy(), demo[np.sort(query_idx)].copy()


@pytest.fixture(scope="module")
def annotated(demo_split, tiny_checkpoint):
    from scgpt_protocol import load_model

    reference, query = (a.copy() for a in demo_split)
    before = {"ref_obs": reference.obs.copy(), "query_obs": query.obs.copy(),
              "ref_obsm": set(reference.obsm), "query_obsm": set(query.obsm)}
    model = load_model(tiny_checkpoint, device="cpu")
    result = zeroshot_annotate(reference, query, model, label_key="bulk_labels", max_seq_len=128,
                               batch_size=64)
    return reference, query, model, result, before


def test_zeroshot_annotate_on_the_demo(annotated):
    reference, query, model, res, before = annotated
    pred = res.predictions
    assert len(pred) == query.n_obs and pred.index.tolist() == query.obs_names.tolist()
    assert list(pred.columns) == [*PREDICTION_COLUMNS, "bulk_labels"]
    ref_labels = set(reference.obs["bulk_labels"].astype(str))
    assert set(pred["scgpt_zeroshot_label"]) <= ref_labels
    assert set(pred["scgpt_zeroshot_label_weighted"]) <= ref_labels
    for col in ("scgpt_zeroshot_confidence", "scgpt_zeroshot_confidence_weighted"):
        assert ((pred[col] > 0) & (pred[col] <= 1)).all()
    votes = pred["scgpt_zeroshot_confidence"] * 10  # a share of k=10 neighbours
    np.testing.assert_allclose(votes, np.round(votes))

    assert set(res.metrics) == {"knn_vote", "knn_weighted", "refinement", "notes"}
    assert res.metrics["refinement"]["coverage"] == 1.0  # min_confidence=0: every cell keeps its label
    for vote, column in (("knn_vote", "scgpt_zeroshot_label"), ("knn_weighted", "scgpt_zeroshot_label_weighted")):
        m = res.metrics[vote]
        assert {"accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "cohen_kappa", "n_cells"} <= set(m)
        assert {row["label"] for row in m["per_class"]} >= set(pred["bulk_labels"])
        assert m["n_cells"] == query.n_obs
        assert all(0 <= m[key] <= 1 for key in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy"))
        assert m["accuracy"] == pytest.approx((pred[column] == pred["bulk_labels"].astype(str)).mean())
    assert res.metrics["knn_vote"]["accuracy"] > 0  # a random model: low, but not nothing

    assert res.reference_embedding.shape == (reference.n_obs, model.config.d_model)
    assert res.query_embedding.shape == (query.n_obs, model.config.d_model)
    assert res.params["k"] == 10 and res.params["n_reference"] == reference.n_obs
    # the inputs got obsm["X_scgpt"] (and embed's uns record), nothing else
    assert set(reference.obsm) == before["ref_obsm"] | {"X_scgpt"}
    assert set(query.obsm) == before["query_obsm"] | {"X_scgpt"}
    pd.testing.assert_frame_equal(reference.obs, before["ref_obs"])
    pd.testing.assert_frame_equal(query.obs, before["query_obs"])
    np.testing.assert_array_equal(query.obsm["X_scgpt"], res.query_embedding)


def test_zeroshot_abstention_and_majority_voting(annotated):
    reference, query, model, res, _ = annotated
    q = query.copy()
    out = zeroshot_annotate(reference, q, model, label_key="bulk_labels", reuse_embeddings=True,
                            min_confidence=0.6, majority_voting=True)
    pred, share = out.predictions, res.predictions["scgpt_zeroshot_confidence"].to_numpy()
    below = share < 0.6  # fewer than 6 of the 10 neighbours agree
    assert 0 < below.sum() < len(below)
    assert (pred["scgpt_zeroshot_label"][below] == "Unknown").all()
    assert (pred["scgpt_zeroshot_label"][~below] == res.predictions["scgpt_zeroshot_label"][~below]).all()
    assert (pred["scgpt_zeroshot_prediction"] == res.predictions["scgpt_zeroshot_label"]).all()
    assert (pred["scgpt_zeroshot_unknown"] == below).all()
    assert pred.groupby("scgpt_over_clustering")["scgpt_majority_voting"].nunique().eq(1).all()
    # scanpy-style keys in the query
    keys = {"scgpt_zeroshot_label", "scgpt_zeroshot_unknown", "scgpt_over_clustering", "scgpt_majority_voting"}
    assert keys <= set(q.obs)
    assert q.uns["scgpt_zeroshot_annotation"]["min_confidence"] == 0.6
    m, r = out.metrics["knn_vote"], out.metrics["refinement"]
    truth = pred["bulk_labels"].astype(str)
    assert m["accuracy"] == pytest.approx((pred["scgpt_zeroshot_label"] == truth).mean())  # Unknown counted wrong
    assert r["coverage"] == pytest.approx(1 - below.mean())
    assert r["assigned"]["accuracy"] == pytest.approx((pred["scgpt_zeroshot_prediction"] == truth)[~below].mean())
    assert r["majority_voting"]["accuracy"] == pytest.approx((pred["scgpt_majority_voting"] == truth).mean())
    pd.testing.assert_series_equal(
        pred["scgpt_zeroshot_label_weighted"], res.predictions["scgpt_zeroshot_label_weighted"]
    )


def test_reused_embeddings_give_the_same_predictions(annotated):
    reference, query, model, res, _ = annotated
    again = zeroshot_annotate(reference, query, model, label_key="bulk_labels", reuse_embeddings=True)
    pd.testing.assert_frame_equal(again.predictions, res.predictions)
    assert again.params["reused_embeddings"] == {"reference": True, "query": True}


def test_query_without_labels_has_no_metrics(annotated):
    reference, query, model, res, _ = annotated
    unlabelled = query.copy()
    del unlabelled.obs["bulk_labels"]
    out = zeroshot_annotate(reference, unlabelled, model, label_key="bulk_labels", reuse_embeddings=True)
    assert out.metrics is None
    assert list(out.predictions.columns) == list(PREDICTION_COLUMNS)
    pd.testing.assert_frame_equal(out.predictions, res.predictions[list(PREDICTION_COLUMNS)])
    assert any("no 'bulk_labels' column" in note for note in out.notes)


def test_unlabelled_reference_cells_are_dropped_with_a_warning(annotated):
    reference, query, model, _, _ = annotated
    ref = reference.copy()
    labels = ref.obs["bulk_labels"].astype(object)
    labels.iloc[:5] = np.nan
    ref.obs["bulk_labels"] = labels
    with pytest.warns(UserWarning, match=rf"5 of {ref.n_obs} reference cells have no 'bulk_labels' label"):
        out = zeroshot_annotate(ref, query, model, label_key="bulk_labels", reuse_embeddings=True)
    assert out.params["n_reference"] == ref.n_obs - 5 and out.reference_used.sum() == ref.n_obs - 5
    assert (out.transfer.neighbors < ref.n_obs - 5).all()
    assert any("5 reference cells without a label" in note for note in out.metrics["notes"])


@pytest.mark.parametrize("placeholder", ["nan", "", "None", " NA "])
def test_placeholder_reference_labels_are_missing_as_in_01_and_03(annotated, placeholder):
    """04 follows the one missing-label rule of 01 and 03: a label 'nan' (a column converted to text) is no class."""
    reference, query, model, _, _ = annotated
    ref = reference.copy()
    labels = ref.obs["bulk_labels"].astype(str).to_numpy(dtype=object)
    labels[:4] = placeholder
    ref.obs["bulk_labels"] = labels
    with pytest.warns(UserWarning, match=rf"4 of {ref.n_obs} reference cells have no 'bulk_labels' label"):
        out = zeroshot_annotate(ref, query, model, label_key="bulk_labels", reuse_embeddings=True)
    assert out.params["n_reference"] == ref.n_obs - 4 and not out.reference_used[:4].any()
    assert placeholder not in set(out.predictions["scgpt_zeroshot_label"])
    assert placeholder not in out.transfer.categories
    with pytest.raises(ValueError, match="ref_labels has 4 missing values"):
        transfer_labels(np.asarray(ref.obsm["X_scgpt"]), labels, np.asarray(query.obsm["X_scgpt"])[:2], k=3)


def test_placeholder_query_labels_are_not_scored(annotated):
    reference, query, model, _, _ = annotated
    q = query.copy()
    labels = q.obs["bulk_labels"].astype(str).to_numpy(dtype=object)
    labels[:3] = "nan"
    q.obs["bulk_labels"] = labels
    out = zeroshot_annotate(reference, q, model, label_key="bulk_labels", reuse_embeddings=True)
    assert out.metrics["knn_vote"]["n_cells"] == q.n_obs - 3
    assert any("3 query cells without a true label were not scored" in note for note in out.metrics["notes"])


def test_query_labels_absent_from_the_reference_are_errors_and_noted(annotated):
    reference, query, model, res, _ = annotated
    q = query.copy()
    q.obs["bulk_labels"] = q.obs["bulk_labels"].astype(str)
    q.obs.iloc[:3, q.obs.columns.get_loc("bulk_labels")] = "Unseen type"
    out = zeroshot_annotate(reference, q, model, label_key="bulk_labels", reuse_embeddings=True)
    assert any("'Unseen type' (3 cells)" in note for note in out.metrics["notes"])
    assert (out.predictions["scgpt_zeroshot_label"].iloc[:3] != "Unseen type").all()


def test_bad_label_keys_are_clear_errors(annotated):
    reference, query, model, _, _ = annotated
    with pytest.raises(KeyError, match=r"label_key='cell_type' is not a column.*'bulk_labels'"):
        zeroshot_annotate(reference, query, model, label_key="cell_type")
    ref = reference.copy()
    ref.obs["one"] = "T cell"
    with pytest.raises(ValueError, match=r"1 distinct label\(s\).*at least 2"):
        zeroshot_annotate(ref, query, model, label_key="one")
    with pytest.raises(ValueError, match=f"only {reference.n_obs} labelled cells"):
        zeroshot_annotate(reference, query, model, label_key="bulk_labels", k=reference.n_obs + 1)


def test_joint_embedding(annotated):
    reference, query, _, res, _ = annotated
    joint = joint_embedding(reference, query, label_key="bulk_labels", result=res)
    n = reference.n_obs + query.n_obs
    assert joint.shape == (n, 0) and joint.obs_names.is_unique
    assert joint.obsm["X_scgpt"].shape == (n, res.query_embedding.shape[1])
    np.testing.assert_array_equal(joint.obsm["X_scgpt"][reference.n_obs :], query.obsm["X_scgpt"])
    counts = joint.obs["dataset"].value_counts().to_dict()
    assert counts == {"reference": reference.n_obs, "query": query.n_obs}
    is_query = (joint.obs["dataset"] == "query").to_numpy()
    assert (joint.obs["predicted"][~is_query] == "reference").all()  # drawn grey, named in legends
    predicted = joint.obs["predicted"][is_query].astype(str).tolist()
    assert predicted == res.predictions["scgpt_zeroshot_label"].tolist()
    assert joint.obs["label"].astype(str).tolist() == [
        *reference.obs["bulk_labels"].astype(str),
        *query.obs["bulk_labels"].astype(str),
    ]
    assert joint.obs["cell"].tolist()[: reference.n_obs] == reference.obs_names.tolist()
    with pytest.raises(KeyError, match="no obsm\\['X_other'\\]"):
        joint_embedding(reference, query, label_key="bulk_labels", use_rep="X_other")


def test_write_zeroshot_round_trip(annotated, tmp_path):
    from scgpt_protocol.core.layout import RunLayout

    _, _, _, res, _ = annotated
    layout = RunLayout(tmp_path / "run")
    paths = write_zeroshot(layout, res)
    assert paths == {"predictions": layout.zeroshot_predictions, "metrics": layout.zeroshot_metrics}
    back = pd.read_csv(paths["predictions"], index_col="cell")
    assert back.index.tolist() == res.predictions.index.tolist()
    pd.testing.assert_frame_equal(back, res.predictions.astype({"bulk_labels": str}), check_names=False)
    record = json.loads(paths["metrics"].read_text())
    assert record["knn_vote"] == res.metrics["knn_vote"] and record["knn_weighted"] == res.metrics["knn_weighted"]
    assert record["params"]["k"] == 10 and record["params"]["label_key"] == "bulk_labels"
    assert not list(layout.zeroshot_dir.glob(".*partial"))


# --------------------------------------------------------------------------- streamed (backed data, stored embeddings)
@pytest.fixture(scope="module")
def streamed(annotated, tmp_path_factory):
    """The demo's reference and query as views of one backed .h5ad, annotated with store_dir."""
    import anndata as ad

    reference, query, model, res, _ = annotated
    folder = tmp_path_factory.mktemp("streamed")
    both = ad.concat([reference, query], label="part", keys=["reference", "query"])
    del both.obsm["X_scgpt"]
    both.write_h5ad(folder / "both.h5ad")
    backed = ad.read_h5ad(folder / "both.h5ad", backed="r")
    part = backed.obs["part"].to_numpy()
    ref_view, query_view = backed[part == "reference"], backed[part == "query"]
    out = zeroshot_annotate(ref_view, query_view, model, label_key="bulk_labels", max_seq_len=128,
                            batch_size=64, store_dir=folder / "store", min_confidence=0.6, majority_voting=True)
    return ref_view, query_view, res, out, folder


def test_streamed_zeroshot_gives_the_same_labels_as_in_memory(streamed):
    from scgpt_protocol.data.store import take_rows

    ref_view, query_view, res, out, folder = streamed
    assert ref_view.isbacked and query_view.is_view  # X stayed on disk
    assert "X_scgpt" not in ref_view.obsm and "X_scgpt" not in query_view.obsm  # the store holds them
    np.testing.assert_array_equal(take_rows(out.query_embedding), res.query_embedding)
    np.testing.assert_array_equal(take_rows(out.reference_embedding), res.reference_embedding)
    assert (folder / "store" / "reference_embeddings.h5").is_file()
    assert out.params["store"] == str(folder / "store")
    pred = out.predictions
    pd.testing.assert_series_equal(pred["scgpt_zeroshot_prediction"], res.predictions["scgpt_zeroshot_label"],
                                   check_names=False)
    for column in PREDICTION_COLUMNS[1:]:
        pd.testing.assert_series_equal(pred[column], res.predictions[column])
    below = res.predictions["scgpt_zeroshot_confidence"].to_numpy() < 0.6
    assert (pred["scgpt_zeroshot_label"][below] == "Unknown").all()
    # majority voting read the stored query embedding: one label per over-cluster
    assert pred.groupby("scgpt_over_clustering")["scgpt_majority_voting"].nunique().eq(1).all()
    assert out.params["precision"]["query"] == res.params["precision"]["query"]


def test_query_blocks_give_the_same_transfer(streamed):
    from scgpt_protocol.annotate.knn import transfer_blocks
    from scgpt_protocol.data.store import take_rows

    ref_view, _, _, out, _ = streamed
    ref = take_rows(out.reference_embedding)
    labels = np.asarray(ref_view.obs["bulk_labels"].astype(str))
    whole = transfer_labels(ref, labels, take_rows(out.query_embedding), k=10)
    blocks = transfer_blocks(ref, labels, out.query_embedding, k=10, block=97)
    for name in ("majority", "weighted", "confidence_majority", "confidence_weighted", "neighbors", "distances"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
    assert blocks.categories == whole.categories


def test_joint_embedding_from_the_store_with_a_cap(streamed):
    from scgpt_protocol.data.store import take_rows

    ref_view, query_view, _, out, _ = streamed
    full = joint_embedding(ref_view, query_view, label_key="bulk_labels", result=out)
    n = ref_view.n_obs + query_view.n_obs
    assert full.n_obs == n
    np.testing.assert_array_equal(full.obsm["X_scgpt"][ref_view.n_obs :], take_rows(out.query_embedding))
    capped = joint_embedding(ref_view, query_view, label_key="bulk_labels", result=out, max_cells=100, seed=1)
    assert capped.n_obs == 100 and capped.obs_names.is_unique
    assert set(capped.obs_names) <= set(full.obs_names)
    rows = full.obs_names.get_indexer(capped.obs_names)
    np.testing.assert_array_equal(capped.obsm["X_scgpt"], full.obsm["X_scgpt"][rows])
    pd.testing.assert_frame_equal(capped.obs.astype(str), full.obs.iloc[rows].astype(str))
    again = joint_embedding(ref_view, query_view, label_key="bulk_labels", result=out, max_cells=100, seed=1)
    assert again.obs_names.tolist() == capped.obs_names.tolist()  # the sample is seeded
