"""Calibrated confidence and label maps across technologies, with a type held out of training (issue 18).

Data: ``pbmc_3tech_symphony_small.h5ad`` (1,200 PBMCs from 10x 3' v1, 3' v2 and 5'; ``../shared/data``) and
``pbmc_label_harmonization.csv`` (its labels -> shared coarse names). The model is trained on one technology
(default 3' v2) with the **coarse** names (T_CD4 -> "CD4 T", Mono_CD14 and Mono_CD16 -> "Monocyte", ...), minus
one coarse type held out of training (default B) and the non-types ``other`` / ``unknown``. The other two
technologies are the query, with **their own** label names, mapped to the model's names through a label-map CSV
written from the harmonisation table -- only for the coarse names the model has; the others (the held-out type,
HSC) stay unmapped and are therefore **novel types**.

For the logistic-regression baseline and for scGPT fine-tuned from the **demo checkpoint** (a tiny randomly
initialised model, as ``checkpoint: demo``; its figures say nothing about scGPT) it prints:
the temperature fitted on the training technology's validation cells, the ECE (15 bins) before and after on
those validation cells and on the query's shared-type cells, the shared-type accuracy and macro-F1 (argmax, no
abstention), and at ``min_confidence`` 0.5 the share of novel-type and of shared-type cells called ``Unknown``
(raw and calibrated probabilities) and the "all cells" accuracy (a novel cell right only when ``Unknown``).

    python benchmarks/bench_calibration_labels.py [--data ../shared/data] [--train-tech 3pv2] [--held-out B]
        [--epochs 40] [--max-seq-len 256] [--precision fp32] [--skip-scgpt] [--out runs/bench_calibration_labels]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from scgpt_protocol.annotate.calibration import expected_calibration_error
from scgpt_protocol.annotate.refinement import refine_labels
from scgpt_protocol.core.params import PRECISION_NAMES
from scgpt_protocol.data.label_map import apply_label_map, describe_label_map, map_obs_labels
from scgpt_protocol.data.matrix import log1p_cp10k
from scgpt_protocol.evaluate.novel import crosstab, novel_record, split_novel

ROOT = Path(__file__).resolve().parent.parent
FILE = "pbmc_3tech_symphony_small.h5ad"
NOT_TYPES = {"other", "unknown"}


def coarse_map(data: Path) -> dict[str, str]:
    table = pd.read_csv(data / "pbmc_label_harmonization.csv", dtype=str, keep_default_na=False)
    rows = table[table["file"] == FILE]
    return dict(zip(rows["label"].str.strip(), rows["coarse"].str.strip()))


def scores(name: str, categories: list[str], fit: dict, q_proba: np.ndarray, q_raw: np.ndarray, q_truth: pd.Series,
           min_confidence: float) -> tuple[dict, pd.DataFrame]:
    """One column of the table, from what the product computed: the temperature and validation ECE of its fit
    (``fit``: the calibration record), the query's calibrated probabilities and raw confidence."""
    cats = np.asarray(categories, dtype=object)
    q_pred = cats[q_proba.argmax(axis=1)]
    truth = q_truth.to_numpy(dtype=object)
    plain = split_novel(truth, q_pred, categories)
    shared = plain["shared_mask"]
    right = q_pred[shared] == truth[shared]
    row = {
        "method": name,
        "temperature": fit["temperature"],
        "val ECE before": fit["ece_before"],
        "val ECE after": fit["ece_after"],
        "query ECE before": expected_calibration_error(q_raw[shared], right),
        "query ECE after": expected_calibration_error(q_proba[shared].max(axis=1), right),
        "shared accuracy": plain["shared"]["accuracy"],
        "shared macro-F1": plain["shared"]["macro_f1"],
    }
    for kind, confidence in (("raw", q_raw), ("calibrated", q_proba.max(axis=1))):
        calls = refine_labels(q_pred, confidence, min_confidence=min_confidence, categories=categories).labels
        record = novel_record(truth, {name: calls}, categories)["methods"][name]
        novel = record["novel"]
        n_novel = sum(v["n_cells"] for v in novel.values())
        row[f"novel -> Unknown ({kind})"] = sum(v["unknown_rate"] * v["n_cells"] for v in novel.values()) / n_novel
        row[f"shared -> Unknown ({kind})"] = float((calls[shared] == "Unknown").mean())
        row[f"all-cells accuracy ({kind})"] = record["all_cells"]["accuracy"]
        if kind == "calibrated":
            table = crosstab(truth, calls)
    return row, table


