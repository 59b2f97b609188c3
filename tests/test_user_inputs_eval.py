"""Inputs real users bring (round two), steps 03 and 04: a query that holds training cells, a reference equal to
its query, labels that differ by case or spaces, a single-class test split, gene symbols in a var column.
A one-epoch tiny model on 200 demo cells."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from scgpt_protocol import load_model
from scgpt_protocol.adapt.saved import load_finetuned
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import EvaluateParams, FinetuneParams, ZeroshotParams
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.evaluate.scoring import evaluate_query, write_results
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD, classification_metrics

FAST = dict(batch_size=16, max_seq_len=32, lr=1e-3, patience=0, epochs=1)


@pytest.fixture(scope="module")
def run(split_pbmc, tiny_checkpoint, tmp_path_factory):
    """A run folder: 01's parameters naming the input file, the prepared cells, a 1-epoch fine-tuned model."""
    run_dir = tmp_path_factory.mktemp("run")
    layout = RunLayout(run_dir).make_dirs()
    source = run_dir.parent / "input.h5ad"
    split_pbmc.write_h5ad(source)
    layout.step_params("preprocess").write_text(yaml.safe_dump({"adata_path": str(source), "label_key": "label"}))
    categories = sorted(split_pbmc.obs["label"].unique())
    params = FinetuneParams(run_dir=str(run_dir), device="cpu", **FAST)
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=layout)
    return layout, source


def test_a_03_query_holding_training_cells_is_warned_about_and_scored_apart(run, split_pbmc):
    from scgpt_protocol.data.read import read_adata
    from scgpt_protocol.protocol.steps.zeroshot import training_overlap

    layout, source = run
    query = read_adata(str(source))  # the training file itself, as a user passed it
    overlap = training_overlap(layout, split_pbmc, query, str(source))
    n_trained = int(split_pbmc.obs["split"].isin(["train", "val"]).sum())
    assert overlap.same_file and overlap.n_seen == n_trained
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    baseline = logistic_regression_baseline(split_pbmc, label_key="label", query=query)
    with pytest.warns(UserWarning, match=rf"{n_trained} of 200 cells of the query are also cells of the run's train "
                                         r"and validation cells \(the same file, by sha256\)"):
        record = evaluate_query(model, query, manifest=manifest, label_key="label", max_seq_len=32,
                                baseline=baseline, overlap=overlap)
    apart = record["overlap"]["methods"]
    assert apart["seen cells"][SCGPT_METHOD]["n_cells"] == n_trained
    assert apart["unseen cells"][SCGPT_METHOD]["n_cells"] == 200 - n_trained
    assert set(apart["unseen cells"]) == {SCGPT_METHOD, BASELINE_METHOD}
    written = write_results(layout, predictions=record["predictions"], metrics={"methods": {}, "split": "test"},
                            query=record)
    saved = json.loads(written["metrics"].read_text())["query"]
    assert saved["overlap"]["n_cells"] == n_trained and saved["overlap"]["same_file"] is True
    assert any("scored apart" in w for w in saved["warnings"])

    other = split_pbmc[split_pbmc.obs["split"] == "test"].copy()
    other.obs_names = [f"new{i}" for i in range(other.n_obs)]
    assert not training_overlap(layout, split_pbmc, other, None)  # new cells, another file: nothing to say


def test_query_labels_in_another_case_or_with_spaces(run, split_pbmc):
    layout, _ = run
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    query = split_pbmc[:60].copy()
    labels = query.obs["label"].astype(str)
    first = labels.iloc[0]
    query.obs["label"] = np.where(labels == first, first.lower(), labels + " ")  # spaces: trimmed, still scored
    expected = re.escape(f"training classes only when case is ignored: {first.lower()!r} ~ {first!r}")
    with pytest.warns(UserWarning, match=expected):
        record = evaluate_query(model, query, manifest=manifest, label_key="label", max_seq_len=32)
    table = record["predictions"]
    assert not table["true_label"].str.endswith(" ").any()
    assert record["warnings"] and first.lower() in record["warnings"][0]


def test_a_single_class_test_split_gets_a_caveat(run, split_pbmc):
    from scgpt_protocol.annotate.inference import predict
    from scgpt_protocol.evaluate.scoring import evaluate_predictions

    m = classification_metrics(["B", "B", "B"], ["B", "B", "B"])
    assert m["accuracy"] == 1.0 and m["notes"][0].startswith("single class: every scored cell is 'B'")
    layout, _ = run
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    one = (split_pbmc.obs["label"] == split_pbmc.obs["label"].iloc[0]).to_numpy()
    prediction = predict(model, split_pbmc, categories=manifest["categories"], genes=manifest["genes"], max_seq_len=32)
    with pytest.warns(UserWarning, match="single class"):
        result = evaluate_predictions(split_pbmc, prediction, label_key="label", cells=one)
    assert any(n.startswith("single class") for n in result.metrics["notes"])


