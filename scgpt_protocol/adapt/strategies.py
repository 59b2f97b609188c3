"""Ways of adapting a loaded scGPT (with a classification head) to a labelled dataset.

Seven strategies, from training nothing to training everything:

========================  ==========================================================  ===========
strategy                  what is trained                                             through
========================  ==========================================================  ===========
``probe``                 nothing (a logistic regression on frozen ``<cls>``          —
                          embeddings is fitted elsewhere)
``head``                  the classification head ``cls_decoder``                     —
``full``                  every parameter                                             —
``lora``                  low-rank updates of the transformer's linear layers + head  ``peft``
``ia3``                   learned rescaling vectors of those layers + head            ``peft``
``adapter``               bottleneck adapters after attention / feed-forward + head   this module
``prefix_tuning``         learned key/value prefixes in every attention layer + head  this module
========================  ==========================================================  ===========

:func:`apply_strategy` freezes the base model and injects / enables what the strategy trains, in
place. LoRA and IA3 go through peft's low-level API (:func:`peft.inject_adapter_in_model`), which
wraps the targeted ``nn.Linear`` modules of this plain ``nn.Module`` in place; only the linear layers
of ``transformer_encoder.layers.N`` are targeted (a full-match regex, since peft matches plain names
by suffix and ``linear1`` would also hit ``value_encoder.linear1``). Adapters and prefixes are
modules of this file, set on the extension points of :mod:`scgpt_protocol.model`
(``EncoderLayer.adapter_attn`` / ``adapter_ff`` and ``SelfAttention.prefix``).

Saving: :func:`trainable_state_dict` gives exactly what a save of the strategy must keep and
:func:`load_trainable_state` puts it back onto a model prepared with the same strategy and config.
For ``lora`` / ``ia3`` it is one flat dict: the keys of :func:`peft.get_peft_model_state_dict`
unchanged (``transformer_encoder.layers.0.linear1.lora_A.weight``, the format that
:func:`peft.set_peft_model_state_dict` expects) together with the head's ``cls_decoder.*`` keys; the
two name spaces cannot collide, so the ``cls_decoder.`` prefix is what tells them apart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor, nn

from ..core.errors import format_keys
from ..core.params import STRATEGY_NAMES
from ..model.scgpt import ScGPT

logger = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "STRATEGY_INFO", "STRATEGY_CONFIGS", "LINEAR_TARGETS", "LoRAConfig", "IA3Config",
    "AdapterConfig", "PrefixTuningConfig", "StrategyConfig", "Adapter", "PrefixKV", "default_config",
    "apply_strategy", "trainable_names", "expected_trainable", "trainable_state_dict", "load_trainable_state",
    "count_parameters"]

STRATEGIES = STRATEGY_NAMES  # one list, kept in params (no torch import there)

STRATEGY_INFO: dict[str, str] = {
    "probe": "nothing in the network is trained (a logistic regression on frozen <cls> embeddings, "
    "fitted elsewhere)",
    "head": "only the classification head cls_decoder is trained",
    "full": "every parameter of the model is trained",
    "lora": "LoRA low-rank updates of the transformer's linear layers (through peft) + the head",
    "adapter": "bottleneck adapters after attention / feed-forward of every layer (ours) + the head",
    "prefix_tuning": "learned key/value prefixes in every attention layer (ours) + the head",
    "ia3": "IA3 rescaling vectors of the transformer's linear layers (through peft) + the head",
}

#: transformer linear layers that LoRA / IA3 can target: short name -> path inside ``layers.N``
LINEAR_TARGETS: dict[str, str] = {
    "Wqkv": "self_attn.Wqkv",
    "out_proj": "self_attn.out_proj",
    "linear1": "linear1",
    "linear2": "linear2",
}
ADAPTER_POSITIONS = ("attn", "ff")

_HEAD = "cls_decoder."
_PEFT_STRATEGIES = ("lora", "ia3")
_INJECTING = ("lora", "ia3", "adapter", "prefix_tuning")


# -- configs ----------------------------------------------------------------------------------
def _fail(cls_name: str, field_name: str, value: Any, expected: str) -> None:
    msg = f"{cls_name}.{field_name} = {value!r} is invalid; expected {expected}."
    raise ValueError(msg)


def _check_int(cls_name: str, field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(cls_name, field_name, value, f"an integer >= {minimum}")


def _check_dropout(cls_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(cls_name, "dropout", value, "a number in [0, 1)")


def _as_names(
    obj: Any, field_name: str, allowed: tuple[str, ...] | dict[str, str], *, empty_ok: bool
) -> None:
    """Normalise a list of names to a tuple (frozen dataclass) and check it against ``allowed``."""
    cls_name = type(obj).__name__
    value = getattr(obj, field_name)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        _fail(cls_name, field_name, value, f"a list of names from {list(allowed)}")
    names = tuple(value)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        _fail(cls_name, field_name, value, f"names from {list(allowed)} (unknown: {unknown})")
    if len(set(names)) != len(names):
        _fail(cls_name, field_name, value, "names without duplicates")
    if not names and not empty_ok:
        _fail(cls_name, field_name, value, f"at least one name from {list(allowed)}")
    object.__setattr__(obj, field_name, names)


class _ConfigMixin:
    """``to_dict`` / ``from_dict`` for the strategy configs (JSON-friendly: tuples become lists)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            msg = f"{cls.__name__} has no field(s) {unknown}; valid fields are {known}."
            raise ValueError(msg)
        return cls(**dict(data))


