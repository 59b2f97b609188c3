"""Strategy comparison on real data, saving/loading what was trained, and the runner's bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from scgpt_protocol.adapt.saved import TRAINABLE_FILE, load_finetuned, save_finetuned
from scgpt_protocol.adapt.train import finetune, strategy_config
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.core.errors import CheckpointError, GeneMatchError
from scgpt_protocol.core.params import STRATEGY_NAMES, FinetuneParams, ParamsError
from scgpt_protocol.data.demo import load_demo
from scgpt_protocol.tl.annotation import AnnotationRunner, adapt_annotation, inspect_annotation_data

FAST = dict(epochs=1, max_seq_len=32, batch_size=32, lr=1e-3, patience=0)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def bundle(demo, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    runner = adapt_annotation(demo, "bulk_labels", checkpoint=tiny_checkpoint, strategies=("probe", "head", "lora"),
                              output_dir=out, **FAST)
    return runner, out


def test_adapt_annotation_ranks_strategies_and_writes_the_bundle(bundle):
    runner, out = bundle
    table = runner.comparison
    assert list(table["strategy"][:3]) == sorted(
        ["probe", "head", "lora"], key=lambda s: -runner.outcomes[s].train.best_val_macro_f1
    )
    assert table["strategy"].iloc[-1].startswith("baseline: logistic regression")
    assert table["best"].sum() == 1 and table.loc[table["best"], "strategy"].item() == runner.best_strategy
    scgpt_rows = table[~table["strategy"].str.startswith("baseline")]
    assert scgpt_rows["test_macro_f1"].between(0, 1).all() and (scgpt_rows["trainable_parameters"] > 0).all()
    assert (scgpt_rows["train_seconds"] > 0).all() and (scgpt_rows["saved_mb"] > 0).all()
    lora, head = (runner.outcomes[s] for s in ("lora", "head"))
    assert lora.train.trainable_parameters > head.train.trainable_parameters  # LoRA trains the head and more
    for name in (
        "comparison.csv",
        "comparison.md",
        "figures/confusion_best.png",
        "figures/per_class_f1.png",
        "split.csv",
    ):
        assert (out / name).is_file(), name
    assert "| strategy |" in (out / "comparison.md").read_text()
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["strategy"] == runner.best_strategy and len(manifest["categories"]) == 10
    assert manifest["base_checkpoint"]["sha256"] and manifest["genes"] and manifest["versions"]["torch"]


def test_runner_annotates_and_reloads_with_identical_predictions(bundle, demo):
    runner, out = bundle
    cells = demo[:60].copy()
    runner.annotate_adata(cells)
    assert {"scgpt_label", "scgpt_label_confidence", "scgpt_label_code"} <= set(cells.obs) and "X_scgpt" in cells.obsm
    assert "scgpt_label_confidence_raw" in cells.obs  # calibrated on the validation cells after fit()
    reloaded = AnnotationRunner.load(out / "model", device="cpu")
    assert reloaded.best_strategy == runner.best_strategy
    assert reloaded.model.temperature == runner.model.temperature == runner.manifest["calibration"]["temperature"]
    np.testing.assert_allclose(reloaded.predict(cells).probabilities, runner.predict(cells).probabilities, atol=1e-6)


def test_runner_annotates_with_abstention_and_majority_voting(bundle, demo):
    runner, _ = bundle
    cells = demo[:120].copy()
    plain = runner.predict(cells)
    threshold = float(np.median(plain.confidence))
    runner.annotate_adata(cells, min_confidence=threshold, majority_voting=True)
    obs = cells.obs
    below = plain.confidence < threshold
    assert (obs["scgpt_label"].astype(str)[below] == "Unknown").all() and obs["scgpt_unknown"].sum() == below.sum()
    assert (obs["scgpt_prediction"].astype(str).to_numpy() == plain.labels).all()
    assert obs.groupby("scgpt_over_clustering", observed=True)["scgpt_majority_voting"].nunique().eq(1).all()
    assert cells.uns["scgpt_annotation"]["majority_voting"] is True


def test_resumed_comparison_reuses_saved_strategies(bundle, demo, tiny_checkpoint, caplog):
    runner, out = bundle
    caplog.set_level("INFO", logger="scgpt_protocol")
    again = adapt_annotation(demo, "bulk_labels", checkpoint=tiny_checkpoint, strategies=("probe", "head", "lora"),
                             output_dir=out, **FAST)
    assert "reusing the model saved" in caplog.text
    assert again.comparison["test_macro_f1"].tolist() == runner.comparison["test_macro_f1"].tolist()
    for name, outcome in runner.outcomes.items():  # the saved confusion matrix comes back as it was
        reused = again.outcomes[name].test_confusion
        assert reused.attrs == outcome.test_confusion.attrs
        np.testing.assert_allclose(reused.to_numpy(), outcome.test_confusion.to_numpy())


@pytest.fixture(scope="module")
def split_demo(demo):
    adata = demo[:240].copy()
    adata.obs["split"] = np.random.default_rng(0).choice(["train", "val", "test"], adata.n_obs, p=[0.6, 0.2, 0.2])
    return adata


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_saves_only_what_it_trained_and_reloads_identically(
    strategy, split_demo, tiny_checkpoint, tmp_path
):
    from scgpt_protocol import load_model

    params = FinetuneParams(run_dir=str(tmp_path), **FAST)
    cats = sorted(split_demo.obs["bulk_labels"].astype(str).unique())
    model = load_model(tiny_checkpoint, n_classes=len(cats), device="cpu")
    finetune(model, split_demo, params, label_key="bulk_labels", categories=cats, strategy=strategy)
    save_finetuned(
        model,
        tmp_path / "m",
        strategy=strategy,
        config=strategy_config(params, strategy),
        label_key="bulk_labels",
        categories=cats,
        genes=list(split_demo.var_names),
    )
    reloaded, manifest = load_finetuned(tmp_path / "m", device="cpu")
    assert manifest["strategy"] == strategy
    a = predict(model, split_demo[:40], categories=cats, max_seq_len=32).probabilities
    b = predict(reloaded, split_demo[:40], categories=cats, max_seq_len=32).probabilities
    np.testing.assert_allclose(a, b, atol=1e-6)
    saved = sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    full_size = (tiny_checkpoint / "best_model.pt").stat().st_size
    if strategy == "full":
        assert (tmp_path / "m" / "best_model.pt").is_file()  # released layout
    else:
        assert (tmp_path / "m" / TRAINABLE_FILE).is_file() and saved < 0.5 * full_size, (saved, full_size)


def test_mismatching_base_checkpoint_is_an_error(split_demo, tiny_checkpoint, tmp_path):
    from scgpt_protocol import load_model, make_tiny_checkpoint

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    params = FinetuneParams(run_dir=str(tmp_path), **FAST)
    cats = sorted(split_demo.obs["bulk_labels"].astype(str).unique())
    model = load_model(base, n_classes=len(cats), device="cpu")
    finetune(model, split_demo, params, label_key="bulk_labels", categories=cats, strategy="lora")
    save_finetuned(
        model,
        tmp_path / "m",
        strategy="lora",
        config=strategy_config(params, "lora"),
        label_key="bulk_labels",
        categories=cats,
        genes=list(split_demo.var_names),
    )
    make_tiny_checkpoint(base, list(split_demo.var_names), d_model=32, nheads=4, d_hid=64, seed=1)  # another model
    with pytest.raises(
        CheckpointError, match=r"trained on one with .*adapter weights would be applied to another model"
    ):
        AnnotationRunner.load(tmp_path / "m", device="cpu")


def test_bad_input(bundle, demo, tiny_checkpoint, tmp_path):
    runner, _ = bundle
    with pytest.raises(ValueError, match=r"unknown strategy \['loraa'\]; valid strategies: \['probe', 'head'"):
        runner.fit(["loraa"])
    with pytest.raises(ParamsError, match=r"unknown setting\(s\) \['epoch'\]"):
        adapt_annotation(demo, "bulk_labels", checkpoint=tiny_checkpoint, output_dir=tmp_path, epoch=3)
    with pytest.raises(ParamsError, match=r"lora_r=0 .* expected >= 1"):
        adapt_annotation(demo, "bulk_labels", checkpoint=tiny_checkpoint, output_dir=tmp_path, lora_r=0)
    few = demo[:, :100].copy()  # 100 of the 765 genes the model was trained on
    with pytest.raises(GeneMatchError, match=r"holds 100 of the 765 genes of the model.s training genes \(13%\)"):
        runner.predict(few)


def test_inspect_annotation_data(demo, tiny_checkpoint):
    report = inspect_annotation_data(demo, "bulk_labels", checkpoint=tiny_checkpoint)
    assert report.genes_matched == 765 and report.min_class_count == 8 and report.value_kind == "log-normalised"
    assert "bulk_labels" in str(report)


def test_predict_uses_only_the_training_genes(bundle, demo):
    """Extra genes in new data (e.g. all genes, while training used HVGs) must not enter the input."""
    import copy

    runner, _ = bundle
    subset = copy.copy(runner)
    subset.manifest = {**runner.manifest, "genes": list(demo.var_names[:500])}  # as if trained on 500 genes
    cells = demo[:30].copy()
    np.testing.assert_allclose(subset.predict(cells).probabilities,
                               subset.predict(cells[:, :500].copy()).probabilities, atol=1e-6)
    assert not np.allclose(runner.predict(cells).probabilities, subset.predict(cells).probabilities)
