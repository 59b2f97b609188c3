"""Label maps in the steps (issue 18): 01's training labels, 04's reference and query (novel types apart)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import PreprocessParams
from scgpt_protocol.data.label_map import LabelMapError
from scgpt_protocol.metrics import ZEROSHOT_METHOD

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
    assert "left out of training" in inspection.label_map_text and "label map" in str(inspection)


def test_01_a_bad_map_fails_before_any_work(tmp_path):
    from scgpt_protocol.pp.stream import prepare_file

    _, path = _fine_input(tmp_path)
    bad = tmp_path / "one_column.csv"
    bad.write_text("type_0\ntype_1\n")
    params = PreprocessParams(adata_path=str(path), label_key="cell_type", label_map=str(bad))
    with pytest.raises(LabelMapError, match="a column is missing"):
        prepare_file(params, {f"GENE{i}": i for i in range(60)}, RunLayout(tmp_path / "run").make_dirs())


# --------------------------------------------------------------------------- 04
NOVEL = "CD14+ Monocyte"


@pytest.fixture(scope="module")
def labelled_pbmc(pbmc):
    import scanpy as sc

    adata = pbmc[:, :300].copy()
    adata.obs["label"] = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
    return adata


def _zeroshot(tmp_path, reference, query, label_map=None, **kw):
    """04's inputs from two files (and a label map), as the notebook gets them."""
    from scgpt_protocol.core.params import ZeroshotParams
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, adata in (("reference", reference), ("query", query)):
        paths.append(tmp_path / f"{name}.h5ad")
        adata.write_h5ad(paths[-1])
    layout = RunLayout(tmp_path / "run").make_dirs()
    params = ZeroshotParams(run_dir=str(layout.run_dir), reference_path=str(paths[0]), query_path=str(paths[1]),
                            label_key="label", label_map=label_map, **kw)
    return layout, zeroshot_inputs(layout, params)


def _annotate(inputs, model, **kw):
    from scgpt_protocol.annotate.zeroshot import zeroshot_annotate
    from scgpt_protocol.evaluate.novel import zeroshot_novel

    reference, query, label_key, maps = inputs
    result = zeroshot_annotate(reference, query, model, label_key=label_key, k=5, max_seq_len=32, **kw)
    return result, zeroshot_novel(result, maps)


def test_04_a_renamed_query_with_a_label_map_scores_like_the_original_names(labelled_pbmc, tiny_model, tmp_path):
    reference, query = labelled_pbmc[:150].copy(), labelled_pbmc[150:230].copy()
    renamed = query.copy()
    renamed.obs["label"] = ["q " + v for v in query.obs["label"]]
    rename = {f"q {v}": v for v in query.obs["label"].unique()}
    _, plain = _zeroshot(tmp_path / "plain", reference, query)
    _, mapped = _zeroshot(tmp_path / "mapped", reference, renamed, label_map=rename)
    assert mapped[3].query.unmapped == [] and set(mapped[1].obs["label_original"]) == set(rename)
    (a, _), (b, _) = _annotate(plain, tiny_model), _annotate(mapped, tiny_model)
    assert a.metrics["knn_vote"] == b.metrics["knn_vote"] and a.metrics["knn_weighted"] == b.metrics["knn_weighted"]
    assert b.metrics["label_map"]["query"]["map"] == rename and "label_map" not in a.metrics


def test_04_a_novel_type_is_reported_apart_and_left_out_of_the_knn_metrics(labelled_pbmc, tiny_model, tmp_path):
    from scgpt_protocol.annotate.zeroshot import write_zeroshot
    from scgpt_protocol.evaluate.novel import zeroshot_crosstab
    from scgpt_protocol.protocol.display.novel import novel_frame

    cells = labelled_pbmc[:300]
    reference = cells[:200][cells[:200].obs["label"] != NOVEL].copy()  # the reference never saw NOVEL
    query = cells[200:].copy()
    n_novel = int((query.obs["label"] == NOVEL).sum())
    assert n_novel > 0
    layout, inputs = _zeroshot(tmp_path, reference, query)  # no map: a query label absent from the reference
    result, novel = _annotate(inputs, tiny_model, min_confidence=0.6)
    assert novel["types"] == [NOVEL] and novel["n_cells"] == n_novel
    entry = novel["methods"][ZEROSHOT_METHOD]["novel"][NOVEL]
    assert entry["n_cells"] == n_novel and sum(entry["called"].values()) == n_novel
    assert entry["unknown_rate"] == pytest.approx(entry["called"].get("Unknown", 0) / n_novel)
    assert result.metrics["knn_vote"]["n_cells"] == query.n_obs - n_novel  # shared types only
    assert novel["methods"][ZEROSHOT_METHOD]["all_cells"]["n_cells"] == query.n_obs
    assert any("absent from the reference (novel types)" in n for n in result.notes)
    table = zeroshot_crosstab(result)
    assert int(table.loc[NOVEL].sum()) == n_novel and NOVEL not in table.columns
    assert novel_frame(novel).loc[(NOVEL, ZEROSHOT_METHOD), "cells"] == n_novel
    write_zeroshot(layout, result)
    saved = json.loads(layout.zeroshot_metrics.read_text())
    assert saved["novel"]["types"] == [NOVEL] and saved["knn_vote"]["n_cells"] == query.n_obs - n_novel


