"""The stages of step 01 that the in-memory (:mod:`.in_memory`) and streamed (:mod:`.stream`) paths share:
mitochondrial share, the normalisation choice, the genes the vocabulary knows, the split, the checks that
cells and genes are left, and the warnings collected for the report."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.errors import InputDataError
from ..data.labels import (
    SPLITS,
    case_only_groups,
    check_label_column,
    clean_labels,
    describe_case_groups,
    trimmed_labels,
)
from ..model.vocab import gene_symbols, match_genes

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.params import PreprocessParams
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.params import PreprocessParams

logger = logging.getLogger(__name__)


def warn_user(message: str, collect: list[str] | None = None, stacklevel: int = 3) -> None:
    """A soft problem: a ``UserWarning`` and a log line (and kept in ``collect``)."""
    logger.warning("%s", message)
    if collect is not None:
        collect.append(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def mito_mask(symbols: Sequence[str]) -> np.ndarray:
    return np.array([s.upper().startswith("MT-") for s in symbols], dtype=bool)


def percent_mito(matrix: Any, mito: np.ndarray, kind: str) -> np.ndarray:
    """Per-cell percentage of the (count-scale) signal in the mitochondrial genes."""
    x = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if kind == "log-normalised":
        x.data = np.expm1(x.data)  # back to the normalised scale
    total = np.asarray(x.sum(axis=1)).ravel()
    mt = np.asarray(x[:, np.flatnonzero(mito)].sum(axis=1)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 100.0 * mt / np.where(total > 0, total, 1.0), 0.0)


def split_cells(
    labels: np.ndarray, rare: np.ndarray, test_size: float, val_size: float, seed: int
) -> tuple[np.ndarray, list[str]]:
    """``split[i]`` in SPLITS for each cell; rare cells go to train. Returns the split and notes."""
    from sklearn.model_selection import train_test_split

    n_total = len(labels)
    split = np.full(n_total, "train", dtype=object)
    idx = np.flatnonzero(~rare)
    y = labels[idx]
    classes = np.unique(y)
    n_test = max(int(round(test_size * n_total)), len(classes))
    n_val = max(int(round(val_size * n_total)), len(classes))
    if len(idx) - n_test - n_val < len(classes):
        msg = (
            f"{len(idx):,} cells in {len(classes)} classes are too few for a test split of {n_test:,} and a "
            f"validation split of {n_val:,} cells with every class in train, val and test. Lower test_size / "
            "val_size, or raise min_cells_per_class so that small classes stay in train only."
        )
        raise InputDataError(msg)
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    y_rest = labels[rest]
    # a class with one cell left cannot be stratified; it stays in train and is repaired below
    left = pd.Series(y_rest).value_counts()
    single = np.isin(y_rest, left.index[left < 2].to_numpy())
    train, val = train_test_split(
        rest[~single], test_size=n_val, stratify=y_rest[~single], random_state=seed + 1
    )
    split[test], split[val] = "test", "val"

    # every non-rare class in every split: move single cells from the split that has the most
    notes = []
    rng = np.random.default_rng(seed)
    for label in classes:
        members = np.flatnonzero((labels == label) & ~rare)
        for target in SPLITS:
            if (split[members] == target).any():
                continue
            counts = {s: int((split[members] == s).sum()) for s in SPLITS}
            donor = max(counts, key=counts.get)
            pick = rng.choice(members[split[members] == donor])
            split[pick] = target
            notes.append(f"moved 1 cell of {label!r} from {donor} to {target} so that the class is in "
                         "every split")
    return split, notes


def warn_no_mito_genes(params: PreprocessParams, log: list[str]) -> None:
    warn_user(f"max_pct_mito={params.max_pct_mito} is set but no gene name starts with 'MT-'; the "
          "mitochondrial filter was skipped.", stacklevel=4)
    log.append("mitochondrial filter skipped: no MT- genes")


def check_cells_left(n_obs: int, n_vars: int, params: PreprocessParams) -> None:
    """A clear error when the filters left no cell or no gene."""
    if n_obs == 0 or n_vars == 0:
        msg = (
            f"no {'cells' if n_obs == 0 else 'genes'} left after filtering "
            f"(min_genes={params.min_genes}, min_cells={params.min_cells}, "
            f"max_pct_mito={params.max_pct_mito}). Relax these filters."
        )
        raise InputDataError(msg)


def choose_normalisation(params: PreprocessParams, kind: str, vmax: float, note: Any) -> tuple[bool, bool]:
    """``(is_counts, normalise)`` for ``params.normalize`` and the values' kind; warns and records the choice."""
    is_counts = kind == "counts"
    normalise = {"yes": True, "no": False, "auto": is_counts}[params.normalize]
    if normalise:
        if kind == "log-normalised":
            warn_user("normalize='yes' but the values already look log-normalised (non-integer, "
                  f"max {vmax:.3g}); they are normalised and log-transformed again. Use "
                  "normalize='auto' unless this is intended.", stacklevel=4)
        note("normalised: normalize_total(target_sum=1e4) + log1p"
               + ("; raw counts kept in layers['counts']" if is_counts else ""))
    else:
        if params.normalize == "auto" and kind == "other":
            warn_user(f"values are neither raw counts nor log-normalised (non-integer, max {vmax:.4g}) and were "
                  "left as they are (normalize='auto'). Set normalize='yes' for CPM/TPM values, or give "
                  "the raw counts (layer=...).", stacklevel=4)
        note(f"not normalised (normalize={params.normalize!r}, values: {kind})"
               + ("; counts also in layers['counts']" if is_counts else ""))
    return is_counts, normalise


