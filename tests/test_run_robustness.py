"""A run is either complete or says plainly what it is: interrupted runs, a full disk, stale steps, file modes.

Each test goes through the runner (papermill, real or with a stand-in for the notebook) or the API and checks
both the typed error / manifest status and what is (and is not) left in ``run_dir``.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from scgpt_protocol.core.errors import DiskFullError, ScGPTProtocolError
from scgpt_protocol.core.io import atomic_write, is_disk_full
from scgpt_protocol.core.layout import STEP_DEPENDS_ON, RunLayout
from scgpt_protocol.core.params import STEPS
from scgpt_protocol.protocol.run import manifest
from scgpt_protocol.protocol.run.runner import RunFailed, RunInterrupted, run_protocol

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "params" / "ci"


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name)


# -- a stand-in for papermill: writes a report the way papermill does, then succeeds or fails ----------------
def _papermill_like_report(notebook: str, report: str, parameters: dict, *, stop_at: int | None = None,
                           error: tuple[str, str] | None = None) -> None:
    """The executed notebook as papermill leaves it: cells before ``stop_at`` ran; with ``error`` the cell
    ``stop_at`` shows it; papermill's final clean-up marks every cell it never reached "completed"."""
    nb = nbformat.read(notebook, as_version=4)
    count = 0
    for i, cell in enumerate(nb.cells):
        cell.metadata["papermill"] = {"status": "completed", "exception": False}
        if cell.cell_type != "code":
            continue
        if stop_at is None or i < stop_at or (i == stop_at and error):
            count += 1
            cell.execution_count = count
        if i == stop_at and error:
            cell.outputs = [nbformat.v4.new_output("error", ename=error[0], evalue=error[1], traceback=[])]
    nb.metadata["papermill"] = {"parameters": parameters}
    nbformat.write(nb, report)


def _first_code_cell_after_parameters(notebook: str) -> int:
    nb = nbformat.read(notebook, as_version=4)
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"][3]


class FakePapermill:
    """``papermill.execute_notebook`` for the runner's control flow: ``plan[step]`` says what each step does."""

    def __init__(self, plan: dict[str, object] | None = None) -> None:
        self.plan = plan or {}
        self.calls: list[str] = []

    def __call__(self, notebook, report, parameters=None, **kwargs):
        step = Path(notebook).stem
        self.calls.append(step)
        layout = RunLayout(parameters["run_dir"])
        action = self.plan.get(step, "ok")
        if action == "ok":
            _papermill_like_report(notebook, report, parameters)
            for path in layout.step_artifacts(step)[:2]:  # stand-ins for the step's outputs
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"stand-in for": step}) if path.suffix == ".json" else f"{step}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "weights.bin").write_bytes(b"w")
            if step == "02_finetune":
                layout.history.write_text("epoch,train_loss\n1,0.9\n2,0.8\n")
            return None
        if callable(action):
            return action(notebook, report, parameters, layout)
        raise AssertionError(action)


def _interrupt_02(notebook, report, parameters, layout):
    """Fine-tuning stopped by Ctrl-C in its training cell, after epoch 1 of 2 was saved."""
    layout.train_dir.mkdir(parents=True, exist_ok=True)
    layout.history.write_text("epoch,train_loss\n1,0.9\n")
    (layout.train_dir / "last_state.pt").write_bytes(b"state after epoch 1")
    _papermill_like_report(notebook, report, parameters, stop_at=_first_code_cell_after_parameters(notebook),
                           error=("KeyboardInterrupt", ""))
    raise KeyboardInterrupt


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_manifest.json").read_text())


@pytest.fixture()
def fake_papermill(monkeypatch):
    import papermill

    fake = FakePapermill()
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return fake


