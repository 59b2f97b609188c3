#!/usr/bin/env python
"""Throughput and memory of ``scgpt_protocol.embedding.embed`` at the released model size.

The model is written by ``make_tiny_checkpoint`` with the released architecture (d_model 512,
12 layers, 8 heads, d_hid 512) and the real 60,697-token vocabulary, so it has the released
51,330,049 parameters (random weights: speed does not depend on their values). The data are the
first ``--n-cells`` cells of PBMC 3k (raw counts). Printed figures:

1. tokens per cell: non-padding mean, and the padded mean of the batches ``embed`` runs;
2. analytic forward FLOPs per cell (see ``encoder_flops``), computed (padded) and useful;
3. steady-state cells/s of ``embed`` (a one-batch warm-up call is timed separately) and the
   FLOP/s it implies;
4. this machine's fp32 matmul FLOP/s (best of a few repeats, same thread count), for a square
   2048 matmul and the model's own [B*L, 512] x [512, 1536] shape, measured before and after;
5. the ratio achieved / matmul rate (a figure, not a check; the target on CPU is >= 50%);
6. peak memory during ``embed`` for N and N/4 cells, each in a fresh subprocess (peak RSS reset
   just before ``embed`` through /proc/self/clear_refs, else the lifetime ru_maxrss), the
   output size, and ``torch.cuda.max_memory_allocated`` on a GPU.

``--profile`` adds where the time goes: tokenisation alone (``iter_batches``, no model), the model
forward alone on the same batches, and a torch.profiler table of one batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from scgpt_protocol.checkpoint import SPECIAL_TOKENS, load_model, make_tiny_checkpoint  # noqa: E402
from scgpt_protocol.device import autocast, resolve_device  # noqa: E402
from scgpt_protocol.embedding import embed, iter_batches  # noqa: E402

# embed()'s own batching defaults, so that iter_batches here yields exactly the batches embed runs
_EMBED_KW = {k: inspect.signature(embed).parameters[k].default for k in ("max_tokens", "chunk_size", "seed")}
ARCH = {"d_model": 512, "nlayers": 12, "nheads": 8, "d_hid": 512}


def encoder_flops(n_tokens: int, length: int, d: int, d_hid: int, nlayers: int) -> int:
    """Forward FLOPs (multiply + add = 2) of ``n_tokens`` tokens that each attend over ``length`` keys.

    Per layer and token: packed qkv projection 2*3*d^2, out_proj 2*d^2, feed-forward 2*2*d*d_hid,
    attention scores q.k (2*L*d over all heads) and the weighted sum of values (2*L*d). Once per
    token, the value encoder's Linear(d, d): 2*d^2. Embedding lookups, LayerNorms, softmax and
    biases are O(d) or O(L) per token and left out. For a padded batch [B, L] call it with
    ``n_tokens = B*L, length = L`` (computed FLOPs); for a cell of n real tokens with ``n, n`` (useful).
    """
    per_layer = 2 * 3 * d * d + 2 * d * d + 2 * 2 * d * d_hid + 2 * 2 * length * d
    return n_tokens * (nlayers * per_layer + 2 * d * d)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, tokens: int, repeats: int = 5) -> dict:
    """Best-of-``repeats`` FLOP/s of a square 2048 matmul and of the model's [tokens, 512] x [512, 1536]."""
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "model_qkv": (tokens, 512, 1536)}.items():
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * m * k * n / best
    return out


def rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so that VmHWM covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes(was_reset: bool) -> int:
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(args: argparse.Namespace) -> dict:
    """One size, in its own process: load, tokenise, warm up, time embed, memory, matmul rate."""
    import anndata

    logging.basicConfig(level=logging.WARNING)  # keeps embed's progress lines out of the table
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model(args.worker_ckpt, device=device)
    adata = anndata.read_h5ad(args.data)[: args.n_cells].copy()
    cfg = model.config
    kw = {"max_seq_len": args.max_seq_len, "batch_size": args.batch_size}
    flop_kw = {"d": cfg.d_model, "d_hid": cfg.d_hid, "nlayers": cfg.nlayers}

    stats: dict = {}
    t = time.perf_counter()
    batches = list(iter_batches(adata, model, **kw, **_EMBED_KW, stats=stats))
    t_tokenise = time.perf_counter() - t
    flops_padded = flops_useful = 0
    for b in batches:
        n_batch, length = b.gene_ids.shape
        flops_padded += encoder_flops(n_batch * length, length, **flop_kw)
        flops_useful += sum(encoder_flops(int(n), int(n), **flop_kw) for n in (~b.padding_mask).sum(1))
    res = {"n_cells": adata.n_obs, "n_batches": len(batches), "tokens_per_cell": stats["n_tokens"] / adata.n_obs,
           "padded_tokens_per_cell": stats["n_padded"] / adata.n_obs, "flops_padded_per_cell":
           flops_padded / adata.n_obs, "flops_useful_per_cell": flops_useful / adata.n_obs}

    compute_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
        torch.float16 if device.type == "cuda" else torch.float32)  # what autocast() runs in
    tokens = int(np.median([b.gene_ids.numel() for b in batches]))
    mm_before = {} if args.worker_mode == "memory" else matmul_rate(device, torch.float32, tokens)

    warm = adata[: min(args.batch_size, adata.n_obs)].copy()
    t = time.perf_counter()
    embed(warm, model, **kw)
    res["warmup_s"], res["warmup_cells"] = time.perf_counter() - t, warm.n_obs

    reset = rss_peak_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    embed(adata, model, **kw)
    res["embed_s"] = time.perf_counter() - t
    res["peak_rss_bytes"], res["peak_rss_kind"] = rss_peak_bytes(reset), "during embed" if reset else "lifetime"
    res["output_bytes"] = adata.obsm["X_scgpt"].nbytes
    if device.type == "cuda":
        res["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if args.worker_mode == "memory":
        return res

    mm_after = matmul_rate(device, torch.float32, tokens)
    res["matmul_fp32"] = {k: max(mm_before[k], mm_after[k]) for k in mm_before}
    res["matmul_fp32_before_after"] = {k: [mm_before[k], mm_after[k]] for k in mm_before}
    res["compute_dtype"] = str(compute_dtype).replace("torch.", "")
    if compute_dtype != torch.float32:
        res["matmul_compute_dtype"] = matmul_rate(device, compute_dtype, tokens)
    if args.profile:
        res["profile"] = profile(model, batches, device, t_tokenise, res["embed_s"])
    return res


def profile(model, batches: list, device: torch.device, t_tokenise: float, t_embed: float) -> dict:
    """Tokenisation alone vs forward alone on the same batches, plus a torch.profiler table of one batch."""
    def forward(b):
        b = b.to(device)
        return model.cell_embedding(b.gene_ids, b.values, b.padding_mask).float().cpu()

    with torch.inference_mode(), autocast(device):
        t = time.perf_counter()
        for b in batches:
            forward(b)
        t_forward = time.perf_counter() - t
        mid = batches[len(batches) // 2]
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            forward(mid)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=12)
    return {"tokenise_s": t_tokenise, "forward_s": t_forward, "embed_s": t_embed,
            "profiled_batch_shape": list(mid.gene_ids.shape), "op_table": table}


def report(a: argparse.Namespace, n_params: int, main: dict, small: dict) -> dict:
    g, mib = 1e9, 2**20
    rate = main["n_cells"] / main["embed_s"]
    achieved, useful = rate * main["flops_padded_per_cell"], rate * main["flops_useful_per_cell"]
    ref_name = "matmul_compute_dtype" if "matmul_compute_dtype" in main else "matmul_fp32"
    ref = max(main[ref_name].values())
    fig = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{a.threads} threads, torch {torch.__version__}, device {resolve_device(a.device)}",
           "n_parameters": n_params, "cells_per_s": rate, "flops_per_s": achieved, "useful_flops_per_s": useful,
           "reference_matmul_flops_per_s": ref, "ratio": achieved / ref, "main": main, "quarter": small}
    mm = main["matmul_fp32"]
    ba = " / ".join(f"{x / g:.0f}" for x in main["matmul_fp32_before_after"]["model_qkv"])
    rows = [
        ("machine", fig["machine"]),
        ("model", f"{n_params:,} parameters in best_model.pt (d 512, 12 layers, 8 heads, d_hid 512)"),
        ("data", f"{main['n_cells']} cells, max_seq_len {a.max_seq_len}, batch_size {a.batch_size}, "
                 f"{main['n_batches']} batches"),
        ("tokens / cell", f"{main['tokens_per_cell']:.1f} non-padding, {main['padded_tokens_per_cell']:.1f} padded "
                          f"({1 - main['tokens_per_cell'] / main['padded_tokens_per_cell']:.1%} padding)"),
        ("GFLOP / cell", f"{main['flops_padded_per_cell'] / g:.1f} computed (padded), "
                         f"{main['flops_useful_per_cell'] / g:.1f} useful"),
        ("warm-up", f"{main['warmup_cells']} cells in {main['warmup_s']:.1f} s"),
        ("embed", f"{main['n_cells']} cells in {main['embed_s']:.1f} s = {rate:.2f} cells/s"),
        ("achieved", f"{achieved / g:.1f} GFLOP/s computed ({useful / g:.1f} useful)"),
        ("fp32 matmul", f"{mm['square_2048'] / g:.1f} GFLOP/s square 2048; {mm['model_qkv'] / g:.1f} GFLOP/s "
                        f"[{main['padded_tokens_per_cell'] * a.batch_size:.0f}~,512]x[512,1536] (before/after {ba})"),
    ]
    if ref_name == "matmul_compute_dtype":
        rows.append((f"{main['compute_dtype']} matmul", " / ".join(f"{v / g:.1f}" for v in main[ref_name].values())
                     + " GFLOP/s (square / model shape; embed runs in this dtype)"))
    rows += [
        ("ratio", f"{achieved / ref:.1%} of the best matmul rate (target >= 50% on CPU)"),
        ("peak RSS", f"{small['peak_rss_bytes'] / mib:.0f} MiB for {small['n_cells']} cells, "
                     f"{main['peak_rss_bytes'] / mib:.0f} MiB for {main['n_cells']} cells ({main['peak_rss_kind']})"),
        ("output", f"{main['output_bytes'] / mib:.2f} MiB ({main['n_cells']} x 512 float32)"),
    ]
    if "cuda_max_allocated_bytes" in main:
        rows.append(("cuda max alloc", f"{small['cuda_max_allocated_bytes'] / mib:.0f} MiB / "
                                       f"{main['cuda_max_allocated_bytes'] / mib:.0f} MiB"))
    print("\n".join(f"{k:<16} {v}" for k, v in rows))
    if "profile" in main:
        p = main["profile"]
        print(f"\nprofile: embed {p['embed_s']:.1f} s = tokenisation (iter_batches alone) {p['tokenise_s']:.1f} s"
              f" + model forward alone {p['forward_s']:.1f} s + rest "
              f"{p['embed_s'] - p['tokenise_s'] - p['forward_s']:.1f} s\none batch {p['profiled_batch_shape']}:")
        print(p["op_table"])
    return fig


