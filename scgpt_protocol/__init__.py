"""scgpt-protocol: fine-tune and use the scGPT single-cell foundation model from notebooks.

The package is layered; imports run one way only (docs/user-guide/architecture.md)::

    core < data < metrics < model < pp | adapt | annotate < evaluate < pl < protocol

As in scanpy, ``scgpt_protocol.pp`` (preprocessing), ``scgpt_protocol.tl`` (tools: embed, fine-tune,
predict, refine, transfer labels) and ``scgpt_protocol.pl`` (plots) are namespaces of the public functions;
the most used names are also here at the top. Everything is imported lazily, so ``import scgpt_protocol``
stays fast.
"""

from __future__ import annotations

from .core.lazy import lazy_exports
from .core.version import REPOSITORY, __version__

#: top-level name -> the module (below this package) that defines it
_EXPORTS = {
    "ScGPT": "model.scgpt",
    "ScGPTConfig": "model.scgpt",
    "load_model": "model.checkpoint",
    "save_checkpoint": "model.save",
    "make_tiny_checkpoint": "model.save",
    "LoadReport": "model.checkpoint",
    "download_checkpoint": "model.download",
    "bin_values": "model.binning",
    "resolve_device": "core.device",
    "embed": "model.embedding",
    "predict": "annotate.inference",
    "refine": "annotate.refinement",
    "zeroshot_annotate": "annotate.zeroshot",
    "build_index": "annotate.atlas_build",
    "load_index": "annotate.atlas",
    "inspect_annotation_data": "tl.annotation",
    "adapt_annotation": "tl.annotation",
    "AnnotationRunner": "tl.annotation",
    "LoRAConfig": "adapt.strategies",
    "IA3Config": "adapt.strategies",
    "AdapterConfig": "adapt.strategies",
    "PrefixTuningConfig": "adapt.strategies",
    "STRATEGIES": "adapt.strategies",
    "FinetuneParams": "core.params",
    "run_protocol": "protocol.run.runner",
}
#: the scanpy-style namespaces and the other subpackages, imported on first use
_SUBPACKAGES = ("pp", "tl", "pl", "metrics", "core", "data", "model", "adapt", "annotate", "evaluate", "protocol")

__getattr__, _, _names = lazy_exports(__name__, _EXPORTS, submodules=_SUBPACKAGES)
__all__ = ["__version__", "REPOSITORY", *_names, "pp", "tl", "pl"]


def __dir__() -> list[str]:
    return sorted(__all__)
