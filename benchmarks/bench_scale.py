#!/usr/bin/env python
"""Time and peak memory of the protocol's four steps at atlas scale (synthetic data, tiny checkpoint).

For each N in --cells (default 50k, 200k, 1M) it writes a synthetic ``.h5ad`` of N cells x --genes genes
(default 20,000) with --genes-per-cell expressed genes per cell (default 1,000; integer counts, float32
CSR, 10 cell types, each over-expressing its own block of genes), written chunk by chunk so that making
it needs little memory. It then runs, each in a fresh Python process (so that its peak RSS is its own):

- ``01``: the preprocessing of 01_preprocess (read, QC, normalise, split, write ``prepared.h5ad``), with
  the path the protocol picks by size, or --path01 in-memory / chunked;
- ``02``: one epoch of ``head`` fine-tuning of --steps steps (batches drawn from the whole train split of
  the backed ``prepared.h5ad``) and the validation of that epoch (every val cell);
- ``03``: prediction of every cell of ``prepared.h5ad`` with the fine-tuned model;
- ``04``: the zero-shot embedding of every cell with the pretrained checkpoint;
- ``bl``: 03's logistic-regression baseline (``logistic_regression_baseline``) on the backed ``prepared.h5ad``:
  fitted on the train split, scored on the test split.

The checkpoint is ``make_tiny_checkpoint`` over the synthetic genes: the demo checkpoint's shape (d_model
64, 2 layers, 4 heads), random weights. --max-seq-len is short (64) so that the figures measure the data
path, not the model. Per step it prints wall time, peak RSS (``ru_maxrss`` of the step's process) and,
for 01, peak RSS over the CSR size of X (data + indices + indptr). With several N it also prints each
step's peak RSS relative to the smallest N and time per cell.

It is not a test: it prints figures and checks nothing. The 1M case takes about 20 minutes on 2 quiet
cores with --threads 1 and 23 GB of disk (input 7.6 GB, prepared.h5ad 15 GB); run it in the background,
e.g. ``nohup python benchmarks/bench_scale.py --cells 1000000 --threads 1 --json /tmp/scale_1m.json >
/tmp/scale_1m.log 2>&1 &``. With ``--workdir DIR --keep`` the data stay and a later run reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CLASSES = 10
BLOCK = 200  # genes over-expressed by each class


# -- synthetic data -----------------------------------------------------------------------------
def _coprime_steps(n_genes: int, count: int = 64) -> np.ndarray:
    steps = [s for s in range(1, n_genes) if np.gcd(s, n_genes) == 1]
    rng = np.random.default_rng(1)
    return np.asarray(rng.choice(steps, size=min(count, len(steps)), replace=False), dtype=np.int64)


def synthetic_chunk(start: int, n: int, n_genes: int, genes_per_cell: int, seed: int = 0):
    """Rows ``start..start+n`` of the synthetic matrix (CSR, float32 integer counts) and their labels.

    Each cell's genes are ``offset + step * k mod n_genes`` for k < genes_per_cell (distinct because
    ``step`` is coprime with n_genes); genes of the cell's class block get 5 more counts on average.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng((seed, start))
    labels = rng.integers(0, N_CLASSES, n)
    steps = _coprime_steps(n_genes)
    offset = rng.integers(0, n_genes, n)[:, None]
    step = steps[rng.integers(0, len(steps), n)][:, None]
    cols = np.sort((offset + step * np.arange(genes_per_cell)[None, :]) % n_genes, axis=1)
    values = rng.poisson(1.0, cols.shape).astype(np.float32) + 1.0
    block_lo = (labels * BLOCK)[:, None]
    in_block = (cols >= block_lo) & (cols < block_lo + BLOCK)
    values[in_block] += rng.poisson(5.0, int(in_block.sum()))
    indptr = np.arange(0, n * genes_per_cell + 1, genes_per_cell, dtype=np.int64)
    matrix = sp.csr_matrix((values.ravel(), cols.ravel().astype(np.int32), indptr), shape=(n, n_genes))
    return matrix, labels


def gene_names(n_genes: int) -> list[str]:
    names = [f"GENE{j:05d}" for j in range(n_genes)]
    for j in range(13):  # a few mitochondrial genes, so that the QC has something to show
        names[n_genes - 1 - j] = f"MT-G{j}"
    return names