def test_a_single_class_test_split_is_warned_about_at_01():
    from scgpt_protocol.core.params import PreprocessParams
    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.pp.in_memory import prepare

    adata = make_toy_adata(n_cells=120, n_genes=40, n_labels=2)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == "type_1")[4:]] = "type_0"  # type_1 keeps 4 cells: train only
    adata.obs["cell_type"] = labels
    vocab = {f"GENE{i}": i for i in range(40)}
    with pytest.warns(UserWarning) as caught:
        prepare(adata, PreprocessParams(label_key="cell_type", min_cells_per_class=5), vocab)
    assert any("the test split holds one class only ('type_0'" in str(w.message) for w in caught)


def test_04_reference_equal_to_its_query_is_warned_and_scored_apart(run, split_pbmc, pbmc, tiny_model, tmp_path):
    from scgpt_protocol.annotate.zeroshot import zeroshot_annotate
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    layout, source = run
    params = ZeroshotParams(run_dir=str(layout.run_dir), reference_path=str(source), query_path=str(source),
                            label_key="label")
    with pytest.warns(UserWarning, match="reference_path and query_path are the same file"):
        reference, query, label_key, _ = zeroshot_inputs(layout, params)
    reference, query = reference[:80].copy(), query[:80].copy()
    with pytest.warns(UserWarning, match="80 of 80 cells of the query are also cells of the voting reference cells"):
        result = zeroshot_annotate(reference, query, tiny_model, label_key=label_key, k=5, max_seq_len=32)
    assert result.metrics["overlap"]["n_cells"] == 80
    assert result.metrics["overlap"]["methods"]["seen cells"]["knn_vote"]["n_cells"] == 80
    assert any("scored apart" in n for n in result.metrics["notes"])
    from scgpt_protocol.annotate.zeroshot import write_zeroshot

    write_zeroshot(RunLayout(tmp_path), result)
    saved = json.loads(RunLayout(tmp_path).zeroshot_metrics.read_text())
    assert saved["overlap"]["n_cells"] == 80 and "seen cells" in saved["overlap"]["methods"]


def test_gene_symbol_key_for_the_query_and_the_reference_in_03_and_04(run, split_pbmc, tmp_path):
    from scgpt_protocol.core.errors import InputDataError
    from scgpt_protocol.data.read import read_with_symbols
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    layout, _ = run
    ensembl = split_pbmc[:30].copy()
    ensembl.var["symbol"] = ensembl.var_names.to_numpy()
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(ensembl.n_vars)]
    path = tmp_path / "ensembl.h5ad"
    ensembl.write_h5ad(path)
    assert EvaluateParams(query_gene_symbol_key="symbol").query_gene_symbol_key == "symbol"
    query = read_with_symbols(str(path), "symbol", what="the query", name="query_gene_symbol_key")
    assert list(query.var_names) == list(split_pbmc.var_names)
    assert query.var["original_var_name"].iloc[0] == "ENSG00000000000"
    with pytest.raises(InputDataError, match=r"query_gene_symbol_key='gene_name' is not a column .* \['symbol'\]"):
        read_with_symbols(str(path), "gene_name", what="the query", name="query_gene_symbol_key")
    params = ZeroshotParams(run_dir=str(layout.run_dir), query_path=str(path), reference_path=str(path),
                            gene_symbol_key="symbol", label_key="label")
    with pytest.warns(UserWarning, match="same file"):
        reference, query, _, _ = zeroshot_inputs(layout, params)
    assert list(reference.var_names) == list(query.var_names) == list(split_pbmc.var_names)


def test_04_query_labels_in_another_case_get_a_hint(pbmc, tiny_model):
    from scgpt_protocol.annotate.zeroshot import zeroshot_annotate

    reference = pbmc[:60, :300].copy()
    reference.obs["label"] = np.where(np.arange(60) % 2, "T cell", "B cell")
    query = pbmc[60:80, :300].copy()
    query.obs["label"] = np.where(np.arange(20) % 2, "t cell", "B cell ")  # another case; a trailing space
    result = zeroshot_annotate(reference, query, tiny_model, label_key="label", k=5, max_seq_len=32)
    note = next(n for n in result.notes if "absent from the reference" in n)
    assert "'t cell' ~ 'T cell'" in note and "'B cell '" not in note  # trimmed, 'B cell ' is a reference label
