"""Reports a biologist acts on: like-for-like comparisons, escaped text, the run summary, a "Next" in every report."""

from __future__ import annotations

import json
import re

import nbformat
import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.annotate.columns import COLUMNS, TRUE_LABEL
from scgpt_protocol.annotate.refinement import UNKNOWN, refine_labels, refinement_metrics
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import STEPS, FinetuneParams
from scgpt_protocol.evaluate.baseline import BaselineResult
from scgpt_protocol.evaluate.scoring import EvalResult, like_for_like
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD, classification_metrics
from scgpt_protocol.protocol.display import (
    comparison_table,
    per_class_frame,
    per_class_table,
    rule_metrics,
    settings_table,
    summary_of,
)
from scgpt_protocol.protocol.run.index import run_index_html, write_run_index

CATS = ["B & T <naive>", "NK", "Mono"]


def _cells(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = np.array(CATS, dtype=object)[rng.integers(0, 3, n)]
    proba = rng.dirichlet([1, 1, 1], n).astype(np.float32)
    proba[np.arange(n), [CATS.index(t) for t in true]] += 0.6  # mostly right
    proba /= proba.sum(axis=1, keepdims=True)
    return true, proba


def _scgpt(true, proba, t=0.5, clusters=None):
    """An EvalResult as evaluate_predictions makes it, from plain arrays."""
    pred = np.array(CATS, dtype=object)[proba.argmax(1)]
    names = pd.Index([f"c{i}" for i in range(len(true))])
    ref = refine_labels(pred, proba.max(1), min_confidence=t)
    if clusters is not None:
        from scgpt_protocol.annotate.refinement import majority_vote

        ref.over_clustering, ref.majority_voting = clusters, majority_vote(ref.labels, clusters, proba.max(1))
    metrics = classification_metrics(true, ref.labels, categories=CATS, proba=proba, unassigned=UNKNOWN if t else None)
    metrics["refinement"] = refinement_metrics(true, ref, categories=CATS, proba=proba)
    frame = pd.DataFrame({TRUE_LABEL: true, COLUMNS["labels"]: ref.labels}, index=names)
    if clusters is not None:
        frame[COLUMNS["over_clustering"]] = clusters
    return EvalResult(metrics=metrics, confusion=pd.DataFrame(), predictions=frame)


def _baseline(true, proba):
    names = pd.Index([f"c{i}" for i in range(len(true))])
    pred = pd.Series(pd.Categorical(np.array(CATS, dtype=object)[proba.argmax(1)], categories=CATS), index=names)
    return BaselineResult(predictions=pred, probabilities=proba, categories=CATS,
                          metrics=classification_metrics(true, pred, categories=CATS, proba=proba), n_genes=10)


def test_baseline_gets_scgpts_abstention_and_its_over_clusters():
    true, p_scgpt = _cells(seed=1)
    _, p_base = _cells(seed=2)
    clusters = np.array([str(i % 6) for i in range(len(true))], dtype=object)
    scgpt = _scgpt(true, p_scgpt, t=0.5, clusters=clusters)
    base = like_for_like(_baseline(true, p_base), scgpt)
    ref = base["refinement"]
    n_low = int((p_base.max(1) < 0.5).sum())
    assert n_low > 0 and ref["n_unknown"] == n_low == base["n_unassigned"]  # the same rule as scGPT's
    assert ref["min_confidence"] == 0.5 and ref["coverage"] == pytest.approx(1 - n_low / len(true))
    # every cell labelled: the baseline's own argmax, unchanged
    assert ref["argmax"]["accuracy"] == pytest.approx(np.mean(np.array(CATS)[p_base.argmax(1)] == true))
    assert base["accuracy"] < ref["argmax"]["accuracy"]  # Unknown counted wrong in the headline
    # majority voting over scGPT's over-clusters: one label per cluster
    assert ref["majority_voting"]["n_clusters"] == 6
    table = comparison_table({SCGPT_METHOD: scgpt.metrics, BASELINE_METHOD: base})
    rules = list(dict.fromkeys(table.index.get_level_values(0)))
    assert rules == ["every cell labelled (argmax)", "Unknown below 0.5 counted wrong", "assigned cells only",
                     "majority voting over over-clusters"]
    for rule in rules:  # every rule has a row for each method, side by side
        assert list(table.loc[rule].index) == [SCGPT_METHOD, BASELINE_METHOD]
    assert table.loc[("assigned cells only", BASELINE_METHOD), "Coverage"] == pytest.approx(ref["coverage"], abs=1e-3)
    assert table["Macro AUROC"].notna().sum() == 2  # on the argmax rows only: it does not depend on a rule


def test_without_abstention_the_baseline_is_scored_as_before():
    true, proba = _cells()
    scgpt = _scgpt(true, proba, t=0.0)
    baseline = _baseline(true, proba)
    out = like_for_like(baseline, scgpt)
    assert out["accuracy"] == baseline.metrics["accuracy"] and out["refinement"]["n_unknown"] == 0
    assert list(dict.fromkeys(comparison_table({SCGPT_METHOD: scgpt.metrics, BASELINE_METHOD: out})
                              .index.get_level_values(0))) == ["every cell labelled (argmax)"]


def test_like_for_like_refuses_other_cells():
    true, proba = _cells()
    scgpt = _scgpt(true, proba)
    other = _baseline(true, proba)
    other.predictions.index = [f"x{i}" for i in range(len(true))]
    with pytest.raises(ValueError, match="not the 60 cells scGPT was scored on"):
        like_for_like(other, scgpt)


def test_per_class_separates_abstained_from_misclassified():
    true = np.array(["A"] * 6 + ["B"] * 4, dtype=object)
    pred = np.array(["A"] * 6 + ["B", "B", "A", "A"], dtype=object)
    conf = np.array([0.9] * 6 + [0.9, 0.9, 0.1, 0.1])  # the two wrong B cells are unsure: abstained
    ref = refine_labels(pred, conf, min_confidence=0.5)
    metrics = classification_metrics(true, ref.labels, unassigned=UNKNOWN)
    metrics["refinement"] = refinement_metrics(true, ref)
    frame = per_class_frame({SCGPT_METHOD: metrics})
    assert frame.loc["B", "scGPT F1 (assigned cells)"] == 1.0  # what it called, it called right
    assert frame.loc["B", "scGPT share Unknown"] == 0.5 and frame.loc["A", "scGPT share Unknown"] == 0.0
    assert metrics["per_class"][1]["f1"] < 1.0  # the headline (Unknown counted wrong) differs
    assert list(rule_metrics({SCGPT_METHOD: metrics}, "argmax")[SCGPT_METHOD]["per_class"][0]) == [
        "label", "precision", "recall", "f1", "support"]


def test_user_and_model_text_is_escaped_in_every_html_table(tmp_path):
    true, proba = _cells()
    scgpt = _scgpt(true, proba)
    methods = {SCGPT_METHOD: scgpt.metrics, BASELINE_METHOD: like_for_like(_baseline(true, proba), scgpt)}
    pages = [per_class_table(methods).to_html(), comparison_table(methods).pipe(lambda f: f.style).to_html(),
             summary_of({"scGPT <fine> & tuned": scgpt.metrics})._repr_html_()]
    from scgpt_protocol.protocol.display import comparison_display

    pages.append(comparison_display(methods, caption="cells of <query> & co").to_html())
    for page in pages[:1] + pages[2:]:
        assert "<naive>" not in page and "B & T" not in page.replace("&amp;", "")
    assert "B &amp; T &lt;naive&gt;" in pages[0]
    assert "scGPT &lt;fine&gt; &amp; tuned" in pages[2] and "cells of &lt;query&gt; &amp; co" in pages[3]
    settings = settings_table(FinetuneParams(run_dir=str(tmp_path))).to_html()
    assert "&lt;cls&gt;" in settings and "<cls>" not in settings  # 02's help text names the <cls> token


def _fake_run(tmp_path, steps_done):
    layout = RunLayout(tmp_path / "run").make_dirs()
    manifest = {"status": "partial", "steps": {s: {"status": "finished", "seconds": 3.0} for s in steps_done}}
    layout.write_json(layout.checkpoint_record, {"kind": "demo", "checkpoint": "demo"})
    return layout, manifest


def test_run_summary_page_shows_each_step_the_headline_and_links(tmp_path):
    layout, manifest = _fake_run(tmp_path, ["01_preprocess"])
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    (layout.reports_dir / "01_preprocess.html").write_text("<html></html>")
    page = run_index_html(layout, manifest)
    assert "href='01_preprocess.html'" in page and page.count("not run") == 3
    assert "No step has scored cells yet" in page and "Demo checkpoint" in page
    true, proba = _cells()
    scgpt = _scgpt(true, proba)
    methods = {SCGPT_METHOD: scgpt.metrics, BASELINE_METHOD: like_for_like(_baseline(true, proba), scgpt)}
    layout.write_json(layout.metrics, json.loads(json.dumps({"methods": methods}, default=float)))
    manifest["steps"]["03_evaluate"] = {"status": "finished", "seconds": 5.0}
    path = write_run_index(layout, manifest)
    page = path.read_text()
    assert path == layout.reports_dir / "index.html"
    assert "Every method under the same rules" in page and "Unknown below 0.5 counted wrong" in page
    assert "<naive>" not in page
    assert re.search(r"04_zeroshot</td><td[^>]*>not run", page)
    assert "run 04_zeroshot with the same run_dir" in page  # Next, after the last finished step


def test_every_step_of_a_run_leaves_the_summary_and_each_report_ends_with_next(ci_run):
    layout, _ = ci_run
    page = (layout.reports_dir / "index.html").read_text()
    for step in STEPS:
        assert f"href='{step}.html'" in page
        assert re.search(rf"{step}</a></td><td[^>]*>finished", page), step
    for name in ("zero-shot kNN vote", "logistic regression", "assigned cells only", "../figures/confusion.png",
                 "../figures/call_umaps.png", "../figures/marker_dotplot.png", "../figures/overview_umap.png"):
        assert name in page, name
    for figure in ("call_umaps", "marker_dotplot", "confidence_by_type", "overview_umap"):  # the evidence, saved
        assert layout.figure(figure).is_file() and layout.figure(figure).with_suffix(".pdf").is_file(), figure
    metrics = json.loads(layout.metrics.read_text())["methods"]
    assert metrics[BASELINE_METHOD]["refinement"]["min_confidence"] == 0.2  # params/ci: the baseline's rule too
    for step in STEPS:
        cells = nbformat.read(layout.reports_dir / f"{step}.ipynb", as_version=4).cells
        heading = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Next"))
        text = json.dumps(cells[heading + 1].outputs)
        assert "Next:" in text, step
        html_report = (layout.reports_dir / f"{step}.html").read_text()
        assert "from scgpt_protocol" not in html_report.split("Step 1")[0], step  # the set-up code is hidden
    zs = json.loads(layout.zeroshot_metrics.read_text())
    assert {"knn_vote", "knn_weighted"} <= set(zs) and "majority" not in zs  # one meaning per word


def test_the_runner_writes_the_summary_after_the_first_step_already(tmp_path):
    from pathlib import Path

    from scgpt_protocol.protocol.run.runner import run_protocol

    params = Path(__file__).resolve().parent.parent / "params" / "ci"
    run_protocol(params, tmp_path / "run", steps=["01"], html=False)
    page = (tmp_path / "run" / "reports" / "index.html").read_text()
    assert re.search(r"href='01_preprocess.ipynb'>01_preprocess</a></td><td[^>]*>finished", page)  # no HTML copy
    for step in ("02_finetune", "03_evaluate", "04_zeroshot"):
        assert re.search(rf"{step}</td><td[^>]*>not run", page), step
    assert "run 02_finetune with the same run_dir" in page and "../figures/overview_umap.png" in page


def test_the_summary_is_written_when_the_first_step_fails(tmp_path):
    """Issue 27: a failed 01 left no summary (``could not write the run summary ...: 0``)."""
    import shutil
    from pathlib import Path

    import pytest
    import yaml

    from scgpt_protocol.protocol.run.runner import RunFailed, run_protocol

    params = tmp_path / "params"
    shutil.copytree(Path(__file__).resolve().parent.parent / "params" / "ci", params)
    first = params / "01_preprocess.yaml"
    first.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "label_key": "no_such_column"}))
    with pytest.raises(RunFailed, match="no_such_column"):
        run_protocol(params, tmp_path / "run", steps=["01"])
    page = (tmp_path / "run" / "reports" / "index.html").read_text()
    assert re.search(r"href='01_preprocess.html'>01_preprocess</a></td><td[^>]*>failed", page)
    assert page.count("no_such_column") >= 2  # in the steps table and in Next
    assert "01_preprocess failed" in page and "logs/preprocess.log" in page
    for step in ("02_finetune", "03_evaluate", "04_zeroshot"):
        assert re.search(rf"{step}</td><td[^>]*>not run", page), step
