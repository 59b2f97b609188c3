"""Running 02 again in the same run folder, as a person does after editing its parameters cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from scgpt_protocol.core.layout import RunLayout

ROOT = Path(__file__).resolve().parent.parent


def _run_02(run_dir: Path, out: Path, **changes) -> str:
    """Execute 02 with params/ci and ``changes``; the text of its outputs."""
    import papermill

    values = {**(yaml.safe_load((ROOT / "params" / "ci" / "02_finetune.yaml").read_text()) or {}), **changes}
    papermill.execute_notebook(str(ROOT / "notebooks" / "02_finetune.ipynb"), str(out),
                               parameters={**values, "run_dir": str(run_dir)}, progress_bar=False, log_output=False)
    nb = nbformat.read(out, as_version=4)
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


def test_02_again_with_a_changed_parameter_trains_anew_and_unchanged_trains_nothing(ci_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SCGPT_PROTOCOL_PROGRESS", "text")
    layout = RunLayout(tmp_path / "run")
    shutil.copytree(ci_run[0].run_dir, layout.run_dir)
    old_history = layout.history.read_text()
    assert json.loads(layout.run_manifest.read_text())["status"] == "finished"

    text = _run_02(layout.run_dir, tmp_path / "changed.ipynb", lr=0.002)
    assert "A new training." in text and "lr: 0.001 -> 0.002" in text
    (aside,) = layout.stale_dir.glob("02_finetune-*")
    assert (aside / "train" / "history.csv").read_text() == old_history  # moved, not deleted
    assert (aside / "model").is_dir() and (aside / "figures" / "training_curves.png").is_file()
    assert not (aside / "logs").exists() and not (aside / "params").exists()  # the running step's own stay
    (stale_03,) = layout.stale_dir.glob("03_evaluate-*")
    assert (stale_03 / "metrics.json").is_file() and not layout.metrics.exists()
    manifest = json.loads(layout.run_manifest.read_text())
    assert manifest["steps"]["03_evaluate"]["status"] == "stale" and manifest["status"] == "partial"
    assert "lr: 0.001 -> 0.002" in manifest["steps"]["03_evaluate"]["stale"]["reason"]
    assert manifest["steps"]["04_zeroshot"]["status"] == "finished"  # 04 reads 01's files only (STEP_DEPENDS_ON)
    history = pd.read_csv(layout.history)
    assert list(history["epoch"]) == [1, 2] and history["lr"].iloc[0] == 0.002  # trained anew, from epoch 1
    new_history = layout.history.read_text()

    text = _run_02(layout.run_dir, tmp_path / "unchanged.ipynb", lr=0.002)
    assert "already trained: nothing to do" in text and "A new training." not in text
    assert "full epoch" not in text  # not one training step
    assert len(list(layout.stale_dir.glob("02_finetune-*"))) == 1 and layout.history.read_text() == new_history

    # raising epochs resumes ("resumed from epoch N"): tests/test_train.py


def test_a_relative_run_dir_is_the_same_folder_for_the_notebooks_and_the_runner(tmp_path):
    from scgpt_protocol.core.params import resolve_run_dir

    workspace = tmp_path / "protocol"
    (workspace / "notebooks").mkdir(parents=True)
    (workspace / "params").mkdir()
    # JupyterLab runs a kernel in the notebook's folder; make demo and scgpt-protocol run start in the one above
    assert resolve_run_dir("runs/demo", workspace / "notebooks") == workspace / "runs" / "demo"
    assert resolve_run_dir("runs/demo", workspace) == workspace / "runs" / "demo"
    assert resolve_run_dir("runs/demo", tmp_path) == tmp_path / "runs" / "demo"  # elsewhere (Colab): the cwd
    assert resolve_run_dir(str(tmp_path / "abs"), workspace / "notebooks") == tmp_path / "abs"


def test_the_manifest_records_the_parameters_each_step_ran_with(ci_run):
    manifest = json.loads(ci_run[0].run_manifest.read_text())
    finetune = manifest["steps"]["02_finetune"]["effective_params"]
    assert finetune["recipe"] == "recipe for the demo checkpoint: every value set by hand"  # params/ci sets them
    assert finetune["values"]["max_seq_len"] == 64 and finetune["values"]["class_weighted"] is False
    assert finetune["values"]["run_dir"] == str(ci_run[0].run_dir)
    zeroshot = manifest["steps"]["04_zeroshot"]["effective_params"]
    assert zeroshot["values"]["min_confidence"] == 0.3 and zeroshot["recipe"].startswith("recipe for the demo")
    assert manifest["steps"]["01_preprocess"]["effective_params"]["recipe"] is None  # 01 has no recipe parameters
