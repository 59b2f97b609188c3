"""Fine-tuning: strategies, early stopping, resume after an interruption, saved artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scgpt_protocol import load_model
from scgpt_protocol.adapt.saved import load_finetuned
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import FinetuneParams

FAST = dict(batch_size=16, max_seq_len=48, lr=1e-3, patience=0)


@pytest.fixture(scope="module")
def categories(split_pbmc):
    return sorted(split_pbmc.obs["label"].unique())


def _run(split_pbmc, categories, checkpoint, run_dir, callback=None, **overrides):
    params = FinetuneParams(run_dir=str(run_dir), **{**FAST, **overrides})
    model = load_model(checkpoint, n_classes=len(categories), device="cpu")
    result = finetune(model, split_pbmc, params, label_key="label", categories=categories,
                      layout=RunLayout(run_dir), on_epoch_end=callback)
    return result, model


def test_full_training_writes_best_model_history_and_summary(split_pbmc, categories, tiny_checkpoint, tmp_path):
    result, model = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=3)
    layout = RunLayout(tmp_path)
    assert list(result.history["epoch"]) == [1, 2, 3]
    assert result.history["train_loss"].notna().all() and (result.history["lr"].diff().dropna() < 0).all()
    assert result.best_epoch == int(result.history.loc[result.history["val_macro_f1"].idxmax(), "epoch"])
    assert result.trainable_parameters == result.total_parameters
    saved, manifest = load_finetuned(layout.model_dir, device="cpu")
    assert manifest["categories"] == categories and manifest["best_epoch"] == result.best_epoch
    assert manifest["strategy"] == "full" and manifest["base_checkpoint"]["sha256"]
    assert (layout.model_dir / "best_model.pt").is_file()  # full: the released layout, loadable elsewhere
    for key, value in saved.state_dict().items():  # the returned model holds the best epoch's weights
        assert torch.equal(value, model.state_dict()[key]), key
    assert layout.history.is_file() and json.loads(layout.train_summary.read_text())["best_epoch"] == result.best_epoch


def test_head_strategy_trains_only_the_head(split_pbmc, categories, tiny_checkpoint, tmp_path):
    before = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu").state_dict()
    result, model = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=2, strategy="head")
    n_head = sum(p.numel() for p in model.cls_decoder.parameters())
    assert result.trainable_parameters == n_head < result.total_parameters
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("cls_decoder."):
            continue
        assert torch.equal(value, after[key]), f"{key} changed under strategy 'head'"
    assert not torch.equal(before["cls_decoder.out_layer.weight"], after["cls_decoder.out_layer.weight"])


def test_resume_after_interruption_ends_like_an_uninterrupted_run(split_pbmc, categories, tiny_checkpoint, tmp_path):
    straight, model_a = _run(split_pbmc, categories, tiny_checkpoint, tmp_path / "a", epochs=4, class_weighted=True)

    def disconnect(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # a Colab disconnect after epoch 2 was saved

    with pytest.raises(KeyboardInterrupt):
        _run(split_pbmc, categories, tiny_checkpoint, tmp_path / "b", disconnect, epochs=4, class_weighted=True)
    resumed, model_b = _run(split_pbmc, categories, tiny_checkpoint, tmp_path / "b", epochs=4, class_weighted=True)
    assert resumed.resumed_from_epoch == 3
    cols = ["epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr"]
    assert straight.history[cols].equals(resumed.history[cols])
    assert resumed.best_epoch == straight.best_epoch
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


def test_resume_with_other_parameters_is_refused(split_pbmc, categories, tiny_checkpoint, tmp_path):
    _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"other parameters \{'lr': \(0\.001, 0\.01\)\}.*new run_dir.*resume=False"):
        _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=2, lr=1e-2)
    result, _ = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=1, lr=1e-2, resume=False)
    assert result.resumed_from_epoch is None


def test_early_stopping_keeps_the_best_epoch(split_pbmc, categories, tiny_checkpoint, tmp_path):
    result, _ = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=30, patience=1, lr=0.0)
    # with lr 0 nothing improves after epoch 1: stop at epoch 2, keep epoch 1
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 1


def test_bad_input(split_pbmc, categories, tiny_checkpoint, tmp_path):
    with pytest.raises(KeyError, match=r"'celltype' not in adata.obs"):
        finetune(load_model(tiny_checkpoint), split_pbmc, FinetuneParams(run_dir=str(tmp_path)),
                 label_key="celltype", categories=categories, layout=RunLayout(tmp_path))
    with pytest.raises(ValueError, match=r"not among the run's categories"):
        finetune(load_model(tiny_checkpoint), split_pbmc, FinetuneParams(run_dir=str(tmp_path)),
                 label_key="label", categories=categories[:2], layout=RunLayout(tmp_path))


def test_resume_after_the_split_changed_is_refused(split_pbmc, categories, tiny_checkpoint, tmp_path):
    """Re-running 01 with another split must not resume a model trained on today's test cells."""
    _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=1)
    resplit = split_pbmc.copy()
    resplit.obs["split"] = np.random.default_rng(1).choice(["train", "val", "test"], resplit.n_obs, p=[0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"holds a training with other data: the prepared cells, split"):
        _run(resplit, categories, tiny_checkpoint, tmp_path, epochs=2)


def test_data_fingerprint_hashed_by_slices_equals_the_whole_join():
    """The fingerprint is hashed a slice of cells at a time (flat memory on atlases); its bytes are those of
    joining every name, split and label at once, so runs started before that change still resume."""
    import hashlib

    import pandas as pd

    from scgpt_protocol.adapt.cells import data_fingerprint
    from scgpt_protocol.data.demo import make_toy_adata

    adata = make_toy_adata(n_cells=70_000, n_genes=5)  # more cells than one 65,536-cell slice
    rng = np.random.default_rng(0)
    adata.obs["split"] = pd.Categorical(np.array(["train", "val", "test"])[rng.integers(0, 3, adata.n_obs)])
    categories = sorted(adata.obs["cell_type"].astype(str).unique())
    split = adata.obs["split"].astype(str).to_numpy()
    fit = np.isin(split, ["train", "val"])
    digest = hashlib.sha256()
    for part in (list(adata.var_names), categories, list(adata.obs_names[fit]), list(split[fit]),
                 list(adata.obs["cell_type"].astype(str).to_numpy()[fit]), ["abc"]):
        digest.update("\x1f".join(part).encode() + b"\x1e")
    assert data_fingerprint(adata, "cell_type", categories, base_sha256="abc") == digest.hexdigest()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)  # a plain string column hashes the same
    assert data_fingerprint(adata, "cell_type", categories, base_sha256="abc") == digest.hexdigest()
    adata.obs.loc[adata.obs_names[np.flatnonzero(fit)[-1]], "cell_type"] = categories[0] + "x"
    assert data_fingerprint(adata, "cell_type", categories + [categories[0] + "x"], base_sha256="abc") != \
        digest.hexdigest()


