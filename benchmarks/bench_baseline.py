#!/usr/bin/env python
"""The logistic-regression baseline of step 03 beside CellTypist's default recipe, on held-out pairs.

Each pair trains on one set of labelled PBMCs and predicts another (another 10x chemistry, or another
dataset through the harmonisation CSV's ``coarse`` names). Both methods see the same cells, the same genes
(those the two sides share) and the same labels; test cells whose label is not a training class are left out
(neither method can call them). For each pair and method the script prints accuracy, macro-F1 (scikit-learn's
macro average over the labels found in the truth or the predictions, computed by one function for both), peak
memory and wall time of normalisation + fitting + prediction.

- **ours**: ``scgpt_protocol.evaluate.baseline.logistic_regression_baseline`` in this process, on one AnnData
  holding the train cells (``split == "train"``) and the test cells (``split == "test"``), raw counts.
- **CellTypist**: ``celltypist.train(adata, labels)`` with its defaults (``feature_selection=True`` too with
  ``--celltypist-feature-selection``) on log1p-CP10k train cells, then ``celltypist.annotate(..., majority_voting
  =False)``, ``predicted_labels``, in a subprocess of ``--celltypist-python`` (a venv of its own: CellTypist needs
  scikit-learn < 1.8; it is no dependency of this package).

Peak memory is ``tracemalloc``'s peak over that span (NumPy, SciPy and scikit-learn buffers are traced), the same
measure on both sides; the time is wall time, which includes tracemalloc's overhead on both sides.

It is not a test: it prints figures and checks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

SYMPHONY = "pbmc_3tech_symphony_small.h5ad"
PBMC3K = "pbmc3k_raw_seurat_labels.h5ad"
ZHENG = "zheng_sorted_pbmc_scminer.h5ad"
HARMONISATION = "pbmc_label_harmonization.csv"
#: (name, train file, train technology or None, test file, test technology or None, label vocabulary)
PAIRS = {
    "3pv2->5p": (SYMPHONY, "3pv2", SYMPHONY, "5p", "cell_type"),
    "5p->3pv1": (SYMPHONY, "5p", SYMPHONY, "3pv1", "cell_type"),
    "3pv1->3pv2": (SYMPHONY, "3pv1", SYMPHONY, "3pv2", "cell_type"),
    "pbmc3k->3tech": (PBMC3K, None, SYMPHONY, None, "coarse"),
    "pbmc3k->zheng": (PBMC3K, None, ZHENG, None, "coarse"),
}


# -- the pairs -----------------------------------------------------------------------------------
def _load(data: Path, file: str, tech: str | None, vocabulary: str):
    import anndata as ad
    import pandas as pd

    adata = ad.read_h5ad(data / file)
    if tech is not None:
        adata = adata[adata.obs["technology"] == tech].copy()
    labels = adata.obs["cell_type"].astype(str)
    if vocabulary != "cell_type":
        table = pd.read_csv(data / HARMONISATION)
        table = table[table["file"] == file].set_index("label")[vocabulary]
        labels = labels.map(table).astype(object)
    adata.obs = pd.DataFrame({"label": labels.to_numpy()}, index=adata.obs_names.astype(str))
    adata.var_names = adata.var_names.astype(str)
    return adata


def make_pair(data: Path, name: str):
    """``(train, test)`` AnnData of raw counts on the genes both share, ``obs["label"]``."""
    train_file, train_tech, test_file, test_tech, vocabulary = PAIRS[name]
    train = _load(data, train_file, train_tech, vocabulary)
    test = _load(data, test_file, test_tech, vocabulary)
    genes = train.var_names.intersection(test.var_names)
    train = train[train.obs["label"].notna().to_numpy() & ~train.obs["label"].isin(["other", "unknown"]).to_numpy(),
                  genes].copy()
    test = test[test.obs["label"].isin(set(train.obs["label"])).to_numpy(), genes].copy()
    return train, test


# -- the two methods ------------------------------------------------------------------------------
def run_ours(train, test, **kwargs) -> dict:
    import anndata as ad

    from scgpt_protocol.evaluate.baseline import logistic_regression_baseline

    both = ad.concat({"train": train, "test": test}, label="split", index_unique="-")
    both.obs["split"] = both.obs["split"].astype(str)
    tracemalloc.start()
    t0 = time.perf_counter()
    result = logistic_regression_baseline(both, label_key="label", seed=0, **kwargs)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"predicted": np.asarray(result.predictions.astype(str)).tolist(), "seconds": seconds, "peak": peak,
            "n_genes": result.n_genes}


def run_celltypist(python: str, train, test, feature_selection: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_baseline_") as tmp:
        train.write_h5ad(Path(tmp) / "train.h5ad")
        test.write_h5ad(Path(tmp) / "test.h5ad")
        cmd = [python, __file__, "--_celltypist", tmp] + (["--celltypist-feature-selection"] if feature_selection
                                                         else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"CellTypist failed (exit {proc.returncode}); is --celltypist-python right?")
        return json.loads((Path(tmp) / "out.json").read_text())


def celltypist_child(tmp: str, feature_selection: bool) -> None:
    """Runs under CellTypist's venv: imports nothing from this package."""
    import anndata as ad
    import celltypist
    import scanpy as sc

    def fit_predict(train, test):
        for adata in (train, test):
            sc.pp.normalize_total(adata, target_sum=1e4)
            sc.pp.log1p(adata)
        model = celltypist.train(train, labels="label", feature_selection=feature_selection)
        result = celltypist.annotate(test, model=model, majority_voting=False)
        return model, result.predicted_labels["predicted_labels"]

    train = ad.read_h5ad(Path(tmp) / "train.h5ad")
    test = ad.read_h5ad(Path(tmp) / "test.h5ad")
    fit_predict(train[::4].copy(), test[:50].copy())  # warm-up (lazy imports, first calls): not measured
    tracemalloc.start()
    t0 = time.perf_counter()
    model, predicted = fit_predict(train, test)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    out = {"predicted": predicted.astype(str).tolist(), "seconds": seconds, "peak": peak,
           "n_genes": len(model.features), "version": celltypist.__version__}
    (Path(tmp) / "out.json").write_text(json.dumps(out))


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
                        help="folder of the shared data (default ../shared/data relative to the repo)")
    parser.add_argument("--celltypist-python", default=os.environ.get("CELLTYPIST_PYTHON", "/work/ct-venv/bin/python"),
                        help="python of a venv with celltypist and scikit-learn<1.8 (env CELLTYPIST_PYTHON)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    parser.add_argument("--celltypist-feature-selection", action="store_true",
                        help="also run CellTypist with feature_selection=True")
    parser.add_argument("--no-celltypist", action="store_true", help="ours only")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--_celltypist", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._celltypist:
        celltypist_child(args._celltypist, args.celltypist_feature_selection)
        return

    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    from scgpt_protocol.metrics import classification_metrics

    data = Path(args.data)
    if not (data / SYMPHONY).is_file():
        raise SystemExit(f"{data / SYMPHONY} not found; pass --data with the folder of the shared data.")
    rows = []
    warm_train, warm_test = make_pair(data, "3pv2->5p")
    run_ours(warm_train[::4].copy(), warm_test[:50].copy())  # warm-up (lazy imports, first calls): not measured
    print(f"{'pair':<15} {'train':>6} {'test':>6} {'genes':>6} {'method':<26} {'accuracy':>8} {'macro-F1':>8} "
          f"{'peak MiB':>8} {'time s':>7}")
    for name in args.pairs.split(","):
        train, test = make_pair(data, name)
        truth = test.obs["label"].astype(str).to_numpy()
        runs = {"ours": None}
        if not args.no_celltypist:
            runs["CellTypist default"] = False
            if args.celltypist_feature_selection:
                runs["CellTypist feature_sel."] = True
        for method, feature_selection in runs.items():
            out = (run_ours(train, test) if feature_selection is None
                   else run_celltypist(args.celltypist_python, train, test, feature_selection))
            m = classification_metrics(truth, out["predicted"])
            row = {"pair": name, "method": method, "n_train": train.n_obs, "n_test": test.n_obs,
                   "genes_shared": train.n_vars, "genes_used": out["n_genes"], "accuracy": m["accuracy"],
                   "macro_f1": m["macro_f1"], "peak_mib": out["peak"] / 2**20, "seconds": out["seconds"]}
            rows.append(row)
            print(f"{name:<15} {train.n_obs:>6} {test.n_obs:>6} {out['n_genes']:>6} {method:<26} "
                  f"{row['accuracy']:>8.3f} {row['macro_f1']:>8.3f} {row['peak_mib']:>8.1f} {row['seconds']:>7.1f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
