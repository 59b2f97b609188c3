"""Token conventions and gene matching: the special tokens, the value ``<cls>`` carries in fine-tuning,
and how a dataset's genes (symbols or Ensembl ids) meet the checkpoint's vocabulary (:func:`match_genes`,
:func:`check_gene_overlap`)."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.errors import GeneMatchError, format_keys
from ..core.log import DETAIL

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["SPECIAL_TOKENS", "GeneMatch", "gene_symbols", "match_genes", "FINETUNE_CLS_VALUE",
    "check_gene_overlap", "case_hint", "MIN_GENE_OVERLAP"]

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

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
        ) + case_hint(names, vocab)
        msg = (
            f"only {match.n_matched:,}/{match.n_total:,} genes of {source} are in the checkpoint vocabulary "
            f"(need at least {min_genes:,} and {min_overlap:.0%}).{hint}"
        )
        raise GeneMatchError(msg)
    return match

def case_hint(names: Sequence[str], vocab: Any) -> str:
    """A sentence for a gene-match message when upper-casing the names matches far more genes (human symbols
    are upper case: ``'cd3e'`` is ``'CD3E'``); ``""`` otherwise."""
    names = [str(n) for n in names]
    known = set(vocab)
    as_is = sum(n in known for n in names)
    upper = [n for n in names if n not in known and n.upper() in known]
    if not upper or (len(upper) < max(10, as_is) and len(upper) < len(names) // 2):
        return ""
    return (f" {len(upper):,} more genes match when upper-cased (e.g. {upper[0]!r} -> {upper[0].upper()!r}): the "
            "vocabulary's symbols are upper case (human). For human genes written in lower case, upper-case them "
            "(adata.var_names = adata.var_names.str.upper()); mouse symbols ('Cd3e') need a mouse checkpoint or "
            "an ortholog mapping.")


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
            "same gene symbols (for Ensembl ids, name the var column with symbols: query_gene_symbol_key in 03, "
            "gene_symbol_key in 01 and 04; or set var_names to a symbol column), or "
            "restrict the reference to the genes both share."
        ) + case_hint(list(map(str, found)), expected_set)
        raise GeneMatchError(msg)
    return shared
