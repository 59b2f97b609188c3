"""Novel cell types: does abstention send a type the model never saw to ``Unknown``?

On PBMC 3k (2,638 cells, 9 Seurat-annotated types; ``../shared/data``) one cell type is left out of
training. The protocol prepares the data once (01's ``prepare``: normalise, 2,000 HVGs, stratified
split); the held-out type's cells are removed from training and validation. Then, on the cells the
models never saw -- the known types' test cells plus *every* cell of the held-out type -- it prints,
for several ``min_confidence`` thresholds, how many cells of the unseen type end up ``Unknown`` and
how many of the known types do, for

* scGPT fine-tuned (``full``), confidence = softmax probability of the predicted class (03);
* scGPT zero-shot kNN (k = 10, reference = the known types' train + validation cells), confidence =
  share of neighbours that agree (04);
* the logistic-regression baseline (log1p-CP10k HVGs), confidence = its predicted-class probability,
  as a reference point with real signal;

plus the area under the ROC curve of "low confidence" as a detector of unseen cells (0.5: no better
than chance), and, with majority voting at the middle threshold, how many unseen cells sit in an
over-cluster voted ``Unknown``.

The released ``whole-human`` checkpoint cannot be downloaded here: a tiny randomly initialised
checkpoint (d_model 64, 2 layers, the data's genes as vocabulary) stands in, as in the demo. Its
figures say what the pipeline does with an untrained encoder, not what the released scGPT achieves.

    python benchmarks/bench_novel_types.py [--held-out B] [--epochs 3] [--strategy full] [--checkpoint DIR]
        [--out runs/bench_novel_types]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from scgpt_protocol import make_tiny_checkpoint
from scgpt_protocol.annotate.refinement import UNKNOWN, refine_labels
from scgpt_protocol.annotate.zeroshot import zeroshot_annotate
from scgpt_protocol.core.params import FinetuneParams, PreprocessParams
from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
from scgpt_protocol.model.checkpoint import load_model, read_vocab
from scgpt_protocol.pp.in_memory import prepare
from scgpt_protocol.tl.annotation import AnnotationRunner, _checkpoint_record

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = {"softmax": (0.0, 0.2, 0.3, 0.5, 0.7, 0.9), "kNN share": (0.0, 0.3, 0.5, 0.7, 0.9)}


def rates(name: str, truth: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, embedding: np.ndarray | None,
          held_out: str, thresholds: tuple[float, ...], vote_at: float, seed: int) -> list[dict]:
    unseen = truth == held_out
    rows = []
    for t in thresholds:
        r = refine_labels(predicted, confidence, embedding, min_confidence=t,
                          majority_voting=embedding is not None and t == vote_at, seed=seed)
        unknown = r.labels == UNKNOWN
        known_assigned = ~unseen & ~unknown
        rows.append({
            "method": name, "min_confidence": t,
            "unseen -> Unknown": unknown[unseen].mean(),
            "known -> Unknown": unknown[~unseen].mean(),
            "known accuracy (assigned)": (truth[known_assigned] == predicted[known_assigned]).mean()
            if known_assigned.any() else np.nan,
            "unseen -> Unknown, majority vote": (r.majority_voting[unseen] == UNKNOWN).mean()
            if r.majority_voting is not None else np.nan,
            "AUROC(low confidence -> unseen)": roc_auc_score(unseen, -confidence),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_raw_seurat_labels.h5ad"))
    p.add_argument("--held-out", default="B", help="the cell type left out of training")
    p.add_argument("--out", default="runs/bench_novel_types")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--strategy", default="full", help="how scGPT is fine-tuned (full, head, probe, lora, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="a pretrained checkpoint folder or 'whole-human' (default: a tiny random one, as in the demo)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    out = Path(a.out)
    raw = anndata.read_h5ad(a.data)
    if a.held_out not in set(raw.obs["cell_type"].astype(str)):
        raise SystemExit(f"--held-out {a.held_out!r} is not a cell type of {a.data}: "
                         f"{sorted(set(raw.obs['cell_type']))}")
    if a.checkpoint is None:
        ckpt = make_tiny_checkpoint(out / "tiny_checkpoint", list(raw.var_names), seed=a.seed)
    else:
        from scgpt_protocol.model.checkpoint import locate_checkpoint

        ckpt = locate_checkpoint(a.checkpoint)[0]
    record = _checkpoint_record(ckpt)
    pre = PreprocessParams(run_dir=str(out), label_key="cell_type", checkpoint=str(ckpt), n_hvg=2000,
                           min_cells_per_class=10, seed=a.seed)
    prepared = prepare(raw, pre, read_vocab(ckpt)).adata
    labels = prepared.obs["cell_type"].astype(str).to_numpy()
    held = labels == a.held_out
    known = prepared[~held].copy()  # train / val / test of the known types: the held-out type never trains
    known.obs["cell_type"] = known.obs["cell_type"].astype(str)
    categories = sorted(set(known.obs["cell_type"]))
    evaluate = prepared[held | (prepared.obs["split"] == "test").to_numpy()].copy()
    truth = evaluate.obs["cell_type"].astype(str).to_numpy()
    n_unseen, n_known = int((truth == a.held_out).sum()), int((truth != a.held_out).sum())
    print(f"held out: {a.held_out!r}; trained on {int((known.obs['split'] == 'train').sum())} cells of "
          f"{len(categories)} known types; evaluated on {n_unseen} unseen + {n_known} known test cells")

    params = FinetuneParams(run_dir=str(out), epochs=a.epochs, lr=1e-3, batch_size=32, max_seq_len=a.max_seq_len,
                            class_weighted=True, patience=0, device="cpu", seed=a.seed)
    runner = AnnotationRunner(known, label_key="cell_type", categories=categories, base_checkpoint=record,
                              params=params)
    runner.fit([a.strategy])
    fine = runner.predict(evaluate)

    reference = known[known.obs["split"].isin(["train", "val"]).to_numpy()].copy()
    query = evaluate.copy()
    zs = zeroshot_annotate(reference, query, load_model(ckpt, device="cpu"), label_key="cell_type", k=10,
                           max_seq_len=a.max_seq_len, seed=a.seed)
    base = logistic_regression_baseline(known, label_key="cell_type", seed=a.seed, query=evaluate).query

    rows = []
    rows += rates(f"scGPT fine-tuned, {a.strategy} (softmax)", truth, np.asarray(fine.labels), fine.confidence,
                  fine.embeddings, a.held_out, THRESHOLDS["softmax"], 0.5, a.seed)
    rows += rates("scGPT zero-shot kNN (share of k=10)", truth,
                  zs.predictions["scgpt_zeroshot_label"].to_numpy(dtype=object),
                  zs.predictions["scgpt_zeroshot_confidence"].to_numpy(), zs.query_embedding,
                  a.held_out, THRESHOLDS["kNN share"], 0.5, a.seed)
    rows += rates("logistic regression (softmax)", truth, base.predictions.astype(str).to_numpy(dtype=object),
                  base.probabilities.max(axis=1), None, a.held_out, THRESHOLDS["softmax"], 0.5, a.seed)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    for name, labels_ in (("scGPT fine-tuned", np.asarray(fine.labels)),
                          ("zero-shot kNN", zs.predictions["scgpt_zeroshot_label"].to_numpy(dtype=object)),
                          ("logistic regression", base.predictions.astype(str).to_numpy(dtype=object))):
        calls = pd.Series(labels_[truth == a.held_out]).value_counts(normalize=True).head(3).round(3)
        print(f"{name}: the unseen {a.held_out!r} cells are called {dict(calls)}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
