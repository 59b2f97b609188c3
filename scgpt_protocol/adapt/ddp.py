"""The process-group primitives of fine-tuning on many GPUs (or CPU processes) with DistributedDataParallel.

The launcher (``torchrun`` and the notebook's) is :mod:`scgpt_protocol.protocol.steps.finetune`.

``torchrun --nproc_per_node=N -m scgpt_protocol finetune params/<scenario> --run-dir runs/<name>`` runs
step 02 in N processes (:func:`run_finetune_step`); the notebook does the same when
``nproc_per_node`` > 1 (:func:`launch_finetune`). Every rank plans the same global batch from
``(seed, epoch)`` and trains on its shard; the loss is scaled so that DDP's averaged gradient equals the
one-process gradient (:mod:`scgpt_protocol.adapt.train`). Rank 0 alone writes files and logs.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["world", "barrier", "DDPClassifier"]


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; a no-op with one process)."""
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


class DDPClassifier(nn.Module):
    """``model.classify`` as a ``forward``, so that DistributedDataParallel's hooks fire."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.model.classify(gene_ids, values, padding_mask)


def start_process_group() -> torch.device | None:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); the device of this rank, None on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    torch.distributed.init_process_group("gloo")
    return None
