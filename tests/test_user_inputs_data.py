"""Inputs real users bring (round two), step 01: cell names, labels, label columns, vocabularies, CPM values
and lower-case gene symbols. Small synthetic data, no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scgpt_protocol.core.errors import CheckpointError, GeneMatchError, InputDataError
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import ParamsError, PreprocessParams
from scgpt_protocol.data.demo import make_toy_adata
from scgpt_protocol.pp.in_memory import prepare
from scgpt_protocol.pp.inspect import inspect_adata

VOCAB = {**{f"GENE{i}": i for i in range(40)}, "<pad>": 40, "<cls>": 41, "<eoc>": 42}


def _toy(**kwargs):
    return make_toy_adata(n_cells=kwargs.pop("n_cells", 120), n_genes=40, n_labels=3, **kwargs)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")  # anndata says so too, on every copy
def test_repeated_cell_names_are_made_unique_at_01_with_a_recorded_warning():
    adata = _toy()
    adata.obs_names = ["AAAC-1"] * 4 + list(adata.obs_names[4:])
    with pytest.warns(UserWarning, match=r"3 cell name\(s\) in obs_names repeat an earlier one \(e.g. 'AAAC-1'\)"):
        inspection = inspect_adata(adata, label_key="cell_type", vocab=VOCAB)
    assert any("prepare makes them unique" in w for w in inspection.warnings)
    with pytest.warns(UserWarning, match="made unique by appending"):
        prepared = prepare(adata, PreprocessParams(label_key="cell_type"), VOCAB)
    assert prepared.adata.obs_names.is_unique
    assert {"AAAC-1", "AAAC-1-1", "AAAC-1-2", "AAAC-1-3"} <= set(prepared.adata.obs_names)
    assert any("repeat an earlier one" in line for line in prepared.log)  # kept in the prepared data's record
    assert adata.obs_names[1] == "AAAC-1"  # the input is not changed


def test_labels_are_trimmed_and_case_only_differences_named():
    adata = _toy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    first = np.flatnonzero(labels == "type_0")
    labels[first[:6]] = "type_0 "
    labels[first[6:12]] = "TYPE_0"
    adata.obs["cell_type"] = labels
    with pytest.warns(UserWarning) as caught:
        inspection = inspect_adata(adata, label_key="cell_type", vocab=VOCAB)
    assert "'type_0 '" in " ".join(str(w.message) for w in caught)
    assert set(inspection.class_counts.index) == {"type_0", "TYPE_0", "type_1", "type_2"}
    assert any("differ only by upper / lower case" in w and "'TYPE_0' / 'type_0'" in w for w in inspection.warnings)
    with pytest.warns(UserWarning) as caught:
        prepared = prepare(adata, PreprocessParams(label_key="cell_type"), VOCAB)
    assert any("differ only by upper / lower case" in str(w.message) for w in caught)
    assert prepared.categories == ["TYPE_0", "type_0", "type_1", "type_2"]  # trimmed: no 'type_0 ' class
    assert any("were trimmed" in line for line in prepared.log)


def test_a_continuous_label_column_gets_a_short_useful_error():
    adata = _toy(n_cells=700)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.int64) * 3 + np.arange(700)
    adata.obs["score"] = np.random.default_rng(0).random(700)
    for key in ("n_counts", "score"):
        with pytest.raises(InputDataError, match=rf"obs\['{key}'\] holds numbers .* columns of text with a few "
                                                 r"distinct values: \['cell_type', 'batch'\]") as err:
            inspect_adata(adata, label_key=key, vocab=VOCAB)
        assert len(str(err.value)) < 500 and "np.int64" not in str(err.value)
        with pytest.raises(InputDataError, match="a measurement rather than cell-type labels"):
            prepare(adata, PreprocessParams(label_key=key), VOCAB)
    adata.obs["cluster"] = np.arange(700) % 4  # integer cluster numbers are labels
    assert inspect_adata(adata, label_key="cluster", vocab=VOCAB).n_classes == 4


def test_a_class_named_unknown_is_warned_about_at_01():
    adata = _toy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace({"type_2": "Unknown"})
    with pytest.warns(UserWarning, match="has a class named 'Unknown'.*refuse this class"):
        prepare(adata, PreprocessParams(label_key="cell_type"), VOCAB)


def test_a_class_named_unknown_with_min_confidence_is_refused_before_training(tmp_path, monkeypatch):
    import papermill
    from test_run_robustness import FakePapermill

    from scgpt_protocol.protocol.run.runner import run_protocol

    def prepare_with_unknown(notebook, report, parameters, layout):
        layout.labels.parent.mkdir(parents=True, exist_ok=True)
        layout.labels.write_text(json.dumps({"label_key": "cell_type", "categories": ["B", "T", "Unknown"]}))
        report_path = layout.step_report("01_preprocess")
        report_path.write_text("{}")

    fake = FakePapermill({"01_preprocess": prepare_with_unknown})
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    scenario = tmp_path / "scenario"
    shutil.copytree(Path(__file__).resolve().parent.parent / "params" / "ci", scenario)
    with pytest.raises(ParamsError, match="class named 'Unknown', and 03_evaluate has min_confidence=0.2"):
        run_protocol(scenario, tmp_path / "run", html=False)
    assert fake.calls == ["01_preprocess"]  # 02 never started
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and "class named 'Unknown'" in manifest["error"]


def test_a_vocabulary_without_cls_is_refused_when_01_loads_the_checkpoint(tiny_checkpoint, tmp_path):
    from scgpt_protocol.pp.io import resolve_checkpoint

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    vocab = json.loads((broken / "vocab.json").read_text())
    del vocab["<cls>"]
    (broken / "vocab.json").write_text(json.dumps(vocab))
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(CheckpointError, match="has no '<cls>' token .*Use the vocab.json released with"):
        resolve_checkpoint(str(broken), layout, [])
    assert not layout.checkpoint_record.exists()


def test_the_qc_histogram_of_cpm_values_draws_with_a_note():
    from scgpt_protocol.pl.qc import plot_qc

    adata = _toy(n_cells=300)
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    adata.X = sp.csr_matrix(sp.diags(1e6 / np.asarray(x.sum(axis=1)).ravel()) @ x, dtype=np.float32)
    fig = plot_qc(adata)
    assert "all cells 1e+06 (normalised per cell?)" in fig.axes[1].get_title()


def test_lower_case_human_symbols_get_the_hint_to_upper_case_them():
    from scgpt_protocol.model.vocab import match_genes

    adata = _toy()
    adata.var_names = adata.var_names.str.lower()
    with pytest.raises(GeneMatchError, match=r"40 more genes match when upper-cased \(e.g. 'gene0' -> 'GENE0'\)"):
        match_genes(adata, VOCAB)
    with pytest.warns(UserWarning, match="upper-case them"):
        inspect_adata(adata, label_key="cell_type", vocab=VOCAB)
    adata.var_names = adata.var_names.str.upper()
    assert match_genes(adata, VOCAB).n_matched == 40


def test_long_and_cjk_labels_are_shortened_in_figures_with_a_note_for_missing_glyphs(tmp_path, caplog):
    from PIL import Image

    from scgpt_protocol.pl.figure import missing_glyphs, save_figure, short_label
    from scgpt_protocol.pl.metrics import plot_confusion
    from scgpt_protocol.pl.qc import plot_class_counts

    long = ("T cell " * 94 + "x")[:660]
    adata = _toy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace({"type_0": "细胞 \U0001F9EC", "type_1": long})
    prepared = prepare(adata, PreprocessParams(label_key="cell_type"), VOCAB)
    assert long in prepared.categories  # the full name stays in the data and the tables
    assert len(short_label(long)) == 40 and short_label(long).endswith("\u2026") and short_label("B") == "B"
    fig = plot_class_counts(prepared)
    saved = save_figure(fig, RunLayout(tmp_path), "class_counts")
    with Image.open(saved) as image:
        assert image.size[0] < 1200  # not 5,900 px wide
    assert "U+7EC6" in caplog.text and "no glyph in the font" in caplog.text
    assert any("no glyph" in t.get_text() for t in fig.texts)
    import pandas as pd

    frame = pd.DataFrame([[1.0, 0.0], [0.0, 1.0]], index=[long, "B"], columns=[long, "B"])
    saved = save_figure(plot_confusion(frame), RunLayout(tmp_path), "confusion")
    with Image.open(saved) as image:
        assert max(image.size) < 1200
    assert missing_glyphs(plot_confusion(frame))[0] == ""
