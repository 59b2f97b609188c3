"""Label maps, novel types and their scoring (issue 18)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.data.label_map import (
    LabelMapError,
    LabelMapNotFoundError,
    apply_label_map,
    novel_types,
    read_label_map,
)
from scgpt_protocol.evaluate.novel import crosstab, split_novel
from scgpt_protocol.metrics import classification_metrics

CLASSES = ["CD4 T", "CD8 T", "B", "Monocyte"]
#: the query's own names -> the model's (many-to-one: both monocyte types are "Monocyte")
RENAME = {"T_CD4": "CD4 T", "T_CD8": "CD8 T", "B cell": "B", "Mono_CD14": "Monocyte", "Mono_CD16": "Monocyte"}


def _query(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels in the query's own names, the same in the model's names, predictions of a noisy model)."""
    rng = np.random.default_rng(seed)
    own = rng.choice(list(RENAME), size=n)
    model_names = np.array([RENAME[v] for v in own], dtype=object)
    pred = model_names.copy()
    wrong = rng.random(n) < 0.2
    pred[wrong] = rng.choice(CLASSES, size=int(wrong.sum()))
    return own, model_names, pred


def test_renamed_query_with_a_map_scores_like_the_original_names(tmp_path):
    own, original, pred = _query()
    mapped = apply_label_map(pd.Series(own), RENAME, model_classes=CLASSES)
    assert mapped.novel == [] and mapped.dropped == {} and mapped.unmapped == []
    assert mapped.labels.tolist() == original.tolist()
    with_map = classification_metrics(mapped.labels.to_numpy(), pred, categories=CLASSES)
    with_names = classification_metrics(original, pred, categories=CLASSES)
    assert with_map == with_names
    without_map = classification_metrics(own, pred, categories=CLASSES)
    assert without_map["accuracy"] == 0.0 < with_names["accuracy"]  # the reason for maps: strings never match


def test_csv_and_inline_forms_agree(tmp_path):
    inline = {**RENAME, "HSC": None, " Doublet ": ""}
    with_header = tmp_path / "map.csv"
    with_header.write_text("label,model\n" + "".join(f"{k},{v}\n" for k, v in RENAME.items()) + "HSC,\n Doublet ,\n")
    no_header = tmp_path / "plain.csv"
    no_header.write_text("".join(f"{k},{v},extra\n" for k, v in RENAME.items()) + "HSC,,\nDoublet,,\n\n")
    expected = {**RENAME, "HSC": None, "Doublet": None}
    assert read_label_map(inline) == expected
    assert read_label_map(with_header) == expected
    assert read_label_map(str(no_header)) == expected
    assert read_label_map(None) == {}
    labels = pd.Series(["T_CD4", "HSC", " Doublet", "Mono_CD16", "HSC"], index=list("abcde"))
    results = [apply_label_map(labels, spec, model_classes=CLASSES) for spec in (inline, with_header, no_header)]
    for r in results:
        assert r.labels.index.tolist() == list("abcde")
        assert r.labels.tolist()[0] == "CD4 T" and r.labels.tolist()[3] == "Monocyte"
        assert r.labels.isna().tolist() == [False, True, True, False, True]
        assert r.dropped == {"HSC": 2, "Doublet": 1} and r.n_dropped == 3


def test_unmapped_labels_are_kept_and_novel_types_found():
    labels = pd.Series(["T_CD4", "NK", "NK", None, "B", "nan"])
    r = apply_label_map(labels, {"T_CD4": "CD4 T"}, model_classes=CLASSES)
    assert r.labels.tolist()[:3] == ["CD4 T", "NK", "NK"] and r.labels.tolist()[4] == "B"
    assert r.unmapped == ["B", "NK"] and r.novel == ["NK"] and r.n_missing == 2
    assert novel_types(["B", " NK ", "pDC", None, "NK"], CLASSES) == ["NK", "pDC"]
    # without model_classes nothing is checked against the model
    assert apply_label_map(labels, {"T_CD4": "Anything"}).novel == []


