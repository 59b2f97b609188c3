"""Checkpoint loading reports, bad checkpoints, save/load round trips, tiny checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from scgpt_protocol import load_model, make_tiny_checkpoint, save_checkpoint
from scgpt_protocol.core.errors import CheckpointError, CheckpointNotFoundError
from scgpt_protocol.core.io import sha256_file


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _edit_state(directory: Path, edit) -> None:
    state = torch.load(directory / "best_model.pt", weights_only=True)
    torch.save(edit(state), directory / "best_model.pt")


def _edit_args(directory: Path, **changes) -> None:
    args = json.loads((directory / "args.json").read_text())
    args.update(changes)
    (directory / "args.json").write_text(json.dumps(args))


def test_load_report_names_dropped_flag_encoder(official_dir, caplog):
    caplog.set_level("INFO", logger="scgpt_protocol")
    model = load_model(official_dir / "checkpoint", device="cpu")
    report = model.load_report
    assert report.dropped == ["flag_encoder.weight"]
    assert report.missing == [] and report.unexpected == [] and report.head == "none"
    assert report.n_loaded == len(model.state_dict())
    assert "flag_encoder.weight" in str(report)
    assert "flag_encoder.weight" in caplog.text  # every load logs its report
    assert not model.training
    assert model.vocab["<cls>"] == 2001 and model.config.pad_token_id == 2000


def test_removed_attention_weights_are_an_error(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    _edit_state(ckpt, lambda s: {k: v for k, v in s.items() if ".Wqkv." not in k})
    with pytest.raises(CheckpointError, match=r"lacks 4 attention weights.*layers\.0\.self_attn\.Wqkv\.weight") as err:
        load_model(ckpt)
    assert "best_model.pt" in str(err.value)


def test_truncated_weights_file_is_an_error(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    data = (ckpt / "best_model.pt").read_bytes()
    (ckpt / "best_model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"could not read .*best_model\.pt.*truncated"):
        load_model(ckpt)


def test_non_checkpoint_file_is_an_error(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    (ckpt / "best_model.pt").write_text("<html>Google Drive - quota exceeded</html>")
    with pytest.raises(CheckpointError, match=r"best_model\.pt"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"nlayers": 1}, r"no place for.*transformer_encoder\.layers\.1\..*args\.json"),
        ({"nlayers": 3}, r"lacks .* weights.*layers\.2\."),
        ({"embsize": 32, "nheads": 4}, r"wrong shape.*encoder\.embedding\.weight"),
        ({"d_hid": 64}, r"wrong shape.*linear1\.weight.*args\.json"),
        ({"embsize": 64, "nheads": 5}, r"not divisible by nheads"),
        ({"nlayers": "two"}, r"nlayers must be a positive integer"),
        ({"input_emb_style": "category"}, r"input_emb_style 'category' is not supported"),
    ],
)
def test_wrong_args_json_is_an_error(official_dir, tmp_path, changes, pattern):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    _edit_args(ckpt, **changes)
    with pytest.raises((CheckpointError, ValueError), match=pattern):
        load_model(ckpt)


def test_args_json_without_architecture_or_not_json(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    (ckpt / "args.json").write_text(json.dumps({"lr": 1e-4}))
    with pytest.raises(CheckpointError, match=r"args\.json lacks the architecture keys \['embsize'"):
        load_model(ckpt)
    (ckpt / "args.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"args\.json is not valid JSON"):
        load_model(ckpt)


def test_missing_folder_or_file(official_dir, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist.*whole-human"):
        load_model(tmp_path / "nowhere")
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    (ckpt / "vocab.json").unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=r"lacks vocab\.json \(found: \[.args\.json., .best_model\.pt.\]\)"
    ):
        load_model(ckpt)


def test_vocab_that_does_not_fit_the_embedding(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["EXTRA"] = len(vocab)
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"encoder\.embedding\.weight.*vocab\.json"):
        load_model(ckpt)


def test_missing_decoder_weights_warn_but_load(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    _edit_state(ckpt, lambda s: {k: v for k, v in s.items() if not k.startswith("mvc_decoder.")})
    with pytest.warns(UserWarning, match="3 decoder weights are missing"):
        model = load_model(ckpt)
    assert sorted(model.load_report.missing) == sorted(
        ["mvc_decoder.gene2query.weight", "mvc_decoder.gene2query.bias", "mvc_decoder.W.weight"]
    )


def test_unrelated_extra_weights_warn(official_dir, tmp_path):
    ckpt = _copy(official_dir / "checkpoint", tmp_path / "ckpt")
    _edit_state(ckpt, lambda s: {**s, "batch_encoder.embedding.weight": torch.zeros(3, 64)})
    with pytest.warns(UserWarning, match="ignoring 1 weights.*batch_encoder"):
        model = load_model(ckpt)
    assert model.load_report.unexpected == ["batch_encoder.embedding.weight"]


def test_new_head_when_class_count_differs(official_dir):
    model = load_model(official_dir / "finetuned", n_classes=3, device="cpu")
    report = model.load_report
    assert report.head == "new"
    assert sorted(report.initialised) == ["cls_decoder.out_layer.bias", "cls_decoder.out_layer.weight"]
    saved = torch.load(official_dir / "finetuned" / "best_model.pt", weights_only=True)
    assert torch.equal(model.state_dict()["cls_decoder._decoder.0.weight"], saved["cls_decoder._decoder.0.weight"])
    assert model.cls_decoder.out_layer.out_features == 3


def test_save_load_round_trip_gives_identical_outputs(official_dir, reference, tmp_path):
    model = load_model(official_dir / "finetuned", device="cpu")
    out = save_checkpoint(model, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best_model.pt", "manifest.json", "vocab.json"]
    saved = torch.load(out / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in saved  # the released naming
    reloaded = load_model(out, device="cpu")
    args = [torch.from_numpy(reference[k]) for k in ("gene_ids", "values", "padding_mask")]
    with torch.no_grad():
        a, b = model(*args), reloaded(*args)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["best_model.pt"]["sha256"] == sha256_file(out / "best_model.pt")
    assert manifest["n_classes"] == 5 and manifest["versions"]["torch"] == torch.__version__
    # args.json keeps the original training arguments beside the architecture
    assert json.loads((out / "args.json").read_text())["lr"] == 0.0001


def test_tiny_checkpoint_has_released_layout(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "t", ["CD3E", "MS4A1", "LYZ"], d_model=16, nheads=2, d_hid=32, nlayers=1)
    vocab = json.loads((ckpt / "vocab.json").read_text())
    assert vocab == {"CD3E": 0, "MS4A1": 1, "LYZ": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    assert "flag_encoder.weight" in state and "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state
    model = load_model(ckpt)
    assert model.config.d_model == 16 and model.load_report.dropped == ["flag_encoder.weight"]
    # same seed, same weights
    again = make_tiny_checkpoint(tmp_path / "u", ["CD3E", "MS4A1", "LYZ"], d_model=16, nheads=2, d_hid=32, nlayers=1)
    assert all(torch.equal(v, torch.load(again / "best_model.pt", weights_only=True)[k]) for k, v in state.items())


def test_full_size_tiny_checkpoint_has_released_parameter_count(tmp_path):
    genes = [f"GENE{i}" for i in range(60694)]  # the released vocabulary: 60,694 genes + 3 special tokens
    ckpt = make_tiny_checkpoint(tmp_path / "full", genes, d_model=512, nlayers=12, nheads=8, d_hid=512)
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    assert sum(v.numel() for v in state.values()) == 51_330_049


def test_make_tiny_checkpoint_rejects_duplicate_genes(tmp_path):
    with pytest.raises(ValueError, match="duplicates"):
        make_tiny_checkpoint(tmp_path, ["A", "B", "A"])


def test_public_api_is_importable_from_the_package():
    import scgpt_protocol as sp

    for name in sp.__all__:
        assert getattr(sp, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sp.nope  # noqa: B018


def test_same_weights_give_the_same_sha256(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", ["CD3E", "LYZ"], d_model=16, nheads=2, d_hid=32, nlayers=1)
    b = make_tiny_checkpoint(tmp_path / "b", ["CD3E", "LYZ"], d_model=16, nheads=2, d_hid=32, nlayers=1)
    assert sha256_file(a / "best_model.pt") == sha256_file(b / "best_model.pt")
