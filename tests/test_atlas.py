"""Reference indexes (issue 30): a labelled reference built once into a faiss index folder, queries mapped onto it in
04; the official scGPT layout; the refusals (another checkpoint, other settings, few shared genes, no faiss)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss")

from scgpt_protocol.annotate.atlas import AtlasIndexError, FaissMissingError, default_nprobe, load_index  # noqa: E402
from scgpt_protocol.annotate.atlas_build import build_index, make_faiss_index  # noqa: E402
from scgpt_protocol.annotate.zeroshot import zeroshot_annotate  # noqa: E402

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def split():
    """The demo's 700 cells: a labelled reference (70%) and a query, stratified by bulk_labels."""
    from sklearn.model_selection import train_test_split

    from scgpt_protocol.data.demo import load_demo

    demo = load_demo()
    ref_idx, query_idx = train_test_split(np.arange(demo.n_obs), train_size=0.7, stratify=demo.obs["bulk_labels"],
                                          random_state=0)
    return demo[np.sort(ref_idx)].copy(), demo[np.sort(query_idx)].copy()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from scgpt_protocol import load_model

    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def flat_index(split, model, tmp_path_factory):
    reference, _ = split
    return build_index(reference, model, tmp_path_factory.mktemp("atlas") / "flat", label_keys=["bulk_labels",
                       "louvain"], max_seq_len=MAX_SEQ_LEN, precision="fp32", sample_size=100)


def _annotate(reference, query, model, **kw):
    kw = {"label_key": "bulk_labels", "max_seq_len": MAX_SEQ_LEN, "precision": "fp32", **kw}
    return zeroshot_annotate(reference, query.copy(), model, **kw)


# --------------------------------------------------------------------------- build once, map many times
def test_flat_index_gives_the_labels_of_the_reference_itself(split, model, flat_index):
    reference, query = split
    direct = _annotate(reference.copy(), query, model, min_confidence=0.5, majority_voting=True)
    indexed = _annotate(load_index(flat_index), query, model, min_confidence=0.5, majority_voting=True)
    pd.testing.assert_frame_equal(indexed.predictions, direct.predictions)
    np.testing.assert_array_equal(indexed.transfer.neighbors, direct.transfer.neighbors)
    np.testing.assert_array_equal(indexed.transfer.distances, direct.transfer.distances)
    assert indexed.metrics["knn_vote"] == direct.metrics["knn_vote"]
    assert indexed.reference_embedding is None and indexed.params["n_reference"] == reference.n_obs
    assert indexed.params["reference_index"]["kind"] == "flat"
    assert indexed.params["reused_embeddings"]["reference"] is True


def test_unlabelled_reference_cells_do_not_vote_in_the_index_either(split, model, tmp_path):
    reference, query = (a.copy() for a in split)
    labels = reference.obs["louvain"].astype(object)
    labels.iloc[::7] = np.nan
    reference.obs["louvain"] = labels
    folder = build_index(reference, model, tmp_path / "idx", label_keys="louvain", max_seq_len=MAX_SEQ_LEN,
                         precision="fp32")
    with pytest.warns(UserWarning, match="reference cells have no 'louvain' label"):
        direct = _annotate(reference, query, model, label_key="louvain")
    with pytest.warns(UserWarning, match="reference cells have no 'louvain' label"):
        indexed = _annotate(folder, query, model, label_key="louvain")  # a folder is loaded
    pd.testing.assert_frame_equal(indexed.predictions, direct.predictions)
    np.testing.assert_array_equal(indexed.transfer.neighbors, direct.transfer.neighbors)


