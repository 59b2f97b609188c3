"""Faults and concurrency: one writer per run folder (the lock), a full disk inside a step's kernel, the kernel
dying, leftovers of failed writes, a read-only run folder, values that cannot be expression or parameters."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scgpt_protocol.core import lock as run_lock
from scgpt_protocol.core.errors import DiskFullError, InputDataError, RunDirError, RunDirInUse
from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.params import MAX_TEXT, ParamsError, PreprocessParams
from scgpt_protocol.model.vocab import SPECIAL_TOKENS
from scgpt_protocol.protocol.run import failures
from scgpt_protocol.protocol.run.runner import RunFailed, run_protocol

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "params" / "ci"


def _holder(run_dir: Path, step: str = "02_finetune") -> subprocess.Popen:
    """Another process that takes ``run_dir``'s lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from scgpt_protocol.core.lock import hold_run_dir
        hold_run_dir({str(run_dir)!r}, step={step!r}, holder="notebook")
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(10)
    proc.stdout.close()


# == one writer per run folder =============================================================================
def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunDirInUse) as info:
            run_lock.hold_run_dir(run_dir, step="03_evaluate", holder="notebook")
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and "step 02_finetune" in msg and "since 20" in msg
        assert "shut down that notebook's kernel" in msg and "choose another run_dir" in msg
        # the headless runner too, before anything of the run is written
        with pytest.raises(RunDirInUse, match=f"in use by pid {proc.pid}"):
            run_protocol(CI, run_dir, steps=["01"], html=False)
        assert not (run_dir / "run_manifest.json").exists()
        # and a notebook's set-up cell (its parameters are not written either)
        values = {n: getattr(PreprocessParams(), n) for n in PreprocessParams.field_names()}
        with pytest.raises(RunDirInUse):
            PreprocessParams.from_namespace({**values, "run_dir": str(run_dir)})
        assert not RunLayout(run_dir).step_params("preprocess").exists()
    finally:
        _stop(proc)


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    _stop(proc, signal.SIGKILL)  # kill -9: no clean-up ran; the OS released the lock
    assert json.loads((run_dir / run_lock.RECORD_FILE).read_text())["pid"] == proc.pid  # its record is still there
    with caplog.at_level("WARNING"):
        lock = run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="notebook")
    try:
        assert lock.took_over["pid"] == proc.pid and lock.record["pid"] == os.getpid()
        assert f"took over the lock of {run_dir}: pid {proc.pid}" in caplog.text
        assert run_lock.hold_run_dir(run_dir, step="02_finetune", holder="notebook") is lock  # the same process
        assert json.loads((run_dir / run_lock.RECORD_FILE).read_text())["step"] == "02_finetune"
        os.chdir(tmp_path)  # the same folder spelled another way is the same lock
        assert run_lock.hold_run_dir("run", step="03_evaluate", holder="notebook") is lock
    finally:
        lock.release()
    assert not (run_dir / run_lock.RECORD_FILE).exists()  # released on purpose: nothing to take over
    again = run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="notebook")
    assert again.took_over is None
    again.release()


