#!/usr/bin/env python
"""Throughput and memory of ``scgpt_protocol.model.embedding.embed`` at the released model size.

The model comes from ``make_tiny_checkpoint`` with the released architecture (d_model 512, 12 layers,
8 heads, d_hid 512) and the real 60,697-token vocabulary: the released 51,330,049 parameters, random
values (speed does not depend on them). The data are the first --n-cells cells of PBMC 3k (raw counts).

Figures: (1) tokens per cell, non-padding and padded as embed batches them; (2) analytic forward
FLOPs per cell (``encoder_flops``), computed over the padded batches and useful (no padding);
(3) steady-state cells/s of embed (a one-batch warm-up call is timed apart) and the FLOP/s it implies;
(4) this machine's matmul FLOP/s with torch, same threads, best of 5 (square 2048, and the model's
[B*L, 512] x [512, 1536]); (5) achieved / matmul rate, per wall second and per CPU second (the latter
holds when other processes take cores); (6) peak RSS during embed for N/4 and N cells, each in a
fresh subprocess, and torch.cuda.max_memory_allocated on a GPU.
--profile adds tokenisation alone (iter_batches, no model) vs the model forward alone on the same
batches, and a torch.profiler table of one batch.
(7) embed per --precisions (default fp32 and bf16) with the ratio of each to both the fp32 and the
bf16 matmul rate. Where a CPU has no native bf16 units (bf16 emulated, tens of times slower) the
low-precision runs use --emulated-cells cells (default 2), and the output says so.
The comparison with the official scGPT embedding path is benchmarks/bench_vs_official.py.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from scgpt_protocol.core.device import (
    autocast,
    cpu_has_native_bf16,
    precision_dtype,
    resolve_device,
    resolve_precision,
)
from scgpt_protocol.model.checkpoint import load_model
from scgpt_protocol.model.embedding import default_max_tokens, embed, iter_batches
from released_size import released_size_checkpoint

# embed()'s own batching defaults, so that iter_batches here makes the very batches embed runs
_EMBED_PARAMS = inspect.signature(embed).parameters
EMBED_DEFAULTS = {k: _EMBED_PARAMS[k].default for k in ("max_tokens", "chunk_size", "seed")}
GB, MIB = 1e9, 2**20


def encoder_flops(n_tokens: int, length: int, d: int, d_hid: int, nlayers: int) -> int:
    """Forward FLOPs (a multiply-add counts 2) of ``n_tokens`` tokens that each attend over ``length`` keys.

    Per layer and token: packed qkv projection 2*3*d^2, out_proj 2*d^2, feed-forward 2*2*d*d_hid, and
    attention: scores q.k^T 2*L*d plus the weighted sum of values 2*L*d (all heads together). Once per
    token the value encoder's Linear(d, d): 2*d^2. Embedding lookup, LayerNorm, softmax, biases are
    O(d + L) per token and left out. A padded batch [B, L] is ``(B*L, L)`` (what is computed); a cell
    of n real tokens is ``(n, n)`` (useful). The last layer computes <cls> alone (as cell_embedding
    does): keys and values 2*2*d^2 for every token, and the rest once per ``length`` tokens.
    """
    per_layer = 2 * 3 * d * d + 2 * d * d + 2 * 2 * d * d_hid + 2 * 2 * length * d
    last_kv = 2 * 2 * d * d
    last_cls = 2 * d * d + 2 * d * d + 2 * 2 * d * d_hid + 2 * 2 * length * d  # q, out_proj, FFN, attention
    return n_tokens * ((nlayers - 1) * per_layer + last_kv + 2 * d * d) + n_tokens // length * last_cls


class Timer:
    """Wall time, CPU time of this process (all threads, user + sys) and minor page faults of a block."""

    def __enter__(self) -> Timer:
        self._wall, self._ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc: object) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self._wall
        self.sys = ru.ru_stime - self._ru.ru_stime
        self.cpu, self.faults = ru.ru_utime - self._ru.ru_utime + self.sys, ru.ru_minflt - self._ru.ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, tokens: int, repeats: int = 5) -> dict:
    """``{shape: [FLOP per wall s, FLOP per CPU s]}``, best of ``repeats``, into a preallocated output."""
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "model_qkv": (tokens, 512, 1536)}.items():
        a, b = (torch.randn(*s, device=device).to(dtype) for s in ((m, k), (k, n)))
        c, wall, cpu = torch.mm(a, b), float("inf"), float("inf")  # the first call is a warm-up
        for _ in range(repeats):
            sync(device)
            with Timer() as t:
                torch.mm(a, b, out=c)
                sync(device)
            wall, cpu = min(wall, t.wall), min(cpu, t.cpu)
        out[name] = [2 * m * k * n / wall, 2 * m * k * n / max(cpu, 1e-6)]
    return out


def rss(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in bytes (Linux), else None."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(s.split()[1]) * 1024 for s in lines if s.startswith(field + ":")), None)


def measure(a: argparse.Namespace) -> dict:
    """One size in its own process: load, tokenise, warm up, time embed, memory; matmul rate if main."""
    import anndata

    logging.basicConfig(level=logging.WARNING)  # keeps embed's progress lines out of the table
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    model = load_model(a.worker_ckpt, device=device)
    adata = anndata.read_h5ad(a.data)[: a.n_cells].copy()
    max_tokens = a.max_tokens if a.max_tokens is not None else default_max_tokens(device)
    kw = {"max_seq_len": a.max_seq_len, "batch_size": a.batch_size, "max_tokens": max_tokens}
    dims = {"d": model.config.d_model, "d_hid": model.config.d_hid, "nlayers": model.config.nlayers}

    stats: dict = {}
    with Timer() as t_tok:
        batches = list(iter_batches(adata, model, **{**EMBED_DEFAULTS, **kw}, stats=stats))
    padded = sum(encoder_flops(b.gene_ids.numel(), b.gene_ids.shape[1], **dims) for b in batches)
    useful = sum(encoder_flops(n, n, **dims) for b in batches for n in (~b.padding_mask).sum(1).tolist())
    n = adata.n_obs
    res = {"n_cells": n, "n_batches": len(batches), "max_tokens": max_tokens, "tokens_per_cell": stats["n_tokens"] / n,
           "padded_tokens_per_cell": stats["n_padded"] / n, "flops_per_cell": padded / n,
           "useful_flops_per_cell": useful / n}

    warm = adata[: min(a.batch_size, n)].copy()
    with Timer() as t:
        embed(warm, model, **kw)
    res.update(warmup_s=t.wall, warmup_cells=warm.n_obs, rss_before_embed=rss("VmRSS"))
    try:  # reset the kernel's peak-RSS mark (Linux >= 4.0) so that VmHWM covers embed alone
        Path("/proc/self/clear_refs").write_text("5")
        res["peak_kind"] = "during embed"
    except OSError:
        res["peak_kind"] = "process lifetime"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Timer() as t:
        embed(adata, model, **kw)
    res.update(embed_s=t.wall, embed_cpu_s=t.cpu, embed_sys_s=t.sys, embed_faults=t.faults,
               output_bytes=adata.obsm["X_scgpt"].nbytes)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    res["peak_rss"] = rss("VmHWM") if res["peak_kind"] == "during embed" else lifetime
    if device.type == "cuda":
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    if a.worker_mode == "quarter":
        return res

    tokens = int(np.median([b.gene_ids.numel() for b in batches]))
    dtype = precision_dtype("auto", device) or torch.float32  # what embed's default (auto) computes in
    res["compute_dtype"] = str(dtype).removeprefix("torch.")
    res["auto_precision"] = resolve_precision("auto", device)
    res["matmul"] = {"float32": matmul_rate(device, torch.float32, tokens),
                     "bfloat16": matmul_rate(device, torch.bfloat16, tokens)}
    if dtype not in (torch.float32, torch.bfloat16):
        res["matmul"][res["compute_dtype"]] = matmul_rate(device, dtype, tokens)
    res["precisions"] = {}
    emulated = device.type == "cpu" and not cpu_has_native_bf16()
    for precision in a.precisions:
        used = resolve_precision(precision, device)
        if used == res["auto_precision"]:  # the timed default run above
            res["precisions"][precision] = {"used": used, "n_cells": n, "embed_s": res["embed_s"],
                                            "flops": padded, "emulated": False}
            continue
        part = adata[: a.emulated_cells].copy() if emulated and used != "fp32" else adata.copy()
        part_batches = list(iter_batches(part, model, **{**EMBED_DEFAULTS, **kw}))
        flops = sum(encoder_flops(b.gene_ids.numel(), b.gene_ids.shape[1], **dims) for b in part_batches)
        embed(part[: min(a.batch_size, part.n_obs)].copy(), model, precision=used, **kw)  # warm-up
        with Timer() as t:
            embed(part, model, precision=used, **kw)
        res["precisions"][precision] = {"used": used, "n_cells": part.n_obs, "embed_s": t.wall, "flops": flops,
                                        "emulated": emulated and used != "fp32"}
    if a.profile:
        best = max(r[0] for r in res["matmul"][res["compute_dtype"]].values())
        res["profile"] = profile(model, batches, device, t_tok.wall, res["auto_precision"])
        res["profile"]["ceiling"] = attention_ceiling(model, batches, device, dtype, best, padded)
    return res


def profile(model: torch.nn.Module, batches: list, device: torch.device, tokenise_s: float,
            precision: str) -> dict:
    """The model forward alone on the batches iter_batches made, and a torch.profiler table of one."""
    def forward(b):  # what embed does per batch, minus tokenisation
        b = b.to(device)
        return model.cell_embedding(b.gene_ids, b.values, b.padding_mask).float().cpu()

    with torch.inference_mode(), autocast(device, precision):
        with Timer() as t:
            for b in batches:
                forward(b)
        mid = batches[len(batches) // 2]
        with torch.profiler.profile() as prof:
            forward(mid)
    ops = prof.key_averages()
    sort = "self_cpu_time_total"
    if device.type == "cuda":  # "self_cuda_time_total" before torch 2.4
        sort = "self_device_time_total"
        sort = sort if hasattr(ops[0], sort) else "self_cuda_time_total"
    return {"tokenise_s": tokenise_s, "forward_s": t.wall, "batch": list(mid.gene_ids.shape),
            "ops": ops.table(sort_by=sort, row_limit=12)}


def attention_ceiling(model: torch.nn.Module, batches: list, device: torch.device, dtype: torch.dtype,
                      matmul: float, flops: float) -> dict:
    """How fast embed could be with this torch's attention kernel: ``scaled_dot_product_attention`` alone on
    every batch's shape and key-padding mask (the layers before the last, whose attention is one query), best
    of 3, and the rest of the FLOPs at the ``matmul`` rate with nothing else costing time."""
    cfg = model.config
    heads, d_head, layers = cfg.nheads, cfg.d_model // cfg.nheads, cfg.nlayers - 1
    seconds = attn_flops = 0.0
    with torch.inference_mode():
        for b in batches:
            batch, length = b.gene_ids.shape
            q, k, v = (torch.randn(batch, heads, length, d_head, device=device, dtype=dtype) for _ in range(3))
            mask = ~b.padding_mask[:, None, None, :].to(device) if bool(b.padding_mask.any()) else None
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # warm-up
            best = float("inf")
            for _ in range(3):
                sync(device)
                with Timer() as t:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    sync(device)
                best = min(best, t.wall)
            seconds += layers * best
            attn_flops += layers * 2 * 2 * batch * length * length * cfg.d_model
    rest = flops - attn_flops
    bound = flops / (seconds + rest / matmul)
    return {"attention_s": seconds, "attention_flops": attn_flops, "attention_rate": attn_flops / seconds,
            "other_flops": rest, "bound_flops_per_s": bound, "bound_ratio": bound / matmul}


def report(a: argparse.Namespace, n_params: int, m: dict, q: dict) -> dict:
    """Print the table of the main run ``m`` and the quarter run ``q``; return every figure (for --json)."""
    n, flops = m["n_cells"], m["n_cells"] * m["flops_per_cell"]
    rate, cells_s = flops / m["embed_s"], m["n_cells"] / m["embed_s"]
    ref, ref_cpu = (max(r[i] for r in m["matmul"][m["compute_dtype"]].values()) for i in (0, 1))
    machine = f"{platform.machine()}, {a.threads} threads, torch {torch.__version__}, "
    machine += str(resolve_device(a.device))
    fig = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine,
           "n_parameters": n_params, "cells_per_s": cells_s, "flops_per_s": rate,
           "matmul_flops_per_s": ref, "ratio": rate / ref, "main": m, "quarter": q}
    pad = 1 - m["tokens_per_cell"] / m["padded_tokens_per_cell"]
    rows = [
        ("machine", machine),
        ("model", f"{n_params:,} parameters in best_model.pt (d_model 512, 12 layers, 8 heads, d_hid 512)"),
        ("data", f"{n} cells, max_seq_len {a.max_seq_len}, batch_size {a.batch_size}, "
                 f"max_tokens {m['max_tokens']:,}: {m['n_batches']} batches"),
        ("tokens / cell", f"{m['tokens_per_cell']:.1f} non-padding, {m['padded_tokens_per_cell']:.1f} padded "
                          f"({pad:.1%} padding)"),
        ("GFLOP / cell", f"{m['flops_per_cell'] / GB:.1f} computed, "
                         f"{m['useful_flops_per_cell'] / GB:.1f} useful"),
        ("warm-up", f"{m['warmup_cells']} cells in {m['warmup_s']:.1f} s (not counted)"),
        ("embed", f"{n} cells in {m['embed_s']:.1f} s = {cells_s:.2f} cells/s"),
        ("achieved", f"{rate / GB:.1f} GFLOP/s computed "
                     f"({cells_s * m['useful_flops_per_cell'] / GB:.1f} useful)"),
    ]
    tokens = f"[{m['padded_tokens_per_cell'] * m['n_cells'] / m['n_batches']:.0f}~,512]x[512,1536]"
    for dtype, r in m["matmul"].items():
        rows.append((f"{dtype} matmul", f"{r['square_2048'][0] / GB:.1f} GFLOP/s square 2048, "
                                        f"{r['model_qkv'][0] / GB:.1f} {tokens} (best of 5)"))
    rows.append(("ratio", f"{rate / ref:.1%} of the best {m['compute_dtype']} matmul rate "
                          f"(target >= 50% on CPU); embed ran in {m['auto_precision']} (auto)"))
    best = {dt_: max(r[0] for r in m["matmul"][dt_].values()) for dt_ in ("float32", "bfloat16")}
    fig["precisions"] = {}
    for precision, r in m.get("precisions", {}).items():
        p_rate = r["flops"] / r["embed_s"]
        fig["precisions"][precision] = {**r, "cells_per_s": r["n_cells"] / r["embed_s"], "flops_per_s": p_rate,
                                        "ratio_fp32_matmul": p_rate / best["float32"],
                                        "ratio_bf16_matmul": p_rate / best["bfloat16"]}
        note = f"; {r['n_cells']} cells only: bf16 is emulated on this CPU" if r["emulated"] else ""
        rows.append((f"embed {precision}", f"{r['n_cells'] / r['embed_s']:.2f} cells/s, {p_rate / GB:.1f} GFLOP/s = "
                     f"{p_rate / best['float32']:.1%} of the fp32 matmul rate, {p_rate / best['bfloat16']:.1%} of "
                     f"the bf16 one (ran in {r['used']}{note})"))
    if resolve_device(a.device).type == "cpu":
        cpu_rate = flops / m["embed_cpu_s"]
        fig.update(flops_per_cpu_s=cpu_rate, matmul_flops_per_cpu_s=ref_cpu, ratio_cpu=cpu_rate / ref_cpu)
        rows += [
            ("per CPU-second", f"embed {cpu_rate / GB:.1f} vs matmul {ref_cpu / GB:.1f} GFLOP per CPU-s: "
                               f"ratio {cpu_rate / ref_cpu:.1%}"),
            ("CPU use", f"{m['embed_cpu_s'] / m['embed_s'] / a.threads:.0%} of {a.threads} threads busy; "
                        f"sys {m['embed_sys_s'] / m['embed_cpu_s']:.1%} of CPU time; "
                        f"{m['embed_faults'] / n:,.0f} minor page faults / cell"),
        ]
    peaks = [f"{r['peak_rss'] / MIB:.0f} MiB for {r['n_cells']} cells "
             f"(+{(r['peak_rss'] - (r['rss_before_embed'] or 0)) / MIB:.0f})" for r in (q, m)]
    rows += [("peak RSS", f"{' / '.join(peaks)}, {m['peak_kind']}; (+ over the RSS before embed)"),
             ("output", f"{m['output_bytes'] / MIB:.2f} MiB ({n} x 512 float32)")]
    if "cuda_max_allocated" in m:
        cuda = [f"{r['cuda_max_allocated'] / MIB:.0f} MiB for {r['n_cells']} cells" for r in (q, m)]
        rows.append(("cuda max alloc", " / ".join(cuda)))
    print("\n".join(f"{k:<16} {v}" for k, v in rows))
    if "profile" in m:
        p = m["profile"]
        print(f"\nprofile: embed {m['embed_s']:.1f} s; tokenisation alone (iter_batches) "
              f"{p['tokenise_s']:.2f} s; model forward alone, same batches {p['forward_s']:.1f} s\n"
              f"one batch {p['batch']}:\n{p['ops']}")
        c = p["ceiling"]
        print(f"attention alone  scaled_dot_product_attention on the same batches and masks, {m['compute_dtype']}: "
              f"{c['attention_s']:.1f} s for {c['attention_flops'] / GB:,.0f} GFLOP = {c['attention_rate'] / GB:.1f} "
              f"GFLOP/s ({c['attention_flops'] / (n * m['flops_per_cell']):.0%} of the FLOPs)\n"
              f"ceiling          that attention plus every other FLOP at the best {m['compute_dtype']} matmul rate, "
              f"nothing else: {c['bound_flops_per_s'] / GB:.1f} GFLOP/s = {c['bound_ratio']:.1%} of it "
              f"(embed reached {rate / ref:.1%})")
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = REPO.parent / "shared" / "data"
    p.add_argument("--vocab", type=Path, default=data / "scgpt_human_vocab.json", help="released vocab.json")
    p.add_argument("--data", type=Path, default=data / "pbmc3k_raw_seurat_labels.h5ad", help="cells x genes")
    p.add_argument("--n-cells", type=int, default=256, help="the first N cells (N/4 run too, for memory)")
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=EMBED_DEFAULTS["max_tokens"],
                   help="embed's cap on padded tokens per batch")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, then CPU), cpu, cuda, ...")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["auto", "fp32", "bf16", "fp16"],
                   help="embed is also timed in each of these (the default run is auto)")
    p.add_argument("--emulated-cells", type=int, default=2,
                   help="cells for low-precision runs on a CPU without native bf16 units")
    p.add_argument("--profile", action="store_true", help="tokenisation vs forward; op table")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    for hidden in ("--worker-ckpt", "--worker-mode", "--worker-out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_ckpt:
        Path(a.worker_out).write_text(json.dumps(measure(a)))
        return
    try:
        resolve_device(a.device)
    except ValueError as err:
        sys.exit(str(err))
    for flag, path in (("--vocab", a.vocab), ("--data", a.data)):
        if not path.is_file():
            sys.exit(f"{path.resolve()} not found; give the file with {flag} PATH.")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = released_size_checkpoint(Path(tmp) / "ckpt", a.vocab)
        n_params = sum(v.numel() for v in torch.load(ckpt / "best_model.pt", weights_only=True).values())
        sizes = {"quarter": max(1, a.n_cells // 4), "main": a.n_cells}
        print(f"wrote a {n_params:,}-parameter checkpoint; embedding {sizes['quarter']}, then "
              f"{a.n_cells} cells", flush=True)
        res = {}
        for mode, n in sizes.items():  # a fresh process each: its peak RSS is its own
            out = Path(tmp) / f"{mode}.json"
            worker = ["--n-cells", str(n), "--threads", str(a.threads), "--worker-ckpt", str(ckpt),
                      "--worker-mode", mode, "--worker-out", str(out)]  # later flags win in argparse
            subprocess.run([sys.executable, __file__, *sys.argv[1:], *worker], check=True)
            res[mode] = json.loads(out.read_text())
    fig = report(a, n_params, res["main"], res["quarter"])
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
