"""The four notebooks, executed headless (runner + papermill, params/ci) and interactively (nbclient)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import anndata as ad
import nbformat
import pandas as pd
import pytest
import yaml

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import STEPS, ParamsError
from scgpt_protocol.protocol.run.runner import RunDirInUse, RunFailed, run_protocol

ROOT = Path(__file__).resolve().parent.parent


def test_runner_leaves_reports_html_and_manifest(ci_run):
    layout, result = ci_run
    assert [s.step for s in result.steps] == list(STEPS)
    for step in STEPS:
        assert (layout.reports_dir / f"{step}.ipynb").is_file()
        assert (layout.reports_dir / f"{step}.html").is_file()
        report = nbformat.read(layout.reports_dir / f"{step}.ipynb", as_version=4)
        assert any(c.metadata.get("tags") == ["injected-parameters"] for c in report.cells)
    manifest = json.loads(layout.run_manifest.read_text())
    assert manifest["status"] == "finished"
    assert set(manifest["steps"]) == set(STEPS) and all(s["seconds"] > 0 for s in manifest["steps"].values())
    assert manifest["versions"]["torch"] and manifest["checksums"]["checkpoint"]["sha256"]
    assert manifest["steps"]["02_finetune"]["params"]["epochs"] == 2


def test_artifacts_of_every_step(ci_run):
    layout, _ = ci_run
    prepared = ad.read_h5ad(layout.prepared_adata)
    assert set(prepared.obs["split"].cat.categories) == {"train", "val", "test"}
    n_test = int((prepared.obs["split"] == "test").sum())

    history = pd.read_csv(layout.history)
    assert list(history["epoch"]) == [1, 2]
    manifest = json.loads((layout.model_dir / "manifest.json").read_text())
    assert manifest["strategy"] == "full" and len(manifest["categories"]) == 10
    assert manifest["cls_value"] == 0.0 and manifest["training"]["max_seq_len"] == 64
    # params/ci/03 sets no max_seq_len: 03 predicts at the length the model was trained with
    assert "predicting at the training length max_seq_len=64" in (layout.logs_dir / "evaluate.log").read_text()

    predictions = pd.read_csv(layout.predictions, index_col=0)
    assert len(predictions) == n_test and predictions.index.is_unique  # one prediction per test cell
    metrics = json.loads(layout.metrics.read_text())
    for method in ("scGPT (fine-tuned)", "logistic regression (log1p-CP10k HVG)"):
        values = metrics["methods"][method]
        for key in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy"):
            assert 0.0 <= values[key] <= 1.0, (method, key)
    assert metrics["methods"]["logistic regression (log1p-CP10k HVG)"]["accuracy"] > 0.7  # real signal in the data
    evaluated = ad.read_h5ad(layout.evaluated_adata)
    assert {"scgpt_label", "scgpt_label_confidence"} <= set(evaluated.obs) and "X_scgpt" in evaluated.obsm

    zs = pd.read_csv(layout.zeroshot_predictions, index_col=0)
    assert len(zs) == n_test and zs["scgpt_zeroshot_confidence"].between(0, 1).all()
    assert 0.0 <= json.loads(layout.zeroshot_metrics.read_text())["knn_vote"]["accuracy"] <= 1.0
    for name in ("qc", "class_counts", "training_curves", "confusion", "per_class_f1", "umap", "zeroshot_umap"):
        assert layout.figure(name).is_file(), name


def test_reports_show_figures_as_images(ci_run):
    layout, _ = ci_run
    report = nbformat.read(layout.reports_dir / "03_evaluate.ipynb", as_version=4)
    images = [o for c in report.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3


def _outputs(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        parts.extend(str(v) for k, v in o.get("data", {}).items() if k in ("text/plain", "text/html", "text/markdown"))
    return "\n".join(parts)


def test_reports_read_in_one_pass(ci_run):
    """Titled, no line repeated more than 3 times, the demo caveat shown once as a banner."""
    layout, _ = ci_run
    for step in STEPS:
        html = (layout.reports_dir / f"{step}.html").read_text()
        title = re.search(r"<title>(.*?)</title>", html, re.S).group(1)
        assert step in title and layout.run_dir.name in title, title
        report = nbformat.read(layout.reports_dir / f"{step}.ipynb", as_version=4)
        lines = Counter(line.strip() for c in report.cells if c.cell_type == "code" for o in c.outputs
                        if o.output_type == "stream" for line in o.text.splitlines() if line.strip())
        line, count = lines.most_common(1)[0]
        assert count <= 3, (step, line, count)
        banners = [c for c in report.cells if c.cell_type == "code" and "Demo checkpoint." in _outputs(c)]
        assert len(banners) == 1, step
        assert "RANDOMLY INITIALISED" not in "".join(o.get("text", "") for c in report.cells
                                                      for o in c.get("outputs", []))  # not as raw stdout


def test_03_and_04_end_with_a_rounded_summary_of_all_three_methods(ci_run):
    layout, _ = ci_run
    for step in ("03_evaluate", "04_zeroshot"):
        cells = nbformat.read(layout.reports_dir / f"{step}.ipynb", as_version=4).cells
        heading = next(
            i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Summary")
        )
        assert [c.cell_type for c in cells[heading + 1 :]] == [
            "code",
            "markdown",
            "code",
            "markdown",
        ]  # summary, next, help
        html = next(o["data"]["text/html"] for o in cells[heading + 1].outputs if "text/html" in o.get("data", {}))
        for name in (
            "scGPT fine-tuned",
            "baseline",
            "zero-shot kNN",
            "Accuracy",
            "Macro-F1",
            "Weighted-F1",
            "n cells",
            "Verdict",
            "demo",
        ):
            assert name in html, (step, name)
        numbers = re.findall(r"<td[^>]*>\s*([0-9][0-9.,]*)\s*</td>", html)
        assert numbers and all(re.fullmatch(r"\d\.\d{3}|[\d,]+", n) for n in numbers), numbers
        rows = 3 if step == "04_zeroshot" else 2  # zero-shot has numbers once 04 has run
        assert len(numbers) == 4 * rows, (step, numbers)


def test_one_palette_for_the_run(ci_run):
    layout, _ = ci_run
    labels = json.loads(layout.labels.read_text())
    colors = labels["colors"]
    assert list(colors) == [*labels["categories"], "Unknown"] and len(set(colors.values())) == len(colors)
    evaluated = ad.read_h5ad(layout.evaluated_adata)
    key = labels["label_key"]
    assert list(evaluated.uns[f"{key}_colors"]) == [colors[c] for c in evaluated.obs[key].cat.categories]
    for name in ("umap", "zeroshot_umap", "per_class_f1", "class_counts"):
        assert layout.figure(name).with_suffix(".pdf").is_file(), name


def test_a_finished_run_is_not_overwritten(ci_run):
    layout, _ = ci_run
    with pytest.raises(RunDirInUse, match="holds a finished run.*--force"):
        run_protocol(ROOT / "params" / "ci", layout.run_dir, steps=["01"])


def test_run_dir_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirInUse, match="not empty and holds no run manifest"):
        run_protocol(ROOT / "params" / "ci", tmp_path)


def test_unknown_parameter_fails_before_anything_runs(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params" / "ci", params)
    (params / "02_finetune.yaml").write_text(yaml.safe_dump({"epoch": 3}))
    with pytest.raises(ParamsError, match=r"unknown parameter\(s\) 'epoch' \(did you mean 'epochs'\?\)"):
        run_protocol(params, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_failure_names_the_report_and_the_cell(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params" / "ci", params)
    (params / "01_preprocess.yaml").write_text(yaml.safe_dump({"adata_path": "missing.h5ad", "checkpoint": "demo"}))
    with pytest.raises(
        RunFailed,
        match=r"step 01_preprocess failed: FileNotFoundError: .*missing\.h5ad"
        r".*\(in cell \d+ of .*01_preprocess\.ipynb\)",
    ):
        run_protocol(params, tmp_path / "run", steps=["01"], html=False)
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"]["01_preprocess"]["status"] == "failed"


@pytest.mark.slow  # 90 s: the four notebooks once more, in one kernel each (CI runs it with --slow)
def test_notebooks_run_interactively_cell_by_cell(tmp_path):
    """As a person in JupyterLab would: open each notebook, edit the parameters cell, run all cells."""
    from nbclient import NotebookClient

    for step, cls in STEPS.items():
        nb = nbformat.read(ROOT / "notebooks" / f"{step}.ipynb", as_version=4)
        overrides = yaml.safe_load((ROOT / "params" / "ci" / f"{step}.yaml").read_text()) or {}
        overrides["run_dir"] = str(tmp_path / "run")
        nb.cells[1].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
    layout = RunLayout(tmp_path / "run")
    assert layout.metrics.is_file() and layout.zeroshot_metrics.is_file()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, caplog):
    from scgpt_protocol.protocol.run.cli import main

    assert main(["run", str(tmp_path / "no-such-params"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "error: parameter folder" in caplog.text and "does not exist" in caplog.text


def test_plain_papermill_with_a_misspelt_parameter_fails(tmp_path):
    """papermill only warns on unknown parameters; the notebook itself refuses them."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as err:  # papermill itself only logs a warning
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "01_preprocess.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"run_dir": str(tmp_path / "run"), "labelkey": "bulk_labels"}, progress_bar=False,
        )
    assert err.value.ename == "ParamsError"
    assert "unknown parameter(s) 'labelkey' (did you mean 'label_key'?)" in err.value.evalue
    assert not (tmp_path / "run" / "data").exists()  # nothing was written