# == 1. interrupted runs ===================================================================================
def test_ctrl_c_during_finetuning_is_recorded_with_the_epoch_and_the_resume_command(tmp_path, fake_papermill, caplog):
    run_dir = tmp_path / "run"
    fake_papermill.plan = {"02_finetune": _interrupt_02}
    with pytest.raises(RunInterrupted) as info:
        run_protocol(CI, run_dir, steps=["01", "02", "03"])
    resume = f"scgpt-protocol run {CI} --run-dir {run_dir} --steps 02,03"
    assert info.value.resume == resume and info.value.step == "02_finetune"
    assert isinstance(info.value, KeyboardInterrupt)  # not swallowed by `except Exception`
    msg = str(info.value)
    assert "step 02_finetune was interrupted (SIGINT / Ctrl-C)" in msg
    assert "finished epoch 1 of 2; it resumes after epoch 1" in msg and f"Resume with: {resume}" in msg
    assert resume in caplog.text  # the runner logs it too

    manifest = _manifest(run_dir)
    assert manifest["status"] == "interrupted"
    record = manifest["steps"]["02_finetune"]
    assert record["status"] == "interrupted" and record["interrupted"]["last_finished_epoch"] == 1
    assert record["interrupted"]["step"] == "02_finetune" and record["interrupted"]["time"]
    assert manifest["interrupted"]["resume"] == resume
    assert manifest["steps"]["01_preprocess"]["status"] == "finished" and "03_evaluate" not in manifest["steps"]
    assert fake_papermill.calls == ["01_preprocess", "02_finetune"]  # 03 did not start

    report = nbformat.read(run_dir / "reports" / "02_finetune.ipynb", as_version=4)
    banner = report.cells[0]
    assert banner.cell_type == "markdown" and "Incomplete report: step `02_finetune` was interrupted" in banner.source
    assert "in cell In [4]" in banner.source and resume in banner.source
    statuses = [c.metadata["papermill"]["status"] for c in report.cells if c.cell_type == "code"]
    assert statuses[:3] == ["completed"] * 3 and statuses[3] == "interrupted"
    assert set(statuses[4:]) == {"not-run"}  # papermill had left them "completed"
    assert report.metadata["scgpt_protocol"]["status"] == "interrupted"
    html = (run_dir / "reports" / "02_finetune.html").read_text()
    assert "Incomplete report" in html
    assert (run_dir / "train" / "last_state.pt").is_file()  # the resumable state stays

    # resuming re-runs 01 with the same parameters and data: nothing becomes stale, 02 continues
    fake_papermill.plan = {}
    result = run_protocol(CI, run_dir, steps=["01", "02", "03"])
    manifest = _manifest(run_dir)
    assert [s.status for s in result.steps] == ["finished"] * 3 and result.stale == []
    assert not (run_dir / "stale").exists() and (run_dir / "train" / "last_state.pt").is_file()
    assert manifest["status"] == "partial" and "interrupted" not in manifest  # 04 has not run
    assert manifest["steps"]["02_finetune"]["status"] == "finished"


def test_sigterm_is_recorded_as_interrupted_and_the_handler_restored(tmp_path, fake_papermill):
    def terminated(notebook, report, parameters, layout):
        _papermill_like_report(notebook, report, parameters, stop_at=_first_code_cell_after_parameters(notebook))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    fake_papermill.plan = {"01_preprocess": terminated}
    t0 = time.perf_counter()
    with pytest.raises(RunInterrupted) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], html=False)
    assert time.perf_counter() - t0 < 4
    assert signal.getsignal(signal.SIGTERM) is before
    assert info.value.signal_name == "SIGTERM" and "--steps 01" in info.value.resume
    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == "interrupted" and manifest["interrupted"]["signal"] == "SIGTERM"
    assert manifest["steps"]["01_preprocess"]["status"] == "interrupted"
    report = nbformat.read(tmp_path / "run" / "reports" / "01_preprocess.ipynb", as_version=4)
    assert "interrupted (SIGTERM)" in report.cells[0].source and "before cell" in report.cells[0].source


def test_interrupted_strategy_comparison_names_the_strategies_kept(tmp_path, fake_papermill):
    params = tmp_path / "params"
    shutil.copytree(CI, params)
    values = yaml.safe_load((CI / "02_finetune.yaml").read_text()) | {"strategies": ["head", "probe"]}
    (params / "02_finetune.yaml").write_text(yaml.safe_dump(values))

    def interrupted(notebook, report, parameters, layout):
        done = layout.train_dir / "comparison" / "strategies" / "head"
        done.mkdir(parents=True)
        (done / "outcome.json").write_text("{}")
        raise KeyboardInterrupt

    fake_papermill.plan = {"02_finetune": interrupted}
    with pytest.raises(RunInterrupted, match=r"Strategies already trained \(head\) are reused when it resumes"):
        run_protocol(params, tmp_path / "run", steps=["01", "02"], html=False)
    info = _manifest(tmp_path / "run")["interrupted"]
    assert info["strategies_finished"] == ["head"] and info["last_finished_epoch"] is None
    assert info["cell"] is None  # no report was written before the interruption
    assert not (tmp_path / "run" / "reports" / "02_finetune.ipynb").exists()


