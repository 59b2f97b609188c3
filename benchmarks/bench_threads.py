#!/usr/bin/env python
"""Fine-tuning on a CPU whose cores another job shares: the ``threads`` setting of step 02.

``finetune`` (strategy ``full``, the recipe's dropout, bf16 where the CPU has bf16 units) at the released size
(``make_tiny_checkpoint`` at d_model 512, 12 layers, 8 heads, d_hid 512 with the real 60,697-token vocabulary)
on PBMC 3k cells with at least ``--max-seq-len - 1`` expressed genes, ``--steps`` steps of ``--batch-size``
cells, one epoch. Each ``--threads`` setting runs in its own process, first on a free machine, then with
``--busy`` processes that each spin one core (a stand-in for another job), started before it and stopped after.
Printed per run: the median and the sum of the steps' wall time (the first step, a warm-up, left out) and, for
``auto``, the comparisons ``CpuThreads`` made (seconds per unit of work on each count).

    python benchmarks/bench_threads.py                       # none, auto and 1; free, then one busy core
    python benchmarks/bench_threads.py --threads none auto --steps 16 --busy 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPIN = "while True:\n    pass\n"


def worker(a: argparse.Namespace) -> dict:
    """One training in this process; the steps' wall times and the thread choices."""
    import anndata

    from scgpt_protocol import load_model
    from scgpt_protocol.adapt import threads as threads_mod
    from scgpt_protocol.adapt.train import finetune
    from scgpt_protocol.core.params import FinetuneParams
    from released_size import full_length_cells

    times: list[float] = []
    choosers: list = []
    step = threads_mod.CpuThreads.step

    @contextmanager
    def timed(self, work):  # every step's wall time, whatever the setting
        if self not in choosers:
            choosers.append(self)
        start = time.perf_counter()
        with step(self, work):
            yield
        times.append(time.perf_counter() - start)

    threads_mod.CpuThreads.step = timed
    adata = anndata.read_h5ad(a.data)
    need = a.batch_size * a.steps
    model = load_model(a.worker_ckpt, device="cpu")
    long_cells = full_length_cells(adata, model, a.max_seq_len)
    if len(long_cells) < need + 16:
        sys.exit(f"{a.data} has {len(long_cells)} cells with {a.max_seq_len - 1}+ expressed genes; {need + 16} "
                 "are needed: lower --steps or --batch-size.")
    adata = adata[long_cells[: need + 16]].copy()
    adata.obs["split"] = ["train"] * need + ["val"] * 16
    categories = sorted(adata.obs["cell_type"].unique())  # finetune adds the head for them
    threads = None if a.worker_threads == "none" else a.worker_threads
    threads = int(threads) if threads not in (None, "auto") else threads
    with tempfile.TemporaryDirectory() as run_dir:
        params = FinetuneParams(run_dir=run_dir, epochs=1, steps_per_epoch=a.steps, batch_size=a.batch_size,
                                max_seq_len=a.max_seq_len, lr=1e-4, patience=0, threads=threads)
        result = finetune(model, adata, params, label_key="cell_type", categories=categories)
    timed_steps = times[1:]
    return {"threads": a.worker_threads, "precision": result.precision, "steps": len(timed_steps),
            "median_s": statistics.median(timed_steps), "total_s": sum(timed_steps),
            "choices": [{"step": s, "s_per_work": {str(k): v for k, v in r.items()}}
                        for c in choosers for s, r in c.choices]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = REPO.parent / "shared" / "data"
    p.add_argument("--vocab", type=Path, default=data / "scgpt_human_vocab.json", help="released vocab.json")
    p.add_argument("--data", type=Path, default=data / "pbmc3k_raw_seurat_labels.h5ad", help="raw counts")
    p.add_argument("--threads", nargs="+", default=["none", "auto", "1"], help="settings: none, auto or a number")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (the first is a warm-up)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=644)
    p.add_argument("--busy", type=int, default=1, help="spinning processes in the second round (0: no round)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    for hidden in ("--worker-ckpt", "--worker-threads", "--worker-out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker_out:
        Path(a.worker_out).write_text(json.dumps(worker(a)))
        return

    from released_size import released_size_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = released_size_checkpoint(Path(tmp) / "ckpt", a.vocab)
        for busy in [0, a.busy] if a.busy else [0]:
            for setting in a.threads:
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
                out = Path(tmp) / "out.json"
                try:
                    subprocess.run([sys.executable, __file__, "--worker-ckpt", str(ckpt), "--worker-threads",
                                    setting, "--worker-out", str(out), *sys.argv[1:]], check=True)
                finally:
                    for s in spinners:
                        s.kill()
                        s.wait()
                rows.append({"busy": busy, **json.loads(out.read_text())})
                r = rows[-1]
                print(f"busy cores {busy}  threads {setting:>4}  {r['precision']}  {r['median_s']:6.2f} s/step "
                      f"(median of {r['steps']})  {r['total_s']:7.1f} s in all", flush=True)
                for c in r["choices"]:
                    rates = ", ".join(f"{k} thread(s) {v * 1e9:.2f}" for k, v in c["s_per_work"].items())
                    print(f"    comparison at step {c['step'] + 1}: {rates} (ns per unit of work)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
