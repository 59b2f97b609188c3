"""`embed` against the official scGPT embedding path, on the same cells, model and machine, in one run.

The official side runs the steps of the official ``scgpt.tasks.embed_data``: the vocabulary through
``GeneVocab``, ``TransformerModel`` built with embed_data's arguments (``use_fast_transformer=True``,
which falls back to PyTorch's ``nn.TransformerEncoder`` where flash-attn is absent), weights through
``load_pretrained``, then ``get_batch_cell_embeddings`` (dense rows, ``DataCollator`` with binning and
sampling, a ``DataLoader``, ``model._encode``, the ``<cls>`` row, L2 norm). Only that last call is timed,
as only ``embed`` is timed on our side (both after a warm-up on one batch of the same cells).

The official code is never a dependency of this project: it is imported from a source checkout given
with ``--official-src`` (e.g. ``git clone https://github.com/bowang-lab/scGPT /tmp/scGPT``). Its package
``__init__`` files, which import training utilities (wandb, scib, ...), are replaced at run time by
empty packages, so that only the modules embed_data uses are loaded: ``model/model.py`` (and what it
imports), ``data_collator.py``, ``preprocess.py``, ``tokenizer``, ``utils`` and ``tasks/cell_emb.py``.
Nothing is installed.

The model is the released architecture with random weights (``make_tiny_checkpoint`` at full size
with the real 60,697-token vocabulary: 51,330,049 parameters), written once and loaded by both sides.
Each side runs in its own process, so that its peak RSS is its own. Printed: cells/s of each side,
the ratio, peak RSS during embedding, and the cosine similarity of the two embeddings per cell (they
differ by the random gene sampling of cells with more than ``max_seq_len - 1`` genes and the random
tie-breaking of binning, which the two codes draw differently).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from scgpt_protocol.core.device import resolve_precision
from scgpt_protocol.model.checkpoint import load_model
from scgpt_protocol.model.embedding import embed
from released_size import released_size_checkpoint

MIB = 2**20


def official_modules(src: Path) -> types.SimpleNamespace:
    """Import what embed_data uses from an official scGPT source tree, without its package __init__s."""
    pkg = src / "scgpt" if (src / "scgpt" / "model" / "model.py").is_file() else src
    if not (pkg / "model" / "model.py").is_file() or not (pkg / "tasks" / "cell_emb.py").is_file():
        sys.exit(f"{src} holds no official scGPT source (expected scgpt/model/model.py and "
                 "scgpt/tasks/cell_emb.py); pass the root of a clone of github.com/bowang-lab/scGPT.")
    root = types.ModuleType("scgpt")
    root.__path__ = [str(pkg)]
    root.logger = logging.getLogger("scGPT")
    sys.modules["scgpt"] = root
    for sub in ("model", "tasks"):  # empty packages: their __init__ pulls in generation/multiomic/grn
        mod = types.ModuleType(f"scgpt.{sub}")
        mod.__path__ = [str(pkg / sub)]
        sys.modules[f"scgpt.{sub}"] = mod
    model = importlib.import_module("scgpt.model.model")
    sys.modules["scgpt.model"].TransformerModel = model.TransformerModel
    return types.SimpleNamespace(
        TransformerModel=model.TransformerModel,
        GeneVocab=importlib.import_module("scgpt.tokenizer").GeneVocab,
        load_pretrained=importlib.import_module("scgpt.utils").load_pretrained,
        get_batch_cell_embeddings=importlib.import_module("scgpt.tasks.cell_emb").get_batch_cell_embeddings,
    )


def peak_rss_reset() -> bool:
    try:  # reset the kernel's peak-RSS mark (Linux >= 4.0) so that VmHWM covers what follows
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_official(a: argparse.Namespace, adata) -> dict:
    off = official_modules(a.official_src)
    ckpt = Path(a.worker_ckpt)
    # embed_data's steps, with gene_col="index" (PBMC 3k has symbols in var_names)
    # GeneVocab.from_file(vocab.json), built in O(n): the torchtext-free GeneVocab of recent official
    # versions inserts each token with a full re-index (quadratic: many minutes for 60,697 tokens);
    # appending them in id order gives the same vocabulary.
    vocab = off.GeneVocab([], default_token=None)
    for token, _ in sorted(json.loads((ckpt / "vocab.json").read_text()).items(), key=lambda kv: kv[1]):
        vocab.append_token(token)
    vocab.set_default_token("<pad>")
    for s in ("<pad>", "<cls>", "<eoc>"):
        if s not in vocab:
            vocab.append_token(s)
    adata.var["id_in_vocab"] = [vocab[g] if g in vocab else -1 for g in adata.var_names]
    adata = adata[:, adata.var["id_in_vocab"] >= 0].copy()
    configs = json.loads((ckpt / "args.json").read_text())
    vocab.set_default_index(vocab["<pad>"])
    gene_ids = np.array(vocab(adata.var_names.tolist()), dtype=int)
    model = off.TransformerModel(
        ntoken=len(vocab), d_model=configs["embsize"], nhead=configs["nheads"], d_hid=configs["d_hid"],
        nlayers=configs["nlayers"], nlayers_cls=configs["n_layers_cls"], n_cls=1, vocab=vocab,
        dropout=configs["dropout"], pad_token=configs["pad_token"], pad_value=configs["pad_value"],
        do_mvc=True, do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False,
        explicit_zero_prob=False, use_fast_transformer=True, fast_transformer_backend="flash", pre_norm=False,
    )
    off.load_pretrained(model, torch.load(ckpt / "best_model.pt", map_location="cpu"), verbose=False)
    model.eval()

    def run(data):
        return off.get_batch_cell_embeddings(
            data, cell_embedding_mode="cls", model=model, vocab=vocab, max_length=a.max_seq_len,
            batch_size=a.batch_size, model_configs=configs, gene_ids=gene_ids, use_batch_labels=False)

    t = time.perf_counter()
    run(adata[: min(a.batch_size, adata.n_obs)])
    warm = time.perf_counter() - t
    before = rss("VmRSS")
    peak_rss_reset()
    t = time.perf_counter()
    emb = run(adata)
    wall = time.perf_counter() - t
    return {"emb": emb.tolist(), "wall": wall, "warmup": warm, "peak_rss": rss("VmHWM"), "rss_before": before,
            "precision": "fp32 (torch.cuda.amp.autocast has no effect on CPU)"}


def run_ours(a: argparse.Namespace, adata, precision: str) -> dict:
    model = load_model(a.worker_ckpt, device="cpu")
    warm = adata[: min(a.batch_size, adata.n_obs)].copy()
    t = time.perf_counter()
    embed(warm, model, max_seq_len=a.max_seq_len, precision=precision)
    warm_s = time.perf_counter() - t
    before = rss("VmRSS")
    peak_rss_reset()
    t = time.perf_counter()
    embed(adata, model, max_seq_len=a.max_seq_len, precision=precision)
    wall = time.perf_counter() - t
    return {"emb": adata.obsm["X_scgpt"].tolist(), "wall": wall, "warmup": warm_s, "peak_rss": rss("VmHWM"),
            "rss_before": before, "precision": adata.uns["X_scgpt_params"]["precision"]}


def worker(a: argparse.Namespace) -> None:
    import anndata

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    adata = anndata.read_h5ad(a.data)[: a.n_cells].copy()
    side = a.worker_side
    res = run_official(a, adata) if side == "official" else run_ours(a, adata, side.removeprefix("ours:"))
    Path(a.worker_out).write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = REPO.parent / "shared" / "data"
    p.add_argument("--official-src", type=Path, required=True, help="root of a clone of bowang-lab/scGPT")
    p.add_argument("--vocab", type=Path, default=data / "scgpt_human_vocab.json", help="released vocab.json")
    p.add_argument("--data", type=Path, default=data / "pbmc3k_raw_seurat_labels.h5ad",
                   help="cells x genes, raw counts")
    p.add_argument("--n-cells", type=int, default=32, help="the first N cells")
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64, help="embed_data's batch size (ours uses its defaults)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precision", nargs="+", default=["auto"], help="our precision(s) to time: auto fp32 bf16")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    for hidden in ("--worker-ckpt", "--worker-side", "--worker-out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_side:
        worker(a)
        return
    official_modules(a.official_src)  # fail early on a wrong path
    for flag, path in (("--vocab", a.vocab), ("--data", a.data)):
        if not path.is_file():
            sys.exit(f"{path.resolve()} not found; give the file with {flag} PATH.")
    sides = ["official", *[f"ours:{p}" for p in a.precision]]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = released_size_checkpoint(Path(tmp) / "ckpt", a.vocab)
        n_params = sum(v.numel() for v in torch.load(ckpt / "best_model.pt", weights_only=True).values())
        print(f"{n_params:,}-parameter checkpoint; {a.n_cells} cells of {a.data.name}; {a.threads} threads; "
              f"{platform.machine()} {torch.__version__}; auto precision here: {resolve_precision('auto', 'cpu')}",
              flush=True)
        for side in sides:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker-ckpt", str(ckpt), "--worker-side", side,
                   "--worker-out", str(out)]
            subprocess.run(cmd, check=True)
            res[side] = json.loads(out.read_text())
            r = res[side]
            print(f"{side:<14} {a.n_cells / r['wall']:6.2f} cells/s ({r['wall']:.1f} s; warm-up {r['warmup']:.1f} s)  "
                  f"peak RSS {r['peak_rss'] / MIB:,.0f} MiB (+{(r['peak_rss'] - r['rss_before']) / MIB:,.0f} during "
                  f"embedding)  precision {r['precision']}", flush=True)
    official = np.asarray(res["official"]["emb"], dtype=np.float64)
    summary = {"n_cells": a.n_cells, "n_parameters": n_params, "threads": a.threads, "sides": {}}
    for side in sides[1:]:
        ours = np.asarray(res[side]["emb"], dtype=np.float64)
        cos = (ours * official).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(official, axis=1)
        speed = res["official"]["wall"] / res[side]["wall"]
        print(f"{side:<14} {speed:.2f}x the official path; cosine to official: mean {cos.mean():.5f}, "
              f"min {cos.min():.5f}")
        summary["sides"][side] = {"cells_per_s": a.n_cells / res[side]["wall"], "speedup": speed,
                                  "cosine_mean": cos.mean(), "cosine_min": cos.min(),
                                  "peak_rss": res[side]["peak_rss"], "precision": res[side]["precision"]}
    summary["official"] = {"cells_per_s": a.n_cells / res["official"]["wall"], "peak_rss": res["official"]["peak_rss"]}
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
