"""Trust: the published fine-tuning recipe by default, and a typed error (never a silent number) for bad input.

Each case of issue 7 is here, through the API or the runner, asserting the error and what is (and is
not) left behind. The runner's interrupted / full-disk / stale-step cases are in test_run_robustness.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from scgpt_protocol import load_model
from scgpt_protocol.adapt.saved import load_finetuned, trained_class_weight, trained_max_seq_len
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.core.errors import CheckpointError, GeneMatchError, InputDataError
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import (
    FinetuneParams,
    ParamsError,
    PreprocessParams,
    ZeroshotParams,
    load_params_file,
)
from scgpt_protocol.data.matrix import check_expression
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.evaluate.scoring import evaluate_query, write_results
from scgpt_protocol.metrics import BASELINE_METHOD, SCGPT_METHOD
from scgpt_protocol.model.embedding import iter_batches
from scgpt_protocol.model.vocab import FINETUNE_CLS_VALUE

FAST = dict(batch_size=16, max_seq_len=32, lr=1e-3, patience=0, epochs=1)


@pytest.fixture(scope="module")
def trained(split_pbmc, tiny_checkpoint, tmp_path_factory):
    """A 1-epoch full fine-tuning with amp on (the default) on the CPU, saved in a run layout."""
    run_dir = tmp_path_factory.mktemp("run")
    categories = sorted(split_pbmc.obs["label"].unique())
    params = FinetuneParams(run_dir=str(run_dir), device="cpu", class_weighted=True, **FAST)
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=RunLayout(run_dir))
    return RunLayout(run_dir), categories


# -- the published recipe -------------------------------------------------------------------------
def test_adam_eps_is_1e4_with_amp_on_the_cpu(trained):
    layout, _ = trained
    state = torch.load(layout.train_state, map_location="cpu", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-4  # amp=True (default), device cpu
    from scgpt_protocol.adapt.optim import adam_eps

    assert adam_eps(False) == 1e-8 and adam_eps(True, 1e-8) == 1e-8  # an explicit adam_eps wins (the demo's)
    assert FinetuneParams(adam_eps="1e-8").adam_eps == 1e-8


def test_cls_value_is_recorded_and_used(trained, split_pbmc):
    layout, categories = trained
    manifest = json.loads((layout.model_dir / "manifest.json").read_text())
    assert manifest["cls_value"] == FINETUNE_CLS_VALUE == 0.0
    model, saved = load_finetuned(layout.model_dir, device="cpu")
    assert model.cls_value == 0.0
    batch = next(iter(iter_batches(split_pbmc[:8], model, max_seq_len=32)))
    assert torch.all(batch.values[:, 0] == 0.0)  # what prediction feeds <cls>
    pretrained = load_model(saved["base_checkpoint"]["checkpoint"], device="cpu")
    assert pretrained.cls_value is None  # pretrained embeddings keep the pretraining value, pad_value -2
    batch = next(iter(iter_batches(split_pbmc[:8], pretrained, max_seq_len=32)))
    assert torch.all(batch.values[:, 0] == -2.0)


def test_classifier_fine_tuned_by_the_official_code_gets_cls_0(official_dir):
    """The official finetuned/ fixture (no manifest of ours): fed <cls> = 0, its logits equal the official ones."""
    with np.load(official_dir / "reference_cls0.npz") as ref:
        ref = {k: ref[k] for k in ref.files}
    model = load_model(official_dir / "finetuned", device="cpu")
    assert model.cls_value == 0.0
    values = ref["values"].copy()
    values[:, 0] = model.cls_value
    with torch.no_grad():
        logits = model.classify(torch.from_numpy(ref["gene_ids"]), torch.from_numpy(values),
                                torch.from_numpy(ref["padding_mask"]))
    assert float(np.abs(logits.numpy() - ref["cls_logits"]).max()) < 1e-5
    # with the pretraining value the logits are measurably different: the value matters
    values[:, 0] = -2.0
    with torch.no_grad():
        other = model.classify(torch.from_numpy(ref["gene_ids"]), torch.from_numpy(values),
                               torch.from_numpy(ref["padding_mask"]))
    assert float(np.abs(other.numpy() - ref["cls_logits"]).max()) > 1e-2


def test_03_evaluates_at_the_training_length(trained):
    layout, _ = trained
    manifest = json.loads((layout.model_dir / "manifest.json").read_text())
    assert trained_max_seq_len(manifest) == 32  # None: the recorded training length
    assert trained_max_seq_len(manifest, 64) == 64  # an explicit value wins (with a warning in the log)
    assert trained_max_seq_len({}) == 1200  # a model without the record
    assert trained_class_weight(manifest) == "balanced"


def test_a_cell_gets_the_same_tokens_alone_and_inside_a_larger_anndata(pbmc, tiny_model):
    cell = pbmc.obs_names[37]

    def tokens(adata):
        out = {}
        for batch in iter_batches(adata, tiny_model, max_seq_len=16, seed=3):
            for row, i in enumerate(batch.index):
                keep = ~batch.padding_mask[row]
                out[adata.obs_names[i]] = (batch.gene_ids[row][keep].tolist(), batch.values[row][keep].tolist())
        return out

    full = tokens(pbmc)[cell]
    alone = tokens(pbmc[[cell]].copy())[cell]
    reordered = tokens(pbmc[::-1].copy())[cell]
    assert full == alone == reordered
    assert len(full[0]) == 16  # the cell has more genes than fit: the sample itself is the same
    # two different cells at the same row of two AnnData objects do not share a stream
    a, b = pbmc[[pbmc.obs_names[0]]].copy(), pbmc[[pbmc.obs_names[1]]].copy()
    b.X = a.X.copy()  # same values, other name
    assert tokens(a)[a.obs_names[0]] != tokens(b)[b.obs_names[0]]


def test_baseline_class_weights_and_query_row(split_pbmc, trained):
    layout, categories = trained
    plain = logistic_regression_baseline(split_pbmc, label_key="label")
    balanced = logistic_regression_baseline(split_pbmc, label_key="label", class_weight="balanced")
    assert plain.class_weight is None and balanced.class_weight == "balanced"
    assert not np.allclose(plain.probabilities, balanced.probabilities)
    query = split_pbmc[split_pbmc.obs["split"] == "test"].copy()
    query.obs_names = [f"q{i}" for i in range(query.n_obs)]
    fitted = logistic_regression_baseline(split_pbmc, label_key="label", class_weight="balanced", query=query)
    assert fitted.query is not None and fitted.query.metrics["n_cells"] == query.n_obs
    # the query holds the test cells: the same classifier gives the same predictions there
    assert list(fitted.query.predictions.astype(str)) == list(fitted.predictions.astype(str))
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    record = evaluate_query(model, query, manifest=manifest, max_seq_len=32, baseline=fitted)
    assert set(record["methods"]) == {SCGPT_METHOD, BASELINE_METHOD}
    written = write_results(layout, predictions=record["predictions"], metrics={"methods": {}, "split": "test"},
                            query=record)
    saved = json.loads(written["metrics"].read_text())
    assert set(saved["query"]["methods"]) == {SCGPT_METHOD, BASELINE_METHOD}
    assert saved["query"]["n_cells"] == query.n_obs
    assert saved["methods"] == {} and written["query_predictions"].is_file()  # query never mixed into "test"


# -- no silent wrong numbers -----------------------------------------------------------------------
def test_a_query_sharing_no_gene_with_the_model_is_refused(split_pbmc, trained):
    """Every gene of the query is in the vocabulary ("matched 300/300"), none among the training genes."""
    layout, categories = trained
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    trained_on, others = manifest["genes"][:400], manifest["genes"][400:700]
    query = split_pbmc[:20, others].copy()
    with pytest.raises(GeneMatchError, match=r"the data holds 0 of the 400 genes of the model's training genes \(0%\)"):
        predict(model, query, categories=manifest["categories"], genes=trained_on, max_seq_len=32)
    half = split_pbmc[:20, manifest["genes"][:150] + others].copy()  # 150 of 400 = 38%
    with pytest.raises(GeneMatchError, match=r"holds 150 of the 400 genes .* \(38%\); need at least 50%"):
        predict(model, half, categories=manifest["categories"], genes=trained_on, max_seq_len=32)


def test_zero_shot_query_sharing_no_gene_with_the_reference_is_refused(pbmc, tiny_model):
    from scgpt_protocol.annotate.zeroshot import zeroshot_annotate

    reference = pbmc[:60, :300].copy()
    reference.obs["label"] = np.where(np.arange(60) % 2, "a", "b")
    query = pbmc[60:80, 400:].copy()
    query.obs["label"] = "a"
    with pytest.raises(GeneMatchError, match=r"the query holds 0 of the 300 genes of the reference"):
        zeroshot_annotate(reference, query, tiny_model, label_key="label", k=5, max_seq_len=32)
    assert "X_scgpt" not in query.obsm  # refused before any work


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_values_are_refused_naming_cell_and_gene(bad):
    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.pp.inspect import inspect_adata

    adata = make_toy_adata(n_cells=20, n_genes=10)
    adata.X = adata.X.toarray().astype(np.float32)
    adata.X[3, 4] = bad
    with pytest.raises(InputDataError, match=r"1 infinite values in 1 cells \(first: cell 'cell3', gene 'GENE4'"):
        check_expression(adata)
    with pytest.raises(InputDataError, match="infinite"):  # 01 refuses it before any QC plot
        inspect_adata(adata, label_key="cell_type", vocab={f"GENE{i}": i for i in range(10)})


def test_numeric_strings_from_yaml_are_numbers(tmp_path):
    path = tmp_path / "02_finetune.yaml"
    path.write_text("lr: 1e-4\nepochs: '3'\n")
    values = load_params_file(path, FinetuneParams)
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # what PyYAML gives
    params = FinetuneParams(**values)
    assert params.lr == 1e-4 and isinstance(params.lr, float) and params.epochs == 3
    with pytest.raises(ParamsError, match=r"lr='fast'.*expected a float"):
        FinetuneParams(lr="fast")
    with pytest.raises(ParamsError, match=r"epochs='2.5'.*expected a int"):
        FinetuneParams(epochs="2.5")


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CPU"], ids=lambda d: f"device-{d}")
def test_a_wrong_device_is_refused_by_the_parameters(device, tmp_path):
    with pytest.raises(ParamsError, match=rf"device={device!r}.*'auto', 'cpu', 'cuda', 'cuda:N'"):
        FinetuneParams(device=device)
    ZeroshotParams(device="cuda:1")  # a GPU index is fine (checked against the machine when used)


def test_runner_refuses_a_wrong_device_before_step_01(tmp_path):
    from scgpt_protocol.protocol.run.runner import run_protocol

    params = tmp_path / "params"
    params.mkdir()
    (params / "01_preprocess.yaml").write_text("adata_path: demo\n")
    (params / "02_finetune.yaml").write_text("device: gpu\n")
    with pytest.raises(ParamsError, match="device='gpu'"):
        run_protocol(params, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_labels_are_drawn_literally(tmp_path):
    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.pl.figure import save_figure
    from scgpt_protocol.pl.qc import plot_class_counts
    from scgpt_protocol.pp.in_memory import prepare

    adata = make_toy_adata(n_cells=120, n_genes=40, n_labels=3)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace({"type_0": r"Mono $\q$"})
    prepared = prepare(adata, PreprocessParams(label_key="cell_type"), {f"GENE{i}": i for i in range(40)})
    saved = save_figure(plot_class_counts(prepared), RunLayout(tmp_path), "class_counts")
    assert saved.is_file() and saved.stat().st_size > 1000


def test_unreadable_h5ad_names_the_path(tmp_path, pbmc):
    from scgpt_protocol.data.read import read_adata

    fake = tmp_path / "table.h5ad"
    fake.write_text("cell,CD3E\nc1,1\n")
    with pytest.raises(InputDataError, match=rf"{fake}.*could not be read as an .h5ad file"):
        read_adata(str(fake))
    good = tmp_path / "good.h5ad"
    pbmc[:50].copy().write_h5ad(good)
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputDataError, match=rf"{truncated}.*truncated"):
        read_adata(str(truncated))


def test_truncated_checkpoint_fails_in_01(tiny_checkpoint, tmp_path):
    import shutil

    from scgpt_protocol.pp.io import resolve_checkpoint

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / "best_model.pt").read_bytes()
    (broken / "best_model.pt").write_bytes(data[: len(data) // 2])
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(CheckpointError, match="best_model.pt"):
        resolve_checkpoint(str(broken), layout, [])
    assert not layout.checkpoint_record.exists()  # 01 records no checkpoint it could not load


def test_placeholder_label_strings_are_missing_labels():
    from scgpt_protocol.data.demo import make_toy_adata
    from scgpt_protocol.pp.in_memory import prepare

    adata = make_toy_adata(n_cells=150, n_genes=40, n_labels=3)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:4], labels[4:7], labels[7] = "nan", "", " None "
    adata.obs["cell_type"] = labels
    with pytest.warns(UserWarning, match="dropped 8 cells without a label"):
        prepared = prepare(adata, PreprocessParams(label_key="cell_type"), {f"GENE{i}": i for i in range(40)})
    assert prepared.categories == sorted(set(labels[8:]))  # no class named 'nan' or ''


def test_zeroshot_takes_label_key_from_the_run_with_both_paths(tmp_path, pbmc):
    from scgpt_protocol.protocol.steps.zeroshot import zeroshot_inputs

    layout = RunLayout(tmp_path / "run").make_dirs()
    layout.write_json(layout.labels, {"label_key": "bulk_labels", "categories": ["a", "b"]})
    for name, cells in (("ref", slice(0, 20)), ("query", slice(20, 40))):  # two files (the same one is warned about)
        pbmc[cells].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    params = ZeroshotParams(
        run_dir=str(layout.run_dir), reference_path=str(tmp_path / "ref.h5ad"), query_path=str(tmp_path / "query.h5ad")
    )
    _, _, label_key, _ = zeroshot_inputs(layout, params)
    assert label_key == "bulk_labels"


def test_new_head_is_initialised_from_the_seed(tiny_checkpoint):
    a = load_model(tiny_checkpoint, n_classes=4, head_seed=0, device="cpu")
    b = load_model(tiny_checkpoint, n_classes=4, head_seed=1, device="cpu")
    c = load_model(tiny_checkpoint, n_classes=4, head_seed=1, device="cpu")
    w = "cls_decoder.out_layer.weight"
    assert not torch.equal(a.state_dict()[w], b.state_dict()[w]) and torch.equal(b.state_dict()[w], c.state_dict()[w])
