"""Cell embeddings from a (pretrained or fine-tuned) scGPT model."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from ..core.device import autocast, resolve_precision
from ..core.log import DETAIL, progress
from ..data.matrix import check_expression, get_matrix, iter_row_chunks
from .scgpt import ScGPT
from .tokenize import Batch, cell_keys, collate, length_sorted_batches, tokenize_rows
from .vocab import check_gene_overlap, gene_symbols, match_genes

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["embed", "iter_batches", "default_max_tokens"]


def default_max_tokens(device: torch.device) -> int:
    """Padded tokens per forward pass: 4,096 on CPU (larger activations cost page faults, measured in
    benchmarks/README.md), 65,536 on GPU."""
    return 65536 if device.type == "cuda" else 4096


def iter_batches(
    adata: AnnData,
    model: ScGPT,
    *,
    max_seq_len: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    epoch: int = 0,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    chunk_size: int = 4096,
    max_tokens: int | None = None,
    stats: dict | None = None,
    genes: Sequence[str] | None = None,
    cls_value: float | None = None,
) -> Iterator[Batch]:
    """Yield padded model inputs for every cell of ``adata``, grouped by length within chunks.

    Each batch's ``index`` gives the row numbers of its cells. ``stats`` (if given) receives
    ``n_empty`` (cells with no expressed matched gene) and ``n_tokens`` / ``n_padded``. ``genes``
    restricts the input to these gene symbols (a fine-tuned model's training genes); data holding
    too few of them is refused (:func:`~scgpt_protocol.model.vocab.check_gene_overlap`). ``<cls>``
    carries ``cls_value`` (None: the model's own, :attr:`ScGPT.cls_value`).
    """
    match = match_genes(adata, model.vocab, gene_symbol_key=gene_symbol_key)
    if genes is not None:
        symbols = np.asarray(gene_symbols(adata, gene_symbol_key), dtype=object)
        outside = ~np.isin(symbols, np.asarray(list(genes), dtype=object))
        match.token_ids[outside] = -1
        check_gene_overlap(symbols[match.token_ids >= 0], genes, what="the data",
                           against="the model's training genes")
    if cls_value is None:
        cls_value = model.cls_value
    columns = match.columns
    col_token_ids = match.token_ids[columns]
    config = model.config
    cls_id, pad_id = model.vocab["<cls>"], config.pad_token_id
    stats = stats if stats is not None else {}
    stats.update(n_empty=0, n_tokens=0, n_padded=0, genes=match)
    names = adata.obs_names
    for start, chunk in iter_row_chunks(get_matrix(adata, layer), chunk_size):
        cells = tokenize_rows(
            chunk[:, columns], col_token_ids, cell_index=cell_keys(names[start : start + chunk.shape[0]]),
            cls_id=cls_id, pad_value=config.pad_value, cls_value=cls_value, max_seq_len=max_seq_len,
            n_bins=config.n_bins, seed=seed, epoch=epoch,
        )
        lengths = np.array([len(c.gene_ids) for c in cells])
        stats["n_empty"] += int((lengths == 1).sum())
        for positions in length_sorted_batches(lengths, batch_size, max_tokens):
            batch = collate([cells[p] for p in positions], positions + start, pad_id=pad_id, pad_value=config.pad_value)
            stats["n_tokens"] += int(lengths[positions].sum())
            stats["n_padded"] += batch.gene_ids.numel()
            yield batch


def embed(
    adata: AnnData,
    model: ScGPT,
    *,
    max_seq_len: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    key_added: str = "X_scgpt",
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    precision: str = "auto",
    out: str | Path | None = None,
) -> Path | None:
    """Write L2-normalised scGPT cell embeddings to ``adata.obsm[key_added]`` (or to the file ``out``).

    Each cell is tokenised as in pretraining (``<cls>`` first with pad_value -2, as the official
    ``embed_data`` does; its expressed genes known to the vocabulary with per-cell bins, a random sample
    of ``max_seq_len - 1`` genes when it has more), and its embedding is the encoder output at
    ``<cls>``, divided by its norm. A fine-tuned model is fed the ``<cls>`` value it was trained with
    (``model.cls_value``: 0, as published). Works on in-memory
    and backed (``backed="r"``) AnnData one chunk of cells at a time; uses mixed precision where it pays.
    The same seed gives the same embeddings, whatever ``batch_size``.

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression (raw counts or log1p-normalised) in ``X`` or ``layer``.
    model
        A model from :func:`~scgpt_protocol.load_model`.
    max_seq_len
        Tokens per cell including ``<cls>`` (1200: the pretraining length).
    batch_size
        Cells per forward pass; ``max_tokens`` also caps the padded tokens per pass (default: 4,096
        on CPU, where larger activations cost page faults (benchmarks/README.md); 65,536 on GPU).
    seed
        Seed of gene sampling and of the random tie-breaking of binning.
    key_added
        ``obsm`` key of the result; parameters are recorded in ``uns[key_added + "_params"]``.
    layer, gene_symbol_key
        Where the expression values and the gene symbols are (default ``X`` and ``var_names``).
    precision
        ``"auto"`` (bf16 autocast on GPUs and on CPUs with bf16 units, else fp32), ``"fp32"``, ``"bf16"``
        or ``"fp16"`` (:func:`~scgpt_protocol.core.device.resolve_precision`). The precision used is recorded
        in ``uns[key_added + "_params"]["precision"]``.
    out
        A path: the embeddings go to this HDF5 file (dataset ``key_added``, float32 ``[n_obs, d_model]``,
        rows in the order of ``obs_names``), written chunk by chunk (:mod:`~scgpt_protocol.data.store`), and
        ``obsm`` is left alone; the path is returned and recorded in ``uns[key_added + "_params"]["store"]``.
        With a backed AnnData (``read_h5ad(path, backed="r")``) memory then stays flat in the number of
        cells. Read rows back with :func:`~scgpt_protocol.data.store.open_store` /
        :func:`~scgpt_protocol.data.store.take_rows`. The values are the same as in ``obsm`` without ``out``.

    Returns
    -------
    The path of ``out`` when given, else None.

    Raises
    ------
    InputDataError
        Negative or NaN values.
    GeneMatchError
        Too few genes in the vocabulary.

    Examples
    --------
    >>> import scanpy as sc, scgpt_protocol as sp  # doctest: +SKIP
    >>> model = sp.load_model("whole-human")  # doctest: +SKIP
    >>> sp.embed(adata, model)  # doctest: +SKIP
    >>> sp.data.neighbors(adata, use_rep="X_scgpt")  # sc.pp.neighbors at any size  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size}.")
    check_expression(adata, layer=layer)
    device = next(model.parameters()).device
    used = resolve_precision(precision, device)
    if max_tokens is None:
        max_tokens = default_max_tokens(device)
    was_training = model.training
    model.eval()
    shape = (adata.n_obs, model.config.d_model)
    sink = _EmbeddingSink(shape, key_added, used, out=out, chunk_size=chunk_size)
    stats: dict = {}
    batches = iter_batches(
        adata, model, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, layer=layer,
        gene_symbol_key=gene_symbol_key, chunk_size=chunk_size, max_tokens=max_tokens, stats=stats,
    )
    _embed_batches(model, batches, sink, n_obs=adata.n_obs, device=device, precision=used, was_training=was_training)
    params = {
        "max_seq_len": max_seq_len, "seed": seed, "layer": layer or "X",
        "genes_matched": stats["genes"].n_matched, "genes_total": stats["genes"].n_total,
        "checkpoint": getattr(model.load_report, "checkpoint_dir", ""), "precision": used,
    }
    return _finish_embedding(adata, sink, params, stats)


class _EmbeddingSink:
    """Where :func:`embed` puts the embeddings: an in-memory array, or the HDF5 store ``out``."""

    def __init__(self, shape: tuple[int, int], key_added: str, precision: str, *, out: str | Path | None,
                 chunk_size: int) -> None:
        self.shape, self.key_added, self.precision = shape, key_added, precision
        self.writer = None
        self.result = None
        if out is None:
            self.result = np.zeros(shape, dtype=np.float32)
        else:
            from ..data.store import create_store

            self.writer = create_store(out, shape[0], {key_added: shape[1]}, attrs={"precision": precision},
                                       chunk_rows=chunk_size)

    def put(self, index: np.ndarray, values: np.ndarray) -> None:
        if self.writer is None:
            self.result[index] = values
        else:
            self.writer.put(index, **{self.key_added: values})


def _embed_batches(model: ScGPT, batches: Iterator[Batch], sink: _EmbeddingSink, *, n_obs: int,
                   device: torch.device, precision: str, was_training: bool) -> None:
    """The normalised ``<cls>`` embedding of every batch into ``sink``; the store is aborted on failure and the
    model goes back to its training mode in any case."""
    try:
        with torch.inference_mode(), autocast(device, precision):
            for batch in progress(batches, total=n_obs, desc="embedding cells", unit="cells",
                                  size=lambda b: len(b.index)):
                batch = batch.to(device)
                emb = model.cell_embedding(batch.gene_ids, batch.values, batch.padding_mask).float()
                sink.put(batch.index, torch.nn.functional.normalize(emb, dim=1).cpu().numpy())
    except BaseException:
        if sink.writer is not None:
            sink.writer.abort()
        raise
    finally:
        model.train(was_training)


def _finish_embedding(adata: AnnData, sink: _EmbeddingSink, params: dict, stats: dict) -> Path | None:
    """Close the store or fill ``obsm``, record ``params`` in ``uns``, warn about cells without a gene; the store."""
    key_added, used, writer = sink.key_added, sink.precision, sink.writer
    store = None
    if writer is not None:
        writer.handle.attrs["params"] = json.dumps(params, default=str)
        store = writer.close()
        params["store"] = str(store)
    if stats["n_empty"]:
        warnings.warn(
            f"{stats['n_empty']:,} cells express none of the matched genes; their embedding is that of "
            "<cls> alone. Consider filtering them (sc.pp.filter_cells(adata, min_genes=...)).",
            UserWarning,
            stacklevel=3,  # the caller of embed
        )
    if store is None:
        adata.obsm[key_added] = sink.result
    if store is None or not adata.is_view:  # a view would be made real (a backed one read whole) by writing uns
        adata.uns[f"{key_added}_params"] = params
    pad_share = 1 - stats["n_tokens"] / max(stats["n_padded"], 1)
    logger.info("embedded %d cells (%d numbers each) -> %s", sink.shape[0], sink.shape[1],
                f"obsm[{key_added!r}]" if store is None else store)
    logger.info("embedding precision %s; %.1f%% of the computed tokens were padding (shorter cells)", used,
                100 * pad_share, extra=DETAIL)
    return store
