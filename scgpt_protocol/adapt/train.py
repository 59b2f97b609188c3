"""Fine-tuning for cell-type annotation: the published recipe by default, and what it lacked.

Follows the official annotation tutorial (and the published fine-tuning protocol): cross-entropy on the
``<cls>`` classifier only, ``<cls>`` fed with the value 0 as the official fine-tuning tokeniser does
(:data:`~scgpt_protocol.tokenize.FINETUNE_CLS_VALUE`), Adam at lr 1e-4 with ``eps=1e-4`` whenever ``amp``
is set (the default; on every device, as the official loop does), StepLR gamma 0.9 per epoch, gradient
clipping 1.0, batch 32, mixed precision on GPU, no layer frozen (strategy ``full``).

The protocol's choice: genes are resampled every epoch for cells with more than ``max_seq_len - 1``
expressed genes (the published protocol's collator resamples every batch; the tutorial samples once).

Ours (off or neutral by default unless said): every adaptation strategy of
:mod:`scgpt_protocol.strategies`; optional weight decay, learning-rate warm-up and class-weighted loss;
the best epoch chosen by validation macro-F1 (the published code keeps the lowest validation loss) with
early stopping after ``patience`` epochs without improvement (on by default, 3); a resumable state after
every epoch (a Colab disconnect costs at most one epoch); curves.

Determinism: the data order of epoch ``e`` depends only on ``(seed, e)``, each cell's gene sampling on
``(seed, e, cell name)``, new modules (the head included) are initialised from ``seed``, and the torch
RNG is re-seeded at each epoch start, so an interrupted and resumed run ends where an uninterrupted one does.
The number of data-loading workers does not change the result.

Scale: the data stream from the prepared file (:mod:`scgpt_protocol.loader`: read it with
``read_prepared(layout, backed=True)``); memory holds per-cell labels and keys, not the matrix.
``steps_per_epoch`` bounds an epoch on an atlas. Under torchrun (:mod:`scgpt_protocol.distributed`) each
of the ``world_size`` processes trains on its shard of every global batch of ``batch_size`` cells; the
loss of a shard is its sum times ``world_size`` over the global batch's cell count (or class-weight sum),
so DDP's averaged gradient is the one-process gradient. Rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.device import PeakMemory, autocast, resolve_device, resolve_precision
from ..core.errors import format_keys
from ..core.layout import RunLayout
from ..core.log import progress
from ..core.params import FinetuneParams
from ..data.matrix import check_expression
from ..model.checkpoint import model_checkpoint_record, torch_save_atomic
from ..model.scgpt import ProbeHead, ScGPT
from ..model.tokenize import cell_keys
from ..model.vocab import FINETUNE_CLS_VALUE, match_genes
from .ddp import Classify, all_reduce_sum, barrier, world
from .loader import CellGroups, ShardLoader, default_num_workers, eval_plan, make_loader, train_plan
from .saved import cpu_copy, save_finetuned

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "finetune", "strategy_config", "data_fingerprint", "adam_eps"]

#: parameters that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"epochs", "resume", "device", "run_dir", "strategies", "mount_drive", "num_workers",
                      "nproc_per_node"}


@dataclass
class TrainResult:
    strategy: str
    history: pd.DataFrame
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    seconds: float
    peak_memory_bytes: int
    trainable_parameters: int
    total_parameters: int
    model_dir: Path | None = None
    precision: str = "fp32"  # what training and validation ran in (fp32, bf16 or fp16)
    world_size: int = 1  # processes (GPUs) that trained together (DistributedDataParallel)
    per_device_batch_size: int = 0  # cells per process and step: ceil(batch_size / world_size)
    num_workers: int = 0  # data-loading worker processes per training process

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "history"}
        out["model_dir"] = str(self.model_dir) if self.model_dir else None
        return out


def strategy_config(params: FinetuneParams, strategy: str | None = None) -> Any:
    """The strategy's config dataclass from the flat fine-tuning parameters (None where it has none)."""
    from . import strategies as st

    strategy = strategy or params.strategy
    if strategy == "lora":
        return st.LoRAConfig(r=params.lora_r, alpha=params.lora_alpha)
    if strategy == "adapter":
        return st.AdapterConfig(bottleneck=params.adapter_bottleneck)
    if strategy == "prefix_tuning":
        return st.PrefixTuningConfig(n_prefix=params.prefix_length)
    if strategy == "ia3":
        return st.IA3Config()
    return None


