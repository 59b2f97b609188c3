"""Fine-tuning for cell-type annotation: the published recipe by default, and what it lacked.

Follows the official annotation tutorial (and the published fine-tuning protocol): cross-entropy on the
``<cls>`` classifier only, ``<cls>`` fed with the value 0 as the official fine-tuning tokeniser does
(:data:`~scgpt_protocol.model.vocab.FINETUNE_CLS_VALUE`), Adam at lr 1e-4 with ``eps=1e-4`` whenever ``amp``
is set (the default; on every device, as the official loop does), StepLR gamma 0.9 per epoch, gradient
clipping 1.0, batch 32, mixed precision on GPU, no layer frozen (strategy ``full``).

The protocol's choice: genes are resampled every epoch for cells with more than ``max_seq_len - 1``
expressed genes (the published protocol's collator resamples every batch; the tutorial samples once).

Ours (off or neutral by default unless said): every adaptation strategy of
:mod:`scgpt_protocol.adapt.strategies`; optional weight decay, learning-rate warm-up and class-weighted loss;
the best epoch chosen by validation macro-F1 (the published code keeps the lowest validation loss) with
early stopping after ``patience`` epochs without improvement (on by default, 3); a resumable state after
every epoch (a Colab disconnect costs at most one epoch); curves.

Determinism: the data order of epoch ``e`` depends only on ``(seed, e)``, each cell's gene sampling on
``(seed, e, cell name)``, new modules (the head included) are initialised from ``seed``, and the torch
RNG is re-seeded at each epoch start, so an interrupted and resumed run ends where an uninterrupted one does.
The number of data-loading workers does not change the result.

Scale: the data stream from the prepared file (:mod:`scgpt_protocol.adapt.loader`: read it with
``read_prepared(layout, backed=True)``); memory holds per-cell labels and keys, not the matrix.
``steps_per_epoch`` bounds an epoch on an atlas. Under torchrun (:mod:`scgpt_protocol.adapt.ddp`) each
of the ``world_size`` processes trains on its shard of every global batch of ``batch_size`` cells; the
loss of a shard is its sum times ``world_size`` over the global batch's cell count (or class-weight sum),
so DDP's averaged gradient is the one-process gradient. Rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.device import PeakMemory, autocast, resolve_device, resolve_precision
from ..core.layout import RunLayout
from ..core.log import DETAIL, progress
from ..core.params import FinetuneParams
from ..data.matrix import check_expression
from ..model.checkpoint import model_checkpoint_record
from ..model.save import torch_save_atomic
from ..model.scgpt import ProbeHead, ScGPT
from ..model.vocab import FINETUNE_CLS_VALUE, match_genes
from .cells import cell_name_keys, codes_and_splits, data_fingerprint
from .ddp import DDPClassifier, all_reduce_sum, barrier, world
from .loader import CellGroups, ShardLoader, default_num_workers, eval_plan, make_loader, train_plan
from .optim import adam_eps, make_optimizer
from .saved import comparable_params, cpu_copy, save_finetuned
from .threads import CpuThreads

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "finetune", "strategy_config"]


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
    return _Stream(make_loader(dataset, num_workers=workers, device=device), n_classes), cell_name_keys(adata.obs_names)


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
        :class:`~scgpt_protocol.core.params.FinetuneParams` (training settings and strategy options).
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
    params = params.with_recipe(base_checkpoint.get("kind"))  # parameters left at None: the checkpoint's recipe
    categories = list(categories)
    codes, train_rows, val_rows = codes_and_splits(adata, label_key, split_key, categories)
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
            inputs = _TrainingInputs(model=model, stream=stream, keys=keys, params=params, strategy=strategy,
                                     codes=codes, train_rows=train_rows, val_rows=val_rows, val_loss_fn=val_loss_fn,
                                     device=device, fingerprint=fingerprint)
            t = _start_training(inputs, weights)
            try:
                _train_epochs(t, layout=layout if rank == 0 else None, on_epoch_end=on_epoch_end,
                              state_path=layout.train_state if layout is not None else None)
            finally:  # also when resuming is refused or interrupted
                t.cpu_threads.close()
        history, best_epoch, best_score, stopped_early, resumed = (t.history, t.best_epoch, t.best_score,
                                                                   t.stopped_early, t.resumed)
    n_trainable, n_total = st.count_parameters(model)
    if strategy == "probe":
        n_trainable = sum(p.numel() for p in model.cls_decoder.parameters())
    result = TrainResult(
        strategy=strategy, history=pd.DataFrame(history), best_epoch=best_epoch, best_val_macro_f1=best_score,
        epochs_run=len(history), stopped_early=stopped_early, resumed_from_epoch=resumed,
        seconds=round(time.perf_counter() - start_time if resumed is None  # resumed: all its epochs' time
                      else sum(float(row.get("seconds", 0)) for row in history), 1),
        peak_memory_bytes=int(memory.peak),
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


@dataclass
class _TrainingInputs:
    """What a fine-tuning's epochs read: the model, the cells, their classes and splits, the parameters."""

    model: ScGPT
    stream: _Stream
    keys: np.ndarray
    params: FinetuneParams
    strategy: str
    codes: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    val_loss_fn: nn.Module
    device: torch.device
    fingerprint: str