def run_worker(a: argparse.Namespace, ckpt: Path, n_cells: int, mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, __file__, *sys.argv[1:], "--n-cells", str(n_cells), "--threads", str(a.threads),
           "--worker-ckpt", str(ckpt), "--worker-mode", mode, "--worker-out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--vocab", type=Path, default=REPO / "../shared/data/scgpt_human_vocab.json")
    p.add_argument("--data", type=Path, default=REPO / "../shared/data/pbmc3k_raw_seurat_labels.h5ad")
    p.add_argument("--n-cells", type=int, default=256, help="first N cells (default 256; N/4 also runs for memory)")
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, ...")
    p.add_argument("--profile", action="store_true", help="time tokenisation vs forward; torch.profiler table")
    p.add_argument("--json", type=Path, help="also write all figures to this file")
    for hidden in ("--worker-ckpt", "--worker-mode", "--worker-out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_ckpt:
        Path(a.worker_out).write_text(json.dumps(measure(a)))
        return
    for what, path in (("vocabulary", a.vocab), ("data", a.data)):
        if not path.resolve().is_file():
            sys.exit(f"{what} file {path.resolve()} not found; pass --{'vocab' if what == 'vocabulary' else 'data'} PATH.")
    vocab = json.loads(a.vocab.read_text())
    genes = [g for g, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if g not in SPECIAL_TOKENS]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", genes, **ARCH)
        n_params = sum(v.numel() for v in torch.load(ckpt / "best_model.pt", weights_only=True).values())
        print(f"wrote a {n_params:,}-parameter checkpoint; running {max(1, a.n_cells // 4)} then {a.n_cells} cells",
              flush=True)
        small = run_worker(a, ckpt, max(1, a.n_cells // 4), "memory", Path(tmp))
        main_res = run_worker(a, ckpt, a.n_cells, "main", Path(tmp))
    fig = report(a, n_params, main_res, small)
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
