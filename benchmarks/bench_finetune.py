#!/usr/bin/env python
"""One fine-tuning step at the released model size: the official model beside ours, same batch, same machine.

The step is the recipe's: the classifier's cross-entropy on ``<cls>``, the model in train mode (dropout 0.2 on
the attention probabilities and the activations), backward, gradient clipping at 1.0, an Adam step (lr 1e-4;
eps 1e-4 with mixed precision, as the official loop sets it). The model is the released architecture with
random weights (``make_tiny_checkpoint`` at d_model 512, 12 layers, 8 heads, d_hid 512, with the real
60,697-token vocabulary: 51.3M parameters and a 9-class head), written once and loaded by every side.
The batches are ``--batch-size`` PBMC 3k cells with at least ``--max-seq-len - 1`` expressed genes, so every
batch is ``batch x max_seq_len`` tokens without padding; they are tokenised once and fed to every side.

Sides, each in its own process and each at every ``--precisions`` (fp32, bf16 autocast):

- ``official``: ``TransformerModel`` of a source checkout of bowang-lab/scGPT (``--official-src``; imported as
  ``bench_vs_official.official_modules`` does, nothing installed), built as the annotation tutorial builds it
  (flash-attn absent: PyTorch's ``nn.TransformerEncoder``), ``model(..., CLS=True)["cls_output"]``,
  ``torch.optim.Adam``;
- ``ours``: this checkout, ``model.classify`` and the optimiser of :func:`scgpt_protocol.adapt.optim.make_optimizer`;
- ``before``: the same as ``ours`` from another checkout of this package (``--before-src``, e.g. a
  ``git worktree`` of an earlier commit), with ``torch.optim.AdamW`` where it has no ``make_optimizer``.

Printed: seconds per step (median of ``--steps`` steps after one warm-up step), cells/s, the FLOP rate
(3x the forward: every position of every layer, ``2 * (8 d^2 + 4 d d_hid + 4 L d)`` per token and layer, plus
the value encoder), its share of this machine's matmul rate in the same precision (``torch.mm``, square 2048,
best of 5, same threads), the speed-up over the official side, the peak RSS rise, and with ``--profile`` the
top operators (torch.profiler, self CPU time) of one step of the sides named there.

    python benchmarks/bench_finetune.py --official-src /tmp/scGPT --before-src /tmp/wt-before --profile ours before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if "--worker-repo" in sys.argv:  # a worker of another checkout imports that checkout's package
    sys.path.insert(0, sys.argv[sys.argv.index("--worker-repo") + 1])
else:
    sys.path.insert(0, str(REPO))

from released_size import ARCH, full_length_cells, released_size_checkpoint  # noqa: E402  (this folder, sys.path[0])
N_CLASSES = 9
MIB = 2**20
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """The CPU's model name and which of :data:`FLAGS` it has (from /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    return f"{name}; {os.cpu_count()} CPUs; flags: {' '.join(have) or 'none of ' + ', '.join(FLAGS)}"


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of ``torch.mm`` on square ``n x n`` matrices of ``dtype``, best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(batch: int, length: int, d: int, d_hid: int, nlayers: int) -> int:
    """FLOPs of one training step on a ``[batch, length]`` batch: 3x the forward of every position and layer."""
    per_token = nlayers * 2 * (4 * d * d + 2 * d * d_hid + 2 * length * d) + 2 * d * d
    return 3 * batch * length * per_token


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_batches(a: argparse.Namespace, ckpt: Path, path: Path) -> tuple[int, int]:
    """Tokenise ``--batch-size * (--steps + 1)`` long cells once into ``path``; returns (batches, length)."""
    import anndata

    from scgpt_protocol.model.checkpoint import load_model
    from scgpt_protocol.model.embedding import iter_batches

    adata = anndata.read_h5ad(a.data)
    model = load_model(ckpt, device="cpu")
    need = a.batch_size * (a.steps + 1)
    long_cells = full_length_cells(adata, model, a.max_seq_len)[:need]
    if len(long_cells) < need:
        sys.exit(f"{a.data} has {len(long_cells)} cells with {a.max_seq_len - 1}+ expressed genes; "
                 f"{need} are needed: lower --steps, --batch-size or --max-seq-len.")
    batches = list(iter_batches(adata[long_cells].copy(), model, max_seq_len=a.max_seq_len,
                                batch_size=a.batch_size, cls_value=0.0, max_tokens=a.batch_size * a.max_seq_len))
    rng = np.random.default_rng(0)
    torch.save([{"gene_ids": b.gene_ids, "values": b.values, "padding_mask": b.padding_mask,
                 "target": torch.from_numpy(rng.integers(0, N_CLASSES, len(b.index)))} for b in batches], path)
    return len(batches), int(batches[0].gene_ids.shape[1])


