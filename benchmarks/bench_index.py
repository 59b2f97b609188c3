#!/usr/bin/env python
"""Reference indexes at atlas scale (issue 30): build time, size, query time, recall and vote agreement of the
inverted-file index against exact search, peak memory, and where the flat / IVF threshold should sit.

The reference is synthetic: --n-ref cells (default 1,000,000) of the model's dimension (--dim 512), clustered as
cell embeddings are: --types cell types (the labels), each a cloud of --states cell states, drawn in a
--latent-dimensional space (default 32) and mapped into --dim dimensions by a random orthonormal map, plus a little
noise in every dimension, then L2-normalised (scGPT's embeddings are L2-normalised and of low intrinsic
dimension; the official index compresses them to 64 dimensions by PCA first). No model is needed. The
embeddings are written chunk by chunk to an HDF5 file, as ``build_index`` streams them from ``embed``'s store,
so that building reads them as it does. The --n-query query cells (default 10,000) come from the same states.

It builds, with :func:`~scgpt_protocol.annotate.atlas_build.make_faiss_index`:

- ``flat`` (exact): the truth; the query's k nearest cells and their kNN votes;
- each kind of --kinds (default ``ivfsq8``, the default above the threshold, and ``ivfpq``): build time (training
  and adding),
  size on disk, query time (search and vote of --n-query cells), recall@k against exact search, the share of
  query cells whose kNN vote (and distance-weighted vote) equals the exact one, and the peak memory of building
  and of searching (resident memory above the level before, sampled every 50 ms);

and, for the threshold, the search time of --n-query cells on a flat and on the default inverted-file index
(IVF-SQ8) of the first --threshold-sizes cells. With --embed-cells N it also times ``embed`` of N cells (of
--embed-data, e.g. pbmc3k, or synthetic counts) with a random model of the released size (51.3M parameters,
1200 tokens), to give the time to map --n-query cells: embedding them plus searching the index.

It prints the figures and checks nothing (``benchmarks/README.md`` holds them). The 1M run takes about 10
minutes on 2 cores, 6 GB of memory and 2 GB of disk in --workdir (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from scgpt_protocol.annotate.atlas import search_index
from scgpt_protocol.annotate.atlas_build import make_faiss_index
from scgpt_protocol.annotate.knn import vote_neighbors
from scgpt_protocol.core.device import PeakMemory


class Synthetic:
    """Clustered unit vectors: ``types`` labels, ``states`` clusters, in a ``latent``-dimensional subspace."""

    def __init__(self, *, dim: int, latent: int, types: int, states: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.states_n = dim, states
        type_centres = rng.normal(size=(types, latent))
        self.state_type = rng.integers(types, size=states)
        self.state_centres = type_centres[self.state_type] + 1.5 * rng.normal(size=(states, latent))
        self.project = np.linalg.qr(rng.normal(size=(dim, latent)))[0].T  # latent x dim, orthonormal rows
        self.seed = seed

    def draw(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, stream])
        states = rng.integers(self.states_n, size=n)
        z = self.state_centres[states] + 1.0 * rng.normal(size=(n, self.project.shape[0]))
        x = z @ self.project + 0.02 * rng.normal(size=(n, self.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), self.state_type[states].astype(np.int32)


def write_reference(path: Path, data: Synthetic, n: int, chunk: int = 65536) -> np.ndarray:
    import h5py

    labels = np.zeros(n, dtype=np.int32)
    with h5py.File(path, "w") as handle:
        out = handle.create_dataset("X_scgpt", shape=(n, data.dim), dtype=np.float32, chunks=(min(4096, n), data.dim))
        for i, lo in enumerate(range(0, n, chunk)):
            x, y = data.draw(min(chunk, n - lo), stream=i + 1)
            out[lo : lo + len(x)] = x
            labels[lo : lo + len(x)] = y
    return labels


def _size(index) -> int:
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:
        faiss.write_index(index, tmp.name)
        return os.path.getsize(tmp.name)


def _map(index, query, labels, k, *, exact=False, nprobe=None):
    """Search and vote, timed: ``(seconds, ids, votes)``."""
    start = time.perf_counter()
    ids, dist = search_index(index, query, k, exact=exact, nprobe=nprobe)
    votes = vote_neighbors(ids, dist, labels, np.arange(labels.max() + 1))
    return time.perf_counter() - start, ids, votes


def build_and_map(embeddings, labels, query, k, kind, *, seed, **kw):
    with PeakMemory(_CPU) as built:
        start = time.perf_counter()
        index, info = make_faiss_index(embeddings, kind=kind, seed=seed, **kw)
        seconds = time.perf_counter() - start
    with PeakMemory(_CPU) as searched:
        query_seconds, ids, votes = _map(index, query, labels, k, exact=(kind == "flat"))
    record = {"kind": info["factory"], "build_s": round(seconds, 1), "train_s": info["train_seconds"],
              "add_s": info["add_seconds"], "size_mib": round(_size(index) / 2**20, 1), "nprobe": info["nprobe"],
              "query_s": round(query_seconds, 2), "build_peak_mib": round(built.peak / 2**20),
              "search_peak_mib": round(searched.peak / 2**20)}
    return index, record, ids, votes


def compare(ids, votes, exact_ids, exact_votes, k) -> dict:
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact_ids)])
    return {f"recall_at_{k}": round(float(recall), 4),
            "vote_agreement": round(float((votes.majority == exact_votes.majority).mean()), 4),
            "weighted_vote_agreement": round(float((votes.weighted == exact_votes.weighted).mean()), 4)}


def time_embedding(n_cells: int, data_path: str | None, vocab_path: str | None) -> dict:
    """cells/s of ``embed`` with a random model of the released size (``whole-human``'s shape and vocabulary)."""
    import anndata as ad
    import scipy.sparse as sp

    from scgpt_protocol import embed, load_model, make_tiny_checkpoint

    if data_path:
        adata = ad.read_h5ad(data_path)[:n_cells].copy()
        genes = list(json.loads(Path(vocab_path).read_text())) if vocab_path else list(adata.var_names)
    else:  # counts of 800 of 20,000 genes per cell
        rng = np.random.default_rng(0)
        genes = [f"G{i}" for i in range(20_000)]
        rows = np.repeat(np.arange(n_cells), 800)
        cols = np.concatenate([rng.choice(20_000, 800, replace=False) for _ in range(n_cells)])
        x = sp.csr_matrix((rng.poisson(2, size=len(rows)).astype(np.float32) + 1, (rows, cols)),
                          shape=(n_cells, 20_000))
        adata = ad.AnnData(x)
        adata.var_names = genes
    genes = [g for g in genes if not g.startswith("<")]
    with tempfile.TemporaryDirectory() as folder:
        path = make_tiny_checkpoint(folder, genes, d_model=512, nlayers=12, nheads=8, d_hid=512)
        model = load_model(path, device="cpu")
        start = time.perf_counter()
        embed(adata, model, max_seq_len=1200, batch_size=32)
        seconds = time.perf_counter() - start
    return {"cells": n_cells, "seconds": round(seconds, 1), "cells_per_s": round(n_cells / seconds, 2),
            "precision": adata.uns["X_scgpt_params"]["precision"]}


def cpu_info() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    import faiss

    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "faiss": faiss.__version__,
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "faiss_threads": faiss.omp_get_max_threads()}