def test_the_folder_holds_index_labels_names_sample_and_manifest(split, model, flat_index):
    from scgpt_protocol.model.checkpoint import model_checkpoint_record

    reference, _ = split
    assert sorted(p.name for p in flat_index.iterdir()) == ["cells.h5", "index.faiss", "index_config.json",
                                                            "manifest.json", "meta.h5ad"]
    assert not list(flat_index.parent.glob(".*partial"))  # the temporary folder is gone
    manifest = json.loads((flat_index / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == model_checkpoint_record(model)["sha256"]
    assert manifest["embedding"] == {"max_seq_len": MAX_SEQ_LEN, "cls_value": -2.0, "precision": "fp32", "seed": 0,
                                     "layer": "X", "gene_symbol_key": None, "d_model": 32, "normalized": True}
    assert manifest["index"]["kind"] == "flat" and manifest["index"]["n_cells"] == reference.n_obs
    assert manifest["genes"] == list(reference.var_names) and manifest["versions"]["faiss"]
    assert manifest["labels"]["bulk_labels"] == {"n_labelled": reference.n_obs,
                                                 "n_labels": reference.obs["bulk_labels"].nunique()}
    index = load_index(flat_index)
    assert index.n_obs == reference.n_obs and list(index.obs_names) == list(reference.obs_names)
    for key in ("bulk_labels", "louvain"):
        assert index.obs[key].astype(str).tolist() == reference.obs[key].astype(str).tolist()
    sample = index.sample_adata("bulk_labels")
    assert sample.n_obs == 100 and sample.obsm["X_scgpt"].shape == (100, 32) and sample.obs_names.isin(
        reference.obs_names).all()
    config = json.loads((flat_index / "index_config.json").read_text())
    assert config["meta_key"] == "bulk_labels" and config["num_embeddings"] == reference.n_obs


def test_joint_embedding_draws_the_index_sample(split, model, flat_index):
    from scgpt_protocol.pl.embedding import joint_embedding

    _, query = split
    index = load_index(flat_index)
    result = _annotate(index, query, model)
    joint = joint_embedding(index, query, label_key="bulk_labels", result=result, max_cells=200, seed=0)
    counts = joint.obs["dataset"].value_counts()
    assert joint.n_obs == 200 and counts["reference"] > 0 and counts["query"] > 0
    assert joint.obs.loc[joint.obs["dataset"] == "reference", "label"].notna().all()


def test_a_label_map_renames_the_index_labels_as_those_of_a_reference_file(split, model, flat_index, tmp_path):
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.core.params import ZeroshotParams
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    reference, query = split
    names = sorted(reference.obs["bulk_labels"].unique())
    label_map = {names[0]: None, **{n: n.split(" ")[0].upper() for n in names[1:]}}  # one type maps to nothing
    paths = {}
    for name, adata in (("reference", reference), ("query", query)):
        paths[name] = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    results = []
    for source in ({"reference_path": str(paths["reference"])}, {"reference_index": str(flat_index)}):
        layout = RunLayout(tmp_path / f"run-{len(results)}").make_dirs()
        params = ZeroshotParams(run_dir=str(layout.run_dir), query_path=str(paths["query"]), label_key="bulk_labels",
                                label_map=label_map, **source)
        ref, q, key, _ = zeroshot_inputs(layout, params)
        results.append(zeroshot_annotate(ref, q, model, label_key=key, max_seq_len=MAX_SEQ_LEN, precision="fp32"))
    direct, indexed = results
    assert direct.params["n_reference"] == indexed.params["n_reference"] < reference.n_obs
    pd.testing.assert_series_equal(indexed.predictions["scgpt_zeroshot_label"],
                                   direct.predictions["scgpt_zeroshot_label"])
    assert names[0] not in set(indexed.predictions["scgpt_zeroshot_label"])


# --------------------------------------------------------------------------- the official layout
def _write_official(folder, embeddings, labels, *, factory="IVF4,Flat", nprobe=4):
    """An index in exactly the official scGPT layout, written with faiss, h5py and json only."""
    import faiss
    import h5py

    folder.mkdir()
    x = np.ascontiguousarray(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), dtype=np.float32)
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_L2)
    index.train(x)
    index.add(x)
    faiss.write_index(index, str(folder / "index.faiss"))
    with h5py.File(folder / "meta.h5ad", "w") as handle:
        handle.create_dataset("meta_labels", data=np.asarray(labels, dtype="S"), compression="gzip", chunks=True)
    config = {"index_desc": factory, "num_embeddings": len(x), "num_features": x.shape[1], "nprobe": nprobe,
              "gpu": False, "meta_key": "cell_type"}
    (folder / "index_config.json").write_text(json.dumps(config))