def official_model(src: Path, ckpt: Path) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """The official TransformerModel as the annotation tutorial builds it, and its classification call."""
    sys.path.insert(0, str(HERE))
    from bench_vs_official import official_modules

    off = official_modules(src)
    vocab = off.GeneVocab([], default_token=None)
    for token, _ in sorted(json.loads((ckpt / "vocab.json").read_text()).items(), key=lambda kv: kv[1]):
        vocab.append_token(token)
    vocab.set_default_index(vocab["<pad>"])
    cfg = json.loads((ckpt / "args.json").read_text())
    model = off.TransformerModel(
        ntoken=len(vocab), d_model=cfg["embsize"], nhead=cfg["nheads"], d_hid=cfg["d_hid"],
        nlayers=cfg["nlayers"], nlayers_cls=cfg["n_layers_cls"], n_cls=N_CLASSES, vocab=vocab,
        dropout=cfg["dropout"], pad_token=cfg["pad_token"], pad_value=cfg["pad_value"], do_mvc=False,
        do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False, input_emb_style="continuous",
        cell_emb_style="cls", explicit_zero_prob=False, use_fast_transformer=True,
        fast_transformer_backend="flash", pre_norm=False,
    )
    off.load_pretrained(model, torch.load(ckpt / "best_model.pt", map_location="cpu"), verbose=False)

    def classify(gene_ids, values, padding_mask):
        return model(gene_ids, values, src_key_padding_mask=padding_mask, CLS=True, CCE=False, MVC=False,
                     ECS=False)["cls_output"]

    return model, classify


