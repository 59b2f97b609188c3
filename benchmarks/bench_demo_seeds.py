#!/usr/bin/env python
"""The demo's test metrics over many seeds of fine-tuning: the run-to-run noise, and two checkouts side by side.

For each ``--seeds`` seed and each ``--src`` checkout of this package (``name=path``; default: this one), a fresh
process runs ``finetune`` with the demo recipe (lr 1e-3, Adam eps 1e-8, batch 16, 256 tokens, class-weighted; 10
epochs, patience 3) on ``RUN_DIR/data/prepared.h5ad`` from the demo checkpoint in ``RUN_DIR/pretrained`` (both
written by ``make demo``), then ``predict`` on the test split: accuracy and macro-F1 over the labels, without
abstention and at ``min_confidence`` 0.5 (``Unknown`` counted wrong). Printed: every run, then per checkout the
mean, sd and median of each figure, the runs that learnt (macro-F1 > 0.1) and, for two checkouts, Welch's t-test
and the Mann-Whitney test of each figure.

    python benchmarks/bench_demo_seeds.py --seeds 18 --src before=/tmp/wt-before --src after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("acc@0.0", "f1@0.0", "acc@0.5", "f1@0.5")


def worker(run_dir: Path, seed: int) -> dict:
    import logging
    import tempfile
    import warnings

    import anndata
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from scgpt_protocol import load_model, tl
    from scgpt_protocol.core.params import FinetuneParams

    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    adata = anndata.read_h5ad(run_dir / "data" / "prepared.h5ad")
    key = next(c for c in ("bulk_labels", "label") if c in adata.obs)
    categories = sorted(adata.obs[key].astype(str).unique())
    model = load_model(run_dir / "pretrained", n_classes=len(categories), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        params = FinetuneParams(run_dir=tmp, seed=seed, lr=1e-3, adam_eps=1e-8, batch_size=16, max_seq_len=256,
                                class_weighted=True)
        result = tl.finetune(model, adata, params, label_key=key, categories=categories)
    test = adata[adata.obs["split"] == "test"].copy()
    truth = test.obs[key].astype(str).to_numpy()
    out = {"seed": seed, "best_epoch": result.best_epoch, "epochs": result.epochs_run}
    for level in (0.0, 0.5):
        labels = np.asarray(tl.predict(model, test, categories=categories, max_seq_len=256,
                                       min_confidence=level).labels).astype(str)
        out[f"acc@{level}"] = round(float(accuracy_score(truth, labels)), 4)
        out[f"f1@{level}"] = round(float(f1_score(truth, labels, labels=categories, average="macro",
                                                  zero_division=0)), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "demo", help="a finished demo run (make demo)")
    p.add_argument("--seeds", type=int, default=6, help="seeds 0 .. N-1")
    p.add_argument("--src", action="append", default=None, help="name=path of a checkout (repeatable)")
    p.add_argument("--json", type=Path, help="also write every run to this file")
    p.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_seed is not None:
        print(json.dumps(worker(a.run_dir, a.worker_seed)))
        return
    if not (a.run_dir / "data" / "prepared.h5ad").is_file():
        sys.exit(f"{a.run_dir} holds no prepared data: run `make demo` first or pass --run-dir.")
    sources = dict(s.split("=", 1) for s in (a.src or [f"this={REPO}"]))
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for seed in range(a.seeds):
        for name, src in sources.items():
            env_path = str(Path(src).resolve())
            done = subprocess.run([sys.executable, __file__, "--run-dir", str(a.run_dir), "--worker-seed", str(seed)],
                                  capture_output=True, text=True, check=True, cwd=env_path,
                                  env={**os.environ, "PYTHONPATH": env_path})
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name:>10} {json.dumps(runs[name][-1])}", flush=True)
    print()
    for name, rows in runs.items():
        parts = []
        for fig in FIGURES:
            values = [r[fig] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            parts.append(f"{fig} {statistics.mean(values):.3f} +- {sd:.3f} ({statistics.median(values):.3f})")
        learnt = sum(r["f1@0.0"] > 0.1 for r in rows)
        print(f"{name:>10} n={len(rows)}  " + "  ".join(parts) + f"  learnt {learnt}")
    if len(runs) == 2 and a.seeds > 2:
        from scipy.stats import mannwhitneyu, ttest_ind

        (n1, r1), (n2, r2) = runs.items()
        for fig in FIGURES:
            x, y = [r[fig] for r in r1], [r[fig] for r in r2]
            print(f"{fig:8s} {n1} vs {n2}: Welch p {ttest_ind(x, y, equal_var=False).pvalue:.3f}, "
                  f"Mann-Whitney p {mannwhitneyu(x, y).pvalue:.3f}")
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
