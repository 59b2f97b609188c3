"""The run manifest's content: the inputs of each step and their checksums, what changed since the last
run (:func:`what_changed`), the steps set aside as stale, the checkpoint record and the headline metrics.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from ...core.io import read_json, utc_now, utc_stamp
from ...core.layout import STEP_DEPENDS_ON, RunLayout
from ...core.params import STEPS, ParamsError
from ...metrics import SUMMARY_METRICS, ZEROSHOT_METHOD, headline_values
from ...model.checkpoint import CHECKPOINT_RECORD_KEYS

logger = logging.getLogger(__name__)


def inputs_of_step(values: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """sha256 of one step's input files (a file shared by steps is hashed once: inputs do not change during
    a run); a checkpoint folder by its ``best_model.pt``, a reference index by its ``manifest.json`` (the official
    layout: its ``meta.h5ad``); 'demo' and released names as such."""
    from ...core.io import sha256_file

    def digest(path: Path) -> str:
        key = str(path)
        if key not in cache:
            cache[key] = sha256_file(path)
        return cache[key]

    sums: dict[str, Any] = {}
    for key in ("adata_path", "query_path", "reference_path"):
        value = values.get(key)
        if value and Path(value).is_file():
            sums[key] = {"path": value, "sha256": digest(Path(value))}
        elif value == "demo":
            version = importlib.metadata.version("scanpy")
            sums[key] = {"path": "demo", "sha256": f"scanpy.datasets.pbmc68k_reduced (scanpy {version})"}
    index = values.get("reference_index")
    if index and Path(index).is_dir():  # a reference index by its record (ours) or its labels (the official layout)
        record = next((Path(index) / n for n in ("manifest.json", "meta.h5ad") if (Path(index) / n).is_file()), None)
        sums["reference_index"] = {"path": index, "sha256": digest(record) if record else None}
    checkpoint = values.get("checkpoint")
    if checkpoint:
        weights = Path(checkpoint) / "best_model.pt"
        sums["checkpoint"] = {"path": checkpoint, "sha256": digest(weights) if weights.is_file() else None}
    return sums


def input_checksums(inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``checksums``: every input file of the steps run, by path."""
    return {v["path"]: v["sha256"] for step_inputs in inputs.values() for k, v in step_inputs.items()
            if k != "checkpoint"}


#: parameters that do not change what a step computes (where it runs, where its files go)
_NEUTRAL_PARAMS = {"run_dir", "mount_drive", "device"}


