"""Command line: ``scgpt-protocol demo`` (the main job on the embedded demo data)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("scgpt_protocol.cli")


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .checkpoint import load_model, make_tiny_checkpoint
    from .data import DEMO_LABEL_KEY, load_demo
    from .embedding import embed

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adata = load_demo()
    logger.info("demo data: %d cells x %d genes, labels in obs[%r]", adata.n_obs, adata.n_vars, DEMO_LABEL_KEY)
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = run_dir / "tiny_checkpoint"
        make_tiny_checkpoint(checkpoint, adata.var_names, seed=args.seed)
        logger.info("no checkpoint given: using a randomly initialised tiny checkpoint (%s); "
                    "embeddings show the pipeline, not biology", checkpoint)
    model = load_model(checkpoint, device=args.device)
    embed(adata, model, seed=args.seed, batch_size=args.batch_size)

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.model_selection import cross_val_score

    labels = adata.obs[DEMO_LABEL_KEY].to_numpy()
    knn = cross_val_score(KNeighborsClassifier(n_neighbors=10), adata.obsm["X_scgpt"], labels, cv=5)
    out = run_dir / "demo_embedded.h5ad"
    adata.write_h5ad(out)
    summary = {
        "cells": adata.n_obs,
        "embedding_dim": int(adata.obsm["X_scgpt"].shape[1]),
        "checkpoint": str(checkpoint),
        "knn10_label_accuracy_5fold": round(float(np.mean(knn)), 4),
        "output": str(out),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key, value in summary.items():
        logger.info("%-28s %s", key, value)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .log import ensure_logging

    parser = argparse.ArgumentParser(prog="scgpt-protocol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="embed the demo data (pbmc68k_reduced) and print a summary")
    demo.add_argument("--run-dir", default="runs/demo", help="where outputs go (default: runs/demo)")
    demo.add_argument("--checkpoint", default=None, help="scGPT checkpoint folder or 'whole-human' (default: a tiny random one)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ensure_logging()
    from .errors import ScGPTProtocolError

    try:
        return _demo(args)
    except (ScGPTProtocolError, KeyError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
