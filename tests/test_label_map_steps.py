"""Label maps in the steps (issue 18): 01's training labels, 04's reference and query (novel types apart)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import PreprocessParams
from scgpt_protocol.data.label_map import LabelMapError

#: 01: a fine label column mapped to coarse names (many-to-one); type_3 mapped to nothing
COARSE = {"type_0": "lymphoid", "type_1": "lymphoid", "type_2": "myeloid", "type_3": None}


# --------------------------------------------------------------------------- 01
def _fine_input(tmp_path):
    from scgpt_protocol.data.demo import make_toy_adata

    adata = make_toy_adata(n_cells=240, n_genes=60, n_labels=4, seed=1)
    path = tmp_path / "fine.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.mark.parametrize("chunked", [False, True])
def test_01_trains_on_the_mapped_labels_and_leaves_out_labels_mapped_to_nothing(tmp_path, chunked):
    from scgpt_protocol.pp.stream import prepare_file

    adata, path = _fine_input(tmp_path)
    fine = adata.obs["cell_type"].astype(str)
    layout = RunLayout(tmp_path / "run").make_dirs()
    params = PreprocessParams(adata_path=str(path), label_key="cell_type", label_map=COARSE, min_cells_per_class=3)
    prepared = prepare_file(params, {f"GENE{i}": i for i in range(60)}, layout, chunked=chunked, chunk_size=50)
    n_left_out = int((fine == "type_3").sum())
    assert prepared.categories == ["lymphoid", "myeloid"]
    assert prepared.adata.n_obs == adata.n_obs - n_left_out
    assert any(f"left out {n_left_out} cells whose label the label map maps to nothing ('type_3' ({n_left_out}))"
               in line for line in prepared.log)
    obs = prepared.adata.obs
    assert set(obs["cell_type_original"]) == {"type_0", "type_1", "type_2"}  # the labels as given, kept
    assert (obs["cell_type"].astype(str) == obs["cell_type_original"].map(COARSE)).all()
    saved = json.loads(layout.labels.read_text())
    assert saved["categories"] == ["lymphoid", "myeloid"]
    assert saved["class_counts"] == {"lymphoid": int(fine.isin(["type_0", "type_1"]).sum()),
                                     "myeloid": int((fine == "type_2").sum())}
    assert set(saved["colors"]) == {"lymphoid", "myeloid", "Unknown"}
    assert saved["label_map"]["dropped"] == {"type_3": n_left_out} and saved["label_map"]["n_dropped"] == n_left_out
    assert saved["label_map"]["unmapped"] == []


def test_01_a_label_map_in_prepare_leaves_the_input_alone_and_counts_unlabelled_cells_apart():
    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.pp.in_memory import prepare

    adata = make_toy_adata(n_cells=200, n_genes=40, n_labels=3)
    labels = adata.obs["cell_type"].astype(object).to_numpy().copy()
    labels[:5] = None
    adata.obs["cell_type"] = labels
    before = adata.obs.copy()
    params = PreprocessParams(label_key="cell_type", label_map={"type_0": "A", "type_1": "A"}, min_cells_per_class=3)
    with pytest.warns(UserWarning, match="dropped 5 cells without a label"):
        prepared = prepare(adata, params, {f"GENE{i}": i for i in range(40)})
    pd.testing.assert_frame_equal(adata.obs, before)  # prepare does not change its input
    assert prepared.categories == ["A", "type_2"]  # type_2 is not in the map: kept as it is
    assert prepared.label_map["unmapped"] == ["type_2"] and prepared.label_map["n_dropped"] == 0


def test_01_inspection_counts_cells_mapped_to_nothing_apart(tmp_path):
    from scgpt_protocol.data.label_map import map_obs_labels
    from scgpt_protocol.pp.inspect import inspect_adata

    adata, _ = _fine_input(tmp_path)
    result = map_obs_labels(adata, "cell_type", COARSE, what="the training data")
    inspection = inspect_adata(adata, label_key="cell_type", vocab={f"GENE{i}": i for i in range(60)},
                               min_cells_per_class=3, label_map=result)
    assert set(inspection.class_counts.index) == {"lymphoid", "myeloid"}
    assert inspection.n_missing_labels == 0  # cells mapped to nothing are not "without a label"
    assert inspection.to_dict()["label_map"]["n_dropped"] == result.n_dropped > 0
    assert "dropped from scoring" in inspection.label_map_text and "label map" in str(inspection)


def test_01_a_bad_map_fails_before_any_work(tmp_path):
    from scgpt_protocol.pp.stream import prepare_file

    _, path = _fine_input(tmp_path)
    bad = tmp_path / "one_column.csv"
    bad.write_text("type_0\ntype_1\n")
    params = PreprocessParams(adata_path=str(path), label_key="cell_type", label_map=str(bad))
    with pytest.raises(LabelMapError, match="a column is missing"):
        prepare_file(params, {f"GENE{i}": i for i in range(60)}, RunLayout(tmp_path / "run").make_dirs())
