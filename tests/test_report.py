"""What a reader sees: banners, rounded tables, the closing summary, one palette per run, quiet logs."""

from __future__ import annotations

import json
import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD, classification_metrics
from scgpt_protocol.protocol.display import (
    checkpoint_banner,
    files_table,
    metrics_display,
    per_class_table,
    run_summary,
    settings_table,
    summary_of,
    training_report,
)

TRUE = ["T"] * 10 + ["B"] * 6 + ["NK"] * 3
GOOD = ["T"] * 10 + ["B"] * 5 + ["T"] + ["NK", "NK", "T"]
POOR = ["T"] * 10 + ["T"] * 6 + ["T"] * 3  # B and NK never predicted: F1 0


@pytest.fixture()
def methods():
    return {SCGPT_METHOD: classification_metrics(TRUE, GOOD), BASELINE_METHOD: classification_metrics(TRUE, POOR)}


def _three_decimals(text: str) -> list[str]:
    return re.findall(r"\b[01]\.\d{3}\b", text)


def test_metrics_display_rounds_names_and_explains_a_missing_auroc(methods):
    styler = metrics_display(methods, caption="test split")
    frame = styler.data
    assert list(frame.columns[:3]) == ["Accuracy", "Macro-F1", "Weighted-F1"] and "n cells" in frame.columns
    assert all(round(v, 3) == v for v in frame["Macro-F1"])
    assert frame.loc[SCGPT_METHOD, "Macro AUROC"] != frame.loc[SCGPT_METHOD, "Macro AUROC"]  # NaN: no probabilities
    assert frame.loc[SCGPT_METHOD, "Note"] == "Macro AUROC n/a: this method gives no class probabilities"
    html = styler.to_html()
    accuracy = methods[SCGPT_METHOD]["accuracy"]  # 17/19 = 0.894736...
    assert "n/a" in html and f">{accuracy:.3f}<" in html and f"{accuracy:.4f}" not in html


def test_per_class_table_sorts_by_support_and_flags_small_classes(methods):
    frame = per_class_table(methods).data
    assert list(frame.index) == ["T", "B", "NK"]
    assert list(frame["Support (test cells)"]) == [10, 6, 3]
    assert list(frame.columns) == ["scGPT F1", "baseline F1", "Support (test cells)", "Flag"]
    assert frame.loc["NK", "Flag"] == "fewer than 5 cells" and frame.loc["B", "Flag"] == ""
    assert frame.loc["B", "baseline F1"] == 0.0


def test_summary_verdict_names_the_winner_the_gap_and_the_demo_caveat(methods):
    summary = summary_of({"scGPT fine-tuned": methods[SCGPT_METHOD], "baseline": methods[BASELINE_METHOD],
                          "zero-shot kNN": "not run yet: run 04_zeroshot"}, demo=True, cells="19 test cells")
    assert list(summary.table.columns) == ["Accuracy", "Macro-F1", "Weighted-F1", "n cells", "Note"]
    gap = methods[SCGPT_METHOD]["macro_f1"] - methods[BASELINE_METHOD]["macro_f1"]
    assert (
        summary.verdict.startswith("scGPT fine-tuned wins on macro-F1")
        and f"{gap:.3f} ahead of baseline" in summary.verdict
    )
    assert "RANDOMLY INITIALISED demo" in summary.caveat
    text = repr(summary)
    assert "zero-shot kNN" in text and "not run yet" in text and _three_decimals(text)
    assert "<table" in summary._repr_html_() and "Verdict" in summary._repr_html_()