def _effective_params(step: str, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """A step's parameters with the defaults filled in, without those that do not change its result."""
    if values is None:
        return None
    try:
        full = STEPS[step].from_mapping(values, source="run_manifest.json").to_dict()
    except (ParamsError, TypeError, ValueError):  # an old manifest's parameters: compare as recorded
        full = dict(values)
    return {k: v for k, v in full.items() if k not in _NEUTRAL_PARAMS}


def what_changed(step: str, record: dict[str, Any] | None, values: dict[str, Any],
                  inputs: dict[str, Any]) -> list[str]:
    """How this run of ``step`` differs from what the manifest recorded for it ([] if the same or unknown)."""
    if not record or record.get("params") is None:
        return []
    before, now = _effective_params(step, record["params"]), _effective_params(step, values)
    changes = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    old_inputs = record.get("inputs")
    if old_inputs is not None:
        for key in sorted(set(old_inputs) | set(inputs)):
            old, new = old_inputs.get(key) or {}, inputs.get(key) or {}
            if old.get("sha256") != new.get("sha256") and not any(key in c.split(":")[0] for c in changes):
                changes.append(f"{key} content changed (sha256 {str(old.get('sha256'))[:12]} -> "
                               f"{str(new.get('sha256'))[:12]})")
    return changes


def set_stale(layout: RunLayout, manifest: dict[str, Any], step: str, changes: list[str]) -> list[str]:
    """``step`` re-runs with ``changes``: set aside the files of the steps that depend on it, mark them stale."""
    stamp, now = utc_stamp(), utc_now()
    reason = f"{step} re-ran with other parameters or inputs ({'; '.join(changes)})"
    marked = []
    for dependent, needs in STEP_DEPENDS_ON.items():
        if step not in needs:
            continue
        record = manifest["steps"].get(dependent)
        folder, moved = layout.set_aside(dependent, stamp)
        if not moved and (record is None or record.get("status") == "stale"):
            continue  # never ran, or already set aside
        previous = {k: v for k, v in (record or {}).items() if k != "stale"}
        manifest["steps"][dependent] = {
            **previous, "status": "stale",
            "stale": {"reason": reason, "time": now,
                      "previous_status": (record or {}).get("status"),
                      "moved_to": str(folder.relative_to(layout.run_dir)) if moved else None,
                      "moved": [str(m) for m in moved]},
        }
        marked.append(dependent)
        logger.warning("%s is stale: %s. Its files were moved to %s (nothing deleted); run it again.",
                       dependent, reason, folder if moved else "(none were there)")
    return marked


def read_last_finished_epoch(layout: RunLayout) -> int | None:
    """The last epoch 02 finished (``train/history.csv``, written with the resumable state)."""
    import csv

    try:
        with open(layout.history, newline="", encoding="utf-8") as fh:
            epochs = [int(float(row["epoch"])) for row in csv.DictReader(fh) if row.get("epoch")]
    except (OSError, ValueError, KeyError):
        return None
    return max(epochs) if epochs else None


def checkpoint_checksum(layout: RunLayout) -> dict[str, Any] | None:
    """The record of the pretrained checkpoint 01 wrote (its sha256 was taken there), None before 01."""
    record = read_json(layout.checkpoint_record, default=None)
    if record is None:
        return None
    return {k: record.get(k) for k in CHECKPOINT_RECORD_KEYS}


def headline_metrics(layout: RunLayout, steps: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of 03 and 04, from the steps the manifest records as finished (never a stale or failed one)."""
    summary: dict[str, Any] = {}

    def done(step: str) -> bool:
        return steps is None or (steps.get(step) or {}).get("status") == "finished"

    if done("03_evaluate") and layout.metrics.is_file():
        metrics = read_json(layout.metrics)
        for method, values in (metrics.get("methods") or {}).items():
            summary[method] = {**headline_values(values, SUMMARY_METRICS, missing=None),
                               "cells": _cells_measured("03", f"{metrics.get('split', 'test')} split", values)}
    if done("04_zeroshot") and layout.zeroshot_metrics.is_file():
        zs = read_json(layout.zeroshot_metrics)
        if zs.get("knn_vote"):
            query = ((steps or {}).get("04_zeroshot") or {}).get("params", {}).get("query_path")
            where = f"query {Path(query).name}" if query else "test split"
            seen = (zs.get("overlap") or {}).get("n_cells")
            summary[ZEROSHOT_METHOD] = {**headline_values(zs["knn_vote"], SUMMARY_METRICS, missing=None),
                                        "cells": _cells_measured("04", where, zs["knn_vote"])
                                        + (f" ({seen:,} also in the reference!)" if seen else "")}
    return summary


def _cells_measured(step: str, where: str, values: dict[str, Any]) -> str:
    """Which cells a headline row was measured on, e.g. ``"03 test split, 140 cells"``."""
    n = values.get("n_cells")
    return f"{step} {where}" + (f", {n:,} cells" if isinstance(n, int) else "")


def effective_params(layout: RunLayout, step: str) -> dict[str, Any] | None:
    """The parameters ``step`` ran with, as its notebook recorded them in ``run_dir/params/<step>.yaml``: the
    values it was given with the recipe for the run's checkpoint filled in (``recipe`` says which, when any)."""
    import yaml

    path = layout.step_params(step.split("_", 1)[1])
    if not path.is_file():
        return None
    text = path.read_text()
    values = yaml.safe_load(text) or {}
    note = next((line[2:].strip() for line in text.splitlines() if line.startswith("# recipe for")), None)
    return {"values": values, "recipe": note}
