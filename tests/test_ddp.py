"""Streaming fine-tuning and DistributedDataParallel on the CPU (gloo): same step as one process, torchrun CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scgpt_protocol import load_model, make_tiny_checkpoint
from scgpt_protocol.adapt.loader import train_plan
from scgpt_protocol.adapt.saved import load_finetuned
from scgpt_protocol.adapt.train import finetune
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import FinetuneParams
from scgpt_protocol.data.demo import make_toy_adata

#: dropout off (below), fp32, no clipping, Adam eps 1: a step proportional to the gradient (Adam with a small
#: eps would hide a wrongly scaled loss: its step barely depends on the gradient's scale)
EXACT = dict(batch_size=5, max_seq_len=24, lr=0.05, adam_eps=1.0, grad_clip=0.0, amp=False, patience=0, epochs=1,
             class_weighted=True, num_workers=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy cells with a split: 11 train cells = global batches of 5, 5 and 1 (fewer cells than 2 ranks)."""
    adata = make_toy_adata(n_cells=40, n_genes=60, n_labels=3, seed=1)
    split = np.array(["train"] * 11 + ["val"] * 9 + ["test"] * 20)
    adata.obs["split"] = split
    path = tmp_path_factory.mktemp("toy") / "prepared.h5ad"
    adata.write_h5ad(path)
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), list(adata.var_names), d_model=32,
                                      nheads=4, d_hid=64)
    return adata, path, checkpoint, sorted(adata.obs["cell_type"].astype(str).unique())


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention dropout (an SDPA argument)
            module.dropout = 0.0
    return model


def _train(adata, checkpoint, categories, **overrides):
    model = _no_dropout(load_model(checkpoint, n_classes=len(categories), device="cpu"))
    result = finetune(model, adata, FinetuneParams(**{**EXACT, **overrides}), label_key="cell_type",
                      categories=categories)
    return result, model.state_dict()


def _rank_worker(rank: int, world_size: int, port: int, h5ad: str, checkpoint: str, categories: list, out: str):
    import anndata

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result, state = _train(anndata.read_h5ad(h5ad, backed="r"), checkpoint, categories)
        if rank == 0:
            torch.save({"state": state, "history": result.history.to_dict("list"), "world": result.world_size,
                        "per_device": result.per_device_batch_size}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_take_the_one_process_step(toy, tmp_path):
    adata, h5ad, checkpoint, categories = toy
    one, one_state = _train(adata, checkpoint, categories)
    start = _no_dropout(load_model(checkpoint, n_classes=len(categories), device="cpu")).state_dict()
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank_worker, args=(2, _free_port(), str(h5ad), str(checkpoint), categories, str(out)),
                                nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two["world"] == 2 and two["per_device"] == 3 and one.world_size == 1
    moved = max(float((one_state[k] - start[k]).abs().max()) for k in start if k.startswith("cls_decoder"))
    assert moved > 1e-3  # three real steps were taken (batches of 5, 5 and 1 cells)
    diff = max(float((one_state[k] - two["state"][k]).abs().max()) for k in one_state)
    assert diff < 1e-6, f"2-process weights differ from 1-process weights by {diff:g}"
    np.testing.assert_allclose(two["history"]["train_loss"], one.history["train_loss"], rtol=1e-5)
    assert two["history"]["val_macro_f1"] == list(one.history["val_macro_f1"])


def test_workers_and_backed_reading_do_not_change_training(toy):
    import anndata

    adata, h5ad, checkpoint, categories = toy
    memory, memory_state = _train(adata, checkpoint, categories, epochs=2)
    backed, backed_state = _train(anndata.read_h5ad(h5ad, backed="r"), checkpoint, categories, epochs=2,
                                  num_workers=2)
    assert backed.num_workers == 2
    assert memory.history[["train_loss", "val_loss"]].equals(backed.history[["train_loss", "val_loss"]])
    for key, value in memory_state.items():
        assert torch.equal(value, backed_state[key]), key
    # what 02 reads (open_prepared_cells): X and obs on disk, labels, split and names read by slices
    from scgpt_protocol.data.backed import open_cells

    lean, lean_state = _train(open_cells(h5ad), checkpoint, categories, epochs=2)
    assert memory.history[["train_loss", "val_loss"]].equals(lean.history[["train_loss", "val_loss"]])
    for key, value in memory_state.items():
        assert torch.equal(value, lean_state[key]), key


def test_steps_per_epoch_walks_through_all_cells():
    rows, keys = np.arange(100, 137), np.arange(200, dtype=np.uint64)
    seen = [np.concatenate([p.rows for p in train_plan(rows, keys, seed=3, epoch=e, batch_size=4,
                                                       steps_per_epoch=2)]) for e in (1, 2, 3, 4, 5)]
    assert all(len(s) == 8 for s in seen)
    assert len(set(np.concatenate(seen[:4]))) == 32  # no cell twice within a pass of 37
    again = train_plan(rows, keys, seed=3, epoch=5, batch_size=4, steps_per_epoch=2)
    assert np.array_equal(np.concatenate([p.rows for p in again]), seen[4])
    assert set(seen[4]) <= set(rows)


def _prepared_run(run_dir: Path, toy) -> RunLayout:
    """What 01 leaves in a run folder, written by hand."""
    import shutil

    from scgpt_protocol.core.io import sha256_file

    adata, h5ad, checkpoint, categories = toy
    layout = RunLayout(run_dir).make_dirs()
    shutil.copy(h5ad, layout.prepared_adata)
    layout.write_json(layout.labels, {"label_key": "cell_type", "categories": categories})
    layout.write_json(layout.checkpoint_record, {"checkpoint": str(checkpoint), "kind": "demo",
                                                 "sha256": sha256_file(Path(checkpoint) / "best_model.pt")})
    return layout


def test_ddp_torchrun_cli_trains_resumes_and_reloads(toy, tmp_path):
    adata, _, _, categories = toy
    layout = _prepared_run(tmp_path / "run", toy)
    params = tmp_path / "02_finetune.yaml"
    params.write_text("strategy: full\nbatch_size: 4\nmax_seq_len: 24\nlr: 0.001\nepochs: 1\npatience: 0\n")

    def torchrun():
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", "-m", "scgpt_protocol", "finetune", str(params),
                   "--run-dir", str(layout.run_dir)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    torchrun()
    summary = json.loads(layout.train_summary.read_text())
    assert summary["world_size"] == 2 and summary["per_device_batch_size"] == 2 and summary["epochs_run"] == 1
    # a second epoch resumes from the first (the state rank 0 wrote), on 2 processes launched as the notebook does
    from scgpt_protocol.protocol.steps.finetune import launch_finetune

    launch_finetune(FinetuneParams(run_dir=str(layout.run_dir), strategy="full", batch_size=4, max_seq_len=24,
                                   lr=0.001, epochs=2, patience=0, nproc_per_node=2))
    summary = json.loads(layout.train_summary.read_text())
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 2
    assert "resuming from" in (layout.logs_dir / "finetune.log").read_text()
    model, manifest = load_finetuned(layout.model_dir, device="cpu")
    assert manifest["world_size"] == 2 and manifest["categories"] == categories
    from scgpt_protocol.annotate.inference import predict

    predicted = predict(model, adata[adata.obs["split"] == "test"].copy(), categories=categories, max_seq_len=24)
    assert len(predicted.labels) == 20