def test_the_official_layout_loads_with_a_warning_and_maps(split, model, tmp_path):
    from scgpt_protocol.pl.embedding import joint_embedding

    reference, query = (a.copy() for a in split)
    direct = _annotate(reference, query, model)
    _write_official(tmp_path / "official", reference.obsm["X_scgpt"], reference.obs["bulk_labels"].astype(str))
    with pytest.warns(UserWarning, match="official scGPT layout.*cannot be checked"):
        index = load_index(tmp_path / "official")
    assert index.layout == "official" and index.nprobe == 4 and list(index.obs.columns) == ["cell_type"]
    assert index.obs_names is None and index.genes is None
    indexed = _annotate(index, query, model)  # label_key 'bulk_labels': the index's one column votes
    # 4 lists of 4 searched: every cell is reachable, so the neighbours (and the kNN vote) are the exact ones
    pd.testing.assert_series_equal(indexed.predictions["scgpt_zeroshot_label"],
                                   direct.predictions["scgpt_zeroshot_label"])
    assert indexed.params["reference_index"]["layout"] == "official"
    joint = joint_embedding(index, query, label_key="bulk_labels", result=indexed)
    assert (joint.obs["dataset"] == "reference").sum() == reference.n_obs  # reconstructed from the index


def test_official_nprobe_defaults_as_the_official_code_sets_it():
    assert [default_nprobe(n) for n in (4, 1000, 1001, 4000, 16000, 16001, 65536)] == [4, 16, 32, 32, 64, 128, 128]


# --------------------------------------------------------------------------- refusals
def test_another_checkpoint_is_refused_naming_both(split, flat_index, tmp_path):
    from scgpt_protocol import load_model, make_tiny_checkpoint

    reference, query = split
    other = make_tiny_checkpoint(tmp_path / "other", list(reference.var_names), d_model=32, nheads=4, d_hid=64,
                                 seed=1)
    with pytest.raises(AtlasIndexError, match=rf"built with the checkpoint .*sha256 .* but the model is {other}"):
        _annotate(load_index(flat_index), query, load_model(other, device="cpu"))
    wider = make_tiny_checkpoint(tmp_path / "wider", list(reference.var_names), d_model=64)
    with pytest.raises(AtlasIndexError, match="32-dimensional embeddings but the model embeds into 64"):
        _annotate(load_index(flat_index), query, load_model(wider, device="cpu"))


def test_other_embedding_settings_are_refused_naming_both(split, model, flat_index):
    _, query = split
    with pytest.raises(AtlasIndexError, match=r"max_seq_len 64 in the index, 32 here.*max_seq_len: 64"):
        _annotate(load_index(flat_index), query, model, max_seq_len=32)
    with pytest.raises(AtlasIndexError, match=r"precision 'fp32' in the index, 'bf16' here"):
        _annotate(load_index(flat_index), query, model, precision="bf16")
    auto = _annotate(load_index(flat_index), query, model, precision="auto")  # auto: the index's precision
    assert auto.params["precision"]["query"] == "fp32"


