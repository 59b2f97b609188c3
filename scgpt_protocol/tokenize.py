"""From an expression matrix to model inputs: gene matching, binning, sampling, padding.

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

import logging
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .binning import bin_nonzero
from .checkpoint import SPECIAL_TOKENS
from .errors import GeneMatchError, InputDataError, format_keys
from .log import DETAIL

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "GeneMatch",
    "gene_symbols",
    "match_genes",
    "TokenizedCell",
    "Batch",
    "cell_rng",
    "cell_keys",
    "FINETUNE_CLS_VALUE",
    "tokenize_rows",
    "collate",
    "length_sorted_batches",
    "iter_row_chunks",
    "get_matrix",
    "check_expression",
    "check_gene_overlap",
    "value_kind",
    "MIN_GENE_OVERLAP",
]

logger = logging.getLogger(__name__)

#: the value ``<cls>`` carries in fine-tuning and classification: the official fine-tuning tokeniser
#: (``tokenize_and_pad_batch``, used by the annotation tutorial and the published protocol) inserts 0
FINETUNE_CLS_VALUE = 0.0

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_VERSION = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$")


# -- genes ----------------------------------------------------------------------------------
@dataclass
class GeneMatch:
    """Which of the data's genes (columns) the vocabulary knows.

    ``token_ids[j]`` is the vocabulary id of column ``j``, or -1 when the gene is unknown or a
    duplicate of an earlier column.
    """

    token_ids: np.ndarray
    n_total: int
    n_duplicated: int
    source: str

    @property
    def n_matched(self) -> int:
        return int((self.token_ids >= 0).sum())

    @property
    def fraction(self) -> float:
        return self.n_matched / max(self.n_total, 1)

    @property
    def columns(self) -> np.ndarray:
        """Indices of the matched columns, in column order."""
        return np.flatnonzero(self.token_ids >= 0)

    def __str__(self) -> str:
        return (
            f"matched {self.n_matched:,}/{self.n_total:,} genes ({self.fraction:.1%}) of {self.source} "
            "to the checkpoint vocabulary"
        )


def gene_symbols(adata: AnnData, gene_symbol_key: str | None = None) -> list[str]:
    """The gene symbol of each column: ``var_names``, or ``var[gene_symbol_key]`` for Ensembl-indexed data.

    Raises
    ------
    KeyError
        ``gene_symbol_key`` is not a column of ``adata.var``.
    """
    if gene_symbol_key is None:
        return [str(g) for g in adata.var_names]
    if gene_symbol_key not in adata.var.columns:
        msg = (
            f"gene_symbol_key {gene_symbol_key!r} is not a column of adata.var; available: "
            f"{format_keys(adata.var.columns)}. Set gene_symbol_key to the column with gene symbols, or None "
            "to use var_names."
        )
        raise KeyError(msg)
    return [str(g) for g in adata.var[gene_symbol_key]]


def match_genes(
    adata: AnnData,
    vocab: dict[str, int],
    *,
    gene_symbol_key: str | None = None,
    min_overlap: float = 0.1,
    min_genes: int = 1,
) -> GeneMatch:
    """Match the genes of ``adata`` to a scGPT vocabulary by symbol.

    Parameters
    ----------
    adata
        Cells x genes; gene symbols in ``var_names`` or in ``var[gene_symbol_key]``.
    vocab
        Gene symbol -> token id (``model.vocab``).
    gene_symbol_key
        A ``var`` column holding gene symbols, for data indexed by Ensembl ids.
    min_overlap, min_genes
        Fewer matched genes than either (a fraction of all genes, a count) is an error.

    Raises
    ------
    GeneMatchError
        No gene, or too few, matched; the message gives matched/total and, for Ensembl ids,
        suggests the symbol column.
    KeyError
        ``gene_symbol_key`` is not a column of ``adata.var``.
    """
    names = np.asarray(gene_symbols(adata, gene_symbol_key), dtype=object)
    source = "adata.var_names" if gene_symbol_key is None else f"adata.var[{gene_symbol_key!r}]"

    special = set(SPECIAL_TOKENS)
    token_ids = np.full(len(names), -1, dtype=np.int64)
    seen: set[str] = set()
    n_dup = 0
    for j, name in enumerate(names):
        name = str(name)
        if name in seen:
            n_dup += 1
            continue
        seen.add(name)
        key = name if name in vocab else _VERSION.sub(r"\1", name)
        if key in vocab and key not in special:
            token_ids[j] = vocab[key]
    match = GeneMatch(token_ids=token_ids, n_total=len(names), n_duplicated=n_dup, source=source)

    if n_dup:
        warnings.warn(
            f"{n_dup} gene names in {source} are duplicated; the first occurrence of each is used. "
            "Make them unique (adata.var_names_make_unique()) or aggregate them beforehand.",
            UserWarning,
            stacklevel=2,
        )
    logger.info("%s", match, extra=DETAIL)  # every tokenisation calls this: the log file only
    if match.n_matched < min_genes or match.fraction < min_overlap:
        n_ensembl = sum(bool(_ENSEMBL.match(str(n))) for n in names[:1000])
        hint = (
            " The genes look like Ensembl ids: pass gene_symbol_key= with the adata.var column that holds "
            f"gene symbols (columns: {format_keys(adata.var.columns)})."
            if n_ensembl > min(len(names), 1000) // 2
            else " Are var_names gene symbols (e.g. 'CD3E', 'MS4A1') of the checkpoint's species?"
        )
        msg = (
            f"only {match.n_matched:,}/{match.n_total:,} genes of {source} are in the checkpoint vocabulary "
            f"(need at least {min_genes:,} and {min_overlap:.0%}).{hint}"
        )
        raise GeneMatchError(msg)
    return match


#: above this, non-integer values are not taken for log-normalised ones
LOG_MAX = 50.0

#: the share of a model's genes (a fine-tuned model's training genes, a zero-shot reference's genes)
#: that data must hold to be predicted or mapped with it
MIN_GENE_OVERLAP = 0.5


def check_gene_overlap(
    found: Sequence[str], expected: Sequence[str], *, what: str, against: str,
    min_overlap: float = MIN_GENE_OVERLAP,
) -> int:
    """The one gene-overlap rule: ``found`` must hold at least ``min_overlap`` of the ``expected`` genes.

    Used for a fine-tuned model's query (against its training genes) and for a zero-shot query
    (against the reference's genes). Logs the real overlap and returns the number of shared genes.

    Raises
    ------
    GeneMatchError
        Fewer shared genes than ``min_overlap`` of ``expected`` (none at all included).
    """
    expected_set = set(map(str, expected))
    shared = len(expected_set & set(map(str, found)))
    share = shared / max(len(expected_set), 1)
    logger.info("%s holds %s of the %s genes of %s (%.0f%%)", what, f"{shared:,}", f"{len(expected_set):,}",
                against, 100 * share)
    if share < min_overlap or shared == 0:
        msg = (
            f"{what} holds {shared:,} of the {len(expected_set):,} genes of {against} ({share:.0%}); need at "
            f"least {min_overlap:.0%}. Predictions on so few shared genes are not trustworthy. Use data with the "
            "same gene symbols (for Ensembl ids, pass gene_symbol_key= or set var_names to a symbol column), or "
            "restrict the reference to the genes both share."
        )
        raise GeneMatchError(msg)
    return shared


# -- matrices -------------------------------------------------------------------------------
class BackedRows:
    """The rows of a backed AnnData view, read from the file only when indexed.

    ``view.X`` of a backed view (``adata[rows]`` of ``read_h5ad(..., backed="r")``) reads all its rows
    into memory at once; this reader keeps the file open and reads the rows asked for
    (``reader[start:stop]``, an index array or a boolean mask), so chunked code stays chunked.
    """

    def __init__(self, adata: AnnData) -> None:
        from anndata.io import sparse_dataset

        parent = adata._adata_ref  # the backed AnnData the view was taken from
        source = parent.file["X"]
        self.source = sparse_dataset(source) if hasattr(source, "keys") else source
        self.rows = np.arange(parent.n_obs)[adata._oidx]
        cols = np.arange(parent.n_vars)[adata._vidx]
        self.cols = None if len(cols) == parent.n_vars and np.array_equal(cols, np.arange(parent.n_vars)) else cols
        self.shape = (len(self.rows), len(cols))
        self.dtype = self.source.dtype
        self.ndim = 2

    def __getitem__(self, key: Any) -> Any:
        cols = None
        if isinstance(key, tuple):
            key, cols = key
        rows = self.rows[key]
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.source[unique]
        if len(unique) != len(rows) or not np.array_equal(unique, rows):
            block = block[inverse]
        if self.cols is not None:
            block = block[:, self.cols]
        return block if cols is None else block[:, cols]


def get_matrix(adata: AnnData, layer: str | None = None) -> Any:
    """``adata.X`` or ``adata.layers[layer]`` with a clear error for an unknown layer.

    For a view of a backed AnnData, ``X`` is a :class:`BackedRows` reader (rows are read when indexed),
    not the whole view loaded at once.
    """
    if layer is None:
        if adata.is_view and adata.isbacked:
            return BackedRows(adata)
        if adata.X is None:
            raise InputDataError("adata.X is empty; pass layer= with the layer that holds expression values.")
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not in adata.layers; available: {format_keys(adata.layers.keys())}."
        raise KeyError(msg)
    return adata.layers[layer]


def iter_row_chunks(matrix: Any, chunk_size: int = 2048) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, csr_chunk)`` for consecutive row blocks of a dense, sparse or backed matrix.

    Only one chunk is in memory at a time (dense input is converted chunk by chunk).
    """
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, chunk_size):
        block = matrix[start : min(start + chunk_size, n_rows)]
        if not sp.issparse(block):
            block = sp.csr_matrix(np.asarray(block))
        yield start, sp.csr_matrix(block)