def worker(a: argparse.Namespace) -> dict:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    side, precision = a.worker_side.split(":")
    amp = precision != "fp32"
    batches = torch.load(a.worker_batches)
    ckpt = Path(a.worker_ckpt)
    if side == "official":
        model, classify = official_model(a.official_src, ckpt)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-4 if amp else 1e-8)
    else:
        from scgpt_protocol.model.checkpoint import load_model

        try:  # this package's optimiser (fused AdamW); a checkout from before it had plain AdamW
            from scgpt_protocol.adapt.optim import make_optimizer
        except ImportError:
            make_optimizer = None

        model = load_model(ckpt, n_classes=N_CLASSES, device="cpu")
        classify = model.classify
        trainable = [p for p in model.parameters() if p.requires_grad]
        if make_optimizer is not None:
            optimizer = make_optimizer(trainable, lr=1e-4, eps=1e-4 if amp else 1e-8, device=torch.device("cpu"))
        else:
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, eps=1e-4 if amp else 1e-8)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)

    def step(b: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = classify(b["gene_ids"], b["values"], b["padding_mask"]).float()
        loss = torch.nn.functional.cross_entropy(logits, b["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    start = time.perf_counter()
    step(batches[0])
    warm = time.perf_counter() - start
    before = rss()
    times, cpu = [], []
    for b in batches[1:]:
        start, start_cpu = time.perf_counter(), time.process_time()
        step(b)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out = {"times": times, "cpu_times": cpu, "warmup": warm, "rss_rise": rss("VmHWM") - before, "profile": None}
    if a.worker_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[1])
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out["profile"] = [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count)
                          for e in events[:a.top]]
        out["profile_total_s"] = total / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = REPO.parent / "shared" / "data"
    p.add_argument("--official-src", type=Path, help="root of a clone of bowang-lab/scGPT (no official side without)")
    p.add_argument("--before-src", type=Path, help="another checkout of this package, timed as the 'before' side")
    p.add_argument("--vocab", type=Path, default=data / "scgpt_human_vocab.json", help="released vocab.json")
    p.add_argument("--data", type=Path, default=data / "pbmc3k_raw_seurat_labels.h5ad", help="raw counts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=644)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--sides", nargs="+", choices=["official", "before", "ours"],
                   help="default: official (with --official-src), before (with --before-src), ours")
    p.add_argument("--profile", nargs="*", default=None, choices=["official", "before", "ours"],
                   help="profile one step of these sides (no name: ours), at every precision")
    p.add_argument("--top", type=int, default=12, help="operators printed per profile")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    for hidden in ("--worker-ckpt", "--worker-side", "--worker-batches", "--worker-out", "--worker-repo"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--worker-profile", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_side:
        Path(a.worker_out).write_text(json.dumps(worker(a)))
        return
    sides = a.sides or [s for s, ok in (("official", a.official_src), ("before", a.before_src), ("ours", True)) if ok]
    profiled = set(["ours"] if a.profile == [] else a.profile or [])
    if "official" in sides and a.official_src is None:
        sys.exit("the official side needs --official-src PATH (a clone of github.com/bowang-lab/scGPT).")
    if "before" in sides and (a.before_src is None or not (a.before_src / "scgpt_protocol").is_dir()):
        sys.exit("the before side needs --before-src PATH, a checkout of this package (with scgpt_protocol/).")
    for flag, path in (("--vocab", a.vocab), ("--data", a.data)):
        if not path.is_file():
            sys.exit(f"{path} not found; give the file with {flag} PATH.")

    torch.set_num_threads(a.threads)
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}  # measured again at the end
    print(f"machine   {cpu_description()}\n          torch {torch.__version__}, {a.threads} threads; matmul 2048^2: "
          f"fp32 {rates['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:,.0f} GFLOP/s (best of 5)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = released_size_checkpoint(Path(tmp) / "ckpt", a.vocab)
        n_params = sum(v.numel() for v in torch.load(ckpt / "best_model.pt", weights_only=True).values())
        n_batches, length = make_batches(a, ckpt, Path(tmp) / "batches.pt")
        flops = step_flops(a.batch_size, length, ARCH["d_model"], ARCH["d_hid"], ARCH["nlayers"])
        print(f"model     {n_params:,} parameters (+ a {N_CLASSES}-class head); batch {a.batch_size} x {length} "
              f"tokens, no padding; {flops / a.batch_size / 1e9:.1f} GFLOP per cell and step\n", flush=True)
        print(f"{'side':<9}{'precision':<10}{'s/step':>8}{'cells/s':>9}{'GFLOP/s':>9}{'% matmul':>10}"
              f"{'x official':>11}{'CPU s':>8}{'RSS rise':>10}", flush=True)
        for precision in a.precisions:
            for side in sides:
                out = Path(tmp) / "out.json"
                cmd = [sys.executable, __file__, "--worker-ckpt", str(ckpt), "--worker-side", f"{side}:{precision}",
                       "--worker-batches", str(Path(tmp) / "batches.pt"), "--worker-out", str(out),
                       "--threads", str(a.threads), "--top", str(a.top)]
                if a.official_src:
                    cmd += ["--official-src", str(a.official_src)]
                if side == "before":
                    cmd += ["--worker-repo", str(a.before_src.resolve())]
                if side in profiled:
                    cmd.append("--worker-profile")
                subprocess.run(cmd, check=True)
                r = results[f"{side}:{precision}"] = json.loads(out.read_text())
                r["s_per_step"] = statistics.median(r["times"])
                r["cpu_s_per_step"] = statistics.median(r["cpu_times"])
                r["cells_per_s"] = a.batch_size / r["s_per_step"]
                r["gflops"] = flops / r["s_per_step"] / 1e9
                r["share"] = flops / r["s_per_step"] / rates[precision]
                official = results.get(f"official:{precision}")
                speedup = f"{official['s_per_step'] / r['s_per_step']:.2f}x" if official else "-"
                print(f"{side:<9}{precision:<10}{r['s_per_step']:8.2f}{r['cells_per_s']:9.2f}{r['gflops']:9.1f}"
                      f"{100 * r['share']:9.1f}%{speedup:>11}{r['cpu_s_per_step']:8.1f}{r['rss_rise'] / MIB:8,.0f} M",
                      flush=True)
    # the machine's rate: the better of two measurements (one before the sides, one after), as other jobs may
    # have held the cores during one; the shares printed above used the first
    again = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    if any(again[k] > rates[k] for k in rates):
        rates = {k: max(rates[k], again[k]) for k in rates}
        print(f"\nmatmul measured again: fp32 {rates['fp32'] / 1e9:,.0f}, bf16 {rates['bf16'] / 1e9:,.0f} GFLOP/s "
              "(the better of the two); shares of that rate:")
        for key, r in results.items():
            r["share"] = flops / r["s_per_step"] / rates[key.split(":")[1]]
            print(f"  {key:<16}{100 * r['share']:5.1f}%")
    for key, r in results.items():
        if r["profile"]:
            print(f"\nprofile of one step, {key} (self CPU time, {r['profile_total_s']:.2f} s in all):")
            for name, seconds, share, count in r["profile"]:
                print(f"  {name[:48]:<48} {seconds:7.3f} s {100 * share:5.1f}%  x{count}")
    if a.json:
        summary = {"machine": cpu_description(), "torch": torch.__version__, "threads": a.threads,
                   "matmul_flops": rates, "batch": [a.batch_size, length], "step_flops": flops, "results": results}
        a.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
