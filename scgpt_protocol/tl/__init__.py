"""Tools, as in ``scanpy.tl``: what a notebook calls on an AnnData once it is prepared.

``embed`` (cell embeddings in ``obsm``), ``finetune`` / ``load_finetuned`` / ``save_finetuned``, ``predict``,
``refine`` (abstention, majority voting), ``transfer_labels`` (kNN on embeddings), ``zeroshot_annotate``,
``build_index`` (a reference embedded once, saved as an index to map onto), ``compute_umap``, each defined in
its own layer (``model``, ``adapt``, ``annotate``, ``pl``) and only named here; and the in-process way through
the whole protocol, defined here (``annotation``): :class:`AnnotationRunner` (fit strategies on your labelled
AnnData, compare them against the baseline, predict, save), ``adapt_annotation``, ``compare_strategies``,
``inspect_annotation_data``.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "embed": ".model.embedding",
    "finetune": ".adapt.train",
    "load_finetuned": ".adapt.saved",
    "save_finetuned": ".adapt.saved",
    "apply_strategy": ".adapt.strategies",
    "predict": ".annotate.inference",
    "refine": ".annotate.refinement",
    "transfer_labels": ".annotate.knn",
    "zeroshot_annotate": ".annotate.zeroshot",
    "build_index": ".annotate.atlas_build",
    "compute_umap": ".pl.embedding",
    "AnnotationRunner": ".tl.annotation",
    "adapt_annotation": ".tl.annotation",
    "compare_strategies": ".tl.annotation",
    "inspect_annotation_data": ".tl.annotation",
})
