"""Abstention (Unknown below min_confidence), majority voting over an over-clustering, and their metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.annotate.inference import annotate
from scgpt_protocol.annotate.refinement import (
    UNKNOWN,
    majority_vote,
    over_cluster,
    overclustering_resolution,
    refine,
    refine_labels,
)
from scgpt_protocol.evaluate.scoring import evaluate_predictions
from scgpt_protocol.metrics import classification_metrics, coverage_curve
from scgpt_protocol.protocol.display import refinement_table


@pytest.fixture(scope="module")
def demo_prediction(pbmc, tiny_checkpoint):
    """200 labelled demo cells with a split, predicted by a tiny random model with a 10-class head."""
    import scanpy as sc

    from scgpt_protocol.annotate.inference import predict
    from scgpt_protocol.model.checkpoint import load_model

    adata = pbmc[:200].copy()
    labels = sc.datasets.pbmc68k_reduced().obs["bulk_labels"]
    adata.obs["label"] = labels.to_numpy()[:200]
    adata.obs["split"] = np.where(np.arange(200) % 5 == 0, "test", "train")
    categories = [str(c) for c in labels.cat.categories]
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    return adata, predict(model, adata, categories=categories, max_seq_len=64, seed=0)


def _blobs(n_per: int = 40, n_blobs: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, 8)) * 10
    emb = np.concatenate([c + rng.normal(size=(n_per, 8)) for c in centres])
    return emb, np.repeat(np.arange(n_blobs), n_per)


# -- abstention -----------------------------------------------------------------------------
def test_abstention_at_a_high_threshold_yields_unknown_cells_and_assigned_metrics_with_coverage(demo_prediction):
    adata, raw = demo_prediction
    threshold = float(np.quantile(raw.confidence, 0.6))  # about 60 % of the cells fall below
    refined = refine(raw, min_confidence=threshold)
    below = raw.confidence < threshold
    assert below.sum() > 50
    assert (refined.labels[below] == UNKNOWN).all() and (refined.labels[~below] == raw.labels[~below]).all()
    np.testing.assert_array_equal(refined.predicted, raw.labels)  # the prediction is kept
    np.testing.assert_array_equal(refined.confidence, raw.confidence)
    np.testing.assert_array_equal(refined.unknown, below)
    assert raw.predicted is None and (raw.labels != UNKNOWN).all()  # the input is left as it was

    result = evaluate_predictions(adata, refined, label_key="label")
    truth = adata.obs["label"].astype(str).to_numpy()
    m = result.metrics
    assert m["accuracy"] == pytest.approx(np.mean((truth == raw.labels) & ~below))  # Unknown counted wrong
    assert m["n_unassigned"] == below.sum() and UNKNOWN not in {r["label"] for r in m["per_class"]}
    r = m["refinement"]
    assert r["coverage"] == pytest.approx(1 - below.mean()) and r["n_unknown"] == below.sum()
    assert r["assigned"]["n_cells"] == (~below).sum()
    assert r["assigned"]["accuracy"] == pytest.approx(np.mean(truth[~below] == raw.labels[~below]))
    frame = result.predictions
    assert (frame.loc[below, "scgpt_label"] == UNKNOWN).all() and frame["scgpt_unknown"].sum() == below.sum()
    assert (frame["scgpt_prediction"].astype(str).to_numpy() == raw.labels).all()
    table = refinement_table(m)
    assert list(table["coverage"].round(6)) == [round(1 - below.mean(), 6)] * 2
    assert table["accuracy"].iloc[1] == pytest.approx(r["assigned"]["accuracy"])


def test_threshold_zero_keeps_every_call(demo_prediction):
    adata, raw = demo_prediction
    refined = refine(raw)
    assert not refined.unknown.any() and (refined.labels == raw.labels).all()
    result = evaluate_predictions(adata, refined, label_key="label")
    plain = evaluate_predictions(adata, raw, label_key="label")
    assert result.metrics["accuracy"] == plain.metrics["accuracy"]
    assert result.metrics["refinement"]["coverage"] == 1.0


def test_unassigned_label_is_not_a_class_in_the_averages():
    m = classification_metrics(["a", "a", "b", "b"], ["a", UNKNOWN, "b", UNKNOWN], unassigned=UNKNOWN)
    assert m["accuracy"] == 0.5 and m["n_unassigned"] == 2
    # per class: a and b have precision 1, recall 1/2 -> F1 2/3; Unknown is not averaged in as F1 = 0
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert [r["label"] for r in m["per_class"]] == ["a", "b"]
    with pytest.raises(ValueError, match="'Unknown' is a true label of 1 cells"):
        classification_metrics([UNKNOWN, "a"], [UNKNOWN, "a"], unassigned=UNKNOWN)


def test_coverage_curve_by_hand_and_monotone_coverage(demo_prediction):
    adata, raw = demo_prediction
    curve = coverage_curve(["a", "a", "b", "b"], ["a", "b", "b", "b"], [0.9, 0.4, 0.8, 0.6], [0.0, 0.5, 0.85, 0.95])
    assert curve["coverage"].tolist() == [1.0, 0.75, 0.25, 0.0]
    assert curve["accuracy_assigned"].tolist()[:3] == [0.75, 1.0, 1.0] and np.isnan(curve["accuracy_assigned"].iloc[3])
    assert curve["accuracy_all"].tolist() == [0.75, 0.75, 0.25, 0.0]
    full = coverage_curve(adata.obs["label"].astype(str), raw.labels, raw.confidence)
    assert len(full) == 21 and (np.diff(full["coverage"]) <= 0).all() and full["coverage"].iloc[0] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_confidence": 1.5}, ValueError, r"min_confidence=1.5 is outside \[0, 1\]"),
        ({"min_confidence": "high"}, TypeError, "min_confidence must be a number"),
        ({"majority_voting": True}, ValueError, "majority_voting needs the model's embedding"),
    ],
)
def test_bad_refinement_input_is_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        refine_labels(["a", "b"], [0.9, 0.2], **kwargs)


def test_a_class_named_unknown_is_refused_when_abstaining():
    with pytest.raises(ValueError, match="has a class named 'Unknown'"):
        refine_labels(["a", "b"], [0.9, 0.2], min_confidence=0.5, categories=["a", "b", UNKNOWN])
    refine_labels(["a", "b"], [0.9, 0.2], categories=["a", "b", UNKNOWN])  # no abstention: nothing to confuse


# -- majority voting ------------------------------------------------------------------------
def test_overclustering_resolution_follows_celltypists_documented_rule():
    steps = {1: 5, 4_999: 5, 5_000: 10, 19_999: 10, 20_000: 15, 39_999: 15, 40_000: 20, 99_999: 20,
             100_000: 25, 199_999: 25, 200_000: 30, 10**7: 30}
    assert {n: overclustering_resolution(n) for n in steps} == steps


def test_majority_voting_gives_one_label_per_over_cluster():
    emb, blob = _blobs()
    rng = np.random.default_rng(1)
    names = np.array(["B", "T", "NK"])
    labels = names[blob].astype(object)
    flip = rng.random(len(labels)) < 0.2  # a fifth of the calls are wrong
    labels[flip] = rng.choice(names, flip.sum())
    out = refine_labels(labels, np.ones(len(labels)), emb, majority_voting=True, seed=0)
    clusters = out.over_clustering
    assert out.params["n_clusters"] == len(set(clusters)) > 3  # over-clustered: more clusters than blobs
    assert out.params["resolution"] == 5.0  # 120 cells: CellTypist's smallest resolution
    per_cluster = pd.DataFrame({"c": clusters, "mv": out.majority_voting, "call": labels})
    assert (per_cluster.groupby("c")["mv"].nunique() == 1).all()
    for _, cells in per_cluster.groupby("c"):  # the vote is the most frequent per-cell call
        counts = cells["call"].value_counts()
        assert counts[cells["mv"].iloc[0]] == counts.max()
    assert np.mean(out.majority_voting == names[blob]) > np.mean(labels == names[blob])  # the vote fixes calls


def test_over_clustering_is_seeded_and_groups_stay_apart():
    emb, _ = _blobs()
    np.testing.assert_array_equal(over_cluster(emb, seed=3), over_cluster(emb, seed=3))
    groups = np.where(np.arange(len(emb)) % 2 == 0, "test", "train")
    out = refine_labels(["x"] * len(emb), np.ones(len(emb)), emb, majority_voting=True, groups=groups)
    for cluster, group in zip(out.over_clustering, groups):
        assert cluster.startswith(f"{group}-")
    assert set(out.params["resolution"]) == {"test", "train"}


def test_a_large_group_is_over_clustered_on_a_sample_and_the_rest_joins_the_nearest_sampled_cell(tmp_path):
    import h5py

    from scgpt_protocol.data.store import subsample

    emb, blob = _blobs(n_per=60)
    labels = np.array(["B", "T", "NK"], dtype=object)[blob]
    with h5py.File(tmp_path / "emb.h5", "w") as f:  # as predict(out=...) stores it
        f["embeddings"] = emb.astype(np.float32)
    with h5py.File(tmp_path / "emb.h5", "r") as f:
        out = refine_labels(labels, np.ones(len(emb)), f["embeddings"], majority_voting=True, seed=2,
                            max_cluster_cells=50)
    sampled = subsample(np.ones(len(emb), dtype=bool), 50, seed=2)
    emb32 = emb.astype(np.float32)
    np.testing.assert_array_equal(out.over_clustering[sampled], over_cluster(emb32[sampled], resolution=5.0, seed=2))
    d = ((emb32[~sampled][:, None, :] - emb32[sampled][None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(out.over_clustering[~sampled], out.over_clustering[sampled][d.argmin(axis=1)])
    assert out.params["max_cluster_cells"] == 50 and out.params["resolution"] == 5.0
    assert (out.majority_voting == labels).mean() > 0.9  # well-separated blobs keep their label
    whole = refine_labels(labels, np.ones(len(emb)), emb, majority_voting=True, seed=2)  # 180 cells: under the cap
    np.testing.assert_array_equal(whole.over_clustering, over_cluster(emb, resolution=5.0, seed=2))


def test_majority_vote_ties_go_to_the_more_confident_label():
    assert majority_vote(["a", "b"], ["0", "0"], [0.4, 0.6]).tolist() == ["b", "b"]
    assert majority_vote(["b", "a"], ["0", "0"]).tolist() == ["a", "a"]  # then alphabetical


def test_annotate_writes_scanpy_style_keys(demo_prediction):
    adata, raw = demo_prediction
    refined = refine(raw, min_confidence=0.2, majority_voting=True, groups=adata.obs["split"])
    cells = adata.copy()
    annotate(cells, refined)
    obs = cells.obs
    assert list(obs["scgpt_label"].cat.categories) == [*raw.categories, UNKNOWN]
    assert {"scgpt_prediction", "scgpt_unknown", "scgpt_over_clustering", "scgpt_majority_voting"} <= set(obs)
    assert (obs["scgpt_label"].astype(str).to_numpy() == refined.labels).all()
    assert cells.uns["scgpt_annotation"]["min_confidence"] == 0.2
    assert cells.uns["scgpt_annotation"]["n_clusters"] == obs["scgpt_over_clustering"].nunique()
    result = evaluate_predictions(cells, refined, label_key="label", cells=cells.obs["split"] == "test")
    mv = result.metrics["refinement"]["majority_voting"]
    truth = result.predictions["true_label"].astype(str).to_numpy()
    assert mv["accuracy"] == pytest.approx(np.mean(truth == result.predictions["scgpt_majority_voting"].astype(str)))
    assert result.predictions["scgpt_over_clustering"].str.startswith("test-").all()