def test_cli_exit_codes_for_an_interrupted_run(tmp_path, fake_papermill, caplog):
    from scgpt_protocol.protocol.run.cli import main

    fake_papermill.plan = {"02_finetune": _interrupt_02}
    assert main(["run", str(CI), "--run-dir", str(tmp_path / "run"), "--steps", "01,02", "--no-html"]) == 130
    assert f"Resume with: scgpt-protocol run {CI} --run-dir {tmp_path / 'run'} --steps 02" in caplog.text


def _ticks(path: Path) -> int:
    return len(path.read_text().split()) if path.is_file() else 0


def test_real_sigterm_during_a_notebook_stops_the_kernel_and_marks_the_report(tmp_path, monkeypatch, fake_notebooks):
    ticks = tmp_path / "run" / "ticks.txt"
    folder = fake_notebooks(tmp_path / "nb", [
        "print('started')",
        f"import time\nfor i in range(400):\n    time.sleep(0.1)\n    open({str(ticks)!r}, 'a').write(f'{{i}}\\n')",
        "print('never')",
    ])
    before = signal.getsignal(signal.SIGTERM)

    def stop_when_running():
        deadline = time.monotonic() + 120
        while _ticks(ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        if _ticks(ticks) >= 3 and signal.getsignal(signal.SIGTERM) is not before:  # only while the runner runs
            os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=stop_when_running, daemon=True)
    timer.start()
    with pytest.raises(RunInterrupted) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], html=False, notebooks=folder)
    timer.join(5)
    assert info.value.signal_name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is before
    assert info.value.resume.endswith(f"--steps 01 --notebooks {folder}")  # the same notebooks again
    n = _ticks(ticks)
    time.sleep(1.0)
    assert _ticks(ticks) == n < 400  # the kernel no longer runs the cell

    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == "interrupted" and manifest["steps"]["01_preprocess"]["status"] == "interrupted"
    report = nbformat.read(tmp_path / "run" / "reports" / "01_preprocess.ipynb", as_version=4)
    assert "was interrupted (SIGTERM)" in report.cells[0].source
    code = [c for c in report.cells if c.cell_type == "code"]
    assert [c.metadata["papermill"]["status"] for c in code][-2:] == ["interrupted", "not-run"]
    assert not code[-1].outputs  # "never" was not printed


def test_keyboardinterrupt_inside_the_kernel_is_interrupted_not_failed(tmp_path, monkeypatch, fake_notebooks):
    folder = fake_notebooks(tmp_path / "nb", ["x = 1", "raise KeyboardInterrupt", "print('never')"])
    with pytest.raises(RunInterrupted) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], html=False, notebooks=folder)
    assert info.value.signal_name == "KeyboardInterrupt in the notebook"
    manifest = _manifest(tmp_path / "run")
    # the cell after papermill's injected-parameters cell
    assert manifest["status"] == "interrupted" and manifest["interrupted"]["cell"] == 4
    report = nbformat.read(tmp_path / "run" / "reports" / "01_preprocess.ipynb", as_version=4)
    assert "Incomplete report" in report.cells[0].source and "In [4]" in report.cells[0].source


