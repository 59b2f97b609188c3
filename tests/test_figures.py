"""Figures a biologist reads: one grey for "no call", method colours apart from class colours, one class
order, legible text, and the evidence figures (markers, confidence, three-panel UMAPs, overview UMAP)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.data.labels import UNKNOWN, UNKNOWN_COLOR


# -- colours --------------------------------------------------------------------------------
def test_unknown_is_grey_and_no_class_takes_its_colour():
    from scanpy.plotting import palettes

    from scgpt_protocol.data.colors import is_grey, label_palette

    for n in (3, 25, 60):
        classes = [f"type {i}" for i in range(n)]
        palette = label_palette(classes)
        assert palette[UNKNOWN] == UNKNOWN_COLOR
        assert UNKNOWN_COLOR not in {palette[c] for c in classes}
        assert not any(is_grey(palette[c]) for c in classes)
        assert len({palette[c] for c in classes}) == n
    assert palettes.default_20[2] == "#279e68"  # the green Unknown used to get, as the third class
    adata = ad.AnnData(
        obs=pd.DataFrame({"ct": pd.Categorical(["a", UNKNOWN], categories=["a", UNKNOWN])}, index=["c1", "c2"])
    )
    adata.uns["ct_colors"] = ["#123456", "#279e68"]  # an input that gave Unknown a class colour
    assert label_palette(["a", UNKNOWN], adata=adata, label_key="ct") == {"a": "#123456", UNKNOWN: UNKNOWN_COLOR}


def test_unknown_is_importable_where_it_was():
    from scgpt_protocol.annotate.refinement import UNKNOWN as from_refinement

    assert from_refinement is UNKNOWN


def test_method_colours_are_no_cell_type_colours():
    from scanpy.plotting import palettes

    from scgpt_protocol.metrics import METHODS
    from scgpt_protocol.pl.metrics import METHOD_COLORS

    cell_type_colours = {to_hex(c) for name in ("default_20", "default_28", "default_102")
                         for c in getattr(palettes, name)}
    method_colours = {to_hex(m.color) for m in METHODS} | {to_hex(c) for c in METHOD_COLORS.values()}
    assert len({m.color for m in METHODS}) == len(METHODS)
    assert not method_colours & cell_type_colours


def _renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return FigureCanvasAgg(fig).get_renderer()


def _legend_font_sizes(fig) -> list[float]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [text.get_fontsize() for legend in legends for text in legend.get_texts()]


# -- scores ---------------------------------------------------------------------------------
def test_confusion_drops_rows_without_true_cells_and_follows_the_order():
    from scgpt_protocol.metrics import confusion
    from scgpt_protocol.pl.metrics import plot_confusion

    true = ["B"] * 3 + ["T"] * 5 + ["NK"] * 2
    pred = ["B", "B", UNKNOWN, "T", "T", "T", UNKNOWN, "B", "NK", UNKNOWN]
    matrix = confusion(true, pred, ["B", "NK", "T", UNKNOWN])
    assert UNKNOWN in matrix.index  # the empty row the figure leaves out
    ax = plot_confusion(matrix, order=[UNKNOWN, "T", "B", "NK"]).axes[0]
    rows = [t.get_text().split(" (n=")[0] for t in ax.get_yticklabels()]
    assert rows == ["T", "B", "NK"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T", "B", "NK", UNKNOWN]  # Unknown column last


def test_coverage_curve_labels_do_not_overprint_and_every_axis_has_a_title():
    from scgpt_protocol.metrics import coverage_curve
    from scgpt_protocol.pl.metrics import plot_coverage_curve

    rng = np.random.default_rng(0)
    true = rng.choice(["a", "b", "c"], 300)
    confidence = rng.uniform(0.3, 1.0, 300)
    pred = np.where(rng.uniform(size=300) < confidence, true, "a")
    curve = coverage_curve(true, pred, confidence)
    fig = plot_coverage_curve(curve, min_confidence=0.5)
    left, right = fig.axes[:2]
    renderer = _renderer(fig)
    labels = [t for t in left.texts if t.get_text()]
    assert labels
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in (left, right))
    lines = right.get_lines()[:3]
    assert len({to_hex(line.get_color()) for line in lines}) == 3
    assert len({line.get_linestyle() for line in lines}) == 3
    assert right.get_legend() is not None and min(_legend_font_sizes(fig)) >= 8
    two = plot_coverage_curve({"scGPT": curve, "zero-shot": curve})
    assert len({to_hex(line.get_color()) for line in two.axes[1].get_lines()}) == 2  # one colour per curve


def test_per_class_f1_is_horizontal_in_the_given_order_with_method_colours():
    from scgpt_protocol.metrics import BASELINE, SCGPT, classification_metrics
    from scgpt_protocol.pl.metrics import plot_per_class_f1

    true = ["T"] * 10 + ["B"] * 6 + ["NK"] * 3
    methods = {SCGPT.name: classification_metrics(true, true), BASELINE.name: classification_metrics(true, ["T"] * 19)}
    fig = plot_per_class_f1(methods, order=["NK", "B", "T"], palette={"NK": "#ff0000", "B": "#00ff00", "T": "#0000ff"})
    ax = fig.axes[0]
    assert [t.get_text().split(" (")[0] for t in ax.get_yticklabels()] == ["NK", "B", "T"]
    bar_colours = {to_hex(p.get_facecolor()) for p in ax.patches}
    assert bar_colours == {to_hex(SCGPT.color), to_hex(BASELINE.color)}
    assert min(_legend_font_sizes(fig)) >= 8 and min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8


def test_best_epoch_note_stays_inside_the_axes():
    from scgpt_protocol.pl.training import plot_training_curves

    history = pd.DataFrame({"epoch": range(1, 11), "train_loss": np.linspace(2, 1, 10),
                            "val_macro_f1": np.linspace(0.1, 0.5, 10), "best": [False] * 9 + [True]})
    fig = plot_training_curves(history)
    renderer = _renderer(fig)
    note = next(t for t in fig.axes[1].texts if t.get_text().startswith("best epoch"))
    inside = fig.axes[1].get_window_extent(renderer)
    box = note.get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1


# -- embeddings -----------------------------------------------------------------------------
def _legend(ax) -> dict[str, str]:
    legend = ax.get_legend()
    return {t.get_text(): to_hex(h.get_markerfacecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_embedding_draws_no_call_grey_shortens_long_labels_and_shows_confidence():
    from scgpt_protocol.data.colors import label_palette
    from scgpt_protocol.pl.embedding import plot_embedding

    rng = np.random.default_rng(0)
    long = "a cell type whose name is much longer than forty characters"
    labels = rng.choice(["B", "T", UNKNOWN, long], 80)
    with_missing = pd.Categorical(np.where(np.arange(80) < 5, None, labels))
    adata = ad.AnnData(obs=pd.DataFrame({"call": with_missing, "confidence": rng.uniform(0, 1, 80)},
                                        index=[f"c{i}" for i in range(80)]))
    adata.obsm["X_umap"] = rng.normal(size=(80, 2))
    fig = plot_embedding(adata, color=["call", "confidence"], palette=label_palette(["B", "T", long]),
                         order=[UNKNOWN, "T", "B", long])
    legend = _legend(fig.axes[0])
    names = list(legend)
    assert names[:2] == ["T", "B"] and names[-2:] == [UNKNOWN, "no label"]  # the greys last
    assert legend[UNKNOWN] == legend["no label"] == UNKNOWN_COLOR
    shortened = names[2]
    assert shortened.endswith("\u2026") and len(shortened) <= 40 and long.startswith(shortened[:-1])
    assert min(t.get_fontsize() for t in fig.axes[0].get_legend().get_texts()) >= 8
    colorbar = [ax for ax in fig.axes if ax.get_ylabel() == "confidence"]
    assert colorbar and colorbar[0].get_ylim() == (0.0, 1.0)


def test_joint_embedding_names_the_reference_cells():
    from scgpt_protocol.data.colors import REFERENCE, REFERENCE_COLOR, label_palette
    from scgpt_protocol.pl.embedding import joint_embedding, plot_embedding

    rng = np.random.default_rng(1)
    ref = ad.AnnData(obs=pd.DataFrame({"ct": rng.choice(["A", "B"], 30)}, index=[f"r{i}" for i in range(30)]))
    query = ad.AnnData(obs=pd.DataFrame({"ct": rng.choice(["A", "B"], 10)}, index=[f"q{i}" for i in range(10)]))
    ref.obsm["X_scgpt"], query.obsm["X_scgpt"] = rng.normal(size=(30, 4)), rng.normal(size=(10, 4))
    joint = joint_embedding(ref, query, label_key="ct")
    assert (joint.obs["predicted"][joint.obs["dataset"] == "reference"] == REFERENCE).all()
    joint.obs["predicted"] = pd.Categorical(np.r_[np.full(30, REFERENCE), rng.choice(["A", UNKNOWN], 10)])
    joint.obsm["X_umap"] = rng.normal(size=(40, 2))
    legend = _legend(plot_embedding(joint, color="predicted", palette=label_palette(["A", "B"])).axes[0])
    assert "NA" not in legend and legend[REFERENCE] == REFERENCE_COLOR and legend[UNKNOWN] == UNKNOWN_COLOR


# -- evidence -------------------------------------------------------------------------------
def _planted(n_per_type: int = 40, seed: int = 0) -> ad.AnnData:
    """Counts of three types, each with one planted marker gene (``mark_<type>``), and a few noise genes."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    types = ["alpha", "beta", "gamma"]
    genes = [f"mark_{t}" for t in types] + [f"noise_{i}" for i in range(12)]
    labels = np.repeat(types, n_per_type)
    counts = rng.poisson(2.0, size=(len(labels), len(genes))).astype(np.float32)
    for j, t in enumerate(types):
        counts[labels == t, j] += rng.poisson(30.0, size=int((labels == t).sum()))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "split": np.where(np.arange(len(labels)) % 4, "train", "test")},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


