"""Adaptation strategies: what each one trains, leaves alone, changes at prediction time and saves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from scgpt_protocol.adapt.strategies import (
    STRATEGIES,
    STRATEGY_CONFIGS,
    STRATEGY_INFO,
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PrefixKV,
    PrefixTuningConfig,
    apply_strategy,
    count_parameters,
    default_config,
    expected_trainable,
    load_trainable_state,
    trainable_names,
    trainable_state_dict,
)
from scgpt_protocol.model.checkpoint import load_model
from scgpt_protocol.model.save import make_tiny_checkpoint

TRAINED = [s for s in STRATEGIES if s != "probe"]
ENCODER_ADAPTING = ("full", "lora", "ia3", "adapter", "prefix_tuning")
# small but non-default configs, so that the defaults are not the only thing that works
CONFIGS = {
    "lora": LoRAConfig(r=4, alpha=8, dropout=0.1),
    "ia3": IA3Config(),
    "adapter": AdapterConfig(bottleneck=8, dropout=0.1),
    "prefix_tuning": PrefixTuningConfig(n_prefix=4),
}
B, L, N_CLASSES = 6, 20, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (100x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    genes = [f"G{i}" for i in range(50)]
    return make_tiny_checkpoint(tmp_path_factory.mktemp("strategies"), genes, d_model=32, nheads=4, d_hid=64)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(0, 50, (B, L), generator=gen)
    gene_ids[:, 0] = 51  # <cls>
    values = torch.rand(B, L, generator=gen) * 5
    lengths = torch.tensor([L, L, 15, 12, 18, 9])
    padding = torch.arange(L)[None, :] >= lengths[:, None]
    gene_ids[padding] = 50  # <pad>
    values[padding] = -2.0
    labels = torch.randint(0, N_CLASSES, (B,), generator=gen)
    return gene_ids, values, padding, labels


def _fresh(checkpoint: Path, strategy: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the injected modules start the same for the same seed
    model = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    return apply_strategy(model, strategy, CONFIGS.get(strategy))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    gene_ids, values, padding, labels = batch
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model.classify(gene_ids, values, padding), labels)
    loss.backward()
    optimizer.step()


def _base_name(name: str) -> str:
    """peft wraps a targeted ``x`` as ``x.base_layer``: map its keys back to the original names."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def _eval_outputs(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    gene_ids, values, padding, _ = batch
    model.eval()
    return model.cell_embedding(gene_ids, values, padding), model.classify(gene_ids, values, padding)


@pytest.fixture(scope="module", params=TRAINED)
def trained(request, checkpoint, batch):
    """One strategy, applied and trained for a few steps, with everything the tests compare."""
    strategy = request.param
    model = _fresh(checkpoint, strategy)
    base = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    trainable_before = trainable_names(model)
    emb_before, logits_before = _eval_outputs(model, batch)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, optimizer, batch)
    _step(model, optimizer, batch)
    # Gradients of the second backward pass: zero-initialised LoRA B / adapter ``up`` make the first
    # gradient of their partner (LoRA A / adapter ``down``) exactly zero; after one step they are not.
    grads = {n: None if p.grad is None else p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        _step(model, optimizer, batch)
    emb_after, logits_after = _eval_outputs(model, batch)
    return dict(strategy=strategy, model=model, original=original, trainable=trainable_before,
                grads=grads, emb_before=emb_before, emb_after=emb_after,
                logits_before=logits_before, logits_after=logits_after)


def test_trainable_parameters_are_the_expected_ones(trained):
    model, strategy = trained["model"], trained["strategy"]
    assert trained["trainable"], f"{strategy}: nothing is trainable"
    assert trained["trainable"] == expected_trainable(model, strategy)
    assert expected_trainable(model) == expected_trainable(model, strategy)  # model.strategy is recorded
    assert any(n.startswith("cls_decoder.") for n in trained["trainable"])
    if strategy in ("lora", "ia3"):
        leaked = [n for n in trained["trainable"] if n.startswith(("value_encoder", "encoder.", "decoder."))]
        assert not leaked, f"{strategy} adapted layers outside the transformer: {leaked}"
        inside = ("transformer_encoder.layers.", "cls_decoder.")
        assert all(n.startswith(inside) for n in trained["trainable"])
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trained["trainable"])
    assert 0 < n_trainable <= n_total


def test_frozen_base_tensors_are_bit_identical_after_training(trained):
    model, original = trained["model"], trained["original"]
    after = {_base_name(k): v for k, v in model.state_dict().items()}
    assert set(original) <= set(after), f"original keys lost: {sorted(set(original) - set(after))}"
    trainable = {_base_name(n) for n in trained["trainable"]}
    frozen = [k for k in original if k not in trainable]
    if trained["strategy"] == "full":
        assert not frozen
    for key in frozen:
        assert torch.equal(original[key], after[key]), f"{trained['strategy']}: frozen {key} changed"
    changed = [k for k in original if k in trainable and not torch.equal(original[k], after[k])]
    assert trained["strategy"] not in ("full", "head") or changed  # and what is trained did move


