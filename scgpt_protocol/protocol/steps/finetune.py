"""Step 02's glue to its run folder, beyond the training loop (:func:`~scgpt_protocol.adapt.train.finetune`).

* :func:`begin_training` -- 02 run again in the same run folder: continue the saved training, or set it aside
  and start anew. A person edits the parameters cell of ``02_finetune`` and runs it again. With the same
  parameters (``epochs``, ``device`` and the like may change) the saved training continues: the log says
  "resumed from epoch N" or "already trained: nothing to do". With other parameters, other prepared data, or
  ``resume=False``, the saved training (``model/``, ``train/``, its figure) moves to
  ``run_dir/stale/02_finetune-<UTC time>/`` and a new one starts; 03, which read the old model, is set aside the
  same way the headless runner does it (:func:`~scgpt_protocol.protocol.run.manifest.set_stale`). Nothing is
  deleted.
* :func:`finetune_inputs` / :func:`train_model` -- what 02 trains on, read from the run folder, and its training
  as the parameters ask (one strategy, several compared, or many processes).
* :func:`run_finetune_step` -- the step from its run folder, as the notebook runs it, also in many processes:
  ``torchrun --nproc_per_node=N -m scgpt_protocol finetune ...`` runs it in each; the notebook launches the same
  when ``nproc_per_node`` > 1 (:func:`launch_finetune`). The process-group primitives the training loop uses
  are in :mod:`scgpt_protocol.adapt.ddp`.
* :func:`save_temperature` -- after training, the model's temperature fitted on the validation cells and
  recorded in its manifest (03 takes it from there).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ...adapt.cells import data_fingerprint
from ...adapt.ddp import barrier, start_process_group, world
from ...adapt.saved import saved_training_key, training_changes, training_key
from ...core.errors import ScGPTProtocolError
from ...core.io import read_json, utc_stamp
from ...core.layout import RunLayout
from ...core.log import DETAIL
from ..display.banners import Banner
from ..run.manifest import set_stale

if TYPE_CHECKING:
    from ...adapt.train import TrainResult
    from ...core.params import FinetuneParams

logger = logging.getLogger(__name__)

__all__ = ["FinetuneInputs", "finetune_inputs", "train_model", "begin_training", "run_finetune_step",
           "launch_finetune", "torchrun_command", "save_temperature", "DistributedRunError"]

_STEP = "02_finetune"


def begin_training(params: FinetuneParams, layout: RunLayout, adata: Any, *, label_key: str,
                   categories: Sequence[str], base_checkpoint: Mapping[str, Any]) -> Banner:
    """Before 02 trains: compare ``params`` (recipe resolved) and the data with the training saved in
    ``layout``; when they differ (or ``params.resume`` is False) set that training and 03 aside.

    Records the training about to run in ``train/training.json``. Returns a banner: a new training (none
    saved), the saved one continued (same parameters), or what was set aside and why.
    """
    params = params.with_recipe(base_checkpoint.get("kind"))
    now = training_key(params, data_fingerprint(adata, label_key, list(categories),
                                                base_sha256=base_checkpoint.get("sha256")))
    saved = saved_training_key(layout)
    changes = [] if saved is None else training_changes(saved, now)
    if saved is not None and not params.resume and not changes:
        changes = ["resume: False (start this training over)"]
    if changes:
        banner = _set_aside(layout, changes)
    elif saved is None:
        banner = Banner("", "A new training (none is saved in this run_dir).", level="info")
    else:
        banner = Banner("", "The same parameters and data as the training saved in train/: it continues where it "
                        "stopped (a changed parameter would start a new one).", level="info")
    layout.train_dir.mkdir(parents=True, exist_ok=True)
    layout.write_json(layout.train_dir / "training.json", {"key": now, "params": params.to_dict()})
    return banner


def _set_aside(layout: RunLayout, changes: list[str]) -> Banner:
    folder, moved = layout.set_aside(_STEP, utc_stamp(), outputs_only=True)  # its report, log, params are being written
    where = folder.relative_to(layout.run_dir)
    logger.warning("a new training starts: %s differs from the saved training. The old one was moved to %s "
                   "(nothing deleted).", "; ".join(changes), folder)
    stale = _mark_dependents(layout, changes)
    text = (f"The parameters differ from the saved training ({'; '.join(changes)}), so a new training starts. "
            f"The old one ({', '.join(str(m) for m in moved) or 'nothing'}) was moved to {where}/ (nothing deleted).")
    if stale:
        text += (f" {', '.join(stale)} read the old model: stale, its files moved under stale/ too; run it again "
                 "after this notebook.")
    return Banner("A new training.", text)


def _mark_dependents(layout: RunLayout, changes: list[str]) -> list[str]:
    """Set aside the steps that read 02's output and mark them stale in the run manifest (when there is one
    that no headless run is writing right now)."""
    manifest = read_json(layout.run_manifest, default=None)
    work = manifest if manifest is not None else {"steps": {}}
    marked = set_stale(layout, work, _STEP, changes)
    if manifest is not None and manifest.get("status") != "running" and marked:  # the runner keeps its own
        if manifest.get("status") == "finished":
            manifest["status"] = "partial"
        layout.write_json(layout.run_manifest, manifest)
    return marked


def save_temperature(layout: RunLayout, params: FinetuneParams) -> dict[str, Any]:
    """02: fit the fine-tuned model's temperature on the validation cells and record it in its manifest.

    Returns the record (``temperature``, ECE and NLL of the validation cells before and after).
    """
    from ...adapt.saved import load_finetuned, save_calibration, trained_max_seq_len
    from ...annotate.calibration import fit_validation_temperature
    from ...pp.io import read_prepared

    model, manifest = load_finetuned(layout.model_dir, device=params.device)
    adata = read_prepared(layout, backed=True)
    record = fit_validation_temperature(model, adata, manifest, params, trained_max_seq_len(manifest, None))
    save_calibration(layout.model_dir, record)
    logger.info("calibration: temperature %.3f fitted on %d validation cells (ECE %.3f -> %.3f)",
                record["temperature"], record["n_cells"], record["ece_before"], record["ece_after"],
                extra=DETAIL)  # the log only: the notebook prints it
    return record


class DistributedRunError(ScGPTProtocolError, RuntimeError):
    """The torchrun training launched by the notebook failed."""


@dataclass
class FinetuneInputs:
    """What step 02 trains on (:func:`finetune_inputs`)."""

    adata: Any  # the prepared cells: streamed from disk, or an AnnData in memory to compare strategies
    label_key: str
    categories: list[str]
    checkpoint: dict[str, Any]  # 01's checkpoint record (checkpoint, kind, sha256)
    model: Any  # the pretrained model with a new head for the categories (None in a comparison of strategies)


def finetune_inputs(params: FinetuneParams, layout: RunLayout) -> FinetuneInputs:
    """Step 02's inputs from its run folder, the one way the notebook and :func:`run_finetune_step` read them: the
    prepared cells (``X`` and ``obs`` stay on disk; read into memory when ``params.strategies`` compares several),
    01's labels and checkpoint records, and the pretrained model with a head of ``len(categories)`` classes (not
    loaded for a comparison of strategies, which loads one per strategy)."""
    from ...model.checkpoint import load_model
    from ...pp.io import open_prepared_cells, read_checkpoint_record, read_labels, read_prepared

    adata = read_prepared(layout) if params.strategies else open_prepared_cells(layout)
    labels, record = read_labels(layout), read_checkpoint_record(layout)
    model = None if params.strategies else load_model(record["checkpoint"], n_classes=len(labels["categories"]),
                                                      head_seed=params.seed, device=params.device)
    return FinetuneInputs(adata, labels["label_key"], list(labels["categories"]), record, model)


def train_model(params: FinetuneParams, layout: RunLayout, inputs: FinetuneInputs) -> Any:
    """Step 02's training as ``params`` asks: several strategies compared on one split (returns the
    :class:`~scgpt_protocol.tl.AnnotationRunner`), ``nproc_per_node`` > 1 processes under torchrun
    (:func:`launch_finetune`; returns its exit status), or one :func:`~scgpt_protocol.adapt.train.finetune`
    (returns its :class:`~scgpt_protocol.adapt.train.TrainResult`). Results land in ``layout`` either way."""
    from ...adapt.train import finetune
    from ...tl.annotation import compare_strategies

    if params.strategies:
        return compare_strategies(inputs.adata, params, layout, label_key=inputs.label_key,
                                  categories=inputs.categories, base_checkpoint=inputs.checkpoint)
    if params.nproc_per_node > 1:  # torchrun: one process per GPU, results in run_dir as below
        return launch_finetune(params)
    return finetune(inputs.model, inputs.adata, params, label_key=inputs.label_key, categories=inputs.categories,
                    layout=layout, base_checkpoint=inputs.checkpoint)


def run_finetune_step(params: FinetuneParams) -> TrainResult:
    """Step 02 from its run folder, as the notebook does it (:func:`finetune_inputs`, then
    :func:`~scgpt_protocol.adapt.train.finetune` with the run's layout). Under torchrun (``WORLD_SIZE`` > 1) each
    process joins the process group first, trains on ``cuda:LOCAL_RANK`` (or the CPU with gloo), and only
    rank 0 writes logs and artifacts."""
    from ...adapt.train import finetune
    from ...core.log import setup_logging
    from ...core.lock import held_lock
    from ...pp.io import read_checkpoint_record

    took = held_lock(params.run_dir) is None
    device = start_process_group()
    try:
        rank, size = world()
        if device is not None:
            params = dataclasses.replace(params, device=str(device))
        elif size > 1:
            params = dataclasses.replace(params, device="cpu")
        layout = RunLayout(params.run_dir)
        params = params.with_recipe(read_checkpoint_record(layout).get("kind"))  # None: the checkpoint's recipe
        if rank == 0:  # the one writer: holds the run folder (or shares the lock of the notebook that launched it)
            layout.hold(params.STEP).make_dirs()
            setup_logging(layout, params.STEP)
        else:
            logging.getLogger("scgpt_protocol").setLevel(logging.WARNING)
        barrier()
        if size > 1:
            logger.info("DistributedDataParallel: %d processes (%s), %s cells per step, about %d per process",
                        size, torch.distributed.get_backend(), params.batch_size, -(-params.batch_size // size))
        inputs = finetune_inputs(dataclasses.replace(params, strategies=None), layout)
        result = finetune(inputs.model, inputs.adata, params, label_key=inputs.label_key,
                          categories=inputs.categories, layout=layout, base_checkpoint=inputs.checkpoint)
        inputs.adata.close()
        return result
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if took:
            RunLayout(params.run_dir).release()


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

    from ...core.lock import held_lock, hold_run_dir

    layout = RunLayout(params.run_dir)
    took = held_lock(layout.run_dir) is None  # a notebook holds it already; a Python caller may not
    lock = hold_run_dir(layout.run_dir, step="02_finetune", holder="launch_finetune")
    try:
        return _run_torchrun(params, layout, lock)
    finally:
        if took:
            lock.release()


def _run_torchrun(params: FinetuneParams, layout: RunLayout, lock: Any) -> int:
    from ...core.lock import inherit_env, shared_fds

    params_file = params.to_yaml(layout.step_params(params.STEP))
    command = torchrun_command(params, params_file)
    logger.info("launching: %s", " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **inherit_env(lock)}  # the processes share the caller's lock
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          pass_fds=shared_fds(lock)) as proc:
        for line in proc.stdout:  # pass the training's own log through (it is also in logs/finetune.log)
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.returncode != 0:
        msg = (f"torchrun exited with status {proc.returncode} (see its output above and logs/finetune.log). "
               "Re-run to resume from the last finished epoch, or set nproc_per_node: 1.")
        raise DistributedRunError(msg)
    return proc.returncode