@pytest.mark.parametrize("backed", [False, True])
def test_marker_genes_finds_the_planted_marker_of_each_type(tmp_path, backed):
    from scgpt_protocol.evaluate.markers import marker_genes

    adata = _planted()
    adata.obs.loc[adata.obs_names[:1], "cell_type"] = np.nan  # an unlabelled cell is left out
    if backed:
        adata.write_h5ad(tmp_path / "planted.h5ad")
        adata = ad.read_h5ad(tmp_path / "planted.h5ad", backed="r")
    train = (adata.obs["split"] == "train").to_numpy()
    markers = marker_genes(adata, label_key="cell_type", cells=train, n_genes=2, max_cells=60, seed=0)
    assert set(markers) == {"alpha", "beta", "gamma"}
    for cell_type, genes in markers.items():
        assert genes[0] == f"mark_{cell_type}" and len(genes) == 2
    assert len({g for genes in markers.values() for g in genes}) == 6  # unique across types
    assert marker_genes(adata, label_key="cell_type", cells=np.flatnonzero(train)[:1]) == {}  # one type: nothing


def test_marker_genes_skips_types_with_one_cell():
    from scgpt_protocol.evaluate.markers import marker_genes

    adata = _planted(n_per_type=10)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[0] = "lonely"
    adata.obs["cell_type"] = pd.Categorical(labels)
    assert "lonely" not in marker_genes(adata, label_key="cell_type", method="t-test")