_CPU = None


def main(argv: list[str] | None = None) -> dict:
    import torch

    global _CPU
    _CPU = torch.device("cpu")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ref", type=int, default=1_000_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--types", type=int, default=100)
    parser.add_argument("--states", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", default="ivfsq8,ivfpq", help="comma-separated: ivfsq8 (the default), ivfpq, ivf")
    parser.add_argument("--threshold-sizes", default="25000,50000,100000,200000,400000")
    parser.add_argument("--embed-cells", type=int, default=0, help="time embed of this many cells (0: skip)")
    parser.add_argument("--embed-data", default=None, help="an .h5ad with counts for --embed-cells")
    parser.add_argument("--vocab", default=None, help="vocab.json of the released checkpoint (the model's genes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import h5py

    out = {"machine": cpu_info(), "args": vars(args)}
    print(json.dumps(out["machine"]))
    data = Synthetic(dim=args.dim, latent=args.latent, types=args.types, states=args.states, seed=args.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        start = time.perf_counter()
        labels = write_reference(Path(folder) / "reference.h5", data, args.n_ref)
        query, truth = data.draw(args.n_query, stream=0)
        print(f"reference {args.n_ref:,} x {args.dim} written in {time.perf_counter() - start:.0f} s")
        with h5py.File(Path(folder) / "reference.h5", "r") as handle:
            embeddings = handle["X_scgpt"]
            flat, exact, exact_ids, exact_votes = build_and_map(embeddings, labels, query, args.k, "flat",
                                                                seed=args.seed)
            exact["knn_vote_accuracy_vs_truth"] = round(float((exact_votes.majority == truth.astype(str)).mean()), 4)
            exact["neighbour_label_purity"] = round(float((labels[exact_ids] == truth[:, None]).mean()), 4)
            print("exact", json.dumps(exact))
            del flat
            out["exact"], out["kinds"] = exact, []
            for kind in args.kinds.split(","):
                index, record, ids, votes = build_and_map(embeddings, labels, query, args.k, kind, seed=args.seed)
                record.update(compare(ids, votes, exact_ids, exact_votes, args.k))
                print(kind, json.dumps(record))
                out["kinds"].append(record)
                del index
            out["threshold"] = threshold(embeddings, labels, query, args)
    if args.embed_cells:
        out["embed"] = time_embedding(args.embed_cells, args.embed_data, args.vocab)
        search = out["kinds"][0]["query_s"]
        out["map_query_s"] = round(args.n_query / out["embed"]["cells_per_s"] + search, 1)
        print("embed", json.dumps(out["embed"]), f"-> mapping {args.n_query:,} query cells: "
              f"{out['map_query_s']:.0f} s (embedding + {search:.1f} s search and vote)")
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS of the whole run {out['peak_rss_mib']:,} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def threshold(embeddings, labels, query, args) -> list[dict]:
    """Flat vs the default index on the first n cells: build and query times, sizes, agreement."""
    rows = []
    for n in (int(s) for s in args.threshold_sizes.split(",") if s):
        if n > embeddings.shape[0]:
            continue
        part = embeddings[:n]
        row = {"n_ref": n}
        flat, _ = make_faiss_index(part, kind="flat")
        row["flat_query_s"], exact_ids, exact_votes = _map(flat, query, labels[:n], args.k, exact=True)
        row["flat_mib"] = round(_size(flat) / 2**20, 1)
        del flat
        start = time.perf_counter()
        index, info = make_faiss_index(part, kind="ivfsq8", seed=args.seed)
        row["ivf_build_s"] = round(time.perf_counter() - start, 1)
        row["ivf_query_s"], ids, votes = _map(index, query, labels[:n], args.k)
        row["ivf"], row["ivf_mib"] = info["factory"], round(_size(index) / 2**20, 1)
        row.update(compare(ids, votes, exact_ids, exact_votes, args.k))
        row["flat_query_s"], row["ivf_query_s"] = round(row["flat_query_s"], 2), round(row["ivf_query_s"], 2)
        print("threshold", json.dumps(row))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