def adam_eps(amp: bool, eps: float | None = None) -> float:
    """Adam's eps: ``eps`` when given, else as the official fine-tuning loop sets it: 1e-4 whenever ``amp``
    is on, on every device (so a result does not depend on the GPU generation or on running on the CPU),
    else PyTorch's 1e-8."""
    if eps is not None:
        return float(eps)
    return 1e-4 if amp else 1e-8


def training_precision(params: FinetuneParams, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: ``params.precision`` on ``device``, fp32 when ``amp`` is off."""
    return resolve_precision(params.precision if params.amp else "fp32", device)


def _class_weights(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def set_train_mode(model: ScGPT, strategy: str) -> None:
    """Dropout where weights are trained; a frozen encoder runs in eval mode (fixed features)."""
    if strategy in ("head", "probe"):
        model.eval()
        if strategy == "head":
            model.cls_decoder.train()
    else:
        model.train()


@dataclass
class _Stream:
    """What the training loop reads the data through: per-cell keys and the loader (one per finetune call)."""

    loader: ShardLoader
    n_classes: int


def _stream(adata: AnnData, model: ScGPT, params: FinetuneParams, device: torch.device, n_cells: int,
            n_classes: int) -> tuple[_Stream, np.ndarray]:
    match = match_genes(adata, model.vocab)
    cfg = model.config
    rank, size = world()
    dataset = CellGroups(
        adata, columns=match.columns, col_token_ids=match.token_ids[match.columns], cls_id=model.vocab["<cls>"],
        pad_id=cfg.pad_token_id, pad_value=cfg.pad_value, cls_value=model.cls_value, max_seq_len=params.max_seq_len,
        n_bins=cfg.n_bins, seed=params.seed, rank=rank, world_size=size,
    )
    workers = params.num_workers if params.num_workers is not None else default_num_workers(
        n_cells, processes_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", size)))
    return _Stream(make_loader(dataset, num_workers=workers, device=device), n_classes), _name_keys(adata.obs_names)


def _logits(model: ScGPT, stream: _Stream, rows: np.ndarray, keys: np.ndarray, params: FinetuneParams,
            device: torch.device) -> np.ndarray:
    """Logits of ``rows`` (in that order); under DDP each rank computes a share and they are summed."""
    model.eval()
    rank, size = world()
    position = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    logits = torch.zeros((len(rows), stream.n_classes), dtype=torch.float32)
    plans = eval_plan(rows, keys, batch_size=params.batch_size * 2, rank=rank, world_size=size)
    with torch.inference_mode(), autocast(device, training_precision(params, device)):  # as predict() does
        for shard in stream.loader(plans):
            batch = shard.batch.to(device)
            out = model.classify(batch.gene_ids, batch.values, batch.padding_mask).float().cpu()
            logits[position[batch.index]] = out
    if size > 1:  # every rank ends with every logit (the same early-stopping decision everywhere)
        dev = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        logits = all_reduce_sum(logits.to(dev)).cpu()
    return logits.numpy()


def _val_metrics(logits: np.ndarray, codes: np.ndarray, loss_fn: nn.Module) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(1)
    return {
        "val_loss": float(loss_fn(torch.from_numpy(logits), torch.from_numpy(codes))),
        "val_macro_f1": float(f1_score(codes, pred, average="macro", zero_division=0)),
        "val_accuracy": float(accuracy_score(codes, pred)),
    }


def data_fingerprint(adata: AnnData, label_key: str, categories: Sequence[str], split_key: str = "split",
                     base_sha256: str | None = None) -> str:
    """sha256 of what a model is trained on: genes, classes, train/val cells and their labels, base model.

    A resumed or reused training must match it: after re-running 01 with another split, an old model
    would otherwise be scored on cells it was trained on.
    """
    import hashlib

    split = _as_categorical(_obs_column(adata, split_key))
    fit = np.isin(split.codes, np.flatnonzero(split.categories.isin(["train", "val"])))
    labels = _as_categorical(_obs_column(adata, label_key))
    label_names = np.asarray(labels.categories.astype(str), dtype=object)
    split_names = np.asarray(split.categories.astype(str), dtype=object)
    names, step = adata.obs_names, 65536
    slices = [(i, np.flatnonzero(fit[i : i + step])) for i in range(0, len(fit), step)]
    slices = [(i, rows) for i, rows in slices if len(rows)]
    per_cell = (
        lambda i, rows: map(str, np.asarray(names[i : i + step])[rows]),  # names read by contiguous slices
        lambda i, rows: split_names[split.codes[i + rows]],
        lambda i, rows: label_names[labels.codes[i + rows]],
    )
    digest = hashlib.sha256()
    # the bytes of "\x1f".join(part) for each part, hashed a slice of cells at a time (flat memory)
    for part in ([map(str, adata.var_names)], [categories], *([fn(i, rows) for i, rows in slices] for fn in per_cell),
                 [[str(base_sha256)]]):
        first = True
        for piece in part:
            text = "\x1f".join(piece)
            digest.update(("" if first else "\x1f").encode() + text.encode())
            first = False
        digest.update(b"\x1e")
    return digest.hexdigest()


def _obs_keys(adata: Any) -> list[str]:
    return list(adata.obs_keys) if hasattr(adata, "obs_column") else list(adata.obs.columns)


def _obs_column(adata: Any, key: str) -> pd.Series:
    """``obs[key]`` of an AnnData, or read from the file for :class:`~scgpt_protocol.backed.BackedCells`."""
    return adata.obs_column(key) if hasattr(adata, "obs_column") else adata.obs[key]


def _name_keys(names: Any, step: int = 65536) -> np.ndarray:
    """:func:`~scgpt_protocol.tokenize.cell_keys` of every cell, names read a slice at a time."""
    return np.concatenate([cell_keys(names[i : i + step]) for i in range(0, len(names), step)] or
                          [np.zeros(0, dtype=np.uint64)])


def _as_categorical(column: pd.Series) -> pd.Categorical:
    """``column`` as a Categorical (a categorical column as it is: no string per cell is made)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.array
    return pd.Categorical(column.astype(str))


def _comparable(params: FinetuneParams, strategy: str, fingerprint: str) -> dict[str, Any]:
    out = {k: v for k, v in params.to_dict().items() if k not in _RESUMABLE_CHANGES}
    out["strategy"] = strategy
    out["data"] = fingerprint
    return out


def _codes_and_splits(adata: AnnData, label_key: str, split_key: str, categories: list[str]) -> tuple:
    for key in (label_key, split_key):
        if key not in _obs_keys(adata):
            msg = f"{key!r} not in adata.obs (columns: {format_keys(_obs_keys(adata))}); run 01_preprocess first."
            raise KeyError(msg)
    labels = _as_categorical(_obs_column(adata, label_key))
    present = labels.categories[np.unique(labels.codes[labels.codes >= 0])].astype(str)
    unknown = sorted(set(present) - set(categories)) + (["<missing>"] if (labels.codes < 0).any() else [])
    if unknown:
        msg = f"labels {unknown[:5]} of obs[{label_key!r}] are not among the run's categories {categories}."
        raise ValueError(msg)
    position = {c: i for i, c in enumerate(categories)}
    lookup = np.array([position.get(c, -1) for c in labels.categories.astype(str)] or [0], dtype=np.int64)
    codes = lookup[labels.codes]
    split = _as_categorical(_obs_column(adata, split_key))
    split_code = {str(c): i for i, c in enumerate(split.categories)}
    train_rows = np.flatnonzero(split.codes == split_code.get("train", -2))
    val_rows = np.flatnonzero(split.codes == split_code.get("val", -2))
    if len(train_rows) == 0 or len(val_rows) == 0:
        found = dict(zip(split.categories.astype(str), np.bincount(split.codes[split.codes >= 0],
                                                                  minlength=len(split.categories))))
        msg = f"obs[{split_key!r}] needs 'train' and 'val' cells; found {found}."
        raise ValueError(msg)
    return codes, train_rows, val_rows


def _fit_probe(model: ScGPT, stream: _Stream, keys: np.ndarray, codes: np.ndarray, train_rows: np.ndarray,
               params: FinetuneParams, n_classes: int) -> dict[str, float]:
    """Logistic regression on frozen, L2-normalised ``<cls>`` embeddings, installed as a ProbeHead."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    device = next(model.parameters()).device
    features = np.zeros((len(train_rows), model.config.d_model), dtype=np.float32)  # the regression's input
    position = np.full(int(train_rows.max()) + 1, -1, dtype=np.int64)
    position[train_rows] = np.arange(len(train_rows))
    model.eval()
    plans = eval_plan(train_rows, keys, batch_size=params.batch_size * 2)  # every rank: the same features
    with torch.inference_mode(), autocast(device, training_precision(params, device)):
        for shard in stream.loader(plans):
            batch = shard.batch.to(device)
            cell = model.cell_embedding(batch.gene_ids, batch.values, batch.padding_mask).float()
            features[position[batch.index]] = torch.nn.functional.normalize(cell, dim=1).cpu().numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=params.seed,
                             class_weight="balanced" if params.class_weighted else None)
    clf.fit(features, codes[train_rows])
    weight = np.zeros((n_classes, model.config.d_model), dtype=np.float32)
    bias = np.full(n_classes, -1e4, dtype=np.float32)  # a class absent from train is never predicted
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # sklearn's binary form: one row for the second class
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    head = ProbeHead(model.config.d_model, n_classes)
    with torch.no_grad():
        head.out_layer.weight.copy_(torch.from_numpy(weight))
        head.out_layer.bias.copy_(torch.from_numpy(bias))
    model.cls_decoder = head.to(next(model.parameters()).device)
    model.requires_grad_(False)
    proba = clf.predict_proba(features)
    return {"train_loss": float(log_loss(codes[train_rows], proba, labels=clf.classes_))}


def finetune(
    model: ScGPT,
    adata: AnnData,
    params: FinetuneParams,
    *,
    label_key: str,
    categories: Sequence[str],
    layout: RunLayout | None = None,
    strategy: str | None = None,
    base_checkpoint: Mapping[str, Any] | None = None,
    split_key: str = "split",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Adapt ``model`` to the ``train`` cells of ``adata`` with one strategy, selecting the epoch on ``val``.

    Parameters
    ----------
    model
        From :func:`~scgpt_protocol.load_model` (a head with ``len(categories)`` outputs is added if
        missing). It is adapted in place and ends with the weights of the best epoch.
    adata
        Prepared data (01_preprocess): non-negative values in ``X``, labels in ``obs[label_key]``,
        ``obs[split_key]`` with ``train`` and ``val`` cells.
    params
        :class:`~scgpt_protocol.params.FinetuneParams` (training settings and strategy options).
    categories
        Class names; class ``i`` is ``categories[i]``.
    layout
        With a layout: the resumable state goes to ``layout.train_dir``, the history to
        ``layout.history`` and the best model to ``layout.model_dir`` (:func:`save_finetuned`).
        Without: nothing is written (comparisons keep models in memory).
    strategy
        Overrides ``params.strategy``.
    base_checkpoint
        ``{"checkpoint": path, "sha256": ...}`` of the pretrained model, recorded with the saved model.
    on_epoch_end
        Called with the epoch's history row after its state is saved.
    """
    from . import strategies as st

    start_time = time.perf_counter()
    strategy = strategy or params.strategy
    base_checkpoint = base_checkpoint or model_checkpoint_record(model)
    categories = list(categories)
    codes, train_rows, val_rows = _codes_and_splits(adata, label_key, split_key, categories)
    check_expression(adata)
    device = resolve_device(params.device)
    if model.cls_decoder is None or model.cls_decoder.out_layer.out_features != len(categories):
        with torch.random.fork_rng(devices=[]):  # a new head starts the same for a seed
            torch.manual_seed(params.seed)
            model.add_classifier(len(categories))
    model.cls_value = FINETUNE_CLS_VALUE  # trained, validated, saved and predicted with <cls> = 0, as published
    model.to(device)
    weights = _class_weights(codes[train_rows], len(categories)) if params.class_weighted else None
    val_loss_fn = nn.CrossEntropyLoss(weight=weights)
    rank, size = world()
    stream, keys = _stream(adata, model, params, device, len(train_rows) + len(val_rows), len(categories))

    if strategy == "probe":
        with PeakMemory(device) as memory:
            row = {"epoch": 1, **_fit_probe(model, stream, keys, codes, train_rows, params, len(categories)),
                   "lr": 0.0}
            row.update(_val_metrics(_logits(model, stream, val_rows, keys, params, device), codes[val_rows],
                                    val_loss_fn))
        row.update(best=True, seconds=round(time.perf_counter() - start_time, 2), stopped=False)
        history, best_epoch, best_score, stopped_early, resumed = [row], 1, row["val_macro_f1"], False, None
        logger.info("probe: val_macro_f1 %.4f  val_accuracy %.4f", row["val_macro_f1"], row["val_accuracy"])
    else:
        with torch.random.fork_rng(devices=[]):  # new modules start the same for a seed
            torch.manual_seed(params.seed)
            st.apply_strategy(model, strategy, strategy_config(params, strategy))
        model.to(device)
        with PeakMemory(device) as memory:
            fingerprint = data_fingerprint(adata, label_key, categories, split_key, base_checkpoint.get("sha256"))
            history, best_epoch, best_score, stopped_early, resumed = _train_epochs(
                model, stream, keys, params, strategy, codes, train_rows, val_rows, weights, val_loss_fn,
                device, layout if rank == 0 else None, on_epoch_end, fingerprint,
                state_path=layout.train_state if layout is not None else None,
            )
    n_trainable, n_total = st.count_parameters(model)
    if strategy == "probe":
        n_trainable = sum(p.numel() for p in model.cls_decoder.parameters())
    result = TrainResult(
        strategy=strategy, history=pd.DataFrame(history), best_epoch=best_epoch, best_val_macro_f1=best_score,
        epochs_run=len(history), stopped_early=stopped_early, resumed_from_epoch=resumed,
        seconds=round(time.perf_counter() - start_time, 1), peak_memory_bytes=int(memory.peak),
        trainable_parameters=n_trainable, total_parameters=n_total, precision=training_precision(params, device),
        world_size=size, per_device_batch_size=-(-params.batch_size // size), num_workers=stream.loader.num_workers,
    )
    del stream  # stops the loader's workers
    model.eval()
    if layout is not None:
        result.model_dir = layout.model_dir
    if layout is not None and rank == 0:
        layout.write_csv(result.history, layout.history, index=False)
        result.model_dir = save_finetuned(
            model, layout.model_dir, strategy=strategy, config=strategy_config(params, strategy),
            label_key=label_key, categories=categories, genes=list(adata.var_names),
            base_checkpoint=base_checkpoint, extra={"training": params.to_dict(), "best_epoch": best_epoch,
                                                    "val_macro_f1": best_score, "precision": result.precision,
                                                    "world_size": size,
                                                    "per_device_batch_size": result.per_device_batch_size},
        )
        layout.write_json(layout.train_summary, result.summary())
    barrier()  # the other ranks return once the model is written
    logger.info("%s: best epoch %d (val macro-F1 %.4f), %s trainable parameters, %.0f s, %s",
                strategy, best_epoch, best_score, f"{n_trainable:,}", result.seconds, result.precision)
    return result


def _train_epochs(model: ScGPT, stream: _Stream, keys: np.ndarray, params: FinetuneParams, strategy: str,
                  codes: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, weights: torch.Tensor | None,
                  val_loss_fn: nn.Module, device: torch.device, layout: RunLayout | None,
                  on_epoch_end: Callable[[dict[str, Any]], None] | None, fingerprint: str,
                  state_path: Path | None) -> tuple:
    """The epochs; ``layout`` (rank 0 only) receives the state and history, ``state_path`` is read to resume."""
    from . import strategies as st

    rank, size = world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    precision = training_precision(params, device)  # autocast dtype; fp16 also gets a GradScaler
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay,
                                  eps=adam_eps(params.amp, params.adam_eps))
    steps_per_epoch = params.steps_per_epoch or math.ceil(len(train_rows) / params.batch_size)
    warmup = round(params.warmup_ratio * steps_per_epoch * params.epochs)

    def lr_factor(step: int) -> float:  # linear warm-up, then StepLR(gamma) per epoch
        return min(1.0, (step + 1) / warmup if warmup else 1.0) * params.lr_gamma ** (step // steps_per_epoch)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(device.type if precision == "fp16" else "cuda", enabled=precision == "fp16")
    # a shard's loss: its sum x world_size / the global batch's count (or class-weight sum); DDP averages
    # the gradients over ranks, so the step is that of one process on the whole batch, even for uneven shards
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None, reduction="sum")
    weight_of = weights.numpy().astype(np.float64) if weights is not None else None
    classify: Callable[..., torch.Tensor] = model.classify
    if size > 1:
        # unused trainable weights (decoders that classify() does not call) must not stall the gradient exchange
        classify = nn.parallel.DistributedDataParallel(
            Classify(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    history: list[dict[str, Any]] = []
    best_epoch, best_score, best_state, stale, first_epoch, resumed = 0, -1.0, None, 0, 1, None
    if state_path is not None and state_path.exists() and params.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved, now = state["params"], _comparable(params, strategy, fingerprint)
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "data"}
            what = f"other parameters {diff} (saved, now)" if diff else (
                "other data: the prepared cells, split, labels or base checkpoint changed (01 ran again?)")
            msg = (
                f"{state_path} holds a training with {what}; resume would mix them. Use a new run_dir, "
                "or set resume=False to start this training over."
            )
            raise ValueError(msg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16 scaling (CPU, bf16)
            scaler.load_state_dict(state["scaler"])
        history, best_epoch, best_score = state["history"], state["best_epoch"], state["best_score"]
        best_state, stale = state["best_state"], state["stale"]
        first_epoch = resumed = state["epoch"] + 1
        logger.info("resuming from %s: epoch %d done, best epoch %d (val macro-F1 %.4f)",
                    state_path, state["epoch"], best_epoch, best_score)
        del state
    barrier()  # every rank has read the state before rank 0 writes the next one
    stopped_early = bool(history) and history[-1].get("stopped", False)

    for epoch in range(first_epoch, params.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        torch.manual_seed(params.seed * 100_003 + epoch + 7_919 * rank)  # rank 0: as with one process
        set_train_mode(model, strategy)
        lr = optimizer.param_groups[0]["lr"]
        total_loss, seen = 0.0, 0
        plans = train_plan(train_rows, keys, seed=params.seed, epoch=epoch, batch_size=params.batch_size,
                           steps_per_epoch=params.steps_per_epoch)
        n_cells = sum(len(p.rows) for p in plans)
        for shard in progress(stream.loader(plans), total=n_cells, desc=f"{strategy} epoch {epoch}/{params.epochs}",
                              unit="cells", size=lambda sh: len(sh.global_index)):
            batch = shard.batch.to(device)
            target = torch.from_numpy(codes[batch.index]).to(device)
            global_codes = codes[shard.global_index]
            denom = float(weight_of[global_codes].sum()) if weight_of is not None else float(len(global_codes))
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                logits = classify(batch.gene_ids, batch.values, batch.padding_mask).float()
            loss = loss_fn(logits, target) * (size / max(denom, 1e-12))
            if not shard.real:  # a rank without cells in this batch: it joins the exchange with a zero gradient
                loss = loss * 0.0
            value = loss.detach().clone()  # the global batch's loss, the same on every rank
            if size > 1:
                value = all_reduce_sum(value if device.type == "cuda" else value.cpu()) / size
            if not torch.isfinite(value):
                msg = f"the training loss became {value.item()} at epoch {epoch}; lower lr (now {params.lr})."
                raise FloatingPointError(msg)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if params.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += value.item() * len(shard.global_index)
            seen += len(shard.global_index)
        row = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "lr": lr}
        row.update(_val_metrics(_logits(model, stream, val_rows, keys, params, device), codes[val_rows],
                                val_loss_fn))
        improved = row["val_macro_f1"] > best_score
        if improved:
            best_epoch, best_score, stale = epoch, row["val_macro_f1"], 0
            best_state = cpu_copy(st.trainable_state_dict(model))
        else:
            stale += 1
        row["best"] = improved
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["stopped"] = params.patience > 0 and stale >= params.patience and epoch < params.epochs
        history.append(row)
        logger.info(
            "%s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_macro_f1 %.4f  val_accuracy %.4f  lr %.2e  (%.1f s)%s",
            strategy, epoch, params.epochs, row["train_loss"], row["val_loss"], row["val_macro_f1"],
            row["val_accuracy"], lr, row["seconds"], "  *best*" if improved else "",
        )
        if layout is not None and state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch_save_atomic({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
                "best_epoch": best_epoch, "best_score": best_score, "best_state": best_state, "stale": stale,
                "params": _comparable(params, strategy, fingerprint),
            }, state_path)
            layout.write_csv(pd.DataFrame(history), layout.history, index=False)
        if on_epoch_end is not None and rank == 0:
            on_epoch_end(row)
        if row["stopped"]:
            logger.info("early stopping: no better validation macro-F1 for %d epochs", params.patience)
            stopped_early = True
    st.load_trainable_state(model, best_state)  # end with the best epoch's weights
    return history, best_epoch, best_score, stopped_early, resumed