def test_marker_dotplot_rows_by_call_markers_by_type_and_saved(tmp_path):
    from scgpt_protocol.pl.evidence import plot_marker_dotplot
    from scgpt_protocol.pl.figure import save_figure

    adata = _planted()
    adata.write_h5ad(tmp_path / "planted.h5ad")
    backed = ad.read_h5ad(tmp_path / "planted.h5ad", backed="r")
    called = adata.obs["cell_type"].astype(str).to_numpy().copy()
    called[::7] = UNKNOWN
    markers = {"alpha": ["mark_alpha", "noise_0"], "beta": ["mark_beta"], "gamma": ["mark_gamma"]}
    fig = plot_marker_dotplot(backed, markers, groupby=called, order=[UNKNOWN, "gamma", "beta", "alpha"],
                              cells=(adata.obs["split"] == "test").to_numpy(), title="markers")
    ax = fig.axes[0]
    rows = [t.get_text().split(" (n=")[0] for t in ax.get_yticklabels()]
    assert rows == ["gamma", "beta", "alpha", UNKNOWN]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mark_gamma", "mark_beta", "mark_alpha", "noise_0"]
    assert [t.get_text() for t in ax.texts] == ["gamma", "beta", "alpha"]  # the type above its markers
    sizes = ax.collections[0].get_sizes().reshape(len(rows), 4)
    assert sizes[0, 0] > sizes[1, 0] and sizes[1, 1] > sizes[0, 1]  # each call carries its own marker
    png = save_figure(fig, RunLayout(tmp_path / "run"), "marker_dotplot", pdf=False)
    assert png.is_file() and png.stat().st_size > 0


