"""From an expression matrix to model inputs: binning, sampling, padding (gene matching: :mod:`.vocab`).

A cell becomes ``<cls>`` followed by its expressed genes that the vocabulary knows, each with its
per-cell bin (1..n_bins-1). ``<cls>`` carries ``pad_value`` (-2) for pretrained embeddings, as in
pretraining and the official ``embed_data``, and :data:`FINETUNE_CLS_VALUE` (0) for fine-tuning and
classification, as the official fine-tuning tokeniser feeds it. Cells with more genes than
``max_seq_len - 1`` keep a random sample of them. Everything works on CSR rows one chunk of cells at a
time, never on a dense copy of the whole matrix, and the randomness of each cell comes from
``(seed, epoch, cell name)`` (:func:`cell_keys`), so a cell gets the same tokens whatever the batch
size, the order of the cells, or the AnnData (a subset, the full file) it sits in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .binning import bin_nonzero

__all__ = ["TokenizedCell", "Batch", "cell_rng", "cell_keys", "tokenize_rows", "collate",
    "length_sorted_batches"]



# -- cells ----------------------------------------------------------------------------------
@dataclass
class TokenizedCell:
    gene_ids: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n]


@dataclass
class Batch:
    """Padded model inputs for a batch of cells; ``index`` are the cells' row numbers."""

    gene_ids: torch.Tensor
    values: torch.Tensor
    padding_mask: torch.Tensor
    index: np.ndarray

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.gene_ids.to(device, non_blocking=nb),
            self.values.to(device, non_blocking=nb),
            self.padding_mask.to(device, non_blocking=nb),
            self.index,
        )


def cell_keys(names: Sequence[str]) -> np.ndarray:
    """A 64-bit key per cell name (``obs_names``), the identity its random stream is drawn from.

    Keyed to the name rather than the row, a cell gets the same gene sample and tie-breaks alone, in a
    subset or inside a larger file, and row ``i`` of two different AnnData objects do not share a stream.
    """
    import hashlib

    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=8).digest(), "little") for n in names),
        dtype=np.uint64, count=len(names),
    )


def cell_rng(seed: int, key: int, epoch: int = 0) -> np.random.Generator:
    """The random stream of one cell (``key`` from :func:`cell_keys`): the same for a seed, whatever the batching."""
    return np.random.default_rng((seed, epoch, int(key)))


def tokenize_rows(
    chunk: sp.csr_matrix,
    col_token_ids: np.ndarray,
    *,
    first_index: int = 0,
    cell_index: np.ndarray | None = None,
    cls_id: int,
    pad_value: float,
    cls_value: float | None = None,
    max_seq_len: int,
    n_bins: int = 51,
    seed: int = 0,
    epoch: int = 0,
) -> list[TokenizedCell]:
    """Tokenise each row of ``chunk`` (cells x matched genes, CSR).

    ``col_token_ids[j]`` is the vocabulary id of column ``j``. Row ``i`` draws its random stream from
    ``cell_index[i]`` -- pass :func:`cell_keys` of the cells' names so that a cell's tokens do not depend
    on where it sits; without it, from its row number ``first_index + i``. ``<cls>`` carries
    ``cls_value`` (None: ``pad_value``, the pretraining convention).
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (<cls> and one gene); got {max_seq_len}.")
    chunk = chunk if chunk.has_canonical_format else chunk.copy()
    chunk.sum_duplicates()
    cells = []
    n_keep = max_seq_len - 1
    head_value = pad_value if cls_value is None else cls_value
    for i in range(chunk.shape[0]):
        lo, hi = chunk.indptr[i], chunk.indptr[i + 1]
        data = chunk.data[lo:hi]
        nonzero = data != 0
        cols, data = chunk.indices[lo:hi][nonzero], data[nonzero]
        rng = cell_rng(seed, int(cell_index[i]) if cell_index is not None else first_index + i, epoch)
        bins = bin_nonzero(data, n_bins, rng) if len(data) else np.zeros(0, np.float32)
        if len(cols) > n_keep:
            pick = rng.choice(len(cols), n_keep, replace=False)
            cols, bins = cols[pick], bins[pick]
        gene_ids = np.empty(len(cols) + 1, dtype=np.int64)
        gene_ids[0], gene_ids[1:] = cls_id, col_token_ids[cols]
        values = np.empty(len(cols) + 1, dtype=np.float32)
        values[0], values[1:] = head_value, bins
        cells.append(TokenizedCell(gene_ids, values))
    return cells


def collate(cells: Sequence[TokenizedCell], index: np.ndarray, *, pad_id: int, pad_value: float) -> Batch:
    """Pad a list of cells to the longest one."""
    length = max(len(c.gene_ids) for c in cells)
    gene_ids = np.full((len(cells), length), pad_id, dtype=np.int64)
    values = np.full((len(cells), length), pad_value, dtype=np.float32)
    for row, cell in enumerate(cells):
        gene_ids[row, : len(cell.gene_ids)] = cell.gene_ids
        values[row, : len(cell.values)] = cell.values
    ids = torch.from_numpy(gene_ids)
    return Batch(ids, torch.from_numpy(values), ids == pad_id, np.asarray(index))


def length_sorted_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Group positions into batches of similar length (longest first), so little goes to padding.

    With ``max_tokens`` a batch also holds at most that many padded tokens (at least one cell),
    which bounds memory when some cells are long.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(batch_size, max_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start : start + size])
        start += size
    return batches