def test_a_query_with_few_of_the_index_genes_is_refused(split, model, flat_index):
    from scgpt_protocol.core.errors import GeneMatchError

    _, query = split
    few = query[:, : query.n_vars // 4].copy()
    with pytest.raises(GeneMatchError, match="of the reference index"):
        _annotate(load_index(flat_index), few, model)


def test_missing_faiss_names_the_pip_line(split, model, flat_index, tmp_path, monkeypatch):
    reference, _ = split
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(FaissMissingError, match=r"pip install 'scgpt-protocol\[atlas\]'"):
        load_index(flat_index)
    with pytest.raises(FaissMissingError, match=r"pip install 'scgpt-protocol\[atlas\]'"):
        build_index(reference, model, tmp_path / "none", label_keys="bulk_labels")
    assert not (tmp_path / "none").exists()


def test_both_or_no_reference_are_refused(split, model):
    from scgpt_protocol.core.params import ParamsError, ZeroshotParams

    with pytest.raises(ParamsError, match="reference_index='idx' .* None when reference_path is set"):
        ZeroshotParams(reference_path="ref.h5ad", reference_index="idx")
    assert ZeroshotParams().reference_index is None  # neither: the run's own train + validation cells
    with pytest.raises(TypeError, match="reference is None; pass the labelled reference"):
        zeroshot_annotate(None, split[1], model, label_key="bulk_labels")


def test_bad_folders_and_keys_are_clear_errors(split, model, flat_index, tmp_path):
    reference, _ = split
    with pytest.raises(FileNotFoundError, match=r"missing does not exist \(resolved to .*\); build one with"):
        load_index(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"is not a reference index: it holds \['notes.txt'\]"):
        load_index(tmp_path / "other")
    with pytest.raises(FileExistsError, match="already exists"):
        build_index(reference, model, flat_index, label_keys="bulk_labels")
    with pytest.raises(KeyError, match=r"label key\(s\) \['celltype'\] are not columns"):
        build_index(reference, model, tmp_path / "x", label_keys="celltype")
    with pytest.raises(KeyError, match=r"label_key='cell_type' is not a label column .* \['bulk_labels', 'louvain'\]"):
        _annotate(load_index(flat_index), split[1], model, label_key="cell_type")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("index.faiss", "cells.h5"):
        (damaged / name).write_bytes((flat_index / name).read_bytes())
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(AtlasIndexError, match="is not valid JSON"):
        load_index(damaged)


def test_overwrite_replaces_the_folder_once_the_new_one_is_complete(split, model, tmp_path):
    reference, _ = split
    small = reference[:120].copy()
    folder = build_index(small, model, tmp_path / "idx", label_keys="bulk_labels", max_seq_len=MAX_SEQ_LEN)
    build_index(reference, model, folder, label_keys="louvain", max_seq_len=MAX_SEQ_LEN, overwrite=True)
    index = load_index(folder)
    assert index.n_obs == reference.n_obs and list(index.obs.columns) == ["louvain"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary or set-aside folder left


# --------------------------------------------------------------------------- inverted-file indexes
def _clusters(n, *, d=32, latent=8, seed=0, stream=1):
    """Unit vectors in clusters of a low-dimensional subspace (as cell embeddings are), 8 labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, latent))
    project = np.linalg.qr(rng.normal(size=(d, latent)))[0].T
    draw = np.random.default_rng([seed, stream])
    which = draw.integers(40, size=n)
    x = (centres[which] + 0.3 * draw.normal(size=(n, latent))) @ project + 0.01 * draw.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which % 8


@pytest.mark.parametrize("kind, n, factory, recall_min, agreement_min", [
    ("ivfsq8", 20_000, "IVF512,SQ8", 0.95, 0.99),  # the default above FLAT_MAX_CELLS: near-exact distances
    ("ivfpq", 10_000, "IVF256,PQ4x8", 0.6, 0.97),  # 4 bytes per cell: coarser
])
def test_inverted_file_indexes_agree_with_exact_search(kind, n, factory, recall_min, agreement_min):
    from scgpt_protocol.annotate.atlas import search_index
    from scgpt_protocol.annotate.knn import vote_neighbors

    ref, labels = _clusters(n)
    query, _ = _clusters(1_000, stream=2)
    flat, _ = make_faiss_index(ref, kind="flat")
    index, info = make_faiss_index(ref, kind=kind)
    assert info["factory"] == factory and info["nprobe"] == 16 and info["train_size"] == n
    exact_ids, exact_dist = search_index(flat, query, 10, exact=True)
    ids, dist = search_index(index, query, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    a = vote_neighbors(exact_ids, exact_dist, labels, np.arange(8))
    b = vote_neighbors(ids, dist, labels, np.arange(8))
    assert recall > recall_min and (a.majority == b.majority).mean() >= agreement_min
    assert make_faiss_index(ref[:1000], kind="auto")[1]["kind"] == "flat"
    assert make_faiss_index(ref, kind="auto", flat_max_cells=n - 1)[1]["kind"] == "ivfsq8"


def test_a_small_threshold_builds_an_inverted_file_index_that_maps(split, model, flat_index, tmp_path):
    reference, query = split
    folder = build_index(reference, model, tmp_path / "ivf", label_keys="bulk_labels", max_seq_len=MAX_SEQ_LEN,
                         precision="fp32", flat_max_cells=100)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["index"]["kind"] == "ivfsq8" and manifest["index"]["nlist"] == reference.n_obs // 39
    index = load_index(folder)
    assert index.nprobe == manifest["index"]["nprobe"] == manifest["index"]["nlist"] and not index.exact
    assert load_index(folder, nprobe=3).nprobe == 3 and load_index(folder, nprobe=1000).nprobe == 12
    approximate = _annotate(index, query, model)
    exact = _annotate(load_index(flat_index), query, model)
    agree = (approximate.predictions["scgpt_zeroshot_label"] == exact.predictions["scgpt_zeroshot_label"]).mean()
    assert agree > 0.9  # 12 lists, all searched; distances of 8-bit codes: nearly always the exact vote
    ivf = build_index(reference, model, tmp_path / "ivf-flat", label_keys="bulk_labels", max_seq_len=MAX_SEQ_LEN,
                      precision="fp32", kind="ivf")
    same = _annotate(load_index(ivf), query, model)  # every list searched, vectors kept whole: the exact vote
    pd.testing.assert_series_equal(same.predictions["scgpt_zeroshot_label"],
                                   exact.predictions["scgpt_zeroshot_label"])


# --------------------------------------------------------------------------- the command line
def test_cli_builds_an_index(split, tiny_checkpoint, tmp_path, caplog):
    from scgpt_protocol.protocol.run.cli import main

    reference, _ = split
    reference[:150].write_h5ad(tmp_path / "ref.h5ad")
    args = ["index", "build", str(tmp_path / "ref.h5ad"), "--label-key", "bulk_labels", "--label-key", "louvain",
            "--out", str(tmp_path / "idx"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
            "--max-seq-len", str(MAX_SEQ_LEN)]
    assert main(args) == 0
    index = load_index(tmp_path / "idx")
    assert index.n_obs == 150 and list(index.obs.columns) == ["bulk_labels", "louvain"]
    assert main(args) == 2 and "already exists" in caplog.text  # never written over without --overwrite
    assert main([*args[:3], "--label-key", "celltype", *args[7:]]) == 2
    assert "'celltype'" in caplog.text


def test_04_left_at_its_recipe_embeds_the_query_as_the_index_was(tmp_path):
    """max_seq_len left at None follows the index's manifest (the demo recipe's 256 would be refused against an
    index built at 1200); a value set by hand stays, and is checked against the index when mapping."""
    import json

    from scgpt_protocol.core.params import ZeroshotParams

    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"embedding": {"max_seq_len": 1200}}))
    follows = ZeroshotParams(reference_index=str(folder)).with_recipe("demo")
    assert follows.max_seq_len == 1200 and follows.recipe["set"]["max_seq_len"] == 1200
    assert follows.min_confidence == 0.5  # the rest of the demo recipe as before
    assert ZeroshotParams(reference_index=str(folder), max_seq_len=256).with_recipe("demo").max_seq_len == 256
    assert ZeroshotParams().with_recipe("demo").max_seq_len == 256  # no index: the recipe
    official = tmp_path / "official"  # no manifest of ours: the recipe, checked when mapping
    official.mkdir()
    assert ZeroshotParams(reference_index=str(official)).with_recipe("pretrained").max_seq_len == 1200
