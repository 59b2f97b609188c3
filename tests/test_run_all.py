"""Run All on the four notebooks as they are, as a person does in JupyterLab: the demo, and the same run as
``make demo``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import STEPS

ROOT = Path(__file__).resolve().parent.parent


def _text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text") or o.get("data", {}).get("text/plain", "")
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow  # 5 min: the demo twice (four notebooks in kernels as JupyterLab runs them, then the runner)
def test_run_all_with_the_defaults_learns_and_is_the_run_make_demo_makes(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    from sklearn.metrics import f1_score

    from scgpt_protocol.protocol.run.runner import run_protocol

    monkeypatch.delenv("SCGPT_PROTOCOL_PROGRESS", raising=False)  # widget bars, as in JupyterLab
    workspace = tmp_path / "protocol"  # a fresh folder laid out as the clone (or `scgpt-protocol init`)
    shutil.copytree(ROOT / "notebooks", workspace / "notebooks")
    shutil.copytree(ROOT / "params", workspace / "params")
    for step in STEPS:  # nothing injected: the parameters cell as it is
        path = workspace / "notebooks" / f"{step}.ipynb"
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, path)  # as Save does
        text = _text(nb)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], "a widget bar was left"
        layout = RunLayout(workspace / "runs" / "demo")  # runs/demo from the folder above notebooks/, as make demo
        assert f"run_dir: {layout.run_dir}" in text
        if step == "02_finetune":
            assert "recipe for the demo checkpoint: lr=0.001" in text and "epoch 10/10: 490 cells in" in text

    predictions = pd.read_csv(layout.predictions, index_col=0)
    test = predictions[predictions["split"] == "test"]  # scgpt_prediction: the argmax, before abstention
    argmax_f1 = f1_score(test["true_label"].astype(str), test["scgpt_prediction"].astype(str), average="macro")
    assert argmax_f1 >= 0.3, f"the demo did not learn: scGPT argmax macro-F1 {argmax_f1:.3f}"
    interactive = {step: yaml.safe_load(layout.step_params(step.split("_", 1)[1]).read_text()) for step in STEPS}

    # `make demo` is `scgpt-protocol run params/demo --run-dir runs/demo` from the folder above notebooks/; from
    # notebooks/ (as a notebook's kernel) the relative run_dir is the same folder
    monkeypatch.chdir(workspace / "notebooks")
    monkeypatch.setenv("SCGPT_PROTOCOL_PROGRESS", "text")
    run_protocol(workspace / "params" / "demo", "runs/demo", force=True, html=False)
    manifest = json.loads(layout.run_manifest.read_text())
    assert manifest["run_dir"] == str(layout.run_dir) and manifest["status"] == "finished"
    for step in STEPS:
        headless = manifest["steps"][step]["effective_params"]
        assert headless["values"] == interactive[step], step
        if STEPS[step].RECIPE_FIELDS:
            assert headless["recipe"].startswith("recipe for the demo checkpoint")
    report = nbformat.read(layout.step_report("02_finetune"), as_version=4)
    assert "already trained: nothing to do" in _text(report)  # the very same training: nothing retrained
    assert not layout.stale_dir.exists()