def test_novel_type_is_reported_apart():
    _, original, pred = _query(seed=1, n=200)
    y_true = np.concatenate([original, ["NK"] * 40, [np.nan] * 5]).astype(object)
    novel_calls = np.array(["Unknown"] * 25 + ["CD8 T"] * 10 + ["CD4 T"] * 5, dtype=object)
    y_pred = np.concatenate([pred, novel_calls, ["B"] * 5]).astype(object)
    out = split_novel(y_true, y_pred, CLASSES)
    assert out["shared_mask"].sum() == 200 and not out["shared_mask"][200:].any()
    assert out["shared"] == classification_metrics(original, pred, categories=CLASSES, unassigned="Unknown")
    assert out["novel"] == {"NK": {"n_cells": 40, "unknown_rate": 25 / 40, "called": {"Unknown": 25, "CD8 T": 10,
                                                                                        "CD4 T": 5}}}
    right_shared = int((original == pred).sum())
    assert out["all_cells"] == {"accuracy": (right_shared + 25) / 240, "n_cells": 240, "n_shared": 200, "n_novel": 40}
    assert out["n_dropped"] == 5
    table = crosstab(y_true, y_pred)
    assert table.loc["NK", "Unknown"] == 25 and table.loc["NK", "CD8 T"] == 10
    assert int(table.to_numpy().sum()) == 240 and table.index.name == "query label"
    assert table.loc["B"].sum() == int((original == "B").sum())


def test_map_file_with_a_missing_column(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("T_CD4\nT_CD8\n")
    with pytest.raises(LabelMapError, match="column is missing"):
        read_label_map(one)
    with pytest.raises(LabelMapNotFoundError, match="not found"):
        read_label_map(tmp_path / "absent.csv")


def test_label_mapped_to_a_class_the_model_lacks():
    with pytest.raises(LabelMapError, match=r"'MK' -> 'Platelet'.*'CD4 T', 'CD8 T', 'B', 'Monocyte'"):
        apply_label_map(pd.Series(["T_CD4", "MK"]), {**RENAME, "MK": "Platelet"}, model_classes=CLASSES)
    # an entry for a label the data does not hold is not an error (a map may cover several datasets)
    assert apply_label_map(pd.Series(["T_CD4"]), {**RENAME, "MK": "Platelet"}, model_classes=CLASSES).novel == []


def test_map_that_leaves_no_shared_type():
    with pytest.raises(LabelMapError, match="no cell has a label the model knows"):
        apply_label_map(pd.Series(["T_CD4", "HSC"]), {"T_CD4": None}, model_classes=CLASSES)


def test_duplicate_labels_with_conflicting_targets(tmp_path):
    conflicting = tmp_path / "dup.csv"
    conflicting.write_text("T_CD4,CD4 T\nT_CD8,CD8 T\n T_CD4 ,CD8 T\n")
    with pytest.raises(LabelMapError, match="two different targets.*line 3"):
        read_label_map(conflicting)
    with pytest.raises(LabelMapError, match="two different targets"):
        read_label_map({"T_CD4": "CD4 T", "T_CD4 ": "CD8 T"})
    agreeing = tmp_path / "same.csv"
    agreeing.write_text("T_CD4,CD4 T\nT_CD4,CD4 T\n")
    assert read_label_map(agreeing) == {"T_CD4": "CD4 T"}


def test_other_bad_maps():
    with pytest.raises(LabelMapError, match="expected one model label"):
        read_label_map({"T_CD4": ["CD4 T"]})
    with pytest.raises(LabelMapError, match="CSV path or a mapping"):
        read_label_map(["T_CD4", "CD4 T"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one prediction per cell"):
        split_novel(["B"], ["B", "B"], CLASSES)
    with pytest.raises(ValueError, match="Unknown"):
        split_novel(["B"], ["B"], [*CLASSES, "Unknown"])