def test_the_same_training_again_resumes_or_says_there_is_nothing_to_do(split_pbmc, categories, tiny_checkpoint,
                                                                        tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="scgpt_protocol")
    first, _ = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=2)
    assert "resumed from" not in caplog.text and "already trained" not in caplog.text
    caplog.clear()
    more, _ = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=3)  # raising epochs continues
    assert "resumed from epoch 2: epochs 3-3 to go" in caplog.text and list(more.history["epoch"]) == [1, 2, 3]
    assert more.resumed_from_epoch == 3 and "full epoch 3/3" in caplog.text and "full epoch 1/3" not in caplog.text
    caplog.clear()
    again, _ = _run(split_pbmc, categories, tiny_checkpoint, tmp_path, epochs=3)
    assert "already trained: nothing to do (3 of 3 epochs done" in caplog.text and "full epoch" not in caplog.text
    assert again.history.equals(more.history)
    assert again.seconds == round(sum(more.history["seconds"]), 1)  # its epochs' time, not this call's


def test_parameters_left_at_none_take_the_recipe_of_the_checkpoint(split_pbmc, categories, tiny_checkpoint, tmp_path):
    from scgpt_protocol.core.params import RECIPES

    params = FinetuneParams(run_dir=str(tmp_path), epochs=1, max_seq_len=48)  # lr, batch_size... left at None
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=RunLayout(tmp_path),
             base_checkpoint={"checkpoint": str(tiny_checkpoint), "kind": "demo", "sha256": None})
    _, manifest = load_finetuned(RunLayout(tmp_path).model_dir, device="cpu")
    trained = manifest["training"]
    demo = RECIPES["demo"]["finetune"]
    assert trained["max_seq_len"] == 48  # set by hand: kept
    assert {k: trained[k] for k in ("lr", "adam_eps", "batch_size", "class_weighted")} == {
        k: demo[k] for k in ("lr", "adam_eps", "batch_size", "class_weighted")}
    pretrained = params.with_recipe("released")  # a released or folder checkpoint: the published values
    recipe = (pretrained.lr, pretrained.adam_eps, pretrained.batch_size, pretrained.class_weighted)
    assert recipe == (1e-4, 1e-4, 32, False)
    assert (
        params.with_recipe("folder").max_seq_len == 48 and FinetuneParams(amp=False).with_recipe(None).adam_eps == 1e-8
    )
