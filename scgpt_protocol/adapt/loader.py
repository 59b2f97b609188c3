"""Streaming model inputs for fine-tuning: a ``torch.utils.data`` Dataset over the CSR rows of the prepared data.

The main process plans what to read (which cells, in which order: it depends only on ``(seed, epoch)``) and a
:class:`CellGroups` dataset reads one *group* of rows per item (8 batches' worth, sorted by row for a fast
read), tokenises them and collates them into batches; a ``DataLoader`` runs that in worker processes. The data
stay on disk when the AnnData is backed (``anndata.read_h5ad(path, backed="r")``): each worker opens its own
read-only handle of the file lazily (an HDF5 handle never crosses a fork), and the main process holds only
per-cell vectors (labels, split, a 64-bit key per cell name), so memory does not grow with the number of cells.

Under DistributedDataParallel every rank plans the same global batches and keeps its shard of each
(:class:`GroupPlan` ``rank`` / ``world_size``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..data.matrix import get_matrix
from ..model.tokenize import Batch, collate, length_sorted_batches, tokenize_rows

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["CellGroups", "GroupPlan", "Shard", "make_loader", "default_num_workers", "train_plan", "eval_plan"]

#: a training group holds this many batches; cells of similar length are batched together inside it
GROUP_BATCHES = 8


@dataclass
class GroupPlan:
    """One dataset item: rows (ascending) to read, how to batch them and which shard to keep."""

    rows: np.ndarray
    keys: np.ndarray  # the cells' 64-bit name keys (their random streams)
    epoch: int
    batch_size: int
    batch_order: np.ndarray | None  # training: the order of the group's length-sorted batches; None: evaluation


@dataclass
class Shard:
    """This rank's part of one global batch. ``real`` is False for a rank left without cells (it then runs
    the first cell of the batch with a zero loss, so that every rank takes part in the gradient exchange)."""

    batch: Batch
    global_index: np.ndarray  # rows of the whole global batch (every rank's cells)
    real: bool = True

    def pin_memory(self) -> Shard:
        b = self.batch
        return Shard(Batch(b.gene_ids.pin_memory(), b.values.pin_memory(), b.padding_mask.pin_memory(), b.index),
                     self.global_index, self.real)


class _Shards(list):
    """A group's shards; ``pin_memory`` for the DataLoader's pinning thread."""

    def pin_memory(self) -> _Shards:
        return _Shards(s.pin_memory() for s in self)


def _identity(item: Any) -> Any:
    return item


class CellGroups(torch.utils.data.Dataset):
    """Tokenised, collated batches of a group of rows of ``adata`` (in memory or backed).

    ``dataset[plan]`` with a :class:`GroupPlan` returns a list of :class:`Shard`: training plans give
    batches of ``batch_size`` cells of similar length in ``plan.batch_order``; evaluation plans give
    length-sorted batches in order. With ``world_size`` > 1 each global batch is cut into ``world_size``
    contiguous parts and this rank keeps part ``rank`` (every rank reads and tokenises the whole group).
    """

    def __init__(self, adata: AnnData, *, columns: np.ndarray, col_token_ids: np.ndarray, cls_id: int, pad_id: int,
                 pad_value: float, cls_value: float | None, max_seq_len: int, n_bins: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if adata.isbacked and adata.is_view:
            msg = ("a subset (view) of a backed AnnData was given; training reads rows of the whole file. Pass the "
                   "whole backed AnnData (the split is taken from obs), or load the subset with .to_memory().")
            raise ValueError(msg)
        self.path = str(adata.filename) if adata.isbacked else None
        self._matrix = None if self.path else get_matrix(adata)
        self._handle: Any = None
        self._pid = os.getpid()
        self.columns, self.col_token_ids = columns, col_token_ids
        self.cls_id, self.pad_id, self.pad_value, self.cls_value = cls_id, pad_id, pad_value, cls_value
        self.max_seq_len, self.n_bins, self.seed = max_seq_len, n_bins, seed
        self.rank, self.world_size = rank, world_size

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path:  # a file handle never travels to another process
            state["_matrix"], state["_handle"] = None, None
        return state

    def __len__(self) -> int:  # items are plans, not positions; the sampler gives them
        return 0

    def _x(self) -> Any:
        if self.path is None:
            return self._matrix
        if self._handle is None or self._pid != os.getpid():  # first use in this process: open our own handle
            import h5py

            from ..data.matrix import disk_matrix

            self._handle, self._pid = h5py.File(self.path, "r"), os.getpid()
            self._matrix = disk_matrix(self._handle["X"])
        return self._matrix

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """The CSR rows ``rows`` (ascending), restricted to the matched gene columns."""
        chunk = self._x()[rows]
        chunk = chunk if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
        return sp.csr_matrix(chunk)[:, self.columns]

    def __getitem__(self, plan: GroupPlan) -> list[Shard]:
        cells = tokenize_rows(
            self.read(plan.rows), self.col_token_ids, cell_index=plan.keys, cls_id=self.cls_id,
            pad_value=self.pad_value, cls_value=self.cls_value, max_seq_len=self.max_seq_len, n_bins=self.n_bins,
            seed=self.seed, epoch=plan.epoch,
        )
        lengths = np.array([len(c.gene_ids) for c in cells])
        if plan.batch_order is None:
            batches = length_sorted_batches(lengths, plan.batch_size)
        else:
            by_length = np.argsort(-lengths, kind="stable")
            sorted_batches = [by_length[b : b + plan.batch_size] for b in range(0, len(by_length), plan.batch_size)]
            batches = [sorted_batches[k] for k in plan.batch_order]
        out = _Shards()
        for positions in batches:
            mine, real = positions, True
            if self.world_size > 1 and plan.batch_order is not None:  # evaluation plans are sharded by row
                mine = np.array_split(positions, self.world_size)[self.rank]
                if len(mine) == 0:
                    mine, real = positions[:1], False
            batch = collate([cells[p] for p in mine], plan.rows[mine], pad_id=self.pad_id, pad_value=self.pad_value)
            out.append(Shard(batch, plan.rows[positions], real))
        return out


class _Plans(torch.utils.data.Sampler):
    """The plans of the current pass (set before each iteration: the loader's workers stay up)."""

    def __init__(self) -> None:
        self.plans: list[GroupPlan] = []

    def __iter__(self) -> Iterator[GroupPlan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


class ShardLoader:
    """A DataLoader over :class:`CellGroups`; ``loader(plans)`` iterates the shards of these plans in order."""

    def __init__(self, dataset: CellGroups, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.sampler = dataset, _Plans()
        self.num_workers = num_workers
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=self.sampler, num_workers=num_workers, collate_fn=_identity,
            pin_memory=pin_memory, persistent_workers=num_workers > 0,
            generator=torch.Generator(),  # its seed draw must not move the global RNG (dropout masks)
        )

    def __call__(self, plans: Sequence[GroupPlan]) -> Iterator[Shard]:
        self.sampler.plans = list(plans)
        for shards in self._loader:
            yield from shards


def make_loader(dataset: CellGroups, *, num_workers: int, device: torch.device) -> ShardLoader:
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda")


def default_num_workers(n_cells: int, *, processes_per_node: int = 1) -> int:
    """Data-loading workers when not set: none for small data (< 20,000 cells: starting workers costs more
    than it saves), else ``min(4, cpus per process - 1)``."""
    if n_cells < 20_000:
        return 0
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(0, min(4, cpus // max(processes_per_node, 1) - 1))


def _groups(order: np.ndarray, keys: np.ndarray, rng: np.random.Generator, *, epoch: int,
            batch_size: int) -> list[GroupPlan]:
    group = batch_size * GROUP_BATCHES
    plans = []
    for start in range(0, len(order), group):
        rows = np.sort(order[start : start + group])
        n_batches = -(-len(rows) // batch_size)
        plans.append(GroupPlan(rows, keys[rows], epoch, batch_size, rng.permutation(n_batches)))
    return plans


def train_plan(rows: np.ndarray, keys: np.ndarray, *, seed: int, epoch: int, batch_size: int,
               steps_per_epoch: int | None = None) -> list[GroupPlan]:
    """The groups of epoch ``epoch``: a function of ``(seed, epoch)`` only.

    ``steps_per_epoch`` None: every row once, in a random order. Else ``steps_per_epoch * batch_size`` cells
    taken in turn from a stream of passes over ``rows`` (pass ``k`` in the random order of ``(seed, k)``), so
    that successive epochs see different cells and every cell is seen before any is seen twice.
    """
    if steps_per_epoch is None:
        rng = np.random.default_rng((seed, epoch, 7))
        return _groups(rows[rng.permutation(len(rows))], keys, rng, epoch=epoch, batch_size=batch_size)
    n, want = len(rows), steps_per_epoch * batch_size
    start = (epoch - 1) * want
    parts, position = [], start
    while position < start + want:
        k, offset = divmod(position, n)
        take = min(n - offset, start + want - position)
        order = np.random.default_rng((seed, k, 11)).permutation(n)
        parts.append(rows[order[offset : offset + take]])
        position += take
    rng = np.random.default_rng((seed, epoch, 7))
    return _groups(np.concatenate(parts), keys, rng, epoch=epoch, batch_size=batch_size)


def eval_plan(rows: np.ndarray, keys: np.ndarray, *, batch_size: int, chunk_size: int = 4096,
              rank: int = 0, world_size: int = 1) -> list[GroupPlan]:
    """Consecutive chunks of ``rows`` (this rank's ``rows[rank::world_size]``) for prediction (epoch 0)."""
    rows = np.asarray(rows)[rank::world_size]
    return [GroupPlan(rows[s : s + chunk_size], keys[rows[s : s + chunk_size]], 0, batch_size, None)
            for s in range(0, len(rows), chunk_size)]