def test_ci_run_refines_labels_and_exports_queryable_artifacts(ci_run):
    """params/ci turns on abstention and majority voting; 03 writes export/vars.h5 and export/obs.duckdb."""
    import duckdb

    layout, _ = ci_run
    predictions = pd.read_csv(layout.predictions, index_col=0)
    assert {"scgpt_prediction", "scgpt_unknown", "scgpt_over_clustering", "scgpt_majority_voting"} <= set(predictions)
    metrics = json.loads(layout.metrics.read_text())
    refined = metrics["methods"]["scGPT (fine-tuned)"]["refinement"]
    assert 0 < refined["coverage"] <= 1 and refined["majority_voting"]["n_cells"] == len(predictions)
    con = duckdb.connect(str(layout.obs_duckdb), read_only=True)
    try:
        assert con.sql("select count(*) from obs").fetchall()[0][0] == len(predictions)
        assert con.sql("select count(*) from obs where umap_1 is null").fetchall()[0][0] == 0
    finally:
        con.close()
    assert ad.read_h5ad(layout.vars_h5).n_obs == len(predictions)
    zs = json.loads(layout.zeroshot_metrics.read_text())
    assert zs["refinement"]["majority_voting"] is not None
    for name in ("coverage_curve", "zeroshot_coverage_curve"):
        assert layout.figure(name).is_file(), name