@dataclass(frozen=True)
class LoRAConfig(_ConfigMixin):
    """LoRA (through peft): ``W x + (alpha / r) B A dropout(x)`` on the targeted linear layers.

    ``A`` starts Kaiming-uniform and ``B`` at zero (peft's default), so the model starts unchanged.
    ``targets`` are short names of :data:`LINEAR_TARGETS`, applied in every transformer layer.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("Wqkv", "out_proj", "linear1", "linear2")

    def __post_init__(self) -> None:
        _check_int("LoRAConfig", "r", self.r, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            _fail("LoRAConfig", "alpha", self.alpha, "a number > 0")
        _check_dropout("LoRAConfig", self.dropout)
        _as_names(self, "targets", LINEAR_TARGETS, empty_ok=False)


@dataclass(frozen=True)
class IA3Config(_ConfigMixin):
    """IA3 (through peft): learned per-channel scaling vectors, initialised to one (no change at start).

    A target in ``feedforward`` has its *input* rescaled (peft's ``feedforward_modules``; for
    ``linear2`` that is the feed-forward activation), the other targets their *output* (for ``Wqkv``,
    the keys, values and queries). ``feedforward`` must be a subset of ``targets``.
    """

    targets: tuple[str, ...] = ("Wqkv", "out_proj", "linear2")
    feedforward: tuple[str, ...] = ("linear2",)

    def __post_init__(self) -> None:
        _as_names(self, "targets", LINEAR_TARGETS, empty_ok=False)
        _as_names(self, "feedforward", LINEAR_TARGETS, empty_ok=True)
        outside = [n for n in self.feedforward if n not in self.targets]
        if outside:
            _fail("IA3Config", "feedforward", list(self.feedforward),
                  f"a subset of targets {list(self.targets)} (add {outside} to targets or remove them here)")


@dataclass(frozen=True)
class AdapterConfig(_ConfigMixin):
    """Bottleneck adapters (:class:`Adapter`) after the attention (``"attn"``) and/or feed-forward
    (``"ff"``) output of every transformer layer, before the residual connection."""

    bottleneck: int = 64
    dropout: float = 0.0
    positions: tuple[str, ...] = ADAPTER_POSITIONS

    def __post_init__(self) -> None:
        _check_int("AdapterConfig", "bottleneck", self.bottleneck, 1)
        _check_dropout("AdapterConfig", self.dropout)
        _as_names(self, "positions", ADAPTER_POSITIONS, empty_ok=False)


@dataclass(frozen=True)
class PrefixTuningConfig(_ConfigMixin):
    """Prefix tuning (:class:`PrefixKV`): ``n_prefix`` learned key/value pairs per head and layer."""

    n_prefix: int = 8

    def __post_init__(self) -> None:
        _check_int("PrefixTuningConfig", "n_prefix", self.n_prefix, 1)


StrategyConfig = Union[LoRAConfig, IA3Config, AdapterConfig, PrefixTuningConfig]

STRATEGY_CONFIGS: dict[str, type] = {
    "lora": LoRAConfig,
    "ia3": IA3Config,
    "adapter": AdapterConfig,
    "prefix_tuning": PrefixTuningConfig,
}


def _check_strategy(strategy: Any) -> str:
    if strategy not in STRATEGIES:
        msg = f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}."
        raise ValueError(msg)
    return strategy


def default_config(strategy: str) -> StrategyConfig | None:
    """The default config of ``strategy`` (None for ``probe``, ``head`` and ``full``, which have none)."""
    cls = STRATEGY_CONFIGS.get(_check_strategy(strategy))
    return None if cls is None else cls()


def _resolve_config(strategy: str, config: Any) -> StrategyConfig | None:
    cls = STRATEGY_CONFIGS.get(strategy)
    if cls is None:
        if config is not None:
            msg = (
                f"strategy {strategy!r} takes no config, but a {type(config).__name__} was given; "
                f"pass config=None (configs exist for {list(STRATEGY_CONFIGS)})."
            )
            raise TypeError(msg)
        return None
    if config is None:
        return cls()
    if isinstance(config, Mapping):
        return cls.from_dict(config)
    if not isinstance(config, cls):
        msg = (
            f"strategy {strategy!r} needs a {cls.__name__} (or a dict of its fields), "
            f"but a {type(config).__name__} was given."
        )
        raise TypeError(msg)
    return config


# -- our modules ------------------------------------------------------------------------------
class Adapter(nn.Module):
    """Bottleneck adapter ``x + up(dropout(relu(down(x))))`` (Houlsby et al., 2019).

    ``down`` (``d_model -> bottleneck``) keeps PyTorch's default initialisation; ``up``
    (``bottleneck -> d_model``) starts at zero, weight and bias, so a new adapter is the identity and
    the model starts exactly where the pretrained one was. (Consequence: the first gradient of
    ``down`` is zero, since it flows through ``up``; from the second step on both learn.)
    """

    def __init__(self, d_model: int, bottleneck: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.dropout(self.activation(self.down(x))))


class PrefixKV(nn.Module):
    """Learned key and value prefixes of one attention layer (prefix tuning, Li & Liang, 2021).

    ``key`` and ``value`` are ``[nheads, n_prefix, d_head]`` parameters, initialised normal with std
    0.02. Unlike LoRA and adapters, prefixes change the model from the start: every position can attend
    to them (they take attention mass in proportion to ``exp(q . k_prefix)``).

    Called by :class:`~scgpt_protocol.model.scgpt.SelfAttention` as ``k, v, attn_mask = prefix(k, v, attn_mask)``
    with ``k, v`` of shape ``[B, H, L, d_head]``; returns ``[B, H, n_prefix + L, d_head]`` (prefix
    first) and the mask extended with "may attend" at the prefix positions (True for a boolean mask,
    0 for an additive float one). A mask of None stays None.
    """

    def __init__(self, nheads: int, d_head: int, n_prefix: int) -> None:
        super().__init__()
        self.n_prefix = n_prefix
        self.key = nn.Parameter(torch.empty(nheads, n_prefix, d_head))
        self.value = nn.Parameter(torch.empty(nheads, n_prefix, d_head))
        nn.init.normal_(self.key, std=0.02)
        nn.init.normal_(self.value, std=0.02)

    def forward(self, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if k.shape[1:2] != self.key.shape[:1] or k.shape[-1] != self.key.shape[-1]:
            msg = (
                f"PrefixKV got keys of shape {tuple(k.shape)}; expected [B, {self.key.shape[0]}, L, "
                f"{self.key.shape[-1]}] (nheads, d_head of the layer it was made for)."
            )
            raise ValueError(msg)
        batch = k.shape[0]
        pk = self.key.to(k.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        pv = self.value.to(v.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        if attn_mask is not None:
            shape = (*attn_mask.shape[:-1], self.n_prefix)
            boolean = attn_mask.dtype == torch.bool
            allowed = attn_mask.new_ones(shape) if boolean else attn_mask.new_zeros(shape)
            attn_mask = torch.cat([allowed, attn_mask], dim=-1)
        return k, v, attn_mask


# -- applying a strategy ----------------------------------------------------------------------
def _target_regex(targets: tuple[str, ...]) -> str:
    """A regex that peft full-matches against module names: the targets inside ``layers.N`` only."""
    paths = "|".join(re.escape(LINEAR_TARGETS[t]) for t in targets)
    return rf"transformer_encoder\.layers\.\d+\.(?:{paths})"


def _inject_peft(model: ScGPT, peft_config: Any) -> None:
    import peft

    peft.inject_adapter_in_model(peft_config, model)


def _apply_lora(model: ScGPT, config: LoRAConfig) -> None:
    import peft

    _inject_peft(model, peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=_target_regex(config.targets), bias="none",
    ))


def _apply_ia3(model: ScGPT, config: IA3Config) -> None:
    import peft

    feedforward: str | list[str] = _target_regex(config.feedforward) if config.feedforward else []
    _inject_peft(model, peft.IA3Config(
        target_modules=_target_regex(config.targets), feedforward_modules=feedforward,
    ))


def _apply_adapter(model: ScGPT, config: AdapterConfig) -> None:
    ref = model.encoder.embedding.weight
    for layer in model.transformer_encoder.layers:
        for position in config.positions:
            adapter = Adapter(model.config.d_model, config.bottleneck, config.dropout)
            setattr(layer, f"adapter_{position}", adapter.to(device=ref.device, dtype=ref.dtype))


def _apply_prefix(model: ScGPT, config: PrefixTuningConfig) -> None:
    ref = model.encoder.embedding.weight
    nheads = model.config.nheads
    d_head = model.config.d_model // nheads
    for layer in model.transformer_encoder.layers:
        prefix = PrefixKV(nheads, d_head, config.n_prefix)
        layer.self_attn.prefix = prefix.to(device=ref.device, dtype=ref.dtype)


_APPLY: dict[str, Callable[[ScGPT, Any], None]] = {
    "lora": _apply_lora,
    "ia3": _apply_ia3,
    "adapter": _apply_adapter,
    "prefix_tuning": _apply_prefix,
}


def apply_strategy(
    model: ScGPT, strategy: str, config: StrategyConfig | Mapping[str, Any] | None = None
) -> ScGPT:
    """Prepare ``model`` for training with ``strategy``: freeze the base, add and enable what it trains.

    The model is changed **in place** (peft wraps layers in place too) and returned for convenience.
    Afterwards ``model.strategy`` holds the strategy name and ``model.strategy_config`` the config
    used (the default one when ``config`` is None; None for ``probe`` / ``head`` / ``full``). New
    modules are created on the model's device and dtype, so a model already on a GPU can be passed.

    Parameters
    ----------
    model
        A loaded :class:`~scgpt_protocol.model.scgpt.ScGPT` with a classification head (load it with
        ``n_classes=``); ``probe`` alone does not need one. A model to which a strategy that injects
        modules (lora, ia3, adapter, prefix_tuning) was already applied is refused.
    strategy
        One of :data:`STRATEGIES`.
    config
        The strategy's config (:data:`STRATEGY_CONFIGS`), a dict of its fields, or None for the default.

    Returns
    -------
    The same model object.

    Raises
    ------
    ValueError
        Unknown strategy, no classification head, a strategy already injected, or a bad config dict.
    TypeError
        A config of the wrong type for the strategy.
    """
    _check_strategy(strategy)
    config = _resolve_config(strategy, config)
    if strategy != "probe" and getattr(model, "cls_decoder", None) is None:
        msg = (
            f"strategy {strategy!r} trains the classification head, but this model has none; load it "
            "with load_model(..., n_classes=k) or call model.add_classifier(k) first."
        )
        raise ValueError(msg)
    previous = getattr(model, "strategy", None)
    if previous in _INJECTING:
        msg = (
            f"strategy {previous!r} was already applied to this model (its modules are injected); "
            f"load a fresh model to apply {strategy!r}."
        )
        raise ValueError(msg)

    model.requires_grad_(False)
    if strategy == "full":
        model.requires_grad_(True)
    elif strategy in _APPLY:
        _APPLY[strategy](model, config)
    if strategy != "probe":
        model.cls_decoder.requires_grad_(True)
    model.strategy = strategy
    model.strategy_config = config

    n_trainable, n_total = count_parameters(model)
    logger.info("strategy %r: %s of %s parameters trainable (%.2f%%)", strategy, f"{n_trainable:,}",
                f"{n_total:,}", 100.0 * n_trainable / max(n_total, 1))
    return model


# -- what is trained, and what is saved --------------------------------------------------------
_LAYER = r"^transformer_encoder\.layers\.\d+\."
_TRAINABLE_PATTERNS: dict[str, re.Pattern[str]] = {
    "lora": re.compile(_LAYER + r"(?:self_attn\.)?\w+\.lora_[AB]\."),
    "ia3": re.compile(_LAYER + r"(?:self_attn\.)?\w+\.ia3_l\."),
    "adapter": re.compile(_LAYER + r"adapter_(?:attn|ff)\."),
    "prefix_tuning": re.compile(_LAYER + r"self_attn\.prefix\."),
}


def _model_strategy(model: ScGPT, strategy: str | None = None) -> str:
    strategy = strategy if strategy is not None else getattr(model, "strategy", None)
    if strategy is None:
        msg = "this model has no strategy applied; call apply_strategy(model, strategy, config) first."
        raise ValueError(msg)
    return _check_strategy(strategy)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require a gradient."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def expected_trainable(model: nn.Module, strategy: str | None = None) -> set[str]:
    """The parameter names ``strategy`` should train, from name rules alone (not from ``requires_grad``).

    ``head``: ``cls_decoder.*``; ``full``: every parameter; ``probe``: none; the others: their
    modules inside ``transformer_encoder.layers.N`` (``.lora_A.`` / ``.lora_B.``, ``.ia3_l.``,
    ``adapter_attn.`` / ``adapter_ff.``, ``self_attn.prefix.``) plus ``cls_decoder.*``.
    ``strategy`` defaults to the one recorded by :func:`apply_strategy`.
    """
    strategy = _model_strategy(model, strategy)
    names = [name for name, _ in model.named_parameters()]
    if strategy == "probe":
        return set()
    if strategy == "full":
        return set(names)
    head = {n for n in names if n.startswith(_HEAD)}
    if strategy == "head":
        return head
    pattern = _TRAINABLE_PATTERNS[strategy]
    return head | {n for n in names if pattern.match(n)}


def trainable_state_dict(model: ScGPT) -> dict[str, Tensor]:
    """Exactly what a save of the model's strategy must keep (tensors share memory with the model,
    as with ``state_dict()``: clone them to keep a snapshot).

    ``full``: ``model.state_dict()``; ``head``: ``cls_decoder.*``; ``lora`` / ``ia3``: the keys of
    :func:`peft.get_peft_model_state_dict` unchanged plus ``cls_decoder.*``, in one flat dict;
    ``adapter`` / ``prefix_tuning``: their parameters (model key names) plus ``cls_decoder.*``;
    ``probe``: an empty dict (its logistic regression is saved elsewhere). The strategy name and its
    config (``config.to_dict()``) are not included: save them beside the tensors.
    """
    strategy = _model_strategy(model)
    state = model.state_dict()
    if strategy == "full":
        return dict(state)
    if strategy == "probe":
        return {}
    head = {k: v for k, v in state.items() if k.startswith(_HEAD)}
    if strategy in _PEFT_STRATEGIES:
        import peft

        return {**peft.get_peft_model_state_dict(model), **head}
    if strategy == "head":
        return head
    pattern = _TRAINABLE_PATTERNS[strategy]
    return {**{k: v for k, v in state.items() if pattern.match(k)}, **head}


def load_trainable_state(model: ScGPT, state: Mapping[str, Tensor]) -> None:
    """Load a :func:`trainable_state_dict` onto ``model`` (the inverse of that function).

    ``model`` must have been prepared by :func:`apply_strategy` with the strategy and config that the
    state was saved under. Every expected key must be present, with its shape, and nothing else.

    Raises
    ------
    ValueError
        No strategy applied, missing or unexpected keys, or shapes that differ.
    """
    strategy = _model_strategy(model)
    reference = trainable_state_dict(model)
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        msg = (
            f"the state does not fit this model prepared for strategy {strategy!r} "
            f"(config {getattr(model, 'strategy_config', None)}): "
            f"missing {len(missing)} keys {format_keys(missing)}, unexpected {len(unexpected)} keys "
            f"{format_keys(unexpected)}. Apply the strategy and config the state was saved with."
        )
        raise ValueError(msg)
    wrong = [f"{k}: state {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in reference.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        msg = (
            f"{len(wrong)} tensors have the wrong shape for strategy {strategy!r}: {format_keys(wrong, 4)}. "
            "Was the state saved with another config (LoRA r, adapter bottleneck, n_prefix)?"
        )
        raise ValueError(msg)
    if not state:
        return
    if strategy in _PEFT_STRATEGIES:
        import peft

        peft_part = {k: v for k, v in state.items() if not k.startswith(_HEAD)}
        result = peft.set_peft_model_state_dict(model, peft_part)
        if result.unexpected_keys:
            msg = f"peft did not place {len(result.unexpected_keys)} keys: {format_keys(result.unexpected_keys)}."
            raise ValueError(msg)
        state = {k: v for k, v in state.items() if k.startswith(_HEAD)}
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for key, value in state.items():
            params[key].copy_(value)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