def make_synthetic(path: Path, n_cells: int, n_genes: int, genes_per_cell: int, chunk: int = 20_000) -> dict:
    """Write the synthetic ``.h5ad`` chunk by chunk; return its size figures."""
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    t0 = time.perf_counter()
    labels = np.empty(n_cells, dtype=np.int64)
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        first = True
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            matrix, labels[start : start + n] = synthetic_chunk(start, n, n_genes, genes_per_cell)
            if first:
                write_elem(f, "X", matrix)  # appendable: anndata writes sparse data with maxshape None
                first = False
            else:
                sparse_dataset(f["X"]).append(matrix)
        names = [f"cell{i:07d}" for i in range(n_cells)]
        obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(labels, [f"type_{k}" for k in range(N_CLASSES)])},
                           index=pd.Index(names, name=None))
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=gene_names(n_genes)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    tmp.replace(path)
    nnz = n_cells * genes_per_cell
    csr_bytes = nnz * (4 + 4) + (n_cells + 1) * 8
    return {"n_cells": n_cells, "n_genes": n_genes, "nnz": nnz, "csr_bytes": csr_bytes,
            "file_bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}


# -- the steps, each run in its own process ----------------------------------------------------
def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _step_01(args: argparse.Namespace, work: Path) -> dict:
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.core.params import PreprocessParams
    from scgpt_protocol.model.checkpoint import read_vocab
    from scgpt_protocol.pp.stream import choose_chunked, prepare_file

    source = work / "input.h5ad"
    params = PreprocessParams(adata_path=str(source), label_key="cell_type", checkpoint=str(work / "checkpoint"))
    chunked = choose_chunked(source, chunked=args.chunked01)
    prepared = prepare_file(params, read_vocab(work / "checkpoint" / "vocab.json"), RunLayout(work / "run"),
                            chunked=chunked)
    return {"path": "chunked" if chunked else "in-memory", "cells_out": int(prepared.adata.n_obs),
            "genes_out": int(prepared.adata.n_vars)}


def _step_02(args: argparse.Namespace, work: Path) -> dict:
    from scgpt_protocol import load_model
    from scgpt_protocol.adapt.train import finetune
    from scgpt_protocol.core.params import FinetuneParams
    from scgpt_protocol.data.backed import open_cells

    adata = open_cells(work / "run" / "data" / "prepared.h5ad")  # as 02 reads it: X and obs stay on disk
    categories = json.loads((work / "run" / "data" / "labels.json").read_text())["categories"]
    params = FinetuneParams(strategy="head", epochs=1, batch_size=32, max_seq_len=args.max_seq_len,
                            steps_per_epoch=args.steps, device="cpu", patience=0)
    model = load_model(work / "checkpoint", device="cpu")
    result = finetune(model, adata, params, label_key="cell_type", categories=categories)
    from scgpt_protocol.adapt.saved import save_finetuned

    save_finetuned(model, work / "model", strategy="head", config=None, label_key="cell_type",
                   categories=categories, genes=list(adata.var_names), extra={"training": params.to_dict()})
    return {"val_macro_f1": result.best_val_macro_f1, "steps": args.steps}


def _step_03(args: argparse.Namespace, work: Path) -> dict:
    from scgpt_protocol.adapt.saved import load_finetuned
    from scgpt_protocol.annotate.inference import predict
    from scgpt_protocol.data.backed import open_cells

    cells = open_cells(work / "run" / "data" / "prepared.h5ad")  # X and obs stay on disk
    model, manifest = load_finetuned(work / "model", device="cpu")
    prediction = predict(model, cells, categories=manifest["categories"], max_seq_len=args.max_seq_len,
                         genes=manifest["genes"], out=work / "predictions.h5")
    truth = np.asarray(cells.obs_column("cell_type")).astype(str)
    return {"accuracy": round(float(np.mean(np.asarray(prediction.labels) == truth)), 4)}


def _step_04(args: argparse.Namespace, work: Path) -> dict:
    from scgpt_protocol import load_model
    from scgpt_protocol.data.backed import open_cells
    from scgpt_protocol.model.embedding import embed

    model = load_model(work / "checkpoint", device="cpu")
    embed(open_cells(work / "run" / "data" / "prepared.h5ad"), model, max_seq_len=args.max_seq_len,
          out=work / "embeddings.h5")
    return {}


def _step_bl(args: argparse.Namespace, work: Path) -> dict:
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.evaluate.baseline import logistic_regression_baseline
    from scgpt_protocol.pp.io import read_prepared

    adata = read_prepared(RunLayout(work / "run"), backed=True)  # as 03 reads it: X stays on disk
    result = logistic_regression_baseline(adata, label_key="cell_type", seed=0)
    return {"n_train": result.n_train, "n_fit": getattr(result, "n_fit", result.n_train), "n_genes": result.n_genes,
            "accuracy": round(float(result.metrics["accuracy"]), 4)}


STEPS = {"01": _step_01, "02": _step_02, "03": _step_03, "04": _step_04, "bl": _step_bl}


def run_step_here(args: argparse.Namespace) -> None:
    """The child side: run one step, print one JSON line with its figures."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    work = Path(args.work)
    t0 = time.perf_counter()
    extra = STEPS[args.step](args, work)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"step": args.step, "seconds": round(seconds, 1), "peak_rss": _peak_rss_bytes(),
                                  **extra}))


def run_step(step: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_step", step, "--_work", str(work), "--max-seq-len", str(args.max_seq_len),
           "--steps", str(args.steps), "--threads", str(args.threads or 0)]
    if args.path01:
        cmd += ["--path01", args.path01]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "agg"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"step {step} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="50000,200000,1000000", help="comma-separated N (default 50k,200k,1M)")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--genes-per-cell", type=int, default=1000)
    parser.add_argument("--steps-to-run", default="01,02,03,04,bl",
                        help="comma-separated subset of 01,02,03,04,bl (bl: 03's logistic-regression baseline)")
    parser.add_argument("--path01", choices=("auto", "in-memory", "chunked"), default="auto",
                        help="01's path (default: what the protocol picks by size)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of 02 (batches of 32 cells)")
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workdir", default=None, help="where the data go (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the data after the run (a later run with the same --workdir reuses them)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.chunked01 = {"auto": None, "in-memory": False, "chunked": True}[args.path01]
    if args._step:
        args.step, args.work = args._step, args._work
        run_step_here(args)
        return

    import torch

    from scgpt_protocol.model.save import make_tiny_checkpoint

    sizes = [int(float(n)) for n in args.cells.split(",")]
    steps = args.steps_to_run.split(",")
    print(f"bench_scale: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__}")
    print(f"data: N cells x {args.genes:,} genes, {args.genes_per_cell:,} expressed genes per cell; "
          f"tiny checkpoint (d_model 64); max_seq_len {args.max_seq_len}; 02: {args.steps} steps of 32 cells")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results: list[dict] = []
    for n in sizes:
        work = root / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        made_file = work / "made.json"
        if made_file.is_file() and (work / "input.h5ad").is_file():  # --workdir of an earlier run (--keep)
            made = json.loads(made_file.read_text())
            how = "reused"
        else:
            made = make_synthetic(work / "input.h5ad", n, args.genes, args.genes_per_cell)
            make_tiny_checkpoint(work / "checkpoint", gene_names(args.genes))
            made_file.write_text(json.dumps(made))
            how = f"written in {made['seconds']:.0f} s"
        print(f"\nN = {n:,}: input {_gib(made['csr_bytes'])} of CSR ({made['nnz']:,} values), file "
              f"{_gib(made['file_bytes'])}, {how}")
        for step in steps:
            figures = run_step(step, work, args)
            figures.update(n_cells=n, csr_bytes=made["csr_bytes"])
            results.append(figures)
            ratio = f", {figures['peak_rss'] / made['csr_bytes']:.2f}x the CSR" if step == "01" else ""
            detail = {k: v for k, v in figures.items() if k not in ("step", "seconds", "peak_rss", "n_cells",
                                                                      "csr_bytes", "load_average")}
            figures["load_average"] = round(os.getloadavg()[0], 1)
            print(f"  {step}: {figures['seconds']:8.1f} s  peak RSS {_gib(figures['peak_rss'])}{ratio}  "
                  f"{figures['seconds'] / n * 1e6:7.1f} us/cell  load {figures['load_average']}  {detail}", flush=True)
        if not args.keep:
            for p in sorted(work.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
    if len(sizes) > 1:
        print("\nper step, relative to the smallest N:")
        for step in steps:
            rows = [r for r in results if r["step"] == step]
            base = rows[0]
            for r in rows:
                print(f"  {step} N={r['n_cells']:>9,}: peak RSS x{r['peak_rss'] / base['peak_rss']:.2f}, "
                      f"time x{r['seconds'] / base['seconds']:.2f} for x{r['n_cells'] / base['n_cells']:.0f} cells")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