def test_run_summary_reads_the_run_and_puts_zero_shot_beside_only_on_the_same_cells(tmp_path, methods):
    layout = RunLayout(tmp_path / "run").make_dirs()
    layout.write_json(layout.checkpoint_record, {"kind": "demo", "checkpoint": "x", "sha256": "0" * 64})
    cells = [f"c{i}" for i in range(len(TRUE))]
    layout.write_json(layout.metrics, {"methods": methods, "split": "test"})
    layout.write_csv(pd.DataFrame({"true_label": TRUE}, index=pd.Index(cells, name="cell")), layout.predictions)
    assert "not run yet: run 04_zeroshot" in repr(run_summary(layout))

    zero = classification_metrics(TRUE, POOR)
    layout.zeroshot_dir.mkdir()
    layout.write_json(layout.zeroshot_metrics, {"knn_vote": zero, "knn_weighted": zero})
    layout.write_csv(pd.DataFrame({"x": 1}, index=pd.Index(cells, name="cell")), layout.zeroshot_predictions)
    summary = run_summary(layout)
    assert summary.table.loc["zero-shot kNN on pretrained scGPT", "Macro-F1"] == round(zero["macro_f1"], 3)
    assert "19 test cells" in summary.cells and "demo" in summary.caveat

    layout.write_csv(pd.DataFrame({"x": 1}, index=pd.Index(["other"], name="cell")), layout.zeroshot_predictions)
    assert "measured on other cells" in repr(run_summary(layout))


def test_training_report_says_when_the_best_epoch_is_the_last():
    summary = {"strategy": "full", "best_epoch": 10, "epochs_run": 10, "best_val_macro_f1": 0.51234,
               "trainable_parameters": 1000, "total_parameters": 2000, "seconds": 12.0, "peak_memory_bytes": 2**21}
    report = training_report(summary)
    assert "more epochs may help" in repr(report) and "0.512" in repr(report) and "0.5123" not in repr(report)
    assert "more epochs" not in repr(training_report({**summary, "best_epoch": 7}))


def test_settings_table_lists_changed_values_first():
    from scgpt_protocol.core.params import FinetuneParams

    table = settings_table(FinetuneParams(lr=1e-3, class_weighted=True, epochs=5)).data
    assert set(table.index[:3]) == {"lr", "class_weighted", "epochs"} and (table["Changed"][:3] == "yes").all()
    assert table.loc["lr", "Default"] == "None" and table.loc["patience", "Changed"] == ""


def test_settings_table_shows_what_the_recipe_set_beside_the_default():
    from scgpt_protocol.core.params import FinetuneParams

    params = FinetuneParams(lr=3e-4).with_recipe("demo")  # lr set by hand; the rest of the recipe from the demo's
    table = settings_table(params).data
    assert table.index[0] == "lr" and table.loc["lr", "Changed"] == "yes" and table.loc["lr", "This run"] == "0.0003"
    recipe = table.index[table["Changed"] == "recipe"]
    assert set(recipe) == {"adam_eps", "batch_size", "max_seq_len", "class_weighted"}
    assert list(table.index[1:5]) == list(recipe)  # right after the changed ones
    assert table.loc["max_seq_len", "This run"] == "256" and table.loc["max_seq_len", "Default"] == "None: demo recipe"
    pretrained = settings_table(FinetuneParams().with_recipe("released")).data
    assert pretrained.loc["lr", "This run"] == "0.0001" and pretrained.loc["adam_eps", "This run"] == "0.0001"
    assert pretrained.loc["lr", "Default"] == "None: pretrained recipe"


def test_checkpoint_banner_is_a_visible_box_for_the_demo_only():
    demo = checkpoint_banner({"kind": "demo"})
    assert "RANDOMLY" not in demo.text and "randomly initialised" in demo.text
    assert "background" in demo._repr_html_()
    real = checkpoint_banner({"kind": "released", "checkpoint": "/c/whole-human", "sha256": "ab" * 32})
    assert "whole-human" in repr(real) and "#fff4d6" not in real._repr_html_()


def test_files_table_shows_paths_inside_the_run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    table = files_table({"metrics": layout.metrics}, layout).data
    assert table.iloc[0, 0] == "metrics.json"