# == 2. a full disk ========================================================================================
def test_atomic_write_on_a_full_disk_raises_disk_full_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 5000)
        raise _enospc()

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, write)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, ScGPTProtocolError) and err.errno == errno.ENOSPC
    assert err.path == str(target) and err.needed == 5000
    assert abs(err.free - shutil.disk_usage(tmp_path).free) < 2**30  # the free space then (others write too)
    # what it wrote before the disk filled up is all that is known of what it needs
    assert str(target) in str(err) and "after 4.9 KiB of it had been written" in str(err) and "GiB is free" in str(err)
    assert "old metrics.json is untouched" in str(err)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_torch_save_on_a_full_disk_names_the_tensor_bytes(tmp_path, monkeypatch):
    from scgpt_protocol.model import save

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    # the real torch writer on a device that is always full
    monkeypatch.setattr(save, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    state = {"w": torch.zeros(256, 256), "tied": None}
    state["tied"] = state["w"]  # one storage, saved once
    with pytest.raises(DiskFullError) as info:
        save.torch_save_atomic(state, tmp_path / "best_model.pt")
    assert info.value.needed == 256 * 256 * 4 and "256.0 KiB" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_torch_enforce_fail_and_h5py_errors_are_disk_full(tmp_path, monkeypatch):
    from scgpt_protocol.model import save

    def enforce_fail(obj, fh):
        fh.write(b"PK" * 100)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        )

    monkeypatch.setattr(save.torch, "save", enforce_fail)
    with pytest.raises(DiskFullError, match=r"no space left to write .*last_state\.pt \(RuntimeError: "):
        save.torch_save_atomic({"w": torch.zeros(1000)}, tmp_path / "last_state.pt")
    assert list(tmp_path.iterdir()) == []

    if Path("/dev/full").exists():  # h5py's own error text for a full disk (errno only in the message)
        import anndata as ad
        import numpy as np

        adata = ad.AnnData(np.zeros((20, 5), dtype=np.float32))
        with pytest.raises(DiskFullError, match="prepared.h5ad"):
            RunLayout(tmp_path).write_h5ad(
                type("A", (), {"write_h5ad": lambda self, p: adata.write_h5ad("/dev/full")})(),
                tmp_path / "data" / "prepared.h5ad",
            )
        assert _leftovers(tmp_path) == []
    assert not is_disk_full(RuntimeError("size mismatch for weight")) and not is_disk_full(OSError(errno.EACCES, "x"))


def test_disk_full_inside_a_notebook_fails_the_step_with_a_typed_error(tmp_path, monkeypatch, fake_notebooks):
    run = tmp_path / "run"
    folder = fake_notebooks(tmp_path / "nb", [
        "from pathlib import Path\nfrom scgpt_protocol.core.io import atomic_write",
        f"atomic_write(Path({str(run)!r}) / 'model' / 'best_model.pt', lambda p: (p.write_bytes(b'x' * 3000), "
        "(_ for _ in ()).throw(OSError(28, 'No space left on device'))))",
        "print('never')",
    ])
    with pytest.raises(RunFailed) as info:
        run_protocol(CI, run, steps=["01"], html=False, notebooks=folder)
    msg = str(info.value)
    assert info.value.ename == "DiskFullError"
    assert "step 01_preprocess failed: DiskFullError: no space left to write" in msg and "best_model.pt" in msg
    assert "after 2.9 KiB of it had been written" in msg and "(in cell 4 of" in msg
    manifest = _manifest(run)
    assert manifest["status"] == "failed" and manifest["steps"]["01_preprocess"]["error_type"] == "DiskFullError"
    assert not (run / "model" / "best_model.pt").exists() and _leftovers(run) == []
    nbformat.read(run / "reports" / "01_preprocess.ipynb", as_version=4)  # complete, and shows the error


def test_report_truncated_by_a_full_disk_is_removed_and_the_run_failed(tmp_path, monkeypatch, fake_notebooks):
    """papermill itself (in the runner's process) cannot finish writing the report."""
    from papermill.iorw import LocalHandler

    folder = fake_notebooks(tmp_path / "nb", ["x = 1", "y = 2", "z = 3"])
    real_write, calls = LocalHandler.write, []

    def write(self, buf, path):
        calls.append(path)
        if len(calls) < 4:
            return real_write(self, buf, path)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(buf[: len(buf) // 2])
        raise _enospc()

    monkeypatch.setattr(LocalHandler, "write", write)
    with pytest.raises(DiskFullError) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], notebooks=folder)
    report = tmp_path / "run" / "reports" / "01_preprocess.ipynb"
    msg = str(info.value)
    assert info.value.path == str(report) and info.value.needed > 0
    assert f"no space left to write {report}" in msg and "is free now" in msg
    assert f"the truncated report {report} was removed" in msg
    assert not report.exists() and not Path(f"{report}.incomplete").exists()  # its space is given back
    assert not report.with_suffix(".html").exists()
    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and manifest["steps"]["01_preprocess"]["status"] == "failed"
    assert "was removed" in manifest["steps"]["01_preprocess"]["error"]