def test_every_trainable_tensor_gets_a_gradient(trained):
    grads = trained["grads"]
    assert set(grads) == trained["trainable"]
    if trained["strategy"] == "full":
        # the pretraining decoders are trainable under 'full' but classify() does not use them
        unused = [n for n in grads if n.startswith(("decoder.", "mvc_decoder."))]
        assert unused and all(grads.pop(n) is None for n in unused)
    zero = sorted(n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0))
    assert not zero, f"{trained['strategy']}: no gradient reached {zero}"


def test_training_changes_eval_mode_predictions(trained):
    strategy = trained["strategy"]
    if strategy in ENCODER_ADAPTING:
        # in eval mode (dropout off): IA3 scalings, LoRA updates, adapters and prefixes must act
        assert not torch.allclose(trained["emb_before"], trained["emb_after"], atol=1e-6), strategy
    else:  # head: the encoder is untouched, the head moved
        assert torch.equal(trained["emb_before"], trained["emb_after"])
    assert not torch.allclose(trained["logits_before"], trained["logits_after"], atol=1e-6)


def test_trainable_state_round_trips_to_a_fresh_model(trained, checkpoint, batch):
    strategy, model = trained["strategy"], trained["model"]
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    fresh = _fresh(checkpoint, strategy, seed=123)  # different random init of the injected modules
    _, logits_fresh = _eval_outputs(fresh, batch)
    assert not torch.allclose(logits_fresh, trained["logits_after"], atol=1e-6)
    load_trainable_state(fresh, state)
    _, logits = _eval_outputs(fresh, batch)
    torch.testing.assert_close(logits, trained["logits_after"], rtol=0, atol=1e-6)


def test_peft_saves_are_much_smaller_than_the_full_model(trained):
    strategy, model = trained["strategy"], trained["model"]
    saved = sum(v.numel() for v in trainable_state_dict(model).values())
    full = sum(v.numel() for v in trained["original"].values())
    ratio = saved / full
    print(f"{strategy}: save holds {saved:,} of {full:,} elements ({ratio:.1%})")
    if strategy == "full":
        assert saved >= full
    else:
        assert ratio < 0.25, f"{strategy} save is {ratio:.1%} of the full model"


def test_probe_freezes_everything(checkpoint):
    model = _fresh(checkpoint, "probe")
    assert trainable_names(model) == set() == expected_trainable(model)
    assert count_parameters(model)[0] == 0
    assert trainable_state_dict(model) == {}
    load_trainable_state(model, {})
    assert model.strategy == "probe" and model.strategy_config is None


def test_probe_needs_no_head(checkpoint):
    model = apply_strategy(load_model(checkpoint, device="cpu"), "probe")
    assert trainable_names(model) == set()


def test_default_configs_and_dict_round_trip():
    assert set(STRATEGY_INFO) == set(STRATEGIES)
    for strategy in STRATEGIES:
        config = default_config(strategy)
        if strategy not in STRATEGY_CONFIGS:
            assert config is None
            continue
        assert type(config) is STRATEGY_CONFIGS[strategy]
        assert type(config).from_dict(config.to_dict()) == config
    assert LoRAConfig().to_dict() == {"r": 8, "alpha": 16, "dropout": 0.05,
                                      "targets": ["Wqkv", "out_proj", "linear1", "linear2"]}
    assert LoRAConfig(targets=["Wqkv"]).targets == ("Wqkv",)
    with pytest.raises(ValueError, match="no field"):
        LoRAConfig.from_dict({"r": 4, "rank": 4})


def test_config_given_as_a_dict(checkpoint):
    model = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    apply_strategy(model, "lora", {"r": 2, "targets": ["linear1"]})
    assert model.strategy_config == LoRAConfig(r=2, targets=("linear1",))
    lora = {n for n in trainable_names(model) if ".lora_" in n}
    assert lora and all(".linear1.lora_" in n for n in lora)


def test_ia3_scales_the_feed_forward_input(checkpoint):
    model = _fresh(checkpoint, "ia3")
    layer = model.transformer_encoder.layers[0]
    assert layer.linear2.is_feedforward and not layer.self_attn.Wqkv.is_feedforward
    assert layer.linear2.ia3_l["default"].shape[-1] == layer.linear2.in_features


