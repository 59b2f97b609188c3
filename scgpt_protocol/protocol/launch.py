"""Step 02 in many processes: ``torchrun --nproc_per_node=N -m scgpt_protocol finetune ...`` runs
:func:`run_finetune_step` in each; the notebook launches the same when ``nproc_per_node`` > 1
(:func:`launch_finetune`). The process-group primitives the training loop uses are in
:mod:`scgpt_protocol.adapt.ddp`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapt.ddp import barrier, start_process_group, world
from ..core.errors import ScGPTProtocolError

if TYPE_CHECKING:
    from ..adapt.train import TrainResult
    from ..core.params import FinetuneParams

logger = logging.getLogger(__name__)

__all__ = ["run_finetune_step", "launch_finetune", "DistributedRunError"]


class DistributedRunError(ScGPTProtocolError, RuntimeError):
    """The torchrun training launched by the notebook failed."""


def run_finetune_step(params: FinetuneParams) -> TrainResult:
    """Step 02 from its run folder, as the notebook does it: the prepared data read backed, the 01 checkpoint,
    :func:`~scgpt_protocol.adapt.train.finetune` with the run's layout. Under torchrun (``WORLD_SIZE`` > 1) each
    process joins the process group first, trains on ``cuda:LOCAL_RANK`` (or the CPU with gloo), and only
    rank 0 writes logs and artifacts."""
    from ..adapt.train import finetune
    from ..core.layout import RunLayout
    from ..core.log import setup_logging
    from ..model.checkpoint import load_model
    from ..pp.io import open_prepared_cells, read_checkpoint_record, read_labels

    device = start_process_group()
    try:
        rank, size = world()
        if device is not None:
            params = dataclasses.replace(params, device=str(device))
        elif size > 1:
            params = dataclasses.replace(params, device="cpu")
        layout = RunLayout(params.run_dir)
        params = params.with_recipe(read_checkpoint_record(layout).get("kind"))  # None: the checkpoint's recipe
        if rank == 0:
            layout.make_dirs()
            setup_logging(layout, params.STEP)
        else:
            logging.getLogger("scgpt_protocol").setLevel(logging.WARNING)
        barrier()
        if size > 1:
            logger.info("DistributedDataParallel: %d processes (%s), %s cells per step, about %d per process",
                        size, torch.distributed.get_backend(), params.batch_size, -(-params.batch_size // size))
        adata = open_prepared_cells(layout)  # X and obs stay on disk
        labels, record = read_labels(layout), read_checkpoint_record(layout)
        model = load_model(record["checkpoint"], n_classes=len(labels["categories"]), head_seed=params.seed,
                           device=params.device)
        result = finetune(model, adata, params, label_key=labels["label_key"], categories=labels["categories"],
                          layout=layout, base_checkpoint=record)
        adata.close()
        return result
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def torchrun_command(params: FinetuneParams, params_file: str | Path) -> list[str]:
    """The command line :func:`launch_finetune` runs (one node, ``params.nproc_per_node`` processes)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={params.nproc_per_node}",
            "-m", "scgpt_protocol", "finetune", str(params_file), "--run-dir", str(params.run_dir)]


def launch_finetune(params: FinetuneParams) -> int:
    """Run step 02 under torchrun with ``params.nproc_per_node`` processes on this machine, streaming its output.

    The parameters go through ``run_dir/params/finetune.yaml`` (written here). Results land in the run folder
    as in a one-process run; read them with ``layout.train_summary`` / ``layout.history``.

    Raises
    ------
    DistributedRunError
        When torchrun exits with an error (its output, above, says why).
    """
    from ..core.layout import RunLayout

    params_file = params.to_yaml(RunLayout(params.run_dir).step_params(params.STEP))
    command = torchrun_command(params, params_file)
    logger.info("launching: %s", " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:  # pass the training's own log through (it is also in logs/finetune.log)
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.returncode != 0:
        msg = (f"torchrun exited with status {proc.returncode} (see its output above and logs/finetune.log). "
               "Re-run to resume from the last finished epoch, or set nproc_per_node: 1.")
        raise DistributedRunError(msg)
    return proc.returncode