def load(a: argparse.Namespace) -> tuple[anndata.AnnData, anndata.AnnData, dict[str, str], Path]:
    """The training technology (coarse labels, held-out type removed) and the query (own labels)."""
    data = Path(a.data)
    raw = anndata.read_h5ad(data / FILE)
    raw.obs["cell_type"] = raw.obs["cell_type"].astype(str)
    techs = sorted(set(raw.obs["technology"].astype(str)))
    if a.train_tech not in techs:
        raise SystemExit(f"--train-tech {a.train_tech!r} is none of {techs}")
    to_coarse = coarse_map(data)
    train_map = apply_label_map(raw.obs["cell_type"], to_coarse)  # 01's use: train on coarse names
    raw.obs["coarse"] = train_map.labels.to_numpy()
    if a.held_out not in set(raw.obs["coarse"].dropna()):
        raise SystemExit(f"--held-out {a.held_out!r} is no coarse type: {sorted(set(raw.obs['coarse'].dropna()))}")
    in_train = (raw.obs["technology"] == a.train_tech).to_numpy()
    keep = in_train & ~raw.obs["coarse"].isin([a.held_out, *NOT_TYPES]).to_numpy()
    train = raw[keep].copy()
    query = raw[~in_train].copy()
    query.X = log1p_cp10k(query.X)
    return train, query, to_coarse, Path(a.out)


def query_labels(query: anndata.AnnData, to_coarse: dict[str, str], categories: list[str], out: Path) -> None:
    """The query's own labels mapped in place (``obs["cell_type"]``; as 03's ``query_label_map`` does) through a
    label-map CSV that only names the model's classes."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "query_label_map.csv"
    rows = [(k, v) for k, v in to_coarse.items() if v in categories]
    path.write_text("label,model\n" + "".join(f"{k},{v}\n" for k, v in rows))
    result = map_obs_labels(query, "cell_type", str(path), model_classes=categories, what="the query")
    print(f"query label map ({path}): {dict(rows)}\n{describe_label_map(result, 'the query')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--train-tech", default="3pv2")
    p.add_argument("--held-out", default="B", help="the coarse type left out of training")
    p.add_argument("--min-confidence", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=PRECISION_NAMES,
                   help="scGPT's training and prediction (fp32: the same figures on every CPU; 'auto' runs bf16 on "
                        "CPUs with bf16 units)")
    p.add_argument("--skip-scgpt", action="store_true", help="the baseline only")
    p.add_argument("--out", default="runs/bench_calibration_labels")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    train, query, to_coarse, out = load(a)
    from scgpt_protocol import make_tiny_checkpoint
    from scgpt_protocol.core.params import PreprocessParams
    from scgpt_protocol.model.checkpoint import read_vocab
    from scgpt_protocol.pp.in_memory import prepare

    ckpt = make_tiny_checkpoint(out / "demo_checkpoint", list(train.var_names), seed=a.seed)  # = checkpoint: demo
    pre = PreprocessParams(run_dir=str(out), label_key="coarse", checkpoint=str(ckpt), n_hvg=1200,
                           min_cells_per_class=10, test_size=0.1, val_size=0.25, seed=a.seed)
    prepared = prepare(train, pre, read_vocab(ckpt)).adata
    prepared.obs["coarse"] = prepared.obs["coarse"].astype(str)
    categories = sorted(set(prepared.obs["coarse"]))
    split = prepared.obs["split"].astype(str)
    print(f"train: {a.train_tech}, {int((split == 'train').sum())} train / {int((split == 'val').sum())} validation "
          f"cells of {categories} (held out: {a.held_out!r}); query: {query.n_obs} cells of "
          f"{sorted(set(query.obs['technology'].astype(str)))}")
    query_labels(query, to_coarse, categories, out)
    q_truth = query.obs["cell_type"].astype(object)
    rows, tables = [], {}

    from scgpt_protocol.evaluate.baseline import logistic_regression_baseline

    base = logistic_regression_baseline(prepared, label_key="coarse", seed=a.seed, query=query,
                                        query_label_key="cell_type", calibrate=True)  # T fitted on the val cells
    row, tables["baseline"] = scores("logistic regression", list(base.categories), base.calibration,
                                     base.query.probabilities, base.query.raw_confidence, q_truth, a.min_confidence)
    rows.append(row)
    if not a.skip_scgpt:
        from scgpt_protocol.core.params import FinetuneParams
        from scgpt_protocol.tl.annotation import AnnotationRunner, _checkpoint_record

        params = FinetuneParams(run_dir=str(out), epochs=a.epochs, lr=1e-3, batch_size=32, max_seq_len=a.max_seq_len,
                                class_weighted=True, patience=0, device="cpu", seed=a.seed,
                                precision=a.precision)
        runner = AnnotationRunner(prepared, label_key="coarse", categories=categories,
                                  base_checkpoint=_checkpoint_record(ckpt), params=params)
        runner.fit(["full"])  # ends with the temperature fitted on the validation cells (runner.manifest)
        pq = runner.predict(query)  # calibrated probabilities; raw_confidence: the raw softmax's
        row, tables["scGPT"] = scores("scGPT fine-tuned (demo checkpoint)", list(pq.categories),
                                      runner.manifest["calibration"], np.asarray(pq.probabilities), pq.raw_confidence,
                                      q_truth, a.min_confidence)
        rows.append(row)
    pd.set_option("display.width", 250)
    table = pd.DataFrame(rows).set_index("method").T
    print(table.round(3).to_string())
    for name, ct in tables.items():
        print(f"\n{name}: query label (mapped) -> call at min_confidence {a.min_confidence} (calibrated)")
        print(ct.to_string())
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
