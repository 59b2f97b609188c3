"""The kernel a headless step runs in: its own output to ``logs/<step>.kernel.log`` (not the console), an
environment that shares the runner's run-folder lock and dumps a Python stack on a crash, and what it said last
when it died.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["kernel_manager_for", "kernel_environment", "last_words", "kernel_died"]


def kernel_manager_for(log_path: Path, pass_fds: tuple[int, ...] = ()) -> type:
    """A jupyter kernel manager class whose kernels write their process output (the kernel's own warnings, a
    crash's stack, a zmq traceback while it is stopped) to ``log_path`` instead of the runner's console, and
    inherit ``pass_fds`` (the run folder's lock: it stays held while the kernel runs); cell output still goes to
    the report. Given to papermill as ``kernel_manager_class``."""
    from jupyter_client.manager import AsyncKernelManager

    class StepKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "ab")  # noqa: SIM115  (the kernel keeps its own copy of the descriptor)
            except OSError:  # a full or read-only disk: the kernel writes to the console as before
                log = None
            if log is not None:
                kw.setdefault("stdout", log)
                kw.setdefault("stderr", log)
            if pass_fds:
                kw["pass_fds"] = pass_fds
            try:
                await super()._async_launch_kernel(kernel_cmd, **kw)
            finally:
                if log is not None:
                    log.close()

    return StepKernelManager


@contextmanager
def kernel_environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block; restore them after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def kernel_died(err: BaseException) -> bool:
    """Whether papermill stopped because the kernel process died (a crash, the OOM killer), not a cell's error."""
    return type(err).__name__ == "DeadKernelError" or "Kernel died" in str(err)


def last_words(log_path: Path, lines: int = 6, limit: int = 600) -> str:
    """The last lines the kernel wrote to its log (its crash report), or ''."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 16384, 0))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    out = " | ".join(kept)
    return out[-limit:]