def check_expression(adata: AnnData, *, layer: str | None = None, chunk_size: int = 4096) -> None:
    """Fail clearly when the expression values are negative, NaN or infinite (scaled data, a wrong layer).

    Raises
    ------
    InputDataError
        With the number of bad values and cells, the first cell and gene, and how to fix it.
    """
    matrix = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    n_nan = n_neg = n_inf = 0
    bad_cells: set[int] = set()
    first: tuple[int, int, float] | None = None
    for start, chunk in iter_row_chunks(matrix, chunk_size):
        data = chunk.data
        bad = ~np.isfinite(data) | (data < 0)
        if not bad.any():
            continue
        n_nan += int(np.isnan(data).sum())
        n_inf += int(np.isinf(data).sum())
        n_neg += int((data < 0).sum() - np.isneginf(data).sum())
        rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[bad]
        bad_cells.update((rows + start).tolist())
        if first is None:
            k = int(np.flatnonzero(bad)[0])
            first = (int(rows[0]) + start, int(chunk.indices[k]), float(data[k]))
    if first is None:
        return
    cell, gene, value = first
    kinds = ", ".join(s for s in (f"{n_neg:,} negative" if n_neg else "", f"{n_nan:,} NaN" if n_nan else "",
                                  f"{n_inf:,} infinite" if n_inf else "") if s)
    msg = (
        f"{where} holds {kinds} values in {len(bad_cells):,} cells (first: cell {adata.obs_names[cell]!r}, "
        f"gene {adata.var_names[gene]!r} = {value}). scGPT expects non-negative expression: raw counts or "
        "log1p-normalised values. If X was scaled (sc.pp.scale), use adata.raw.to_adata() or a counts "
        "layer (layer=...); replace NaN and infinite values (a failed normalisation, a division by zero) first."
    )
    raise InputDataError(msg)


def value_kind(matrix: Any, n_rows: int = 2000) -> tuple[str, float]:
    """``("counts" | "log-normalised" | "other", max of the sampled values)`` from a sample of ``n_rows`` rows.

    The one counts-vs-log-normalised check of the package (01's inspection and normalisation, the
    baseline's normalisation): whole numbers are counts; other values below :data:`LOG_MAX` are taken
    for log1p-normalised ones.
    """
    n = matrix.shape[0]
    if n > n_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, n_rows, replace=False))
        block = matrix[rows]
    else:
        block = matrix[:]
    data = block.data if sp.issparse(block) else np.asarray(block).ravel()
    data = data[data != 0]
    if data.size == 0:
        return "other", 0.0
    vmax = float(np.max(data))
    if np.all(np.mod(data, 1) == 0):
        return "counts", vmax
    if vmax < LOG_MAX:
        return "log-normalised", vmax
    return "other", vmax



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