def test_new_modules_follow_the_model_dtype(checkpoint, batch):
    gene_ids, values, padding, _ = batch
    for strategy in ("lora", "ia3", "adapter", "prefix_tuning"):
        model = load_model(checkpoint, n_classes=N_CLASSES, device="cpu").double()
        apply_strategy(model, strategy, CONFIGS[strategy])
        assert {p.dtype for p in model.parameters()} == {torch.float64}, strategy
        assert model.classify(gene_ids, values.double(), padding).dtype == torch.float64


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: LoRAConfig(r=0), "r"),
        (lambda: LoRAConfig(r=2.5), "r"),
        (lambda: LoRAConfig(alpha=0), "alpha"),
        (lambda: LoRAConfig(alpha=-1.0), "alpha"),
        (lambda: LoRAConfig(dropout=1.0), "dropout"),
        (lambda: LoRAConfig(dropout=-0.1), "dropout"),
        (lambda: LoRAConfig(targets=("Wqkv", "q_proj")), "targets"),
        (lambda: LoRAConfig(targets=()), "targets"),
        (lambda: LoRAConfig(targets="Wqkv"), "targets"),
        (lambda: IA3Config(targets=("Wqkv", "nope")), "targets"),
        (lambda: IA3Config(targets=("Wqkv",), feedforward=("linear2",)), "feedforward"),
        (lambda: AdapterConfig(bottleneck=0), "bottleneck"),
        (lambda: AdapterConfig(dropout=1.0), "dropout"),
        (lambda: AdapterConfig(positions=("attn", "mlp")), "positions"),
        (lambda: PrefixTuningConfig(n_prefix=0), "n_prefix"),
    ],
)
def test_out_of_range_config_fields_are_refused(make, field):
    with pytest.raises(ValueError, match=rf"\.{field} = .* expected"):
        make()


def test_unknown_strategy_lists_the_valid_ones(checkpoint):
    model = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    with pytest.raises(ValueError, match="unknown strategy 'qlora'") as err:
        apply_strategy(model, "qlora")
    assert all(s in str(err.value) for s in STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        default_config("qlora")


def test_wrong_config_type_is_refused(checkpoint):
    model = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    with pytest.raises(TypeError, match="needs a LoRAConfig"):
        apply_strategy(model, "lora", AdapterConfig())
    with pytest.raises(TypeError, match="takes no config"):
        apply_strategy(model, "head", LoRAConfig())
    assert getattr(model, "strategy", None) is None  # nothing was applied


def test_model_without_head_is_refused(checkpoint):
    model = load_model(checkpoint, device="cpu")
    assert model.cls_decoder is None
    for strategy in ("head", "lora", "adapter"):
        with pytest.raises(ValueError, match="has none"):
            apply_strategy(model, strategy)


def test_second_injection_is_refused(checkpoint):
    model = _fresh(checkpoint, "adapter")
    with pytest.raises(ValueError, match="already applied"):
        apply_strategy(model, "lora")


def test_load_trainable_state_names_missing_and_unexpected_keys(checkpoint):
    model = _fresh(checkpoint, "lora")
    state = dict(trainable_state_dict(model))
    dropped = "transformer_encoder.layers.1.linear2.lora_B.weight"
    del state[dropped]
    state["transformer_encoder.layers.9.linear2.lora_B.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing 1 keys") as err:
        load_trainable_state(model, state)
    assert dropped in str(err.value) and "layers.9" in str(err.value)

    other = _fresh(checkpoint, "adapter")
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(other, trainable_state_dict(model))
    bigger = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    apply_strategy(bigger, "lora", LoRAConfig(r=16))
    with pytest.raises(ValueError, match="wrong shape"):
        load_trainable_state(model, trainable_state_dict(bigger))
    with pytest.raises(ValueError, match="no strategy applied"):
        load_trainable_state(load_model(checkpoint, n_classes=N_CLASSES, device="cpu"), {})


def test_prefix_kv_extends_keys_values_and_mask():
    prefix = PrefixKV(nheads=4, d_head=8, n_prefix=3)
    k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    k2, v2, mask = prefix(k, v, None)
    assert mask is None
    assert k2.shape == v2.shape == (2, 4, 8, 8)
    assert torch.equal(k2[:, :, 3:], k) and torch.equal(v2[:, :, 3:], v)
    assert torch.equal(k2[0, :, :3], prefix.key.detach()) and torch.equal(v2[1, :, :3], prefix.value.detach())

    attn_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    _, _, mask = prefix(k, v, attn_mask)
    assert mask.shape == (2, 1, 1, 8) and mask.dtype == torch.bool
    assert mask[..., :3].all()
    assert torch.equal(mask[..., 3:], attn_mask)
    with pytest.raises(ValueError, match="PrefixKV got keys"):
        prefix(torch.randn(2, 2, 5, 8), v, None)


def test_adapter_starts_as_identity(checkpoint, batch):
    gene_ids, values, padding, _ = batch
    base = load_model(checkpoint, n_classes=N_CLASSES, device="cpu")
    adapted = apply_strategy(copy.deepcopy(base), "adapter", CONFIGS["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted.classify(gene_ids, values, padding),
                                   base.classify(gene_ids, values, padding), rtol=0, atol=0)
