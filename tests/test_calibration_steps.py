"""Calibration and label maps through the steps (issue 18): 02 records the temperature, predict applies it, the
calibrated probabilities drive ``Unknown``, 03 measures ECE before and after; the query's label map and its novel
types. A one-epoch tiny model on 200 demo cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from scgpt_protocol import load_model
from scgpt_protocol.adapt.saved import load_finetuned
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.annotate.calibration import calibrated, expected_calibration_error, fit_model_temperature
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.annotate.refinement import UNKNOWN, refine
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import EvaluateParams, FinetuneParams
from scgpt_protocol.data.label_map import LabelMapError
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.evaluate.calibration import calibration_report
from scgpt_protocol.evaluate.scoring import evaluate_predictions, evaluate_query, write_results
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD

FAST = dict(batch_size=16, max_seq_len=32, lr=1e-3, patience=0, epochs=1)


@pytest.fixture(scope="module")
def run(split_pbmc, tiny_checkpoint, tmp_path_factory):
    """A run folder with the prepared cells and a 1-epoch fine-tuned model (02 done, calibration not yet)."""
    run_dir = tmp_path_factory.mktemp("run")
    layout = RunLayout(run_dir).make_dirs()
    split_pbmc.write_h5ad(layout.prepared_adata)
    layout.step_params("preprocess").write_text(yaml.safe_dump({"adata_path": "x.h5ad", "label_key": "label"}))
    categories = sorted(split_pbmc.obs["label"].unique())
    params = FinetuneParams(run_dir=str(run_dir), device="cpu", **FAST)
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=layout)
    return layout, params


def _model(layout):
    return load_finetuned(layout.model_dir, device="cpu")


def _predict(model, manifest, adata, **kwargs):
    return predict(model, adata, categories=manifest["categories"], genes=manifest["genes"], max_seq_len=32,
                   batch_size=32, **kwargs)


def test_predict_divides_the_logits_by_the_temperature_and_keeps_the_raw_confidence(run, split_pbmc):
    model, manifest = _model(run[0])
    assert model.temperature is None  # no calibration recorded yet
    raw = _predict(model, manifest, split_pbmc[:80], temperature=None)
    auto = _predict(model, manifest, split_pbmc[:80])  # "auto" without a recorded temperature: raw
    assert raw.raw_confidence is None and auto.temperature is None
    np.testing.assert_allclose(auto.probabilities, raw.probabilities)
    hot = _predict(model, manifest, split_pbmc[:80], temperature=2.5)
    assert hot.temperature == 2.5
    np.testing.assert_array_equal(hot.codes, raw.codes)  # a temperature never changes the call
    np.testing.assert_allclose(hot.probabilities, calibrated(raw.probabilities, 2.5), atol=2e-5)
    np.testing.assert_allclose(hot.raw_confidence, raw.confidence, atol=1e-6)
    assert (hot.confidence < raw.confidence + 1e-6).all()  # T > 1 softens
    model.temperature = 2.5
    np.testing.assert_allclose(_predict(model, manifest, split_pbmc[:80]).probabilities, hot.probabilities)
    with pytest.raises(ValueError, match="positive number"):
        _predict(model, manifest, split_pbmc[:5], temperature=-1.0)


def test_calibrated_probabilities_drive_unknown(run, split_pbmc):
    model, manifest = _model(run[0])
    prediction = _predict(model, manifest, split_pbmc, temperature=3.0)
    threshold = float(np.median(prediction.raw_confidence))
    refined = refine(prediction, min_confidence=threshold)
    unknown = np.asarray(refined.labels) == UNKNOWN
    np.testing.assert_array_equal(unknown, prediction.confidence < threshold)  # the calibrated confidence decides
    assert unknown.sum() > (prediction.raw_confidence < threshold).sum()  # not the raw one
    adata = split_pbmc.copy()
    from scgpt_protocol.annotate.inference import annotate

    annotate(adata, refined)
    np.testing.assert_allclose(adata.obs["scgpt_label_confidence_raw"], prediction.raw_confidence)
    frame = evaluate_predictions(adata, refined, label_key="label").predictions
    assert {"scgpt_label_confidence", "scgpt_label_confidence_raw"} <= set(frame.columns)


def test_the_temperature_lowers_validation_nll_of_an_over_confident_model(run, split_pbmc):
    model, manifest = _model(run[0])
    with torch.no_grad():  # a deliberately over-confident head: every logit 25x larger
        model.cls_decoder.out_layer.weight.mul_(25)
        model.cls_decoder.out_layer.bias.mul_(25)
    record = fit_model_temperature(model, split_pbmc, categories=manifest["categories"], label_key="label",
                                   cells=(split_pbmc.obs["split"] == "val").to_numpy(), genes=manifest["genes"],
                                   max_seq_len=32)
    assert record["temperature"] > 2 and record["split"] == "val"
    assert record["nll_after"] < record["nll_before"]
    assert record["ece_after"] < record["ece_before"]
    assert record["n_cells"] == int((split_pbmc.obs["split"] == "val").sum())


def test_02_records_the_temperature_and_03_takes_it_or_fits_one(run, split_pbmc, capsys):
    from scgpt_protocol.protocol.steps import (
        FITTED_HERE,
        FROM_MANIFEST,
        model_temperature,
        save_temperature,
    )

    layout, params = run
    model, manifest = _model(layout)
    evaluate = EvaluateParams(run_dir=str(layout.run_dir), device="cpu", batch_size=32)
    fitted_here = model_temperature(layout, model, manifest, split_pbmc, evaluate, 32)
    assert fitted_here["source"] == FITTED_HERE
    record = save_temperature(layout, params)
    saved = json.loads((layout.model_dir / "manifest.json").read_text())["calibration"]
    assert saved["temperature"] == pytest.approx(record["temperature"])
    assert record["temperature"] == pytest.approx(fitted_here["temperature"], rel=1e-3)  # the same cells, the same fit
    model, manifest = _model(layout)
    assert model.temperature == pytest.approx(record["temperature"])
    taken = model_temperature(layout, model, manifest, split_pbmc, evaluate, 32)
    assert taken["source"] == FROM_MANIFEST and taken["temperature"] == pytest.approx(record["temperature"])
    off = EvaluateParams(run_dir=str(layout.run_dir), device="cpu", calibrate=False)
    assert model_temperature(layout, model, manifest, split_pbmc, off, 32) is None
    assert "calibrate=False" in capsys.readouterr().out


def test_the_baseline_is_calibrated_on_the_validation_cells_and_03_reports_ece(run, split_pbmc):
    raw = logistic_regression_baseline(split_pbmc, label_key="label")
    base = logistic_regression_baseline(split_pbmc, label_key="label", calibrate=True)
    assert raw.temperature is None and base.temperature is not None and base.calibration["split"] == "val"
    np.testing.assert_allclose(base.probabilities.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(base.probabilities.argmax(axis=1), raw.probabilities.argmax(axis=1))
    np.testing.assert_allclose(base.raw_confidence, raw.probabilities.max(axis=1), atol=1e-6)

    model, manifest = _model(run[0])
    test = (split_pbmc.obs["split"] == "test").to_numpy()
    prediction = _predict(model, manifest, split_pbmc, temperature=1.7)
    scgpt = evaluate_predictions(split_pbmc, prediction, label_key="label", cells=test)
    report = calibration_report(scgpt, base, fitted={"temperature": 1.7, "split": "val", "n_cells": 40})
    rec = report.record
    truth = split_pbmc.obs["label"][test].to_numpy()
    right = np.asarray(prediction.labels)[test] == truth
    assert rec["ece_before"] == pytest.approx(expected_calibration_error(prediction.raw_confidence[test], right))
    assert rec["ece_after"] == pytest.approx(expected_calibration_error(prediction.confidence[test], right))
    assert rec["temperature"] == 1.7 and rec["n_cells"] == int(test.sum()) and rec["split"] == "test"
    b_right = base.predictions.astype(str).to_numpy() == truth
    assert rec["baseline"]["ece_after"] == pytest.approx(expected_calibration_error(base.probabilities.max(1), b_right))
    assert set(report.tables) == {"scGPT raw", "scGPT calibrated", "baseline raw", "baseline calibrated"}
    uncalibrated = calibration_report(evaluate_predictions(split_pbmc, _predict(model, manifest, split_pbmc,
                                                                                temperature=None),
                                                           label_key="label", cells=test))
    assert uncalibrated.record["temperature"] is None and uncalibrated.record["ece_after"] is None


# -- the query's label map and its novel types ----------------------------------------------------
def _renamed(query: pd.Series) -> tuple[pd.Series, dict[str, str]]:
    mapping = {label: f"their {label.lower()}" for label in sorted(query.unique())}
    return query.map(mapping), {v: k for k, v in mapping.items()}


def _query_params(layout, path, label_map, **kwargs):
    return EvaluateParams(run_dir=str(layout.run_dir), query_path=str(path), query_label_key="label",
                          query_label_map=label_map, device="cpu", **kwargs)


def test_a_renamed_query_with_a_label_map_scores_like_the_original_names(run, split_pbmc, tmp_path):
    from scgpt_protocol.protocol.steps.evaluate import read_query

    layout, _ = run
    model, manifest = _model(layout)
    original = split_pbmc[split_pbmc.obs["split"] == "test"].copy()
    renamed = original.copy()
    renamed.obs["label"], back = _renamed(original.obs["label"].astype(str))
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    csv = tmp_path / "map.csv"
    pd.DataFrame({"label": list(back), "model": list(back.values())}).to_csv(csv, index=False)
    query, mapped = read_query(_query_params(layout, tmp_path / "renamed.h5ad", str(csv)), manifest)
    assert mapped.novel == [] and mapped.dropped == {}
    assert (query.obs["label_original"].astype(str) == renamed.obs["label"].astype(str).to_numpy()).all()
    scores = {}
    for name, adata in (("original", original), ("mapped", query)):
        base = logistic_regression_baseline(split_pbmc, label_key="label", query=adata, query_label_key="label")
        record = evaluate_query(model, adata, manifest=manifest, label_key="label", max_seq_len=32, baseline=base,
                                min_confidence=0.2, label_map=mapped if name == "mapped" else None)
        assert "novel" not in record
        scores[name] = {m: (r["accuracy"], r["macro_f1"], r["n_cells"]) for m, r in record["methods"].items()}
    assert scores["mapped"] == scores["original"] and set(scores["mapped"]) == {SCGPT_METHOD, BASELINE_METHOD}
    assert record["label_map"]["n_dropped"] == 0
    assert set(record["crosstab"].index) == set(back)  # the query's own names, as given


def test_a_novel_type_is_scored_apart_and_written(run, split_pbmc, tmp_path):
    from scgpt_protocol.protocol.steps.evaluate import read_query

    layout, _ = run
    model, manifest = _model(layout)
    query = split_pbmc[split_pbmc.obs["split"] == "test"].copy()
    labels = query.obs["label"].astype(str)
    novel_label = labels.value_counts().index[0]
    query.obs["label"] = np.where(labels == novel_label, "Megakaryocyte", labels)  # a type the model never saw
    dropped = labels.value_counts().index[1]
    query.write_h5ad(tmp_path / "q.h5ad")
    params = _query_params(layout, tmp_path / "q.h5ad", {dropped: None}, min_confidence=0.2)
    query, mapped = read_query(params, manifest)
    assert mapped.novel == ["Megakaryocyte"] and mapped.dropped == {dropped: int((labels == dropped).sum())}
    base = logistic_regression_baseline(split_pbmc, label_key="label", query=query, query_label_key="label")
    record = evaluate_query(model, query, manifest=manifest, label_key="label", max_seq_len=32, baseline=base,
                            min_confidence=0.2, label_map=mapped)
    n_novel, n_dropped = int((labels == novel_label).sum()), int((labels == dropped).sum())
    novel = record["novel"]
    assert novel["types"] == ["Megakaryocyte"] and novel["n_cells"] == n_novel
    for method in (SCGPT_METHOD, BASELINE_METHOD):
        entry = novel["methods"][method]["novel"]["Megakaryocyte"]
        assert entry["n_cells"] == n_novel and sum(entry["called"].values()) == n_novel
        all_cells = novel["methods"][method]["all_cells"]
        assert all_cells["n_cells"] == len(labels) - n_dropped and all_cells["n_novel"] == n_novel
        # the shared-type metrics leave the novel and the dropped cells out
        assert record["methods"][method]["n_cells"] == len(labels) - n_novel - n_dropped
    plain = evaluate_query(model, query, manifest=manifest, label_key="label", max_seq_len=32, baseline=base,
                           label_map=mapped)  # no abstention: the baseline's own metrics, on the shared types too
    assert {m: r["n_cells"] for m, r in plain["methods"].items()} == {
        SCGPT_METHOD: len(labels) - n_novel - n_dropped, BASELINE_METHOD: len(labels) - n_novel - n_dropped}
    calls = record["predictions"]["scgpt_label"].astype(str).to_numpy()
    is_novel = query.obs["label"].astype(str).to_numpy() == "Megakaryocyte"
    assert novel["methods"][SCGPT_METHOD]["novel"]["Megakaryocyte"]["unknown_rate"] == pytest.approx(
        np.mean(calls[is_novel] == UNKNOWN))
    assert record["crosstab"].loc["Megakaryocyte"].sum() == n_novel
    written = write_results(layout, predictions=record["predictions"], metrics={"methods": {}, "split": "test"},
                            query=record)
    saved = json.loads(written["metrics"].read_text())["query"]
    assert saved["novel"]["types"] == ["Megakaryocyte"] and saved["label_map"]["dropped"] == {dropped: n_dropped}
    assert pd.read_csv(written["query_crosstab"], index_col=0).loc["Megakaryocyte"].sum() == n_novel
    from scgpt_protocol.protocol.display.novel import crosstab_display, novel_display

    assert "Megakaryocyte" in novel_display(record["novel"]).data
    assert "Megakaryocyte" in crosstab_display(record["crosstab"]).to_html()


def test_each_bad_query_map_gives_its_error(run, split_pbmc, tmp_path):
    from scgpt_protocol.protocol.steps.evaluate import read_query

    layout, _ = run
    _, manifest = _model(layout)
    query = split_pbmc[:40].copy()
    query.write_h5ad(tmp_path / "q.h5ad")
    one_column = tmp_path / "one.csv"
    one_column.write_text("label\nB\n")
    first = str(query.obs["label"].iloc[0])
    cases = [
        (str(one_column), "a column is missing"),
        ({first: "Not a class"}, "to a class the model lacks"),
        ({label: None for label in query.obs["label"].astype(str).unique()}, "no cell has a label the model knows"),
        (str(tmp_path / "absent.csv"), "not found"),
    ]
    for spec, message in cases:
        with pytest.raises((LabelMapError, FileNotFoundError), match=message):
            read_query(_query_params(layout, tmp_path / "q.h5ad", spec), manifest)


def test_03_next_points_to_the_reliability_diagram_when_the_confidence_is_off(tmp_path):
    from scgpt_protocol.protocol.display.banners import next_steps

    layout = RunLayout(tmp_path).make_dirs()
    for ece_after, expected in ((0.25, True), (0.03, False)):
        layout.write_json(layout.metrics, {"methods": {}, "calibration": {"temperature": 1.4, "ece_before": 0.3,
                                                                          "ece_after": ece_after}})
        text = next_steps(layout, "03_evaluate").text
        assert ("reliability.png" in text) is expected, text
    assert "0.25" not in text
