"""Gene matching, value checks, per-cell tokenisation and length-grouped batches."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_protocol.core.errors import GeneMatchError, InputDataError
from scgpt_protocol.data.matrix import check_expression
from scgpt_protocol.model.tokenize import collate, length_sorted_batches, tokenize_rows
from scgpt_protocol.model.vocab import match_genes

VOCAB = {"CD3E": 0, "MS4A1": 1, "LYZ": 2, "NKG7": 3, "ENSG00000283675.1": 4, "<pad>": 5, "<cls>": 6, "<eoc>": 7}


def _adata(genes, X=None, **var):
    X = np.ones((3, len(genes)), dtype=np.float32) if X is None else X
    return ad.AnnData(X=X, var=pd.DataFrame(var, index=pd.Index(genes, name=None)))


def test_match_by_symbol_and_unknown_genes():
    match = match_genes(_adata(["LYZ", "FOO", "CD3E", "NKG7"]), VOCAB)
    assert match.token_ids.tolist() == [2, -1, 0, 3]
    assert (match.n_matched, match.n_total) == (3, 4)
    assert match.columns.tolist() == [0, 2, 3]
    assert "3/4 genes" in str(match)


def test_special_tokens_are_never_genes():
    assert match_genes(_adata(["<pad>", "<cls>", "LYZ"]), VOCAB).token_ids.tolist() == [-1, -1, 2]


def test_duplicated_genes_keep_the_first_and_warn():
    adata = ad.AnnData(np.ones((2, 3), np.float32))
    adata.var_names = ["LYZ", "CD3E", "LYZ"]
    with pytest.warns(UserWarning, match="1 gene names in adata.var_names are duplicated; the first"):
        match = match_genes(adata, VOCAB)
    assert match.token_ids.tolist() == [2, 0, -1]


def test_ensembl_index_suggests_symbol_column_and_column_works():
    ids = ["ENSG00000198851.9", "ENSG00000105369.10", "ENSG00000090382.7", "ENSG00000105374.10"]
    adata = _adata(ids, symbol=["CD3E", "CD79A", "LYZ", "NKG7"])
    with pytest.raises(GeneMatchError, match=r"only 0/4 genes.*Ensembl ids: pass gene_symbol_key=.*\['symbol'\]"):
        match_genes(adata, VOCAB)
    assert match_genes(adata, VOCAB, gene_symbol_key="symbol").token_ids.tolist() == [0, -1, 2, 3]
    with pytest.raises(KeyError, match=r"gene_symbol_key 'symbols' is not a column.*\['symbol'\]"):
        match_genes(adata, VOCAB, gene_symbol_key="symbols")


def test_ensembl_version_suffix_is_stripped():
    match = match_genes(_adata(["ENSG00000283675.7", "LYZ"]), VOCAB)  # vocab has ENSG00000283675.1 only
    assert match.token_ids.tolist() == [-1, 2]
    match = match_genes(_adata(["ENSG00000283675.1", "LYZ"]), VOCAB)
    assert match.token_ids.tolist() == [4, 2]
    vocab = {**VOCAB, "ENSG00000111111": 8}
    assert match_genes(_adata(["ENSG00000111111.3", "LYZ"]), vocab).token_ids.tolist() == [8, 2]


def test_under_minimum_overlap_is_an_error():
    genes = ["LYZ"] + [f"X{i}" for i in range(19)]
    with pytest.raises(GeneMatchError, match=r"only 1/20 genes .*need at least 1 and 10%"):
        match_genes(_adata(genes), VOCAB, min_overlap=0.1)
    assert match_genes(_adata(genes), VOCAB, min_overlap=0.05).n_matched == 1


@pytest.mark.parametrize("sparse", [True, False])
def test_negative_and_nan_values_are_reported_with_counts_and_place(sparse):
    X = np.array([[1, 0, 2], [0, -0.5, 1], [np.nan, 1, -1]], dtype=np.float32)
    adata = _adata(["LYZ", "CD3E", "NKG7"], X=sp.csr_matrix(X) if sparse else X)
    adata.obs_names = ["c0", "c1", "c2"]
    with pytest.raises(
        InputDataError,
        match=r"2 negative, 1 NaN values in 2 cells \(first: cell 'c1', gene 'CD3E' = -0\.5\).*adata\.raw",
    ):
        check_expression(adata)
    check_expression(_adata(["LYZ"], X=np.abs(np.nan_to_num(X[:, :1]))))  # clean data passes


def test_tokenize_rows_layout():
    X = sp.csr_matrix(np.array([[0, 5, 1, 0], [0, 0, 0, 0], [3, 3, 3, 2]], dtype=np.float32))
    cols = np.array([10, 11, 12, 13])
    cells = tokenize_rows(X, cols, first_index=0, cls_id=99, pad_value=-2, max_seq_len=10, n_bins=51)
    first = cells[0]
    assert first.gene_ids[0] == 99 and first.values[0] == -2  # <cls> first with pad_value
    assert sorted(first.gene_ids[1:].tolist()) == [11, 12]  # only expressed genes
    assert dict(zip(first.gene_ids[1:], first.values[1:])) == {11: 50.0, 12: 1.0}
    assert cells[1].gene_ids.tolist() == [99]  # no expressed gene: <cls> only
    assert len(cells[2].gene_ids) == 5 and set(cells[2].values[1:]) <= set(range(1, 51))


def test_tokenize_samples_to_max_seq_len_and_is_seeded_per_cell():
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, size=(4, 300)).astype(np.float32))
    cols = np.arange(300) + 1000
    kw = dict(cls_id=1, pad_value=-2, max_seq_len=51, n_bins=51)
    a = tokenize_rows(X, cols, first_index=0, seed=3, **kw)
    assert all(len(c.gene_ids) == 51 for c in a)
    assert all(len(set(c.gene_ids[1:].tolist())) == 50 for c in a)  # sampled without replacement
    b = tokenize_rows(X[2:], cols, first_index=2, seed=3, **kw)  # same cell, other chunking
    assert np.array_equal(a[2].gene_ids, b[0].gene_ids) and np.array_equal(a[2].values, b[0].values)
    c = tokenize_rows(X, cols, first_index=0, seed=4, **kw)
    assert not np.array_equal(a[0].gene_ids, c[0].gene_ids)
    d = tokenize_rows(X, cols, first_index=0, seed=3, epoch=1, **kw)  # resampled each epoch
    assert not np.array_equal(a[0].gene_ids, d[0].gene_ids)


def test_length_sorted_batches_and_collate():
    lengths = np.array([3, 10, 1, 7, 9, 2])
    batches = length_sorted_batches(lengths, batch_size=2)
    assert [b.tolist() for b in batches] == [[1, 4], [3, 0], [5, 2]]
    capped = length_sorted_batches(lengths, batch_size=4, max_tokens=20)
    assert all(len(b) * lengths[b].max() <= 20 for b in capped)
    assert sorted(np.concatenate(capped).tolist()) == list(range(6))

    X = sp.csr_matrix(np.array([[1, 2, 0], [0, 0, 4]], dtype=np.float32))
    cells = tokenize_rows(X, np.array([5, 6, 7]), first_index=0, cls_id=9, pad_value=-2, max_seq_len=10)
    batch = collate(cells, np.array([0, 1]), pad_id=8, pad_value=-2)
    assert batch.gene_ids.shape == (2, 3)
    assert batch.padding_mask.tolist() == [[False, False, False], [False, False, True]]
    assert batch.gene_ids[1, 2].item() == 8 and batch.values[1, 2].item() == -2