# -- one palette per run -------------------------------------------------------------------
def _legend_colours(ax) -> dict[str, str]:
    legend = ax.get_legend()
    return {t.get_text(): to_hex(h.get_markerfacecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}


def _point_colours(ax, adata, key) -> dict[str, set[str]]:
    colours = [to_hex(c) for c in ax.collections[0].get_facecolors()]
    out: dict[str, set[str]] = {}
    for label, colour in zip(adata.obs[key].astype(str), colours):
        out.setdefault(label, set()).add(colour)
    return out


def test_same_category_same_colour_in_both_panels_even_with_fewer_predicted_categories():
    from scgpt_protocol.data.colors import label_palette
    from scgpt_protocol.pl.embedding import plot_embedding

    labels = ["Dendritic", "B", "T", "NK", "Mono"]
    rng = np.random.default_rng(0)
    true = rng.choice(labels, 60)
    pred = np.where(np.isin(true, ["NK", "Mono"]), "Dendritic", true)  # fewer categories, another order
    adata = ad.AnnData(obs=pd.DataFrame({"truth": pd.Categorical(true), "pred": pd.Categorical(pred)},
                                        index=[f"c{i}" for i in range(60)]))
    adata.obsm["X_umap"] = rng.normal(size=(60, 2))
    palette = label_palette(sorted(labels))
    fig = plot_embedding(adata, basis="X_umap", color=["truth", "pred"], palette=palette)
    left, right = (_legend_colours(ax) for ax in fig.axes[:2])
    assert set(right) < set(left)
    for label, colour in right.items():
        assert colour == left[label] == to_hex(palette[label])
    for ax, key in zip(fig.axes[:2], ["truth", "pred"]):
        assert all(c == {to_hex(palette[label])} for label, c in _point_colours(ax, adata, key).items())


def test_zero_shot_joint_umap_uses_the_run_palette():
    from scgpt_protocol.data.colors import label_palette
    from scgpt_protocol.pl.embedding import joint_embedding, plot_embedding

    rng = np.random.default_rng(1)
    ref = ad.AnnData(obs=pd.DataFrame({"cell_type": rng.choice(["A", "B", "C", "D"], 40)},
                                      index=[f"r{i}" for i in range(40)]))
    query = ad.AnnData(obs=pd.DataFrame({"cell_type": rng.choice(["A", "C"], 20)}, index=[f"q{i}" for i in range(20)]))
    ref.obsm["X_scgpt"], query.obsm["X_scgpt"] = rng.normal(size=(40, 4)), rng.normal(size=(20, 4))
    joint = joint_embedding(ref, query, label_key="cell_type")
    joint.obs["predicted"] = pd.Categorical(np.r_[np.full(40, np.nan, dtype=object), rng.choice(["C", "A"], 20)])
    joint.obsm["X_umap"] = rng.normal(size=(60, 2))
    palette = label_palette(["A", "B", "C", "D"])
    fig = plot_embedding(joint, basis="X_umap", color=["dataset", "label", "predicted"], palette=palette)
    label, predicted = _legend_colours(fig.axes[1]), _legend_colours(fig.axes[2])
    assert all(predicted[c] == label[c] == to_hex(palette[c]) for c in ("A", "C"))
    dataset = _legend_colours(fig.axes[0])
    assert not set(dataset.values()) & {to_hex(c) for c in palette.values()}  # reference/query: other colours


def test_label_palette_keeps_the_input_colours_by_name():
    from scgpt_protocol.data.colors import label_palette

    adata = ad.AnnData(obs=pd.DataFrame({"ct": pd.Categorical(["x", "y", "z"], categories=["z", "y", "x"])},
                                        index=["c1", "c2", "c3"]))
    adata.uns["ct_colors"] = ["#000001", "#000002", "#000003"]  # z, y, x
    palette = label_palette(["x", "y", "z", "new"], adata=adata, label_key="ct")
    assert palette["x"] == "#000003" and palette["z"] == "#000001"
    assert palette["new"] not in {"#000001", "#000002", "#000003"}
    assert label_palette(["a", "b"]) == label_palette(["a", "b"])  # fixed


def test_per_class_figure_marks_zero_f1_and_keeps_the_legend_off_the_title(methods):
    from scgpt_protocol.pl.metrics import plot_per_class_f1

    fig = plot_per_class_f1(methods)
    ax = fig.axes[0]
    markers = [line for line in ax.get_lines() if line.get_marker() == "<"]
    assert markers and len(markers[0].get_ydata()) == 2  # the baseline's two F1 = 0 bars
    assert [t.get_text().split(" (")[0] for t in ax.get_yticklabels()] == ["T", "B", "NK"]  # largest on top
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    assert ax.get_yticklabels()[2].get_text().endswith("*")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    legend_box = fig.legends[0].get_window_extent(renderer)
    title_box = ax.title.get_window_extent(renderer)
    assert not legend_box.overlaps(title_box)


# -- quiet logs ----------------------------------------------------------------------------
def test_details_go_to_the_log_file_only(tmp_path, capsys):
    from scgpt_protocol.core.log import DETAIL, _stdout_handler, setup_logging

    layout = RunLayout(tmp_path / "run")
    package = logging.getLogger("scgpt_protocol")
    setup_logging(layout, "test")
    stdout = _stdout_handler()  # what a notebook shows (pytest's own handler hides it here)
    package.addHandler(stdout)
    try:
        log = logging.getLogger("scgpt_protocol.test")
        log.info("for the reader")
        log.info("tensor names for the file", extra=DETAIL)
    finally:
        package.removeHandler(stdout)
        for handler in [h for h in package.handlers if isinstance(h, logging.FileHandler)]:
            package.removeHandler(handler)
            handler.close()
    out = capsys.readouterr().out
    assert "for the reader" in out and "tensor names" not in out
    assert "tensor names for the file" in layout.step_log("test").read_text()


def test_load_report_summary_has_no_tensor_names(tiny_checkpoint):
    from scgpt_protocol import load_model

    report = load_model(tiny_checkpoint, n_classes=3, device="cpu").load_report
    line = report.summary()
    assert re.fullmatch(r"all \d+ pretrained weights loaded(; \d+ pretraining-only weights? dropped)?; "
                        r"a new classifier head, trained in fine-tuning", line), line
    assert "." not in line.replace("fine-tuning", "")  # no dotted tensor names


def test_parameters_cell_puts_the_usual_changes_first():
    from scgpt_protocol.core.params import STEPS, parameters_cell

    for cls in STEPS.values():
        lines = parameters_cell(cls).splitlines()
        basic, advanced = (
            lines.index("# --- change these ---"),
            lines.index("# --- advanced: the defaults suit most data ---"),
        )
        assert basic < advanced and lines[basic + 1].startswith("run_dir:")
        assert all(len(line) <= 120 for line in lines), max(lines, key=len)
        assert "seed: int" in "\n".join(lines[advanced:])
    first = parameters_cell(STEPS["01_preprocess"]).split("# --- advanced")[0]
    for name in ("adata_path", "label_key", "checkpoint"):
        assert f"\n{name}:" in first


def test_html_report_has_a_title_and_wrapping_output(tmp_path):
    import nbformat

    from scgpt_protocol.protocol.run.reports import _export_html, report_title

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# hi"))
    path = tmp_path / "03_evaluate.ipynb"
    nbformat.write(nb, path)
    html = _export_html(path, report_title("03_evaluate", tmp_path / "my-run")).read_text()
    assert "<title>03_evaluate · my-run · scgpt-protocol</title>" in html
    assert "word-break: normal" in html
    assert json.loads(path.read_text())["metadata"].get("title") is None  # the .ipynb report is left as is
