"""Progress display modes and logging set-up."""

from __future__ import annotations

import logging

import pytest

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.core.log import progress, progress_mode, setup_logging


@pytest.mark.parametrize("forced", ["text", "widget", "off"])
def test_environment_variable_forces_the_mode(monkeypatch, forced):
    monkeypatch.setenv("SCGPT_PROTOCOL_PROGRESS", forced)
    assert progress_mode() == forced


def test_outside_a_notebook_progress_is_text(monkeypatch):
    monkeypatch.delenv("SCGPT_PROTOCOL_PROGRESS", raising=False)
    assert progress_mode() == "text"


def test_text_progress_logs_a_final_line_with_counts(monkeypatch, caplog):
    monkeypatch.setenv("SCGPT_PROTOCOL_PROGRESS", "text")
    caplog.set_level(logging.INFO, logger="scgpt_protocol")
    items = list(progress(iter([[1, 2], [3]]), total=3, desc="work", unit="cells", size=len))
    assert items == [[1, 2], [3]]
    assert "work: 3 cells in 0:00:00" in caplog.text


def test_setup_logging_writes_the_step_log_once(tmp_path):
    layout = RunLayout(tmp_path)
    setup_logging(layout, "demo")
    setup_logging(layout, "demo")  # re-running the cell adds no second file handler
    logging.getLogger("scgpt_protocol.test").info("hello from a step")
    handlers = [h for h in logging.getLogger("scgpt_protocol").handlers if isinstance(h, logging.FileHandler)]
    assert len(handlers) == 1
    handlers[0].flush()
    assert "hello from a step" in layout.step_log("demo").read_text()
    logging.getLogger("scgpt_protocol").removeHandler(handlers[0])
    handlers[0].close()


def test_a_finished_widget_bar_leaves_its_final_state_as_text_in_the_saved_notebook(tmp_path):
    """In a kernel (as in JupyterLab) the bar is a widget while it runs; the saved notebook keeps a line of text,
    not a widget view that would read "model not found" when opened again (widget state is not saved)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import os\nos.environ.pop('SCGPT_PROTOCOL_PROGRESS', None)\n"
        "from scgpt_protocol.core.log import progress, progress_mode\n"
        "print(progress_mode())\n"
        "items = list(progress(iter([[1, 2], [3]]), total=3, desc='epoch 1/1', unit='cells', size=len))\n"
        "stopped = progress(iter(range(10)), total=10, desc='cut short', unit='cells')\n"
        "next(stopped); stopped.close()"
    )]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    assert outputs[0].text.strip() == "widget"
    shown = [o.data for o in outputs if o.output_type == "display_data"]
    assert not any("application/vnd.jupyter.widget-view+json" in d for d in shown), shown
    texts = [d["text/plain"] for d in shown]
    assert len(texts) == 2 and texts[0].startswith("epoch 1/1: 3 cells in 0:00:0")
    assert texts[1].startswith("cut short: stopped at 0/10 cells in ")  # the item handed out was not finished