def test_full_disk_for_the_manifest_too_is_best_effort(tmp_path, fake_papermill, monkeypatch):
    def truncated(notebook, report, parameters, layout):
        Path(report).write_text('{"cells": [')
        raise _enospc()

    fake_papermill.plan = {"01_preprocess": truncated}
    real = RunLayout.write_json

    def write_json(self, path, obj):
        if path.name == "run_manifest.json" and obj.get("status") == "failed":
            raise DiskFullError(path, needed=100, free=0)
        return real(self, path, obj)

    monkeypatch.setattr(RunLayout, "write_json", write_json)
    with pytest.raises(DiskFullError) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], html=False)
    assert "run_manifest.json could not be updated" in str(info.value)
    assert _manifest(tmp_path / "run")["steps"]["01_preprocess"]["status"] == "running"  # what it said before
    assert not (tmp_path / "run" / "reports" / "01_preprocess.ipynb").exists()  # truncated: removed


# == 3. stale steps ========================================================================================
def test_step_artifacts_name_every_figure_the_notebooks_save():
    import re

    layout = RunLayout("/r")
    for step in STEPS:
        source = "\n".join(c.source for c in nbformat.read(ROOT / "notebooks" / f"{step}.ipynb", as_version=4).cells)
        saved = set(re.findall(r'layout,\s*"(\w+)"\)', source)) - set(
            STEPS
        )  # next_steps(layout, "<step>") is no figure
        assert saved and saved == set(RunLayout.STEP_FIGURES[step]), step
        assert layout.step_report(step) in layout.step_artifacts(step)
        for name in saved:  # save_figure writes a PDF beside each PNG: both are set aside when stale
            assert {layout.figure(name), layout.figure(name).with_suffix(".pdf")} <= set(layout.step_artifacts(step))
    assert set(STEP_DEPENDS_ON) == set(STEPS)


def test_what_changed_ignores_defaults_and_where_it_runs_but_not_the_data():
    record = {
        "params": {"run_dir": "/a", "epochs": 2, "device": "cpu"},
        "inputs": {"adata_path": {"path": "/d.h5ad", "sha256": "aaa"}},
    }
    same = {"run_dir": "/b", "epochs": 2, "patience": 3, "device": "cuda"}  # patience given at its default
    assert (
        manifest.what_changed("02_finetune", record, same, {"adata_path": {"path": "/d.h5ad", "sha256": "aaa"}}) == []
    )
    assert manifest.what_changed("02_finetune", record, {**same, "epochs": 3}, record["inputs"]) == ["epochs: 2 -> 3"]
    changed = manifest.what_changed("02_finetune", record, same, {"adata_path": {"path": "/d.h5ad", "sha256": "bbb"}})
    assert changed == ["adata_path content changed (sha256 aaa -> bbb)"]
    assert manifest.what_changed("02_finetune", None, same, {}) == []  # never ran: nothing to compare


def test_changed_parameters_make_dependents_stale_until_rerun(tmp_path, fake_papermill):
    run_dir = tmp_path / "run"
    run_protocol(CI, run_dir, steps=["01", "02", "04"], html=False)
    params = tmp_path / "params"
    shutil.copytree(CI, params)
    (params / "01_preprocess.yaml").write_text((CI / "01_preprocess.yaml").read_text() + "test_size: 0.3\n")
    result = run_protocol(params, run_dir, steps=["01"], html=False, force=True)
    assert result.stale == ["02_finetune", "04_zeroshot"]  # 03 never ran: nothing to mark
    manifest = _manifest(run_dir)
    assert manifest["status"] == "partial" and "03_evaluate" not in manifest["steps"]
    for step in ("02_finetune", "04_zeroshot"):
        stale = manifest["steps"][step]["stale"]
        assert manifest["steps"][step]["status"] == "stale" and stale["previous_status"] == "finished"
        assert "01_preprocess re-ran with other parameters or inputs (test_size: 0.2 -> 0.3)" in stale["reason"]
        assert (run_dir / stale["moved_to"] / "reports" / f"{step}.ipynb").is_file()
    assert (run_dir / manifest["steps"]["02_finetune"]["stale"]["moved_to"] / "train" / "history.csv").is_file()
    assert not (run_dir / "model").exists() and not (run_dir / "train").exists() and not (run_dir / "zeroshot").exists()

    result = run_protocol(params, run_dir, steps=["02"], html=False)  # re-run: finished again, 04 still stale
    manifest = _manifest(run_dir)
    assert manifest["steps"]["02_finetune"]["status"] == "finished" and "stale" not in manifest["steps"]["02_finetune"]
    assert manifest["steps"]["04_zeroshot"]["status"] == "stale" and manifest["status"] == "partial"
    assert result.stale == []