@dataclass
class _Training(_TrainingInputs):
    """One fine-tuning's epochs: what they read, how they optimise, and how far they got (saved and resumed)."""

    trainable: list[nn.Parameter]
    precision: str  # autocast dtype; fp16 also gets a GradScaler
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loss_fn: nn.Module
    weight_of: np.ndarray | None  # class weights, for the batch's denominator
    classify: Callable[..., torch.Tensor]
    cpu_threads: CpuThreads  # the thread count of the steps (CPU)
    # progress
    history: list[dict[str, Any]]
    best_epoch: int = 0
    best_score: float = -1.0
    best_state: Any = None
    epochs_without_gain: int = 0  # epochs since the best validation macro-F1 (early stopping counts them)
    first_epoch: int = 1
    resumed: int | None = None
    stopped_early: bool = False

    def state(self, epoch: int) -> dict[str, Any]:
        """What resuming after ``epoch`` needs."""
        return {
            "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "history": self.history,
            "best_epoch": self.best_epoch, "best_score": self.best_score, "best_state": self.best_state,
            "epochs_without_gain": self.epochs_without_gain,
            "params": comparable_params(self.params, self.strategy, self.fingerprint),
        }


def _train_epochs(t: _Training, *, layout: RunLayout | None, on_epoch_end: Callable[[dict[str, Any]], None] | None,
                  state_path: Path | None) -> None:
    """Run the epochs of ``t`` (resumed from ``state_path`` when it holds a state); ``layout`` (rank 0 only)
    receives the state and history after every epoch. Ends with the best epoch's weights in the model."""
    from . import strategies as st

    rank, _ = world()
    params = t.params
    if state_path is not None and state_path.exists() and params.resume:
        _resume(t, state_path)
    barrier()  # every rank has read the state before rank 0 writes the next one
    t.stopped_early = bool(t.history) and t.history[-1].get("stopped", False)
    if t.resumed is not None:
        done = t.resumed - 1
        if t.stopped_early or done >= params.epochs:
            why = f"stopped early after epoch {done}" if t.stopped_early else f"{done} of {params.epochs} epochs done"
            logger.info("already trained: nothing to do (%s; best epoch %d, validation macro-F1 %.4f). Raise epochs "
                        "to train on, or change a parameter to start a new training.", why, t.best_epoch, t.best_score)
        else:
            logger.info("resumed from epoch %d: epochs %d-%d to go (best so far: epoch %d, validation macro-F1 %.4f)",
                        done, t.resumed, params.epochs, t.best_epoch, t.best_score)

    for epoch in range(t.first_epoch, params.epochs + 1):
        if t.stopped_early:
            break
        row = _run_epoch(t, epoch)
        if layout is not None and state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch_save_atomic(t.state(epoch), state_path)
            layout.write_csv(pd.DataFrame(t.history), layout.history, index=False)
        if on_epoch_end is not None and rank == 0:
            on_epoch_end(row)
        if row["stopped"]:
            logger.info("early stopping: no better validation macro-F1 for %d epochs", params.patience)
            t.stopped_early = True
    st.load_trainable_state(t.model, t.best_state)  # end with the best epoch's weights


def _start_training(inputs: _TrainingInputs, weights: torch.Tensor | None) -> _Training:
    """The optimiser (AdamW), the schedule (linear warm-up, then StepLR per epoch), the loss (``weights``: the
    class weights, None: unweighted) and, with several processes, the DDP wrapper: a training at epoch 1."""
    model, params, device, train_rows = inputs.model, inputs.params, inputs.device, inputs.train_rows
    _, size = world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    precision = training_precision(params, device)  # autocast dtype; fp16 also gets a GradScaler
    optimizer = make_optimizer(trainable, lr=params.lr, weight_decay=params.weight_decay,
                               eps=adam_eps(params.amp, params.adam_eps), device=device)
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
            DDPClassifier(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    threads = params.threads
    if threads == "auto" and size > 1:  # a rank's step time includes waiting for the others: no measure of its own
        logger.info("threads auto: not with %d processes; each keeps torch's count", size)
        threads = None
    cpu_threads = CpuThreads(device, threads)
    given = {f.name: getattr(inputs, f.name) for f in fields(_TrainingInputs)}
    return _Training(**given, trainable=trainable, precision=precision, optimizer=optimizer,
                     scheduler=scheduler, scaler=scaler, loss_fn=loss_fn, weight_of=weight_of, classify=classify,
                     cpu_threads=cpu_threads, history=[])


def _resume(t: _Training, state_path: Path) -> None:
    """Continue from the state saved after an epoch; refuses a state saved with other parameters or data."""
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    saved, now = state["params"], comparable_params(t.params, t.strategy, t.fingerprint)
    if saved != now:
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "data"}
        what = f"other parameters {diff} (saved, now)" if diff else (
            "other data: the prepared cells, split, labels or base checkpoint changed (01 ran again?)")
        msg = (
            f"{state_path} holds a training with {what}; resume would mix them. Use a new run_dir, "
            "or set resume=False to start this training over (the 02 notebook sets the old training aside "
            "and starts a new one itself)."
        )
        raise ValueError(msg)
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 scaling (CPU, bf16)
        t.scaler.load_state_dict(state["scaler"])
    t.history, t.best_epoch, t.best_score = state["history"], state["best_epoch"], state["best_score"]
    # "stale": the key of states saved before it was named for what it counts
    t.best_state = state["best_state"]
    t.epochs_without_gain = state.get("epochs_without_gain", state.get("stale", 0))
    t.first_epoch = t.resumed = state["epoch"] + 1
    logger.info("resuming from %s: epoch %d done", state_path, state["epoch"], extra=DETAIL)
    del state


