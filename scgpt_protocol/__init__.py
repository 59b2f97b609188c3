"""scgpt-protocol: fine-tune and use the scGPT single-cell foundation model from notebooks.

The public API is re-exported here lazily, so ``import scgpt_protocol`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
#: where the notebooks' Colab cell installs the package from, and the badges point to
REPOSITORY = "scgpt-protocol/scgpt-protocol"

_EXPORTS = {
    "ScGPT": "model",
    "ScGPTConfig": "model",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "make_tiny_checkpoint": "checkpoint",
    "LoadReport": "checkpoint",
    "download_checkpoint": "download",
    "bin_values": "binning",
    "resolve_device": "device",
    "embed": "embedding",
    "predict": "predict",
    "refine": "refine",
    "zeroshot_annotate": "zeroshot",
    "inspect_annotation_data": "annotation",
    "adapt_annotation": "annotation",
    "AnnotationRunner": "annotation",
    "LoRAConfig": "strategies",
    "IA3Config": "strategies",
    "AdapterConfig": "strategies",
    "PrefixTuningConfig": "strategies",
    "STRATEGIES": "strategies",
    "FinetuneParams": "params",
    "run_protocol": "runner",
}

__all__ = ["__version__", "REPOSITORY", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'scgpt_protocol' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
