"""Cost of one training step per adaptation strategy at the released model size.

For every strategy the released architecture (d_model 512, 12 layers, 8 heads, d_hid 512, the real
60,697-token vocabulary: 51,330,049 parameters, random values) gets a 9-class head, the strategy is
applied, and training steps (forward, cross-entropy, backward, AdamW step) run on the first cells of
PBMC 3k. ``probe`` trains nothing in the network: its row times the embedding pass it needs.

Each strategy runs in a fresh process, so its peak memory is its own: the process's peak resident
memory above its level after the model was loaded (CPU), or ``torch.cuda.max_memory_allocated`` (GPU).
Figures: trainable parameters, steady-state cells/s (after one warm-up step), peak memory.

    python benchmarks/bench_strategies.py                   # all strategies, 1200 tokens, batch 4
    python benchmarks/bench_strategies.py --strategies lora,full --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("probe", "head", "full", "lora", "adapter", "prefix_tuning", "ia3")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(a: argparse.Namespace) -> dict:
    """One strategy, in this process."""
    import warnings

    import anndata
    import torch

    from scgpt_protocol import load_model
    from scgpt_protocol.adapt.strategies import apply_strategy, count_parameters
    from scgpt_protocol.adapt.train import set_train_mode
    from scgpt_protocol.core.device import resolve_device
    from scgpt_protocol.model.embedding import iter_batches

    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = load_model(a.checkpoint, n_classes=9, device=device)
    adata = anndata.read_h5ad(a.data)[: a.n_cells].copy()
    batches = [b.to(device) for b in iter_batches(adata, model, max_seq_len=a.max_seq_len, batch_size=a.batch_size)]
    apply_strategy(model, a.strategy)
    model.to(device)
    set_train_mode(model, a.strategy)  # as finetune does: a frozen encoder runs in eval mode
    trainable, total = count_parameters(model)
    if a.strategy == "probe":  # what a probe fits: a linear head on the embedding (d x classes + bias)
        trainable = (model.config.d_model + 1) * 9
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] or [torch.zeros(1)], lr=1e-4)
    base_rss = _rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    def step(batch) -> None:
        if a.strategy == "probe":  # the embedding pass a probe is fitted on (sklearn fits in milliseconds)
            with torch.inference_mode():
                model.cell_embedding(batch.gene_ids, batch.values, batch.padding_mask)
            return
        target = torch.randint(0, 9, (len(batch.index),), device=device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.classify(batch.gene_ids, batch.values, batch.padding_mask).float()
            loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = batches[1 : 1 + a.steps]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cells = sum(len(b.index) for b in timed)
    peak = (torch.cuda.max_memory_allocated() - base_cuda if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss)
    tokens = sum(int((~b.padding_mask).sum()) for b in timed) / max(cells, 1)
    return {"strategy": a.strategy, "trainable_parameters": trainable, "total_parameters": total,
            "cells_per_s": cells / seconds, "step_seconds": seconds / len(timed), "tokens_per_cell": tokens,
            "peak_memory_mib": peak / 2**20, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default=str(ROOT.parent / "shared" / "data" / "scgpt_human_vocab.json"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_raw_seurat_labels.h5ad"))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--n-cells", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    for path, flag in ((a.vocab, "--vocab"), (a.data, "--data")):
        if not Path(path).is_file():
            sys.exit(f"{path} not found; pass {flag} (the files are in the project's shared/data folder).")
    from released_size import released_size_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = released_size_checkpoint(Path(tmp) / "full", a.vocab)
        n_cells = a.batch_size * (a.steps + 1)
        for strategy in a.strategies.split(","):
            cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--checkpoint", str(ckpt),
                   "--data", a.data, "--n-cells", str(n_cells), "--max-seq-len", str(a.max_seq_len),
                   "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--threads", str(a.threads),
                   "--device", a.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            r = rows[-1]
            print(f"{r['strategy']:14s} trainable {r['trainable_parameters']:>11,} of {r['total_parameters']:,}  "
                  f"{r['cells_per_s']:6.2f} cells/s  {r['step_seconds']:6.1f} s/step  "
                  f"peak {r['peak_memory_mib']:7.0f} MiB  ({r['tokens_per_cell']:.0f} tokens/cell, {r['device']})",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k not in {"worker"}},
                                            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