def vocabulary_genes(out: AnnData, vocab: dict[str, int], params: PreprocessParams,
                      note: Any) -> tuple[AnnData, Any]:
    """``out`` restricted to the genes of the vocabulary (token ids in ``var``), and the gene match
    (:func:`~scgpt_protocol.model.vocab.match_genes`; ``match.columns`` are the columns kept)."""
    before = out.n_vars
    match = match_genes(out, vocab, gene_symbol_key=params.gene_symbol_key)
    cols = match.columns
    symbols = gene_symbols(out, params.gene_symbol_key)
    out = out[:, cols].copy()
    out.var["scgpt_token_id"] = match.token_ids[cols].astype(np.int64)
    if params.gene_symbol_key is not None:
        out.var["original_var_name"] = np.asarray(out.var_names, dtype=str)
        out.var_names = pd.Index([symbols[j] for j in cols], dtype=str)
    note(f"kept the genes in the checkpoint vocabulary ({match.source}): "
           f"{before:,} -> {out.n_vars:,} genes ({match.fraction:.1%})")
    return out, match


def repeated_names_message(names: Any) -> str | None:
    """``"3 cell name(s) in obs_names repeat an earlier one (e.g. 'A', 'B')"``, or None when all are unique."""
    names = pd.Index(names)
    if names.is_unique:
        return None
    examples = ", ".join(repr(n) for n in pd.unique(names[names.duplicated(keep=False)])[:3])
    return f"{int(names.duplicated().sum()):,} cell name(s) in obs_names repeat an earlier one (e.g. {examples})"


def unique_cell_names(out: AnnData, log: list[str] | None = None) -> bool:
    """Make repeated ``obs_names`` unique in place (anndata's ``-1``, ``-2`` ... suffixes), with a warning kept in
    ``log``: 03 matches predictions, exports and queries to cells by name. Returns whether any repeated."""
    message = repeated_names_message(out.obs_names)
    if message is None:
        return False
    out.obs_names_make_unique()
    warn_user(f"{message}; they were made unique by appending '-1', '-2', ... If the names matter (to match "
              "cells to another table), make them unique in the input file first, e.g. with "
              "adata.obs_names_make_unique() or by joining a sample column to them.", log, stacklevel=4)
    return True


def map_training_labels(obs: pd.DataFrame, params: PreprocessParams) -> tuple[pd.DataFrame, Any]:
    """``obs`` with ``params.label_map`` applied to ``obs[label_key]`` (a copy; the labels as given are kept in
    ``obs[label_key + "_original"]``; a label mapped to nothing becomes NaN, so its cells are left out of
    training), and the :class:`~scgpt_protocol.data.label_map.LabelMapResult` (None without a map: ``obs`` as
    it is). The model has no classes yet: every label the map leaves alone is a class of its own."""
    if params.label_map is None:
        return obs, None
    from ..data.label_map import apply_label_map

    label_key = params.label_key
    result = apply_label_map(obs[label_key], params.label_map)
    obs = obs.copy()
    obs[f"{label_key}_original"] = obs[label_key].to_numpy()
    obs[label_key] = pd.Categorical(result.labels.to_numpy(dtype=object))
    return obs, result


def report_unlabelled(label_key: str, n_in: int, n_out: int, mapped: Any, log: list[str], stacklevel: int) -> None:
    """Say how many of ``n_in`` cells were left out because the label map maps their label to nothing (logged:
    the user asked for it) and how many had no label at all (warned), ``n_out`` cells left."""
    n_map = mapped.n_dropped if mapped is not None else 0
    if n_map:
        shown = ", ".join(f"{k!r} ({n:,})" for k, n in sorted(mapped.dropped.items()))
        message = (f"left out {n_map:,} cells whose label the label map maps to nothing ({shown}): "
                   f"{n_in:,} -> {n_in - n_map:,} cells")
        log.append(message)
        logger.info("%s", message)
    n_unlabelled = n_in - n_map - n_out
    if n_unlabelled:
        warn_user(f"dropped {n_unlabelled:,} cells without a label in obs[{label_key!r}]: "
                  f"{n_in - n_map:,} -> {n_out:,} cells", stacklevel=stacklevel + 1)
        log.append(f"dropped cells without a label: {n_in - n_map:,} -> {n_out:,} cells")


def checked_labels(obs: pd.DataFrame, label_key: str, log: list[str] | None = None) -> np.ndarray:
    """``obs[label_key]`` as text without surrounding spaces; refuses a continuous column, warns (into ``log``)
    about labels trimmed and labels that differ only by case (they stay apart)."""
    check_label_column(obs, label_key)
    trimmed = trimmed_labels(obs[label_key])
    labels = clean_labels(obs[label_key])
    if trimmed:
        warn_user(f"{len(trimmed)} label(s) of obs[{label_key!r}] had spaces around them and were trimmed "
                  f"(so they join the label without them): {', '.join(repr(t) for t in trimmed[:5])}"
                  + (" ..." if len(trimmed) > 5 else ""), log, stacklevel=4)
    groups = case_only_groups(labels)
    if groups:
        warn_user(f"labels of obs[{label_key!r}] that differ only by upper / lower case stay separate classes: "
                  f"{describe_case_groups(groups)}. If they are one cell type, write them the same way in the "
                  "input.", log, stacklevel=4)
    unknown = sorted({v for v in labels if v.casefold() == "unknown"})
    if unknown:
        warn_user(f"obs[{label_key!r}] has a class named {unknown[0]!r}: 03 and 04 call cells they abstain on "
                  "(min_confidence > 0) 'Unknown', so with min_confidence set they refuse this class. If it "
                  "means 'no label', set these labels to NaN (prepare drops them); else rename the class.",
                  log, stacklevel=4)
    return labels.astype(str)
