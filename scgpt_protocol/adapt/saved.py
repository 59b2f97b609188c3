"""Saving and loading a fine-tuned model: only what was trained (the full weights, or the adapter's),
the base checkpoint's record and sha256 so that the base is found and checked on loading, and the
settings a later step needs (:func:`trained_max_seq_len`, :func:`trained_class_weight`); and the key a saved
training state must match to be resumed (:func:`training_key`, :func:`saved_training_key`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.device import resolve_device
from ..core.errors import CheckpointError
from ..core.io import read_json
from ..core.layout import RunLayout
from ..core.params import FinetuneParams
from ..model.checkpoint import CHECKPOINT_RECORD_KEYS, load_model, model_checkpoint_record
from ..model.save import save_checkpoint, torch_save_atomic, write_manifest
from ..model.scgpt import ProbeHead, ScGPT

logger = logging.getLogger(__name__)

__all__ = ["save_finetuned", "load_finetuned", "trained_max_seq_len", "trained_class_weight", "manifest_temperature",
           "save_calibration", "training_key", "saved_training_key", "training_changes"]

#: strategies whose saved model is a whole checkpoint in the released layout (the others save what they trained)
_FULL_CHECKPOINT = ("full",)
TRAINABLE_FILE = "trainable.pt"


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def trained_max_seq_len(manifest: Mapping[str, Any], requested: int | None = None, default: int = 1200) -> int:
    """The sequence length to predict with: ``requested``, else the length the model was trained at.

    A model trained at 3001 and evaluated at 1200 sees a different sample of genes per cell than it
    learned from; the manifest records the training length (``training.max_seq_len``). A model
    without that record (fine-tuned elsewhere) gets ``default``, logged.
    """
    trained = (manifest.get("training") or {}).get("max_seq_len")
    if requested is None:
        if trained is None:
            logger.info("the model records no training length; predicting at max_seq_len=%d", default)
            return default
        logger.info("predicting at the training length max_seq_len=%d", trained)
        return int(trained)
    if trained is not None and int(trained) != requested:
        logger.warning("predicting at max_seq_len=%d, but the model was trained at %d", requested, trained)
    return requested


def trained_class_weight(manifest: Mapping[str, Any]) -> str | None:
    """``"balanced"`` when the model was trained with a class-weighted loss (for a fair baseline), else None."""
    return "balanced" if (manifest.get("training") or {}).get("class_weighted") else None


# -- saving and loading fine-tuned models -----------------------------------------------------
def save_finetuned(
    model: ScGPT,
    directory: str | Path,
    *,
    strategy: str,
    config: Any,
    label_key: str,
    categories: Sequence[str],
    genes: Sequence[str],
    base_checkpoint: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save what a strategy trained, with a ``manifest.json`` that says how to rebuild the model.

    ``full``: a whole checkpoint in the released layout (loads here and in the official code). Every
    other strategy: only the trained weights (``trainable.pt``: the head, adapters, prefixes, LoRA / IA3
    weights), with the base checkpoint recorded by path and sha256. (A ``head`` model also exports to
    the released layout with :func:`~scgpt_protocol.model.checkpoint.save_checkpoint`.)
    """
    from . import strategies as st

    directory = Path(directory)
    base_checkpoint = base_checkpoint or model_checkpoint_record(model)
    info = {
        "strategy": strategy,
        "strategy_config": config.to_dict() if config is not None else None,
        "label_key": label_key,
        "categories": list(categories),
        "genes": list(genes),
        "base_checkpoint": {k: base_checkpoint.get(k) for k in CHECKPOINT_RECORD_KEYS},
        "cls_value": model.cls_value,  # what <cls> carried in training: prediction feeds the same
        **(extra or {}),
    }
    if strategy in _FULL_CHECKPOINT:
        save_checkpoint(model, directory, extra=info)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        state = cpu_copy(model.cls_decoder.state_dict()) if strategy == "probe" else st.trainable_state_dict(model)
        if strategy == "probe":
            state = {f"cls_decoder.{k}": v for k, v in state.items()}
        torch_save_atomic(cpu_copy(state), directory / TRAINABLE_FILE)
        write_manifest(directory, [TRAINABLE_FILE], info)
    logger.info("saved the %s model to %s", strategy, directory)
    return directory


def _resolve_base(record: Mapping[str, Any], directory: Path) -> Path:
    from ..core.io import sha256_file
    from ..model.checkpoint import locate_checkpoint
    from ..model.download import KNOWN_CHECKPOINTS

    path, expected = record.get("checkpoint"), record.get("sha256")
    base = Path(path or "")
    if not base.is_dir() and record.get("kind") == "released" and base.name in KNOWN_CHECKPOINTS:
        base, _ = locate_checkpoint(base.name)  # a released model's cache folder is named after it
    if not (base / "best_model.pt").is_file():
        msg = (
            f"the base checkpoint of {directory} ({path}) is not there; the saved model holds only what was "
            "trained on top of it. Put the base checkpoint back at that path."
        )
        raise CheckpointError(msg)
    found = sha256_file(base / "best_model.pt")
    if expected and found != expected:
        msg = (
            f"the base checkpoint {base} has sha256 {found[:16]}..., but {directory} was trained on one with "
            f"{expected[:16]}...: the adapter weights would be applied to another model. Use the checkpoint "
            "it was trained on."
        )
        raise CheckpointError(msg)
    return base


