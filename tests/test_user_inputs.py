"""Inputs real users bring (round two): scenario folders, run folders, re-runs and the closing table.

The runner's control flow runs with the stand-in for papermill of ``test_run_robustness``; nothing here
trains a model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from test_run_robustness import FakePapermill, _papermill_like_report

from scgpt_protocol.core.params import ParamsError
from scgpt_protocol.protocol.run.runner import RunDirInUse, RunFailed, run_protocol

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "params" / "ci"


@pytest.fixture()
def fake_papermill(monkeypatch):
    import papermill

    fake = FakePapermill()
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return fake


def _scenario(tmp_path: Path, names: dict[str, str | None]) -> Path:
    """A copy of params/ci with each step file renamed (``None``: left out)."""
    folder = tmp_path / "scenario"
    folder.mkdir()
    for step, name in names.items():
        if name is not None:
            shutil.copyfile(CI / f"{step}.yaml", folder / name)
    return folder


@pytest.mark.parametrize("names", [
    {"01_preprocess": None, "02_finetune": None, "03_evaluate": None, "04_zeroshot": None},
    {"01_preprocess": "01-preprocess.yaml", "02_finetune": "02_finetune.yaml", "03_evaluate": "03_evaluate.yaml",
     "04_zeroshot": "04_zeroshot.yaml"},
], ids=["empty-folder", "misnamed-01"])
def test_a_scenario_without_a_step_file_is_refused_not_run_on_the_demo(tmp_path, fake_papermill, names, caplog):
    from scgpt_protocol.protocol.run.cli import main

    scenario = _scenario(tmp_path, names)
    with pytest.raises(FileNotFoundError, match=r"no parameter file for step\(s\) 01_preprocess.*01_preprocess\.yaml"):
        run_protocol(scenario, tmp_path / "run", html=False)
    assert main(["run", str(scenario), "--run-dir", str(tmp_path / "run"), "--no-html"]) == 2
    assert "01_preprocess" in caplog.text and fake_papermill.calls == [] and not (tmp_path / "run").exists()


def test_yml_files_and_a_finished_runs_params_folder_are_scenarios(tmp_path, fake_papermill):
    scenario = _scenario(tmp_path, {"01_preprocess": "01_preprocess.yml", "02_finetune": "finetune.yaml",
                                    "03_evaluate": "evaluate.yml", "04_zeroshot": "04_zeroshot.yaml"})
    run_protocol(scenario, tmp_path / "run", html=False)
    assert fake_papermill.calls == ["01_preprocess", "02_finetune", "03_evaluate", "04_zeroshot"]
    # a run's params/ as the notebooks write them (full values, run_dir included) re-runs into another folder
    params = tmp_path / "run" / "params"
    for step in ("preprocess", "finetune", "evaluate", "zeroshot"):
        (params / f"{step}.yaml").write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": 0}))
    (params / "preprocess.yaml").write_text(
        yaml.safe_dump({"run_dir": "x", "adata_path": "demo", "checkpoint": "demo"})
    )
    run_protocol(params, tmp_path / "again", html=False)
    manifest = json.loads((tmp_path / "again" / "run_manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["steps"]["01_preprocess"]["params"]["run_dir"] == str(tmp_path / "again")


def test_two_files_for_one_step_are_refused(tmp_path, fake_papermill):
    scenario = _scenario(tmp_path, {"01_preprocess": "01_preprocess.yaml", "02_finetune": "02_finetune.yaml",
                                    "03_evaluate": "03_evaluate.yaml", "04_zeroshot": "04_zeroshot.yaml"})
    shutil.copyfile(scenario / "01_preprocess.yaml", scenario / "preprocess.yml")
    with pytest.raises(ParamsError, match="2 files for step 01_preprocess: 01_preprocess.yaml, preprocess.yml"):
        run_protocol(scenario, tmp_path / "run", html=False)
    assert fake_papermill.calls == []


def test_an_empty_step_file_says_which_defaults_it_uses_before_running(tmp_path, fake_papermill, caplog):
    scenario = _scenario(tmp_path, {"02_finetune": "02_finetune.yaml"})
    (scenario / "01_preprocess.yaml").write_text("")
    with caplog.at_level(logging.WARNING):
        run_protocol(scenario, tmp_path / "run", steps=["01", "02"], html=False)
    before = caplog.text.split("running 01_preprocess")[0]
    assert "01_preprocess.yaml is empty" in before
    assert "does not set adata_path: step 01 uses the built-in demo data" in before
    assert "does not set checkpoint: step 01 uses a tiny random checkpoint" in before


def test_a_run_dir_that_is_a_file_is_a_clear_error(tmp_path, fake_papermill, caplog):
    from scgpt_protocol.protocol.run.cli import main

    file = tmp_path / "results.txt"
    file.write_text("mine\n")
    with pytest.raises(RunDirInUse, match="is a file, not a folder"):
        run_protocol(CI, file, html=False)
    with pytest.raises(RunDirInUse, match=r"lies inside .*results\.txt, which is a file"):
        run_protocol(CI, file / "run", html=False)
    assert main(["run", str(CI), "--run-dir", str(file), "--no-html"]) == 2
    assert "is a file, not a folder" in caplog.text and file.read_text() == "mine\n"


def _fail_03(notebook, report, parameters, layout):
    _papermill_like_report(notebook, report, parameters, stop_at=4, error=("InputDataError", "bad query"))
    raise RuntimeError("InputDataError: bad query")


@pytest.mark.parametrize("step", ["03_evaluate", "04_zeroshot"])
def test_a_failed_force_rerun_leaves_no_earlier_results_looking_current(tmp_path, fake_papermill, step):
    from scgpt_protocol.core.layout import RunLayout

    run_dir = tmp_path / "run"
    run_protocol(CI, run_dir, html=False)
    layout = RunLayout(run_dir)
    outputs = [p for p in layout.step_artifacts(step)[:2] if p.exists()]
    assert outputs  # the stand-in wrote the step's first outputs
    fake_papermill.plan = {step: _fail_03}
    with pytest.raises(RunFailed, match="results of its earlier run were set aside in stale/"):
        run_protocol(CI, run_dir, steps=[step], html=False, force=True)
    assert not any(p.exists() for p in outputs)
    record = json.loads(layout.run_manifest.read_text())["steps"][step]
    assert record["status"] == "failed"
    kept = run_dir / record["previous_results"]
    assert all((kept / p.relative_to(run_dir)).exists() for p in outputs)
    # a rerun that finishes replaces them and keeps no copy
    fake_papermill.plan = {}
    run_protocol(CI, run_dir, steps=[step], html=False, force=True)
    assert all(p.exists() for p in outputs)
    assert not list(layout.stale_dir.glob(f"{step}-previous-*/reports"))[1:]


def test_the_closing_table_says_which_cells_each_row_was_measured_on(tmp_path, caplog):
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.metrics import ZEROSHOT_METHOD
    from scgpt_protocol.protocol.run.manifest import headline_metrics

    layout = RunLayout(tmp_path)
    layout.zeroshot_metrics.parent.mkdir(parents=True)
    layout.metrics.write_text(json.dumps({"split": "test", "methods": {"scGPT": {"accuracy": 0.9, "n_cells": 140}}}))
    layout.zeroshot_metrics.write_text(
        json.dumps({"knn_vote": {"accuracy": 1.0, "n_cells": 240}, "overlap": {"n_cells": 240}})
    )
    steps = {
        "03_evaluate": {"status": "finished"},
        "04_zeroshot": {"status": "finished", "params": {"query_path": "/data/query.h5ad"}},
    }
    summary = headline_metrics(layout, steps)
    assert summary["scGPT"]["cells"] == "03 test split, 140 cells"
    assert summary[ZEROSHOT_METHOD]["cells"] == "04 query query.h5ad, 240 cells (240 also in the reference!)"


def test_the_cli_closing_table_prints_the_cells_of_each_row(tmp_path, fake_papermill, caplog):
    from scgpt_protocol.protocol.run.cli import main

    def evaluate(notebook, report, parameters, layout):
        _papermill_like_report(notebook, report, parameters)
        layout.metrics.write_text(
            json.dumps({"split": "test", "methods": {"scGPT": {"accuracy": 0.5, "n_cells": 140}}})
        )

    fake_papermill.plan = {"03_evaluate": evaluate}
    with caplog.at_level(logging.INFO):
        assert main(["run", str(CI), "--run-dir", str(tmp_path / "run"), "--no-html"]) == 0
    assert "measured on" in caplog.text and "headline metrics (test split)" not in caplog.text
    row = next(line for line in caplog.text.splitlines() if "scGPT" in line and "0.500" in line)
    assert row.rstrip().endswith("03 test split, 140 cells")
