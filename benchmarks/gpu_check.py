"""GPU readiness check: parity, mixed precision, training with AMP, fused attention, full-size figures.

``make gpu-check`` (CUDA) or ``make gpu-check DEVICE=cpu`` (what CI runs). Checks, each printed as
PASS / FAIL / SKIP with what was measured; the exit status is 1 if any check fails:

1. **fp32 parity on the device**: the official fixture (``tests/fixtures/scgpt_official_tiny``) run on
   the device, against the outputs the official code computed (max abs diff < 1e-5), including the
   ``<cls>``-only path of ``cell_embedding`` / ``classify``.
2. **embed and predict in bf16 and fp16** (and what ``auto`` resolves to): cosine to fp32 >= 0.999 for
   every cell; predicted labels equal to fp32 for >= 99% of cells (a random head has near ties).
3. **training with AMP, every strategy**: one epoch (a few steps) of ``finetune`` in bf16 and in fp16
   (fp16 with a GradScaler, whose state is checked), finite losses, weights updated.
4. **SDPA kernel**: which scaled-dot-product-attention kernel runs in inference (padding mask) and in
   training (dropout), read from the profiler; on CUDA a fused one (flash / memory-efficient / cuDNN)
   is required, the unfused math path is a failure.
5. **full-size figures**: the released architecture (51.3M parameters, random weights, a 60,697-token
   vocabulary) on synthetic cells of about 800 expressed genes: embed cells/s and peak memory in fp32
   and in each low precision, and the time (s/step, cells/s) and peak memory of a ``full`` training step with AMP
   (the recipe's: dropout 0.2, clipping 1.0, the fine-tuning optimiser).

On CUDA the full-size part uses 1,024 cells for embedding and batch 32 for training. On CPU it uses
reduced sizes (16 cells for embedding, 1 training step of 2 cells, max length 512; checks 2-3 on fewer
demo cells), and it skips the
full-size bf16 / fp16 timings where the CPU has no native bf16 units (they are emulated there, tens of
times slower than fp32); the output says so. Correctness checks 1-4 use the tiny fixture model and
run everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from scgpt_protocol.adapt.optim import adam_eps, make_optimizer
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.annotate.inference import predict
from scgpt_protocol.core import device as dev
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import STRATEGY_NAMES, FinetuneParams
from scgpt_protocol.data.demo import make_toy_adata
from scgpt_protocol.model.checkpoint import load_model
from scgpt_protocol.model.embedding import embed
from scgpt_protocol.model.save import make_tiny_checkpoint

FIXTURE = REPO / "tests" / "fixtures" / "scgpt_official_tiny"
MIB = 2**20
RESULTS: list[tuple[str, str, str]] = []


def report(status: str, name: str, detail: str) -> None:
    RESULTS.append((status, name, detail))
    print(f"{status:<4}  {name:<44} {detail}", flush=True)


def check(name: str, ok: bool, detail: str) -> None:
    report("PASS" if ok else "FAIL", name, detail)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# -- 1. parity ----------------------------------------------------------------------------------
def parity(device: torch.device) -> None:
    with np.load(FIXTURE / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    args = [torch.from_numpy(ref[k]).to(device) for k in ("gene_ids", "values", "padding_mask")]
    keep = ~ref["padding_mask"]

    def diff(ours: torch.Tensor, theirs: np.ndarray, mask: np.ndarray | None = None) -> float:
        a = ours.detach().float().cpu().numpy()
        return float(np.abs(a[mask] - theirs[mask]).max() if mask is not None else np.abs(a - theirs).max())

    for name in ("checkpoint", "finetuned"):
        model = load_model(FIXTURE / name, device=device)
        with torch.no_grad(), dev.autocast(device, "fp32"):
            out = model(*args)
            diffs = {
                "encoder": diff(out["transformer_output"], ref["transformer_output"], keep),
                "cls": diff(out["cell_emb"], ref["cls_embedding"]),
                "mlm": diff(out["mlm_output"], ref["mlm_output"], keep),
                "mvc": diff(out["mvc_output"], ref["mvc_output"], keep),
                "cell_embedding (<cls>-only last layer)": diff(model.cell_embedding(*args), ref["cls_embedding"]),
            }
            if name == "finetuned":
                diffs["logits"] = diff(out["cls_output"], ref["cls_logits"])
                diffs["classify (<cls>-only)"] = diff(model.classify(*args), ref["cls_logits"])
        worst = max(diffs.values())
        check(f"fp32 parity, {name}", worst < 1e-5,
              "max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + " (tolerance 1e-5)")


# -- 2. low-precision embed / predict -----------------------------------------------------------
def low_precision_outputs(device: torch.device, precisions: list[str]) -> None:
    import scanpy as sc

    n = 700 if device.type == "cuda" else 200  # all demo cells on a GPU, the first 200 on a CPU
    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()[:n].copy()
    labels = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(tmp, list(adata.var_names), d_model=64, nlayers=3, nheads=4, d_hid=128)
        model = load_model(ckpt, device=device)
        ref = adata.copy()
        embed(ref, model, precision="fp32", max_seq_len=512)
        for precision in precisions:
            low = adata.copy()
            embed(low, model, precision=precision, max_seq_len=512)
            cos = cosine(ref.obsm["X_scgpt"].astype(np.float64), low.obsm["X_scgpt"].astype(np.float64))
            used = low.uns["X_scgpt_params"]["precision"]
            check(f"embed {precision}", cos.min() >= 0.999 and used == precision,
                  f"cosine to fp32 min {cos.min():.6f} (1 - min = {1 - cos.min():.1e}), mean {cos.mean():.6f} over "
                  f"{low.n_obs} cells; recorded {used}")
        cats = sorted(set(labels))
        model = load_model(ckpt, n_classes=len(cats), device=device)
        fp32 = predict(model, adata, categories=cats, precision="fp32", max_seq_len=512)
        for precision in precisions:
            low = predict(model, adata, categories=cats, precision=precision, max_seq_len=512)
            same = float((low.labels == fp32.labels).mean())
            check(f"predict {precision}", same >= 0.99 and low.precision == precision,
                  f"{same:.1%} of {adata.n_obs} labels equal to fp32; max |dp| "
                  f"{np.abs(low.probabilities - fp32.probabilities).max():.2e}")


# -- 3. training with AMP -----------------------------------------------------------------------
def training(device: torch.device, precisions: list[str]) -> None:
    import scanpy as sc

    n = 160 if device.type == "cuda" else 96
    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()[:n].copy()
    adata.obs["label"] = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()[:n]
    adata.obs["split"] = np.random.default_rng(0).choice(["train", "val"], adata.n_obs, p=[0.8, 0.2])
    cats = sorted(adata.obs["label"].unique())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", list(adata.var_names), d_model=32, nlayers=2, nheads=4,
                                    d_hid=64)
        for precision in precisions:
            for strategy in STRATEGY_NAMES:
                run = Path(tmp) / f"{precision}-{strategy}"
                params = FinetuneParams(run_dir=str(run), strategy=strategy, epochs=1, batch_size=32, max_seq_len=48,
                                        lr=1e-3, patience=0, precision=precision, device=str(device))
                model = load_model(ckpt, n_classes=len(cats), device=device)
                before = {k: v.detach().clone() for k, v in model.state_dict().items()}
                t = time.perf_counter()
                result = finetune(model, adata, params, label_key="label", categories=cats, layout=RunLayout(run))
                seconds = time.perf_counter() - t
                losses = result.history["train_loss"].to_numpy()
                after = model.state_dict()
                updated = any(not torch.equal(before[k], after[k]) for k in before if k in after) or any(
                    k not in before for k in after)  # injected modules (lora, adapters...) are new tensors
                detail = f"loss {losses[-1]:.3f}, ran in {result.precision}, {seconds:.1f} s"
                ok = bool(np.isfinite(losses).all()) and updated and result.precision == precision
                if precision == "fp16" and strategy != "probe":
                    scaler = torch.load(RunLayout(run).train_state, weights_only=False)["scaler"]
                    ok = ok and bool(scaler) and scaler.get("scale", 0) > 0
                    detail += f"; GradScaler scale {scaler.get('scale', 'off') if scaler else 'off'}"
                check(f"train {strategy} {precision}", ok, detail)


# -- 4. SDPA kernel -----------------------------------------------------------------------------
def sdpa_kernels(model: torch.nn.Module, batch, device: torch.device, precision: str, train: bool) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    model.train(train)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ctx = contextlib.nullcontext() if train else torch.inference_mode()
    with ctx, dev.autocast(device, precision), profile(activities=activities) as prof:
        out = model.classify(batch.gene_ids, batch.values, batch.padding_mask)
        if train:
            out.float().sum().backward()
        sync(device)
    names = {e.key for e in prof.key_averages()}
    # SDPA's kernels, and on the CPU in training this package's own attention with dropout
    return sorted(n for n in names if ("attention" in n.lower() and n.startswith("aten::_"))
                  or n == "_DropoutAttention")


def attention_kernel(device: torch.device, precision: str) -> None:
    from scgpt_protocol.model.embedding import iter_batches

    adata = make_toy_adata(n_cells=8, n_genes=400, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(tmp, list(adata.var_names), d_model=64, nlayers=2, nheads=4, d_hid=128)
        model = load_model(ckpt, n_classes=3, device=device)
        batch = next(iter(iter_batches(adata, model, max_seq_len=256, batch_size=8))).to(device)
        assert bool(batch.padding_mask.any()), "the check needs a padded batch"
        for train in (False, True):
            kernels = sdpa_kernels(model, batch, device, precision, train)
            what = f"{'training (dropout)' if train else 'inference'}, padding mask, {precision}"
            unfused = [k for k in kernels if "math" in k]
            if device.type == "cuda":
                fused = [k for k in kernels if any(s in k for s in ("flash", "efficient", "cudnn"))]
                check(f"SDPA fused kernel: {what}", bool(fused) and not unfused, f"kernels: {kernels}")
            else:
                report("INFO", f"SDPA kernel (CPU): {what}", f"kernels: {kernels or ['math (composite ops)']}")


# -- 5. full-size figures -----------------------------------------------------------------------
class Peak:
    """Peak memory of a block: the CUDA allocator's peak, or the peak RSS rise on Linux CPUs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.meter = dev.PeakMemory(self.device).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.meter.__exit__(*exc)
            self.peak = self.meter.peak


