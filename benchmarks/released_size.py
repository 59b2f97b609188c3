"""The released model's size with random weights, for the benchmarks that time it.

The released ``whole-human`` checkpoint cannot be downloaded here; speed does not depend on the weights, so the
benchmarks write ``make_tiny_checkpoint`` at the released architecture with the genes of the real ``vocab.json``
(51,330,049 parameters with its 60,697 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

#: the released architecture
ARCH = {"d_model": 512, "nlayers": 12, "nheads": 8, "d_hid": 512}


def released_size_checkpoint(directory: str | Path, vocab_path: str | Path) -> Path:
    """A checkpoint at :data:`ARCH` whose vocabulary is the genes of ``vocab_path`` (in id order, special tokens
    left out, as ``make_tiny_checkpoint`` adds its own); returns its folder."""
    from scgpt_protocol.model.save import make_tiny_checkpoint
    from scgpt_protocol.model.vocab import SPECIAL_TOKENS

    vocab = json.loads(Path(vocab_path).read_text())
    genes = [g for g, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if g not in SPECIAL_TOKENS]
    return make_tiny_checkpoint(directory, genes, **ARCH)


def full_length_cells(adata, model, max_seq_len: int) -> np.ndarray:
    """Positions of the cells with at least ``max_seq_len - 1`` expressed genes known to ``model``'s vocabulary:
    tokenised at ``max_seq_len``, they fill it, so their batches have no padding."""
    from scgpt_protocol.model.vocab import match_genes

    columns = match_genes(adata, model.vocab).columns
    return np.flatnonzero(np.diff(sp.csr_matrix(adata.X[:, columns]).indptr) >= max_seq_len - 1)
