"""All seven adaptation strategies and the baseline on PBMC 3k (2,638 cells, 9 Seurat-annotated types).

A tiny randomly initialised checkpoint (d_model 64, 2 layers) whose vocabulary is the data's genes stands
in for the released model, which cannot be downloaded here: the table shows what each strategy costs
and that the comparison runs end to end, not what the released scGPT achieves. The random model learns
from scratch, hence lr 1e-3 rather than the published 1e-4.

    python benchmarks/compare_strategies_pbmc3k.py [--out runs/compare_pbmc3k] [--epochs 5]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import anndata

from scgpt_protocol import make_tiny_checkpoint
from scgpt_protocol.core.params import STRATEGY_NAMES
from scgpt_protocol.tl.annotation import adapt_annotation

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_raw_seurat_labels.h5ad"))
    p.add_argument("--out", default="runs/compare_pbmc3k")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--n-hvg", type=int, default=2000)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    adata = anndata.read_h5ad(a.data)
    out = Path(a.out)
    ckpt = make_tiny_checkpoint(out / "tiny_checkpoint", list(adata.var_names), seed=0)
    start = time.perf_counter()
    runner = adapt_annotation(
        adata, "cell_type", checkpoint=ckpt, strategies=STRATEGY_NAMES, output_dir=out,
        n_hvg=a.n_hvg, epochs=a.epochs, lr=1e-3, batch_size=32, max_seq_len=a.max_seq_len,
        class_weighted=True, patience=0, min_cells_per_class=10,
    )
    print(runner.comparison.round(3).to_string(index=False))
    print(f"best: {runner.best_strategy}; {time.perf_counter() - start:.0f} s; bundle in {out}")


if __name__ == "__main__":
    main()