def full_size(device: torch.device, precisions: list[str]) -> None:
    on_gpu = device.type == "cuda"
    n_cells, max_len, train_batch, train_steps = (1024, 1200, 32, 5) if on_gpu else (16, 512, 2, 1)
    if not on_gpu:
        report("INFO", "full size on CPU: reduced sizes", f"{n_cells} cells, max length {max_len}, training "
               f"{train_steps} steps of {train_batch} cells (CUDA: 1,024 cells, 1,200, 5 x 32)")
    adata = make_toy_adata(n_cells=n_cells, n_genes=2000, n_labels=4, seed=2)  # ~800 expressed genes per cell
    genes = list(adata.var_names) + [f"PAD_GENE{i}" for i in range(60697 - 3 - adata.n_vars)]
    timed = ["fp32"]
    for precision in precisions:
        if device.type == "cpu" and precision in ("bf16", "fp16") and not dev.cpu_has_native_bf16():
            report("SKIP", f"full-size embed {precision}", "this CPU has no native bf16/fp16 matrix units "
                   "(emulated: tens of times slower than fp32); auto uses fp32 here")
            continue
        timed.append(precision)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(tmp, genes, d_model=512, nlayers=12, nheads=8, d_hid=512)
        model = load_model(ckpt, device=device)
        n_params = sum(p.numel() for p in model.parameters())
        report("INFO", "full-size model", f"{n_params:,} parameters (+ flag_encoder in the file); "
               f"auto precision here: {dev.resolve_precision('auto', device)}")
        for precision in timed:
            embed(adata[: min(4, n_cells)].copy(), model, precision=precision, max_seq_len=max_len)  # warm-up
            work = adata.copy()
            sync(device)
            with Peak(device) as peak:
                t = time.perf_counter()
                embed(work, model, precision=precision, max_seq_len=max_len)
                sync(device)
                seconds = time.perf_counter() - t
            report("INFO", f"full-size embed {precision}", f"{n_cells / seconds:,.1f} cells/s ({n_cells} cells, "
                   f"{seconds:.1f} s), peak memory +{peak.peak / MIB:,.0f} MiB")
        train_precision = dev.resolve_precision("auto", device)
        model = load_model(ckpt, n_classes=4, device=device)
        model.train()
        optimizer = make_optimizer(model.parameters(), lr=1e-4, eps=adam_eps(True), device=device)  # as finetune
        scaler = torch.amp.GradScaler(device.type if train_precision == "fp16" else "cuda",
                                      enabled=train_precision == "fp16")
        from scgpt_protocol.model.embedding import iter_batches

        codes = torch.tensor(adata.obs["cell_type"].cat.codes.to_numpy(), dtype=torch.long)
        batches = iter(iter_batches(adata, model, max_seq_len=max_len, batch_size=train_batch, max_tokens=10**9))
        seconds, cells = 0.0, 0
        with Peak(device) as peak:
            for step in range(train_steps + 1):  # the first step is a warm-up
                batch = next(batches).to(device)
                sync(device)
                t = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with dev.autocast(device, train_precision):
                    logits = model.classify(batch.gene_ids, batch.values, batch.padding_mask).float()
                    loss = torch.nn.functional.cross_entropy(logits, codes[batch.index].to(device))
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                sync(device)
                if step:
                    seconds += time.perf_counter() - t
                    cells += len(batch.index)
        report("INFO", f"full-size training step ({train_precision})",
               f"{seconds / train_steps:,.2f} s/step, {cells / seconds:,.2f} cells/s ({train_steps} steps of "
               f"{train_batch} cells, {batch.gene_ids.shape[1]} tokens; dropout 0.2, clipping 1.0, AdamW), "
               f"loss {loss.item():.3f}, peak memory +{peak.peak / MIB:,.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cpu, or cuda:N")
    p.add_argument("--skip-full-size", action="store_true", help="only the correctness checks 1-4")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    try:
        device = dev.resolve_device(a.device)
    except ValueError as err:
        sys.exit(f"{err} (no GPU here? run the CPU variant: make gpu-check DEVICE=cpu)")
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    extra = (f"compute capability {torch.cuda.get_device_capability(device)}" if device.type == "cuda" else
             f"native bf16 units: {dev.cpu_has_native_bf16()}, {torch.get_num_threads()} threads")
    print(f"gpu-check on {device} ({name}; {extra}); torch {torch.__version__}; "
          f"auto precision: {dev.resolve_precision('auto', device)}", flush=True)
    if device.type == "cpu":
        print("no GPU used: this is the CPU variant of the check", flush=True)
    precisions = ["bf16", "fp16"]
    parity(device)
    low_precision_outputs(device, precisions)
    training(device, precisions)
    attention_kernel(device, dev.resolve_precision("auto", device) if device.type == "cuda" else "fp32")
    if not a.skip_full_size:
        full_size(device, precisions)
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    print(f"\n{sum(r[0] == 'PASS' for r in RESULTS)} passed, {len(failed)} failed, "
          f"{sum(r[0] == 'SKIP' for r in RESULTS)} skipped in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