def test_rerun_of_01_on_other_data_sets_the_old_results_aside(ci_run, tmp_path, pbmc, caplog):
    """The real notebooks: a full params/ci run, then --force --steps 01 (same data, then other data)."""
    from scgpt_protocol.data.demo import load_demo
    from scgpt_protocol.protocol.run.cli import main

    source, _ = ci_run
    run_dir = tmp_path / "run"
    shutil.copytree(source.run_dir, run_dir)
    layout = RunLayout(run_dir)
    headline = _manifest(run_dir)["headline"]
    assert headline  # the copy holds a finished run with metrics

    # the same parameters and data (as when resuming): nothing is stale
    result = run_protocol(CI, run_dir, steps=["01"], force=True, html=False)
    manifest = _manifest(run_dir)
    assert result.stale == [] and not layout.stale_dir.exists()
    assert manifest["status"] == "finished" and manifest["headline"] == headline == result.summary
    assert all(manifest["steps"][s]["status"] == "finished" for s in STEPS)

    # other data
    other = tmp_path / "other.h5ad"
    load_demo()[:500].copy().write_h5ad(other)
    params = tmp_path / "params"
    shutil.copytree(CI, params)
    values = yaml.safe_load((CI / "01_preprocess.yaml").read_text()) | {"adata_path": str(other)}
    (params / "01_preprocess.yaml").write_text(yaml.safe_dump(values))
    caplog.clear()
    assert main(["run", str(params), "--run-dir", str(run_dir), "--steps", "01", "--force", "--no-html"]) == 0
    assert "headline metrics" not in caplog.text  # the old model's numbers are not shown as this run's
    assert (
        "stale (a step they depend on re-ran with other parameters or inputs; run them again): "
        "02_finetune, 03_evaluate, 04_zeroshot" in caplog.text
    )

    manifest = _manifest(run_dir)
    assert manifest["status"] == "partial" and manifest["headline"] == {}
    moved = {}
    for step in ("02_finetune", "03_evaluate", "04_zeroshot"):
        record = manifest["steps"][step]
        assert record["status"] == "stale" and record["stale"]["previous_status"] == "finished"
        assert "adata_path: 'demo' -> " in record["stale"]["reason"] and record["stale"]["time"]
        moved[step] = run_dir / record["stale"]["moved_to"]
        assert moved[step].parent == layout.stale_dir and moved[step].name.startswith(f"{step}-")
    # everything moved with its relative path; nothing deleted; nothing left in place
    for step, rels in {
        "02_finetune": [
            "model/best_model.pt",
            "train/history.csv",
            "figures/training_curves.png",
            "reports/02_finetune.ipynb",
            "reports/02_finetune.html",
            "logs/finetune.log",
        ],
        "03_evaluate": [
            "predictions.csv",
            "metrics.json",
            "data/evaluated.h5ad",
            "figures/confusion.png",
            "figures/umap.png",
            "reports/03_evaluate.ipynb",
        ],
        "04_zeroshot": [
            "zeroshot/metrics.json",
            "zeroshot/predictions.csv",
            "figures/zeroshot_umap.png",
            "reports/04_zeroshot.ipynb",
        ],
    }.items():
        for rel in rels:
            assert (moved[step] / rel).exists(), (step, rel)
            assert not (run_dir / rel).exists(), rel
    old_metrics = json.loads((moved["03_evaluate"] / "metrics.json").read_text())
    assert old_metrics["methods"]  # the old results are intact, only set aside
    # 01's own files are the new data's
    import anndata as ad

    assert ad.read_h5ad(layout.prepared_adata, backed="r").n_obs <= 500
    assert manifest["steps"]["01_preprocess"]["inputs"]["adata_path"]["path"] == str(other)


# == 4. file modes =========================================================================================
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        layout = RunLayout(tmp_path)
        paths = [atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x")),
                 layout.write_json(tmp_path / "b.json", {"a": 1})]
        atomic_write(tmp_path / "a.txt", lambda p: p.write_text("y"))  # replacing keeps following it
    finally:
        os.umask(before)
    for path in paths:
        assert path.stat().st_mode & 0o777 == mode, (oct(umask), path)