def test_03_with_store_outputs_streams_to_the_store_with_the_same_results(ci_run, tmp_path):
    """store_outputs=True (forced on the demo): predict(out=data/predictions.h5), refinement, evaluation, UMAP and
    export read the store; the tables and metrics are those of the in-memory run."""
    import h5py
    import numpy as np

    layout, _ = ci_run
    run_dir, params = tmp_path / "run", tmp_path / "params"
    shutil.copytree(layout.run_dir, run_dir)
    shutil.copytree(ROOT / "params" / "ci", params)
    overrides = yaml.safe_load((params / "03_evaluate.yaml").read_text()) or {}
    (params / "03_evaluate.yaml").write_text(yaml.safe_dump({**overrides, "store_outputs": True}))
    run_protocol(params, run_dir, steps=["03"], force=True, html=False)
    streamed = RunLayout(run_dir)
    assert yaml.safe_load(streamed.step_params("evaluate").read_text())["store_outputs"] is True
    pd.testing.assert_frame_equal(pd.read_csv(streamed.predictions, index_col=0),
                                  pd.read_csv(layout.predictions, index_col=0))
    assert json.loads(streamed.metrics.read_text())["methods"] == json.loads(layout.metrics.read_text())["methods"]
    evaluated = ad.read_h5ad(streamed.evaluated_adata, backed="r")
    assert "X_scgpt" not in evaluated.obsm and evaluated.uns["X_scgpt_store"] == str(streamed.prediction_store)
    in_memory = ad.read_h5ad(layout.evaluated_adata, backed="r")
    with h5py.File(streamed.prediction_store, "r") as store:
        np.testing.assert_array_equal(store["embeddings"][:], in_memory.obsm["X_scgpt"])
    pd.testing.assert_frame_equal(evaluated.obs, in_memory.obs)
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["steps"]["03_evaluate"]["status"] == "finished"
    assert streamed.obs_duckdb.is_file() and streamed.figure("umap").is_file()


@pytest.mark.slow  # 25 s: 04 once more (CI runs it with --slow)
def test_04_onto_a_reference_index_gives_the_labels_of_the_run(ci_run, tmp_path, monkeypatch):
    """Issue 30: the run's train + validation cells built once into an index (the run's checkpoint and 04's
    settings), then 04 with reference_index: only the query is embedded, and the calls are those of the run."""
    pytest.importorskip("faiss")
    from scgpt_protocol import build_index, load_model
    from scgpt_protocol.pp.io import read_checkpoint_record, read_labels, read_prepared

    layout, _ = ci_run
    run_dir, params = tmp_path / "run", tmp_path / "params"
    shutil.copytree(layout.run_dir, run_dir)
    shutil.copytree(ROOT / "params" / "ci", params)
    overrides = yaml.safe_load((params / "04_zeroshot.yaml").read_text()) or {}
    prepared = read_prepared(layout, backed=True)
    reference = prepared[prepared.obs["split"].isin(["train", "val"]).to_numpy()]
    model = load_model(read_checkpoint_record(layout)["checkpoint"], device="cpu")
    build_index(reference, model, tmp_path / "index", label_keys=read_labels(layout)["label_key"],
                max_seq_len=overrides["max_seq_len"])
    (params / "04_zeroshot.yaml").write_text(yaml.safe_dump({**overrides, "reference_index": "index"}))
    monkeypatch.chdir(tmp_path)  # a relative reference_index is taken from the working directory
    run_protocol(params, run_dir, steps=["04"], force=True, html=False)
    indexed = RunLayout(run_dir)
    pd.testing.assert_frame_equal(pd.read_csv(indexed.zeroshot_predictions, index_col=0),
                                  pd.read_csv(layout.zeroshot_predictions, index_col=0))
    metrics = json.loads(indexed.zeroshot_metrics.read_text())
    assert metrics["params"]["reference_index"]["kind"] == "flat"
    assert not (indexed.zeroshot_dir / "reference_embeddings.h5").is_file()  # only the query was embedded
    assert indexed.figure("zeroshot_umap").is_file()
