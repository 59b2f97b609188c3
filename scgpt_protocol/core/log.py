"""Logging and progress bars.

The package logs through ``logging.getLogger("scgpt_protocol....")`` and never prints. Unless the
application configured logging itself, INFO messages go to the current ``sys.stdout`` so that they
appear in notebooks, executed reports and terminals alike.

Progress: a widget bar (``tqdm.notebook``) when a person runs a notebook, replaced by its final state
as a line of text when it ends (so a saved notebook keeps it); plain text lines at an interval when a
terminal, papermill or CI runs the code (widget bars render as ``HBox(...)`` in executed reports).
``SCGPT_PROTOCOL_PROGRESS`` = ``widget`` / ``text`` / ``off`` forces a mode; the protocol runner sets ``text``
for the notebooks it executes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

logger = logging.getLogger("scgpt_protocol")

__all__ = ["progress", "progress_mode", "ensure_logging", "setup_logging", "DETAIL"]

T = TypeVar("T")

#: ``logger.info(..., extra=DETAIL)``: a detail for the log file only, not for the notebook's output
#: (internal names, per-call repeats, tables the notebook already displays)
DETAIL: dict[str, Any] = {"scgpt_detail": True}


def _not_detail(record: logging.LogRecord) -> bool:
    return not getattr(record, "scgpt_detail", False)


class _CurrentStdout(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is now (Jupyter swaps it per cell)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it once
        pass


def _stdout_handler() -> logging.Handler:
    """Plain messages to the current stdout, without :data:`DETAIL` records."""
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_not_detail)
    return handler


def ensure_logging(level: int = logging.INFO) -> None:
    """Show the package's INFO messages unless the application set up logging itself."""
    if any(isinstance(h, _CurrentStdout) for h in logger.handlers) or logging.getLogger().handlers:
        return
    logger.addHandler(_stdout_handler())
    logger.setLevel(level)
    logger.propagate = False


def setup_logging(layout: Any, step: str, level: int = logging.INFO) -> None:
    """Send the package's log to the notebook's output and to ``run_dir/logs/<step>.log``.

    Idempotent: re-running the cell does not add a second handler.
    """
    ensure_logging(level)
    path = Path(layout.step_log(step))
    path.parent.mkdir(parents=True, exist_ok=True)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.info("logging to %s", path)
    from .versions import note_untested_versions

    note_untested_versions()  # versions outside the tested set: said once, here and in the first output


def progress_mode() -> str:
    """``widget``, ``text`` or ``off`` (see the module docstring)."""
    forced = os.environ.get("SCGPT_PROTOCOL_PROGRESS", "").strip().lower()
    if forced in {"widget", "text", "off"}:
        return forced
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    try:  # JupyterLab, Notebook and Colab (whose shell subclasses ipykernel's)
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:
        ZMQInteractiveShell = None  # noqa: N806
    if shell is not None and ZMQInteractiveShell is not None and isinstance(shell, ZMQInteractiveShell):
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return "text"
        return "widget"
    return "text"


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    interval: float = 10.0,
    size: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Iterate with a progress display.

    ``size(item)`` gives an item's size in ``unit`` (e.g. the cells of a batch); ``total`` is in
    the same unit. Text mode logs a line every ``interval`` seconds and a last line with the
    elapsed time.
    """
    mode = progress_mode()
    if total is None and hasattr(iterable, "__len__") and size is None:
        total = len(iterable)  # type: ignore[arg-type]
    if mode == "widget":
        yield from _widget_progress(iterable, total=total, desc=desc, unit=unit, size=size)
        return

    ensure_logging()
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += size(item) if size is not None else 1
        now = time.perf_counter()
        if mode == "text" and now - last >= interval and (total is None or done < total):
            last = now
            rate = done / (now - start)
            eta = f", eta {_fmt((total - done) / rate)}" if total and rate > 0 else ""
            of = f"/{total:,}" if total else ""
            logger.info("%s: %s%s %s (%.1f %s/s%s)", desc, f"{done:,}", of, unit, rate, unit, eta)
    if mode != "off":
        logger.info("%s", _final_line(desc, done, None, unit, time.perf_counter() - start, finished=True))


def _final_line(desc: str, done: int, total: int | None, unit: str, elapsed: float, *, finished: bool) -> str:
    """A finished (or stopped) progress display as one line of text."""
    of = f"/{total:,}" if total and not finished else ""
    state = "" if finished else "stopped at "
    return (f"{desc}: {state}{done:,}{of} {unit} in {_fmt(elapsed)} "
            f"({done / max(elapsed, 1e-9):.1f} {unit}/s)")


def _widget_progress(iterable: Iterable[T], *, total: int | None, desc: str, unit: str,
                     size: Callable[[T], int] | None) -> Iterator[T]:
    """A widget bar while it runs; when it ends (or stops), the bar's output becomes its last state as text.

    A saved notebook then shows that line (``"full epoch 3/10: 490 cells in 0:00:12 (40.8 cells/s)"``)
    whether or not the notebook also saved the widgets' state: a widget view left in the output would read
    "model not found" when the notebook is opened again.
    """
    from IPython.display import Pretty, display
    from tqdm.notebook import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, display=False)
    handle = display(bar.container, display_id=True)
    bar.displayed = True
    start, done, finished = time.perf_counter(), 0, False
    try:
        for item in iterable:
            yield item
            step = size(item) if size is not None else 1
            done += step
            bar.update(step)
        finished = True
    finally:
        bar.close()
        line = _final_line(desc, done, total, unit, time.perf_counter() - start, finished=finished)
        if handle is not None:
            handle.update(Pretty(line))
        logger.info("%s", line, extra=DETAIL)  # the log file has it too


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
