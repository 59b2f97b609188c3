"""Precision (auto / fp32 / bf16 / fp16): how it resolves, and what bf16 changes in embeddings,
predictions and training (tiny checkpoint; the released size is a slow test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scgpt_protocol import load_model
from scgpt_protocol.adapt.saved import load_finetuned
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.core import device as dev
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import STRATEGY_NAMES, FinetuneParams, ParamsError
from scgpt_protocol.model.embedding import embed


# -- resolving "auto" ---------------------------------------------------------------------------
@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_the_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.resolve_precision("auto", "cpu") == expected
    assert dev.resolve_precision("auto", torch.device("cpu")) == expected
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is kept
        assert dev.resolve_precision(explicit, "cpu") == explicit


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16")])
def test_auto_on_cuda_is_bf16_from_ampere_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dev.resolve_precision("auto", torch.device("cuda")) == expected
    assert (
        dev.precision_dtype("auto", torch.device("cuda")) == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    )


def test_auto_on_mps_is_fp32():
    assert dev.resolve_precision("auto", torch.device("mps")) == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"precision 'half' is not one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        dev.resolve_precision("half", "cpu")


def test_cpu_detection_reads_the_cpu_flags_when_torch_cannot_tell(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
    for flags, expected in (({"avx2", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                            ({"avx2", "avx512f"}, False)):
        monkeypatch.setattr(dev, "_cpuinfo_flags", lambda flags=flags: flags)
        dev.cpu_has_native_bf16.cache_clear()
        assert dev.cpu_has_native_bf16() is expected
    dev.cpu_has_native_bf16.cache_clear()


def test_autocast_runs_matmuls_in_the_resolved_dtype():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    cpu = torch.device("cpu")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with dev.autocast(cpu, precision):
            assert torch.nn.functional.linear(x, w).dtype == dtype
    with dev.autocast(cpu, "bf16", enabled=False):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


def test_finetune_params_refuse_low_precision_with_amp_off():
    with pytest.raises(ParamsError, match=r"precision='bf16'.*'auto' or 'fp32' when amp is False"):
        FinetuneParams(amp=False, precision="bf16")
    assert FinetuneParams(amp=False, precision="auto").precision == "auto"
    with pytest.raises(ParamsError, match=r"precision='fp8'.*one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        FinetuneParams(precision="fp8")


# -- what bf16 changes --------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_embeddings_are_close_to_fp32_and_recorded(pbmc, tiny_model):
    fp32, bf16 = pbmc[:200].copy(), pbmc[:200].copy()
    embed(fp32, tiny_model, precision="fp32")
    embed(bf16, tiny_model, precision="bf16")
    assert fp32.uns["X_scgpt_params"]["precision"] == "fp32"
    assert bf16.uns["X_scgpt_params"]["precision"] == "bf16"
    cos = _cosine(fp32.obsm["X_scgpt"], bf16.obsm["X_scgpt"])
    assert cos.min() >= 0.999, cos.min()
    assert not np.array_equal(fp32.obsm["X_scgpt"], bf16.obsm["X_scgpt"])  # bf16 did run


@pytest.fixture(scope="module")
def split_pbmc(labelled_split):
    return labelled_split(240)


@pytest.fixture(scope="module")
def categories(split_pbmc):
    return sorted(split_pbmc.obs["label"].unique())


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_bf16_training_on_cpu_works_for_every_strategy(split_pbmc, categories, tiny_checkpoint, tmp_path, strategy):
    params = FinetuneParams(run_dir=str(tmp_path), strategy=strategy, epochs=1, batch_size=16, max_seq_len=32,
                            lr=1e-3, patience=0, precision="bf16", device="cpu")
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, split_pbmc[:120], params, label_key="label", categories=categories,
                      layout=RunLayout(tmp_path))
    assert result.precision == "bf16"
    assert np.isfinite(result.history["train_loss"]).all() and np.isfinite(result.history["val_loss"]).all()
    after = model.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert any(k.startswith("cls_decoder.") for k in changed) or strategy != "head"
    assert changed or strategy in ("lora", "ia3", "adapter", "prefix_tuning", "probe")  # those add new tensors
    for p in model.parameters():  # weights stay fp32: autocast only lowers the compute
        assert p.dtype == torch.float32
    layout = RunLayout(tmp_path)
    assert json.loads(layout.train_summary.read_text())["precision"] == "bf16"
    _, manifest = load_finetuned(layout.model_dir, device="cpu")
    assert manifest["precision"] == "bf16" and manifest["training"]["precision"] == "bf16"


def test_fp16_training_on_cpu_uses_a_grad_scaler(split_pbmc, categories, tiny_checkpoint, tmp_path):
    params = FinetuneParams(run_dir=str(tmp_path), strategy="full", epochs=1, batch_size=16, max_seq_len=48,
                            lr=1e-3, patience=0, precision="fp16", device="cpu")
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    result = finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=RunLayout(tmp_path))
    assert result.precision == "fp16" and np.isfinite(result.history["train_loss"]).all()
    state = torch.load(RunLayout(tmp_path).train_state, weights_only=False)
    assert state["scaler"] and state["scaler"]["scale"] > 0  # the scaler was on and its state is saved


def test_bf16_predictions_equal_fp32_on_the_demo(split_pbmc, categories, tiny_checkpoint, tmp_path):
    params = FinetuneParams(run_dir=str(tmp_path), strategy="full", epochs=3, batch_size=16, max_seq_len=64,
                            lr=1e-3, patience=0, precision="fp32", device="cpu")
    model = load_model(tiny_checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories)
    fp32 = predict(model, split_pbmc, categories=categories, max_seq_len=64, precision="fp32")
    bf16 = predict(model, split_pbmc, categories=categories, max_seq_len=64, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    np.testing.assert_array_equal(bf16.labels, fp32.labels)
    assert np.abs(bf16.probabilities - fp32.probabilities).max() < 0.05
    assert _cosine(fp32.embeddings, bf16.embeddings).min() >= 0.999


@pytest.mark.slow
def test_bf16_embeddings_at_the_released_size_are_within_cosine_0999(pbmc, tmp_path):
    """The released architecture (d_model 512, 12 layers; random weights) on demo cells: bf16 vs fp32."""
    from scgpt_protocol import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path, list(pbmc.var_names), d_model=512, nlayers=12, nheads=8, d_hid=512)
    model = load_model(ckpt, device="cpu")
    fp32, bf16 = pbmc[:8].copy(), pbmc[:8].copy()
    embed(fp32, model, precision="fp32", max_seq_len=256)
    embed(bf16, model, precision="bf16", max_seq_len=256)
    cos = _cosine(fp32.obsm["X_scgpt"], bf16.obsm["X_scgpt"])
    assert cos.min() >= 0.999, cos