def test_confidence_by_type_rows_axis_and_threshold():
    from scgpt_protocol.pl.evidence import CONFIDENCE_AXIS, plot_confidence_by_type

    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], 90, p=[0.5, 0.3, 0.2])
    confidence = rng.uniform(0, 1, 90)
    fig = plot_confidence_by_type(labels, confidence, threshold=0.4)
    ax = fig.axes[0]
    assert [t.get_text().split(" (n=")[0] for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() == CONFIDENCE_AXIS
    vertical = [line for line in ax.get_lines() if list(line.get_xdata()) == [0.4, 0.4]]
    assert vertical
    no_line = plot_confidence_by_type(labels, confidence, threshold=0, order=["c", "a", "b"]).axes[0]
    assert not [line for line in no_line.get_lines() if list(line.get_xdata()) == [0, 0]]
    assert [t.get_text().split(" (n=")[0] for t in no_line.get_yticklabels()] == ["c", "a", "b"]


def test_call_umaps_three_panels_and_majority_voting_off(tmp_path):
    from scgpt_protocol.annotate.columns import COLUMNS
    from scgpt_protocol.pl.evidence import plot_call_umaps
    from scgpt_protocol.pl.figure import save_figure

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            COLUMNS["labels"]: pd.Categorical(rng.choice(["a", "b", UNKNOWN], 50)),
            COLUMNS["majority_voting"]: pd.Categorical(rng.choice(["a", "b"], 50)),
            COLUMNS["confidence"]: rng.uniform(0, 1, 50),
        },
        index=[f"c{i}" for i in range(50)],
    )
    adata = ad.AnnData(obs=obs, obsm={"X_umap_scgpt": rng.normal(size=(50, 2))})
    fig = plot_call_umaps(adata, basis="X_umap_scgpt")
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0] == "predicted label" and titles[1].startswith("majority voting") and "confidence" in titles[2]
    assert _legend(fig.axes[0])[UNKNOWN] == UNKNOWN_COLOR
    assert save_figure(fig, RunLayout(tmp_path / "run"), "call_umaps", pdf=False).is_file()
    no_vote = ad.AnnData(
        obs=obs.drop(columns=COLUMNS["majority_voting"]), obsm={"X_umap_scgpt": adata.obsm["X_umap_scgpt"]}
    )
    off = plot_call_umaps(no_vote, basis="X_umap_scgpt")
    assert any(t.get_text() == "majority voting off" for t in off.axes[1].texts)


def test_mt_caveat_below_five_mt_genes():
    from scgpt_protocol.pl.qc import plot_qc
    from scgpt_protocol.pp.inspect import MIN_MT_GENES, mt_gene_count

    adata = _planted(n_per_type=5)
    adata.var_names = ["MT-CO1", *adata.var_names[1:]]
    assert mt_gene_count(adata) == 1 < MIN_MT_GENES
    assert "not meaningful" in plot_qc(adata).axes[2].get_title()
    adata.var_names = [f"MT-{i}" for i in range(6)] + list(adata.var_names[6:])
    assert mt_gene_count(adata) == 6
    assert "not meaningful" not in plot_qc(adata).axes[2].get_title()


@pytest.mark.slow
def test_overview_umap_on_a_seeded_sample(tmp_path):
    from scgpt_protocol.pl.figure import save_figure
    from scgpt_protocol.pl.qc import plot_overview_umap

    adata = _planted()
    adata.write_h5ad(tmp_path / "planted.h5ad")
    backed = ad.read_h5ad(tmp_path / "planted.h5ad", backed="r")
    fig = plot_overview_umap(backed, label_key="cell_type", max_cells=60, seed=0)
    ax = fig.axes[0]
    assert "60 of 120 cells" in ax.get_title()
    assert set(_legend(ax)) <= {"alpha", "beta", "gamma"}
    again = plot_overview_umap(backed, label_key="cell_type", max_cells=60, seed=0)
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), again.axes[0].collections[0].get_offsets())
    assert save_figure(fig, RunLayout(tmp_path / "run"), "overview_umap", pdf=False).is_file()


def test_an_input_grey_class_colour_is_replaced():
    from scgpt_protocol.data.colors import is_grey, label_palette

    adata = ad.AnnData(obs=pd.DataFrame({"ct": pd.Categorical(["a", "b"])}, index=["c1", "c2"]))
    adata.uns["ct_colors"] = ["#123456", "#7f7f7f"]  # b grey in the input: it would read as "no call"
    palette = label_palette(["a", "b"], adata=adata, label_key="ct")
    assert palette["a"] == "#123456" and not is_grey(palette["b"])
