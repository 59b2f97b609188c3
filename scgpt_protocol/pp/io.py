"""The files of step 01: the pretrained checkpoint a run uses (:func:`resolve_checkpoint` records it in
``checkpoint.json``), ``prepared.h5ad`` and ``labels.json`` (:func:`write_prepared`), and their readers for
the later steps (:func:`read_prepared`, :func:`open_prepared_cells`, :func:`read_labels`,
:func:`read_checkpoint_record`), each with a clear error when 01 has not run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..core.log import DETAIL
from ..data.colors import label_palette
from ..data.labels import SPLITS
from ..data.read import open_backed
from .in_memory import PreparedData

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.layout import RunLayout
logger = logging.getLogger(__name__)

__all__ = ["open_prepared_cells", "resolve_checkpoint", "read_checkpoint_record", "write_prepared",
    "read_prepared", "read_labels"]

#: the notebook that writes the files read here (named in the error when they are missing); the step's
#: parameters call it ``PreprocessParams.STEP`` ("preprocess")
WRITER = "01_preprocess"


# -- checkpoint -----------------------------------------------------------------------------
def resolve_checkpoint(spec: str, layout: RunLayout, genes: Sequence[str]) -> Path:
    """Find (or make) the pretrained checkpoint the run uses and record it.

    Parameters
    ----------
    spec : str
        ``"demo"``: a tiny randomly initialised checkpoint whose vocabulary is ``genes``, written to
        ``layout.demo_checkpoint_dir`` (for trying the protocol out; its results mean nothing);
        ``"whole-human"`` (or another name of
        :data:`~scgpt_protocol.model.download.KNOWN_CHECKPOINTS`): the released model, downloaded once
        into the cache; anything else: a checkpoint folder.
    layout : RunLayout
        The run; the record goes to ``layout.checkpoint_record``.
    genes : sequence of str
        The data's gene symbols (:func:`gene_symbols`); used only for ``"demo"``.

    Returns
    -------
    Path
        The checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).

    Raises
    ------
    CheckpointNotFoundError
        The folder, or one of its files, does not exist.
    CheckpointError
        The checkpoint does not load (a truncated file, weights that do not match args.json).
    """
    from ..model.checkpoint import checkpoint_record, load_model, locate_checkpoint

    path, kind = locate_checkpoint(spec, demo_dir=layout.demo_checkpoint_dir, demo_genes=genes)
    if kind == "demo":
        logger.warning(
            "checkpoint='demo': using a tiny RANDOMLY INITIALISED model written to %s. It has never seen a "
            "cell: everything it produces (embeddings, predictions, metrics) is for trying the protocol out "
            "and means nothing biologically. Set checkpoint='whole-human' (or a checkpoint folder) for real "
            "results.", path, extra=DETAIL,  # notebooks show report.checkpoint_banner instead
        )
    else:
        logger.info("checkpoint %r (%s): %s", spec, kind, path)
        # load it once now: a truncated or mismatched checkpoint fails here, not after 01 has finished
        load_model(path, device="cpu")
    layout.write_json(layout.checkpoint_record, checkpoint_record(path, kind))
    return path


def read_checkpoint_record(layout: RunLayout) -> dict[str, Any]:
    """The record :func:`resolve_checkpoint` wrote: ``checkpoint``, ``kind``, ``sha256``.

    Raises
    ------
    FileNotFoundError
        Step ``01_preprocess`` has not run with this ``run_dir``.
    """
    return layout.read_json(layout.checkpoint_record, step=WRITER)


# -- writing --------------------------------------------------------------------------------
def write_prepared(prepared: PreparedData, layout: RunLayout, label_key: str) -> dict[str, Path]:
    """Write the prepared AnnData and the label record of the run.

    Parameters
    ----------
    prepared : PreparedData
        The result of :func:`prepare`.
    layout : RunLayout
        The run.
    label_key : str
        The label column (recorded for the later steps).

    Returns
    -------
    dict of str to Path
        ``{"prepared_adata": layout.prepared_adata, "labels": layout.labels}``.

    Notes
    -----
    The h5ad is written under a temporary name next to its target and renamed once complete, so
    an interrupted write never leaves a half-written ``prepared.h5ad``. ``labels.json`` holds
    ``label_key``, ``categories``, ``class_counts``, ``split_counts`` (``{split: {label: n}}``),
    ``rare_classes``, ``colors`` and, when 01 had a ``label_map``, ``label_map``
    (:func:`~scgpt_protocol.data.label_map.label_map_record`).
    """
    path = layout.write_h5ad(prepared.adata, layout.prepared_adata)
    write_labels(prepared, layout, label_key)
    logger.info("wrote %s (%s cells x %s genes) and %s", path, f"{prepared.adata.n_obs:,}",
                f"{prepared.adata.n_vars:,}", layout.labels, extra=DETAIL)  # the notebook shows report.files_table
    return {"prepared_adata": path, "labels": layout.labels}


def write_labels(prepared: PreparedData, layout: RunLayout, label_key: str) -> Path:
    """Write ``layout.labels`` (see :func:`write_prepared`)."""
    counts = prepared.split_counts
    labels = {
        "label_key": label_key,
        "categories": list(prepared.categories),
        "class_counts": {str(k): int(v) for k, v in counts.sum(axis=1).items()},
        "split_counts": {s: {str(k): int(v) for k, v in counts[s].items()} for s in SPLITS},
        "rare_classes": list(prepared.rare_classes),
        "colors": dict(prepared.colors) or label_palette(prepared.categories),  # one palette for every figure
    }
    if prepared.label_map is not None:  # what 01's label_map did: the map, cells left out, labels kept as given
        labels["label_map"] = prepared.label_map
    return layout.write_json(layout.labels, labels)


def read_prepared(layout: RunLayout, *, backed: bool = False) -> AnnData:
    """Read ``layout.prepared_adata`` (a clear error if step 01 has not run); ``backed``: open it read-only
    with ``X`` and ``layers`` left on disk (:func:`open_backed`), for data larger than memory."""
    import anndata

    path = layout.require(layout.prepared_adata, step=WRITER)
    return open_backed(path) if backed else anndata.read_h5ad(path)


def open_prepared_cells(layout: RunLayout) -> Any:
    """The run's ``prepared.h5ad`` for fine-tuning, with ``X`` and ``obs`` left on disk
    (:class:`~scgpt_protocol.data.backed.BackedCells`; a clear error before step 01).
    :func:`~scgpt_protocol.adapt.train.finetune` reads its label and split columns and the cell names from the file
    by slices, so that its memory does not grow with the number of cells (benchmarks/bench_scale.py)."""
    from ..data.backed import open_cells

    return open_cells(layout.require(layout.prepared_adata, step=WRITER))


def read_labels(layout: RunLayout) -> dict[str, Any]:
    """Read ``layout.labels`` (a clear error if step 01 has not run)."""
    return layout.read_json(layout.labels, step=WRITER)
