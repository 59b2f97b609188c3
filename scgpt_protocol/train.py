"""Fine-tuning for cell-type annotation, with the published defaults and what they lacked.

Published defaults (scGPT annotation tutorial): Adam lr 1e-4, StepLR gamma 0.9 per epoch, cross-entropy
on the classifier output, gradient clipping 1.0, mixed precision on GPU, genes resampled each epoch.
Added here: optional class-weighted loss, early stopping on validation macro-F1 with the best epoch
kept, a resumable state after every epoch (a Colab disconnect costs at most one epoch), training curves.

Determinism: the data order and gene sampling of epoch ``e`` depend only on ``(seed, e)`` and the
torch RNG is re-seeded at each epoch start, so an interrupted and resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .checkpoint import load_model, save_checkpoint
from .device import resolve_device
from .embedding import iter_batches
from .layout import RunLayout
from .log import progress
from .model import ScGPT
from .params import FinetuneParams
from .tokenize import Batch, check_expression, collate, match_genes, tokenize_rows

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["TrainResult", "finetune", "trainable_parameters", "load_finetuned"]

logger = logging.getLogger(__name__)

#: parameters that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"epochs", "resume", "device", "run_dir"}


@dataclass
class TrainResult:
    history: pd.DataFrame
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    model_dir: Path
    seconds: float
    trainable_parameters: int
    total_parameters: int

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "history"}
        out["model_dir"] = str(self.model_dir)
        return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )


def _set_strategy(model: ScGPT, strategy: str) -> None:
    if strategy == "full":
        model.requires_grad_(True)
    elif strategy == "head":
        model.requires_grad_(False)
        model.cls_decoder.requires_grad_(True)
    else:
        msg = f"strategy {strategy!r} is not one of ['full', 'head']."
        raise ValueError(msg)


def _train_mode(model: ScGPT, strategy: str) -> None:
    """Dropout where weights are trained; a frozen encoder runs in eval mode (fixed features)."""
    if strategy == "head":
        model.eval()
        model.cls_decoder.train()
    else:
        model.train()


def _class_weights(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _training_batches(
    adata: AnnData, model: ScGPT, rows: np.ndarray, *, params: FinetuneParams, epoch: int,
    columns: np.ndarray, col_token_ids: np.ndarray,
) -> Iterator[Batch]:
    """Shuffled batches of the given rows; within groups of 8 batches, cells of similar length go together."""
    rng = np.random.default_rng((params.seed, epoch, 7))
    order = rows[rng.permutation(len(rows))]
    group = params.batch_size * 8
    cfg = model.config
    batches: list[Batch] = []
    for start in range(0, len(order), group):
        cells_idx = np.sort(order[start : start + group])
        chunk = adata.X[cells_idx]
        chunk = (chunk if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk)))[:, columns]
        cells = tokenize_rows(
            chunk, col_token_ids, cell_index=cells_idx, cls_id=model.vocab["<cls>"], pad_value=cfg.pad_value,
            max_seq_len=params.max_seq_len, n_bins=cfg.n_bins, seed=params.seed, epoch=epoch,
        )
        lengths = np.array([len(c.gene_ids) for c in cells])
        by_length = np.argsort(-lengths, kind="stable")
        for b in range(0, len(by_length), params.batch_size):
            pos = by_length[b : b + params.batch_size]
            batches.append(collate([cells[p] for p in pos], cells_idx[pos], pad_id=cfg.pad_token_id, pad_value=cfg.pad_value))
        if len(batches) >= 8 or start + group >= len(order):
            for k in rng.permutation(len(batches)):
                yield batches[k]
            batches = []


def _evaluate(model: ScGPT, adata: AnnData, codes: np.ndarray, params: FinetuneParams, loss_fn: nn.Module,
              device: torch.device) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    logits = np.zeros((adata.n_obs, model.cls_decoder.out_layer.out_features), dtype=np.float32)
    with torch.inference_mode():
        for batch in iter_batches(adata, model, max_seq_len=params.max_seq_len, batch_size=params.batch_size * 2,
                                  seed=params.seed):
            batch = batch.to(device)
            logits[batch.index] = model.classify(batch.gene_ids, batch.values, batch.padding_mask).float().cpu().numpy()
    loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(codes)))
    pred = logits.argmax(1)
    return {
        "val_loss": loss,
        "val_macro_f1": float(f1_score(codes, pred, average="macro", zero_division=0)),
        "val_accuracy": float(accuracy_score(codes, pred)),
    }


def _comparable(params: FinetuneParams) -> dict[str, Any]:
    return {k: v for k, v in params.to_dict().items() if k not in _RESUMABLE_CHANGES}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    tmp.replace(path)


def finetune(
    model: ScGPT,
    adata: AnnData,
    params: FinetuneParams,
    *,
    label_key: str,
    categories: Sequence[str],
    layout: RunLayout,
    split_key: str = "split",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on the ``train`` cells of ``adata``, selecting the epoch on ``val`` cells.

    Parameters
    ----------
    model
        From :func:`~scgpt_protocol.load_model` (a head with ``len(categories)`` outputs is added if
        missing). It is trained in place and ends with the weights of the best epoch.
    adata
        Prepared data (01_preprocess): non-negative values in ``X``, labels in ``obs[label_key]``,
        ``obs[split_key]`` with ``train`` and ``val`` cells.
    params
        :class:`~scgpt_protocol.params.FinetuneParams`.
    categories
        Class names; class ``i`` is ``categories[i]``.
    layout
        Where the best model (``layout.model_dir``), the resumable state and the history go.
    on_epoch_end
        Called with the epoch's history row after its state is saved.

    Returns
    -------
    TrainResult
    """
    start_time = time.perf_counter()
    for key in (label_key, split_key):
        if key not in adata.obs:
            msg = f"{key!r} not in adata.obs (columns: {list(adata.obs.columns)}); run 01_preprocess first."
            raise KeyError(msg)
    categories = list(categories)
    labels = adata.obs[label_key].astype(str).to_numpy()
    unknown = sorted(set(labels) - set(categories))
    if unknown:
        msg = f"labels {unknown[:5]} of obs[{label_key!r}] are not among the run's categories {categories}."
        raise ValueError(msg)
    codes = pd.Categorical(labels, categories=categories).codes.astype(np.int64)
    split = adata.obs[split_key].astype(str).to_numpy()
    train_rows, val_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        msg = f"obs[{split_key!r}] needs 'train' and 'val' cells; found {dict(zip(*np.unique(split, return_counts=True)))}."
        raise ValueError(msg)
    check_expression(adata)

    device = resolve_device(params.device)
    if model.cls_decoder is None or model.cls_decoder.out_layer.out_features != len(categories):
        model.add_classifier(len(categories))
    model.to(device)
    _set_strategy(model, params.strategy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = trainable_parameters(model)
    logger.info("strategy %r: %s of %s parameters trainable", params.strategy, f"{n_trainable:,}", f"{n_total:,}")

    use_amp = params.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    optimizer = torch.optim.Adam(trainable, lr=params.lr, eps=1e-4 if use_amp and amp_dtype == torch.float16 else 1e-8)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=params.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    weights = _class_weights(codes[train_rows], len(categories)) if params.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    val_loss_fn = nn.CrossEntropyLoss(weight=weights)

    history: list[dict[str, Any]] = []
    best_epoch, best_score, stale, first_epoch, resumed = 0, -1.0, 0, 1, None
    state_path = layout.train_state
    if state_path.exists() and params.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["params"] != _comparable(params):
            diff = {k: (state["params"].get(k), v) for k, v in _comparable(params).items() if state["params"].get(k) != v}
            msg = (
                f"{state_path} holds a training with other parameters {diff} (saved, now); resume would mix "
                "them. Use a new run_dir, or set resume=False to start this training over."
            )
            raise ValueError(msg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best_epoch, best_score, stale = state["history"], state["best_epoch"], state["best_score"], state["stale"]
        first_epoch = resumed = state["epoch"] + 1
        logger.info("resuming from %s: epoch %d done, best epoch %d (val macro-F1 %.4f)",
                    state_path, state["epoch"], best_epoch, best_score)
    stopped_early = bool(history) and history[-1].get("stopped", False)

    match = match_genes(adata, model.vocab)
    columns, col_token_ids = match.columns, match.token_ids[match.columns]
    val_adata = adata[val_rows]
    n_batches = -(-len(train_rows) // params.batch_size)
    epoch = first_epoch - 1
    for epoch in range(first_epoch, params.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        torch.manual_seed(params.seed * 100_003 + epoch)
        _train_mode(model, params.strategy)
        total_loss, seen = 0.0, 0
        batches = _training_batches(adata, model, train_rows, params=params, epoch=epoch, columns=columns,
                                    col_token_ids=col_token_ids)
        for batch in progress(batches, total=len(train_rows), desc=f"epoch {epoch}/{params.epochs}", unit="cells",
                              size=lambda b: len(b.index)):
            batch = batch.to(device)
            target = torch.from_numpy(codes[batch.index]).to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(model.classify(batch.gene_ids, batch.values, batch.padding_mask).float(), target)
            if not torch.isfinite(loss):
                msg = f"the training loss became {loss.item()} at epoch {epoch}; lower lr (now {params.lr})."
                raise FloatingPointError(msg)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if params.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(batch.index)
            seen += len(batch.index)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "lr": lr}
        row.update(_evaluate(model, val_adata, codes[val_rows], params, val_loss_fn, device))
        improved = row["val_macro_f1"] > best_score
        if improved:
            best_epoch, best_score, stale = epoch, row["val_macro_f1"], 0
            _save_best(model, layout, label_key, categories, params, epoch, row)
        else:
            stale += 1
        row["best"] = improved
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["stopped"] = params.patience > 0 and stale >= params.patience and epoch < params.epochs
        history.append(row)
        logger.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_macro_f1 %.4f  val_accuracy %.4f  lr %.2e  (%.1f s)%s",
            epoch, params.epochs, row["train_loss"], row["val_loss"], row["val_macro_f1"], row["val_accuracy"],
            lr, row["seconds"], "  *best*" if improved else "",
        )
        _save_state(state_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
            "best_epoch": best_epoch, "best_score": best_score, "stale": stale, "params": _comparable(params),
        })
        layout.write_csv(pd.DataFrame(history), layout.history, index=False)
        if on_epoch_end is not None:
            on_epoch_end(row)
        if row["stopped"]:
            logger.info("early stopping: no better validation macro-F1 for %d epochs", params.patience)
            stopped_early = True

    # end with the best epoch's weights, as saved
    best = load_model(layout.model_dir, device=device)
    model.load_state_dict(best.state_dict())
    model.eval()
    result = TrainResult(
        history=pd.DataFrame(history), best_epoch=best_epoch, best_val_macro_f1=best_score,
        epochs_run=len(history), stopped_early=stopped_early, resumed_from_epoch=resumed,
        model_dir=layout.model_dir, seconds=round(time.perf_counter() - start_time, 1),
        trainable_parameters=n_trainable, total_parameters=n_total,
    )
    layout.write_json(layout.train_summary, result.summary())
    logger.info("best epoch %d (val macro-F1 %.4f); model in %s", best_epoch, best_score, layout.model_dir)
    return result


def _save_best(model: ScGPT, layout: RunLayout, label_key: str, categories: list[str], params: FinetuneParams,
               epoch: int, row: dict[str, Any]) -> None:
    save_checkpoint(model, layout.model_dir)
    layout.write_json(layout.model_dir / "labels.json", {
        "label_key": label_key, "categories": categories, "epoch": epoch,
        "val_macro_f1": row["val_macro_f1"], "strategy": params.strategy,
    })


def load_finetuned(layout: RunLayout, *, device: str = "auto") -> tuple[ScGPT, dict[str, Any]]:
    """The fine-tuned model of a run and its label record (``label_key``, ``categories``)."""
    labels = layout.read_json(layout.model_dir / "labels.json", step="02_finetune")
    return load_model(layout.model_dir, device=device), labels