def load_finetuned(directory: str | Path, *, device: str | torch.device = "auto") -> tuple[ScGPT, dict[str, Any]]:
    """A model saved by :func:`save_finetuned` and its manifest (``strategy``, ``categories``, ``label_key``...)."""
    from . import strategies as st

    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    manifest = read_json(manifest_path, missing_hint=f"{directory} holds no fine-tuned model; run 02_finetune first.")
    strategy = manifest.get("strategy")
    if strategy is None:
        msg = f"{manifest_path} has no 'strategy': {directory} is a plain checkpoint; use load_model."
        raise CheckpointError(msg)
    n_classes = len(manifest["categories"])
    if strategy in _FULL_CHECKPOINT:
        model = load_model(directory, device=device)
        model.temperature = manifest_temperature(manifest)
        return model, manifest
    base = _resolve_base(manifest["base_checkpoint"], directory)
    model = load_model(base, n_classes=n_classes, device="cpu")
    state = torch.load(directory / TRAINABLE_FILE, map_location="cpu", weights_only=True)
    if strategy == "probe":
        model.cls_decoder = ProbeHead(model.config.d_model, n_classes)
        model.cls_decoder.load_state_dict({k.removeprefix("cls_decoder."): v for k, v in state.items()})
        model.requires_grad_(False)
    else:
        config_cls = st.STRATEGY_CONFIGS.get(strategy)
        config = config_cls.from_dict(manifest["strategy_config"]) if config_cls else None
        st.apply_strategy(model, strategy, config)
        st.load_trainable_state(model, state)
    # a model of ours saved before the value was recorded was trained with pad_value (None)
    model.cls_value = manifest.get("cls_value")
    model.temperature = manifest_temperature(manifest)
    return model.to(resolve_device(device)).eval(), manifest


def manifest_temperature(manifest: Mapping[str, Any]) -> float | None:
    """The calibration temperature recorded in a fine-tuned model's manifest (None: the model has none)."""
    value = (manifest.get("calibration") or {}).get("temperature")
    return float(value) if value is not None else None


def save_calibration(directory: str | Path, record: Mapping[str, Any]) -> Path:
    """Add the ``calibration`` record (the temperature fitted on the validation cells) to a fine-tuned model's
    ``manifest.json``, atomically; the weights are not touched."""
    from ..core.io import atomic_write

    path = Path(directory) / "manifest.json"
    manifest = read_json(path, missing_hint=f"{directory} holds no fine-tuned model; run 02_finetune first.")
    manifest["calibration"] = dict(record)
    atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str) + "\n"))
    return path


#: parameters that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"epochs", "resume", "device", "run_dir", "strategies", "mount_drive", "num_workers",
                      "nproc_per_node", "threads"}


def comparable_params(params: FinetuneParams, strategy: str, fingerprint: str) -> dict[str, Any]:
    """The parameters a saved training state must match to be resumed, with the strategy and the data."""
    out = {k: v for k, v in params.to_dict().items() if k not in _RESUMABLE_CHANGES}
    out["strategy"] = strategy
    out["data"] = fingerprint
    return out


def training_key(params: FinetuneParams, fingerprint: str) -> dict[str, Any]:
    """What a saved training must match to be continued: the parameters (recipe resolved) except those that may
    change on resume (``epochs``, ``device``...), the strategies compared, and the data's fingerprint
    (:func:`~scgpt_protocol.adapt.cells.data_fingerprint`)."""
    return {**comparable_params(params, params.strategy, fingerprint), "strategies": params.strategies}


def saved_training_key(layout: RunLayout) -> dict[str, Any] | None:
    """The :func:`training_key` of the training saved in ``layout.train_dir`` (``training.json``, else the
    resumable state's), or None when there is none."""
    record = layout.train_dir / "training.json"
    if record.is_file():
        return read_json(record)["key"]
    if layout.train_state.is_file():  # a run from before training.json: the state carries the same key
        return torch.load(layout.train_state, map_location="cpu", weights_only=False)["params"]
    return None


def training_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How a training with key ``now`` differs from the saved one (``name: saved -> now``; [] when the same)."""
    changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if k != "data" and k in saved and saved.get(k) != now.get(k)]
    if saved.get("data") != now.get("data"):
        changes.append("the prepared data (cells, split, labels or base checkpoint) changed: 01 ran again")
    return changes
