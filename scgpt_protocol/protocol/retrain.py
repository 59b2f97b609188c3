"""Step 02 run again in the same run folder: continue the saved training, or set it aside and start anew.

A person edits the parameters cell of ``02_finetune`` and runs it again. With the same parameters (``epochs``,
``device`` and the like may change) the saved training continues: the log says "resumed from epoch N" or
"already trained: nothing to do". With other parameters, other prepared data, or ``resume=False``, the saved
training (``model/``, ``train/``, its figure) moves to ``run_dir/stale/02_finetune-<UTC time>/`` and a new one
starts; 03, which read the old model, is set aside the same way the headless runner does it
(:func:`~scgpt_protocol.protocol.manifest.set_stale`). Nothing is deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any, Mapping, Sequence

from ..adapt.cells import data_fingerprint
from ..adapt.train import saved_training_key, training_changes, training_key
from ..core.layout import RunLayout
from ..core.params import FinetuneParams
from .display import Banner
from .manifest import set_stale

logger = logging.getLogger(__name__)

__all__ = ["begin_training"]

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
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder, moved = layout.set_aside(_STEP, stamp, outputs_only=True)  # its report, log, params are being written
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
    manifest = json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else None
    work = manifest if manifest is not None else {"steps": {}}
    marked = set_stale(layout, work, _STEP, changes)
    if manifest is not None and manifest.get("status") != "running" and marked:  # the runner keeps its own
        if manifest.get("status") == "finished":
            manifest["status"] = "partial"
        layout.write_json(layout.manifest, manifest)
    return marked