def test_04_a_reference_label_mapped_to_nothing_leaves_its_cells_out(labelled_pbmc, tiny_model, tmp_path):
    reference, query = labelled_pbmc[:150].copy(), labelled_pbmc[150:230].copy()
    n_ref = int((reference.obs["label"] == NOVEL).sum())
    n_query = int((query.obs["label"] == NOVEL).sum())
    _, inputs = _zeroshot(tmp_path, reference, query, label_map={NOVEL: None})
    ref, q, _, maps = inputs
    assert ref.n_obs == reference.n_obs - n_ref and NOVEL not in set(ref.obs["label"].dropna())
    assert maps.reference.dropped == {NOVEL: n_ref} and maps.query.dropped == {NOVEL: n_query}
    assert q.n_obs == query.n_obs and int(q.obs["label"].isna().sum()) == n_query  # not scored, not novel
    result, novel = _annotate(inputs, tiny_model)
    assert result.params["n_reference"] == reference.n_obs - n_ref and novel is None
    assert result.metrics["label_map"]["reference"]["n_dropped"] == n_ref
    assert any("left out of scoring" in n for n in result.notes)


def test_04_bad_label_maps_fail_early_with_clear_errors(labelled_pbmc, tmp_path):
    reference, query = labelled_pbmc[:100].copy(), labelled_pbmc[100:150].copy()
    one_column = tmp_path / "one_column.csv"
    one_column.write_text("label\nB cell\n")
    with pytest.raises(LabelMapError, match="a column is missing"):
        _zeroshot(tmp_path / "a", reference, query, label_map=str(one_column))
    renamed = query.copy()
    renamed.obs["label"] = ["q " + v for v in query.obs["label"]]
    rename = {f"q {v}": v for v in query.obs["label"].unique()}
    with pytest.raises(LabelMapError, match=r"the query's labels against the reference's .* 'q CD19\+ B' -> 'B cell'"):
        _zeroshot(tmp_path / "b", reference, renamed, label_map={**rename, "q CD19+ B": "B cell"})  # not a ref name
    with pytest.raises(LabelMapError, match="no cell has a label the model knows"):
        _zeroshot(tmp_path / "c", reference, renamed, label_map={"unrelated": "x"})


def test_04_maps_the_run_s_own_cells_read_backed(split_pbmc, tmp_path):
    from scgpt_protocol.core.params import ZeroshotParams
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    layout = RunLayout(tmp_path / "run").make_dirs()
    layout.write_h5ad(split_pbmc, layout.prepared_adata)
    layout.write_json(layout.labels, {"label_key": "label", "categories": sorted(split_pbmc.obs["label"].unique())})
    split, labels = split_pbmc.obs["split"].to_numpy(), split_pbmc.obs["label"].to_numpy()
    merge = {"CD4+/CD45RA+/CD25- Naive T": "CD4 T", "CD4+/CD45RO+ Memory": "CD4 T", NOVEL: None}
    params = ZeroshotParams(run_dir=str(layout.run_dir), label_map=merge)
    reference, query, label_key, maps = zeroshot_inputs(layout, params)
    assert reference.isbacked and query.isbacked and label_key == "label"
    trained = np.isin(split, ["train", "val"])
    assert reference.n_obs == int((trained & (labels != NOVEL)).sum()) and query.n_obs == int((split == "test").sum())
    assert "CD4 T" in set(reference.obs["label"]) and not {NOVEL, "CD4+/CD45RO+ Memory"} & set(reference.obs["label"])
    assert int(query.obs["label"].isna().sum()) == int(((split == "test") & (labels == NOVEL)).sum())
    assert list(query.obs["label_original"]) == list(labels[split == "test"])
    assert maps.query.novel == [] and "Label map on the query" in maps.describe()