def test_the_kernels_of_a_run_share_its_lock_and_others_do_not(tmp_path):
    run_dir = tmp_path / "run"
    lock = run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="scgpt-protocol run")
    code = ("from scgpt_protocol.core.layout import RunLayout\n"
            f"RunLayout({str(run_dir)!r}).hold('preprocess'); print('ok')")
    try:
        env = {**os.environ, **run_lock.inherit_env(lock)}
        shared = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert shared.stdout.strip() == "ok", shared.stderr
        forged = {**env, run_lock.INHERITED_ENV: f"{lock.path}\tnot-the-token"}
        other = subprocess.run([sys.executable, "-c", code], env=forged, capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "RunDirInUse" in other.stderr and "is in use by" in other.stderr
    finally:
        lock.release()


def test_a_run_while_the_folder_is_free_leaves_the_lock_released(tmp_path, monkeypatch):
    import papermill

    seen = {}

    def execute(notebook, report, parameters=None, **kwargs):  # what the kernel would see
        record = json.loads((Path(parameters["run_dir"]) / run_lock.RECORD_FILE).read_text())
        seen.update(record=record, env=os.environ.get(run_lock.INHERITED_ENV, ""),
                    manager=kwargs.get("kernel_manager_class"))
        Path(report).write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    run_protocol(CI, tmp_path / "run", steps=["01"], html=False)
    assert seen["record"]["holder"] == "scgpt-protocol run" and seen["record"]["pid"] == os.getpid()
    assert seen["record"]["step"] == "01_preprocess" and seen["env"].split("\t")[1] == seen["record"]["token"]
    assert seen["manager"] is not None  # the kernel's own output goes to logs/<step>.kernel.log
    assert not (tmp_path / "run" / run_lock.RECORD_FILE).exists() and run_lock.INHERITED_ENV not in os.environ


def test_two_writers_started_together_one_wins(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from scgpt_protocol.core.errors import RunDirInUse
        from scgpt_protocol.core.lock import hold_run_dir
        while time.time() < {time.time() + 3.0}:  # start at the same moment
            pass
        try:
            hold_run_dir({str(tmp_path / "run")!r}, step="01_preprocess", holder="notebook")
            print("held", flush=True)
            time.sleep(3)
        except RunDirInUse:
            print("refused", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["held", "refused", "refused"]


def test_without_os_locks_the_record_is_an_exclusive_claim(tmp_path, monkeypatch):
    import filelock

    def no_locks(fd, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(filelock, "lock_descriptor", no_locks)
    run_dir = tmp_path / "run"
    lock = run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="notebook")
    assert not lock.os_lock and json.loads((run_dir / run_lock.RECORD_FILE).read_text())["pid"] == os.getpid()
    other_host = {"pid": 1, "host": "elsewhere", "holder": "notebook", "step": "02_finetune", "since": "then"}
    lock.release()
    (run_dir / run_lock.RECORD_FILE).write_text(json.dumps(other_host))
    with pytest.raises(RunDirInUse, match=r"on host elsewhere.*delete .*\.scgpt-protocol\.lock\.json and run again"):
        run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="notebook")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run_dir / run_lock.RECORD_FILE).write_text(json.dumps({**other_host, "host": socket.gethostname(),
                                                             "pid": int(dead.stdout)}))
    lock = run_lock.hold_run_dir(run_dir, step="01_preprocess", holder="notebook")  # its process ended here
    assert lock.took_over["pid"] == int(dead.stdout)
    lock.release()


def test_a_set_up_cell_run_again_with_another_run_dir_frees_the_first(tmp_path):
    first, second = RunLayout(tmp_path / "a"), RunLayout(tmp_path / "b")
    first.hold("preprocess")
    assert run_lock.held_lock(first.run_dir) is not None
    second.hold("preprocess")
    assert run_lock.held_lock(first.run_dir) is None and run_lock.held_lock(second.run_dir) is not None
    second.release()


# == a full disk, a dying kernel, leftovers ================================================================
_PARTIAL_THEN_DIE = [
    "from pathlib import Path\nimport os, signal",
    "p = Path(run_dir) / 'data' / '.prepared.abcd1234.partial.h5ad'\np.parent.mkdir(parents=True, exist_ok=True)\n"
    "p.write_bytes(b'x' * 300_000)",
    "os.kill(os.getpid(), signal.SIGKILL)  # as HDF5 takes the kernel down on a full disk",
    "print('never')",
]


def test_a_kernel_that_dies_fails_the_step_and_its_half_written_files_go(tmp_path, fake_notebooks):
    run_dir = tmp_path / "run"
    folder = fake_notebooks(tmp_path / "nb", _PARTIAL_THEN_DIE)
    with pytest.raises(RunFailed) as info:
        run_protocol(CI, run_dir, steps=["01"], html=False, notebooks=folder)
    assert info.value.ename == "DeadKernelError" and "the kernel died while running 01_preprocess.ipynb" in str(
        info.value)
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"]["01_preprocess"]["status"] == "failed"
    assert manifest["steps"]["01_preprocess"]["error_type"] == "DeadKernelError" and "leftovers" not in manifest
    assert not list(run_dir.rglob("*.partial*")) and (run_dir / "reports" / "index.html").is_file()
    assert (run_dir / "logs" / "preprocess.kernel.log").is_file()  # the kernel's own output, not the console


def test_a_kernel_that_dies_on_a_full_disk_is_disk_full(tmp_path, monkeypatch, fake_notebooks):
    run_dir = tmp_path / "run"
    folder = fake_notebooks(tmp_path / "nb", _PARTIAL_THEN_DIE)
    real = failures.free_bytes
    calls = []

    def full_then_free(path):  # the disk is full when the kernel dies; its leftovers free 300 kB
        calls.append(path)
        return 0 if len(calls) == 1 else real(path)

    monkeypatch.setattr(failures, "free_bytes", full_then_free)
    with pytest.raises(DiskFullError) as info:
        run_protocol(CI, run_dir, steps=["01"], html=False, notebooks=folder)
    msg = str(info.value)
    assert info.value.path.endswith(".prepared.abcd1234.partial.h5ad") and info.value.needed == 300_000
    assert "The kernel died on the full disk" in msg and "was removed (293.0 KiB)" in msg
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"]["01_preprocess"]["error_type"] == "DiskFullError"
    assert not list(run_dir.rglob("*.partial*"))


def test_disk_full_while_01_writes_the_prepared_data_stops_before_the_disk_is(tmp_path, monkeypatch, pbmc):
    """The space check stops the HDF5 write before the disk fills up (a full disk can crash HDF5 itself)."""
    from scgpt_protocol import pp
    from scgpt_protocol.core import io as core_io

    path = tmp_path / "in.h5ad"
    pbmc.write_h5ad(path)
    params = PreprocessParams(adata_path=str(path), label_key="bulk_labels", min_cells_per_class=3)
    vocab = {g: i for i, g in enumerate([*map(str, pbmc.var_names), *SPECIAL_TOKENS])}
    monkeypatch.setattr(core_io, "free_bytes", lambda folder: 3 * 2**20)  # 3 MiB free, as on a small disk
    for chunked in (False, True):
        layout = RunLayout(tmp_path / f"run{chunked}").make_dirs()
        with pytest.raises(DiskFullError) as info:
            pp.prepare_file(params, vocab, layout, chunked=chunked, chunk_size=200)
        err = info.value
        # free: what the disk has plus what the partial file held when it stopped (it is removed)
        assert err.path == str(layout.prepared_adata) and err.free >= 3 * 2**20 and err.needed > err.free
        assert "is missing" in str(err) and "Stopped before the disk was full" in str(err)
        assert not list(layout.run_dir.rglob("*.partial*")) and not layout.prepared_adata.exists()


def test_leftovers_of_earlier_runs_are_removed_and_those_that_stay_are_listed(tmp_path, monkeypatch):
    import papermill

    run_dir = tmp_path / "run"
    layout = RunLayout(run_dir).make_dirs()
    stray = layout.data_dir / ".prepared.abcd1234.partial.h5ad"
    stray.write_bytes(b"x" * 1000)
    stuck = layout.figures_dir / ".qc.zz99.partial.png"
    stuck.write_bytes(b"x")
    old_report = layout.reports_dir / "01_preprocess.ipynb.incomplete"
    old_report.parent.mkdir(parents=True)
    old_report.write_text("{")
    foreign = layout.data_dir / "notes.partial.txt"  # not ours: kept
    foreign.write_text("mine")
    other_step = layout.model_dir / ".best_model.qq11.partial.pt"  # 02's: not removed when 01 runs
    other_step.parent.mkdir(parents=True)
    other_step.write_bytes(b"x")
    (run_dir / "run_manifest.json").write_text(json.dumps({"params_dir": str(CI), "status": "failed", "steps": {}}))
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == stuck.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(papermill, "execute_notebook", lambda notebook, report, **kw: Path(report).write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})))
    run_protocol(CI, run_dir, steps=["01"], html=False)
    assert not stray.exists() and not old_report.exists() and foreign.exists() and stuck.exists()
    assert other_step.exists()
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["leftovers"] == {"01_preprocess": [f"{stuck}: Permission denied"]}
    page = (run_dir / "reports" / "index.html").read_text()
    assert "Half-written files left behind" in page and stuck.name in page


