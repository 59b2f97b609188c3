"""Our model against outputs computed by the official scGPT code on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt_protocol import load_model

TOL = 1e-5


def _run(model, ref):
    with torch.no_grad():
        return model(
            torch.from_numpy(ref["gene_ids"]),
            torch.from_numpy(ref["values"]),
            torch.from_numpy(ref["padding_mask"]),
        )


def _max_diff(ours: torch.Tensor, theirs: np.ndarray, keep: np.ndarray | None = None) -> float:
    a = ours.numpy()
    return float(np.abs(a[keep] - theirs[keep]).max() if keep is not None else np.abs(a - theirs).max())


@pytest.fixture(scope="module")
def outputs(official_dir, reference):
    return _run(load_model(official_dir / "checkpoint", device="cpu"), reference)


@pytest.mark.parametrize(
    ("ours", "theirs", "non_padded"),
    [
        ("transformer_output", "transformer_output", True),
        ("cell_emb", "cls_embedding", False),
        ("mlm_output", "mlm_output", True),
        ("mvc_output", "mvc_output", True),
    ],
)
def test_pretrained_outputs_match_official(outputs, reference, ours, theirs, non_padded):
    keep = ~reference["padding_mask"] if non_padded else None
    assert outputs[ours].shape == reference[theirs].shape
    assert _max_diff(outputs[ours], reference[theirs], keep) < TOL


def test_finetuned_classifier_logits_match_official(official_dir, reference):
    model = load_model(official_dir / "finetuned", device="cpu")
    assert model.config.n_classes == 5
    assert model.load_report.head == "loaded"
    assert _max_diff(_run(model, reference)["cls_output"], reference["cls_logits"]) < TOL


def test_public_methods_agree_with_forward(official_dir, reference):
    """cell_embedding / classify compute the last layer for <cls> alone: the same numbers up to rounding."""
    model = load_model(official_dir / "finetuned", device="cpu")
    args = [torch.from_numpy(reference[k]) for k in ("gene_ids", "values", "padding_mask")]
    with torch.no_grad():
        full = model(*args)
        assert torch.equal(model.encode(*args), full["transformer_output"])
        cell, logits = model.cell_embedding(*args), model.classify(*args)
    assert cell.shape == full["cell_emb"].shape and logits.shape == full["cls_output"].shape
    torch.testing.assert_close(cell, full["cell_emb"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, full["cls_output"], rtol=0, atol=1e-6)
    assert _max_diff(cell, reference["cls_embedding"]) < TOL
    assert _max_diff(logits, reference["cls_logits"]) < TOL


def test_cls_only_last_layer_with_wrapped_projection_matches(official_dir, reference):
    """The <cls>-only path also holds when Wqkv is wrapped (LoRA / IA3 replace the plain Linear)."""
    model = load_model(official_dir / "finetuned", device="cpu")
    args = [torch.from_numpy(reference[k]) for k in ("gene_ids", "values", "padding_mask")]
    attn = model.transformer_encoder.layers[-1].self_attn

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    with torch.no_grad():
        plain = model.cell_embedding(*args)
        attn.Wqkv = Wrapped(attn.Wqkv)
        wrapped = model.cell_embedding(*args)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=1e-6)
    assert _max_diff(wrapped, reference["cls_embedding"]) < TOL


def test_pytorch_in_proj_naming_loads_to_the_same_model(official_dir, reference, tmp_path):
    """Checkpoints saved by the official PyTorch path name attention `in_proj_*`: a rename, no reshape."""
    import shutil

    src = official_dir / "finetuned"
    for name in ("args.json", "vocab.json"):
        shutil.copy(src / name, tmp_path / name)
    state = torch.load(src / "best_model.pt", weights_only=True)
    renamed = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}
    assert any("in_proj_weight" in k for k in renamed)
    torch.save(renamed, tmp_path / "best_model.pt")
    model = load_model(tmp_path, device="cpu")
    assert model.load_report.renamed == 4  # weight and bias of 2 layers
    assert _max_diff(_run(model, reference)["cls_output"], reference["cls_logits"]) < TOL