def _run_epoch(t: _Training, epoch: int) -> dict[str, Any]:
    """Train one epoch, validate, keep the best weights; the epoch's row, appended to ``t.history``."""
    from . import strategies as st

    params = t.params
    t0 = time.perf_counter()
    lr = t.optimizer.param_groups[0]["lr"]
    train_loss = _train_steps(t, epoch)
    t.cpu_threads.settle()  # validation on the chosen count, not on one a comparison was trying
    row = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
    row.update(_val_metrics(_logits(t.model, t.stream, t.val_rows, t.keys, params, t.device), t.codes[t.val_rows],
                            t.val_loss_fn))
    improved = row["val_macro_f1"] > t.best_score
    if improved:
        t.best_epoch, t.best_score, t.epochs_without_gain = epoch, row["val_macro_f1"], 0
        t.best_state = cpu_copy(st.trainable_state_dict(t.model))
    else:
        t.epochs_without_gain += 1
    row["best"] = improved
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["stopped"] = params.patience > 0 and t.epochs_without_gain >= params.patience and epoch < params.epochs
    t.history.append(row)
    logger.info(
        "%s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_macro_f1 %.4f  val_accuracy %.4f  lr %.2e  (%.1f s)%s",
        t.strategy, epoch, params.epochs, row["train_loss"], row["val_loss"], row["val_macro_f1"],
        row["val_accuracy"], lr, row["seconds"], "  *best*" if improved else "",
    )
    return row


def _train_steps(t: _Training, epoch: int) -> float:
    """The optimiser steps of one epoch; the mean training loss per cell."""
    params, device = t.params, t.device
    rank, _ = world()
    torch.manual_seed(params.seed * 100_003 + epoch + 7_919 * rank)  # rank 0: as with one process
    set_train_mode(t.model, t.strategy)
    total_loss, seen = 0.0, 0
    plans = train_plan(t.train_rows, t.keys, seed=params.seed, epoch=epoch, batch_size=params.batch_size,
                       steps_per_epoch=params.steps_per_epoch)
    n_cells = sum(len(p.rows) for p in plans)
    width = 2 * t.model.config.d_model + t.model.config.d_hid  # a token's cost: width + its keys (CpuThreads)
    for shard in progress(t.stream.loader(plans), total=n_cells, desc=f"{t.strategy} epoch {epoch}/{params.epochs}",
                          unit="cells", size=lambda sh: len(sh.global_index)):
        batch = shard.batch.to(device)
        with t.cpu_threads.step(batch.gene_ids.numel() * (width + batch.gene_ids.shape[1])):
            value = _step(t, shard, batch, epoch)
        total_loss += value.item() * len(shard.global_index)
        seen += len(shard.global_index)
    return total_loss / max(seen, 1)


def _step(t: _Training, shard: Any, batch: Any, epoch: int) -> torch.Tensor:
    """One optimiser step on ``batch`` (this rank's part of ``shard``); the global batch's loss."""
    params, device = t.params, t.device
    _, size = world()
    target = torch.from_numpy(t.codes[batch.index]).to(device)
    global_codes = t.codes[shard.global_index]
    denom = float(t.weight_of[global_codes].sum()) if t.weight_of is not None else float(len(global_codes))
    t.optimizer.zero_grad(set_to_none=True)
    with autocast(device, t.precision):
        logits = t.classify(batch.gene_ids, batch.values, batch.padding_mask).float()
    loss = t.loss_fn(logits, target) * (size / max(denom, 1e-12))
    if not shard.real:  # a rank without cells in this batch: it joins the exchange with a zero gradient
        loss = loss * 0.0
    value = loss.detach().clone()  # the global batch's loss, the same on every rank
    if size > 1:
        value = all_reduce_sum(value if device.type == "cuda" else value.cpu()) / size
    if not torch.isfinite(value):
        msg = f"the training loss became {value.item()} at epoch {epoch}; lower lr (now {params.lr})."
        raise FloatingPointError(msg)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)
    if params.grad_clip > 0:
        nn.utils.clip_grad_norm_(t.trainable, params.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return value