# == typed errors ==========================================================================================
def test_a_read_only_run_folder_is_a_run_dir_error(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(run_lock.LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunDirError) as info:
        run_protocol(CI, tmp_path / "run", steps=["01"], html=False)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EROFS
    assert str(info.value).startswith(f"run_dir {tmp_path / 'run'} is on a read-only file system")
    assert "choose a run_dir on a writable disk" in str(info.value)


def test_float16_expression_is_read_exactly_and_complex_is_refused(tmp_path, pbmc):
    from scgpt_protocol import pp

    x16 = np.asarray(pbmc.X.toarray() if hasattr(pbmc.X, "toarray") else pbmc.X, dtype=np.float16)
    half = ad.AnnData(x16, obs=pbmc.obs, var=pbmc.var)
    half.write_h5ad(tmp_path / "half.h5ad")
    vocab = {g: i for i, g in enumerate([*map(str, pbmc.var_names), *SPECIAL_TOKENS])}
    params = PreprocessParams(adata_path=str(tmp_path / "half.h5ad"), label_key="bulk_labels", min_cells_per_class=3)
    for chunked in (False, True):
        layout = RunLayout(tmp_path / f"run{chunked}").make_dirs()
        out = pp.prepare_file(params, vocab, layout, chunked=chunked)
        stored = ad.read_h5ad(layout.prepared_adata)
        assert stored.X.dtype == np.float32 and out.adata.n_obs == stored.n_obs
        genes = [list(half.var_names).index(g) for g in stored.var_names]
        rows = [list(half.obs_names).index(c) for c in stored.obs_names]
        np.testing.assert_array_equal(stored.X.toarray(), x16[np.ix_(rows, genes)].astype(np.float32))
    ad.AnnData(x16.astype(np.complex64), obs=pbmc.obs, var=pbmc.var).write_h5ad(tmp_path / "complex.h5ad")
    with pytest.raises(InputDataError, match=r"adata.X holds values of dtype complex64; expected real numbers"):
        pp.prepare_file(PreprocessParams(adata_path=str(tmp_path / "complex.h5ad"), label_key="bulk_labels"),
                        vocab, RunLayout(tmp_path / "c").make_dirs())


def test_a_parameter_value_of_megabytes_is_refused_shortened(tmp_path):
    huge = "x" * 10_000_000
    with pytest.raises(ParamsError) as info:
        PreprocessParams(label_key=huge)
    msg = str(info.value)
    assert len(msg) < 600 and "(10,000,002 characters in all)" in msg and f"at most {MAX_TEXT:,} characters" in msg
    for value in (huge, {huge: "T cell"}, {"T": huge}):  # a label map: a path or an inline mapping
        with pytest.raises(ParamsError, match="at most 4,096 characters"):
            PreprocessParams(label_map=value)
    PreprocessParams(label_map={"CD4 T": "T cell"}, label_key="x" * MAX_TEXT)  # at the limit: fine
    scenario = tmp_path / "params"
    scenario.mkdir()
    for step in ("01_preprocess", "02_finetune", "03_evaluate", "04_zeroshot"):
        (scenario / f"{step}.yaml").write_text("label_key: " + huge + "\n" if step == "01_preprocess" else "{}\n")
    with pytest.raises(ParamsError):
        run_protocol(scenario, tmp_path / "run", steps=["01"], html=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_records_keep_long_values_shortened_but_comparable():
    from scgpt_protocol.core.io import short_record

    a, b = "a" * 5000, "a" * 4999 + "b"
    record = short_record({"label_map": {a: "T cell"}, "k": [a, 1], "short": "x"})
    key = next(iter(record["label_map"]))
    assert len(key) < 200 and "5,000 characters, sha256" in key and record["short"] == "x" and record["k"][1] == 1
    assert short_record(a) != short_record(b) and short_record(a) == short_record("a" * 5000)


def test_run_dir_in_a_step_file_loses_to_the_run_dir_and_the_first_line_says_so(tmp_path, monkeypatch, caplog):
    import papermill

    scenario = tmp_path / "params"
    scenario.mkdir()
    for step in ("01_preprocess", "02_finetune", "03_evaluate", "04_zeroshot"):
        extra = "\nrun_dir: somewhere/else\n" if step == "01_preprocess" else ""
        (scenario / f"{step}.yaml").write_text((CI / f"{step}.yaml").read_text() + extra)
    monkeypatch.setattr(papermill, "execute_notebook", lambda notebook, report, **kw: Path(report).write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})))
    with caplog.at_level("INFO"):
        run_protocol(scenario, tmp_path / "run", steps=["01"], html=False)
    first = caplog.records[0].getMessage()
    assert first.startswith(f"scenario {scenario}") and f"run folder {tmp_path / 'run'}" in first
    assert "it wins over run_dir 'somewhere/else' in 01_preprocess.yaml" in first
    assert not (tmp_path / "somewhere").exists()


def test_sigterm_leaves_no_kernel_traceback_on_the_console(tmp_path, fake_notebooks):
    """A real ``scgpt-protocol run`` stopped by SIGTERM: the kernel's own complaints go to its log."""
    folder = fake_notebooks(tmp_path / "nb", ["print('started')", "import time\ntime.sleep(120)"])
    proc = subprocess.Popen([sys.executable, "-m", "scgpt_protocol", "run", str(CI), "--run-dir",
                             str(tmp_path / "run"), "--steps", "01", "--notebooks", str(folder), "--no-html"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    report = tmp_path / "run" / "reports" / "01_preprocess.ipynb"
    while time.monotonic() < deadline and "started" not in (report.read_text() if report.is_file() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "was interrupted (SIGTERM)" in out
    assert "Traceback" not in out and "zmq" not in out and "IPKernelApp" not in out
