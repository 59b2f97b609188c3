"""What a failed step leaves: the typed error for its record (a cell's error, a dead kernel, a full disk) and no
half-written file (:func:`remove_leftovers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core.errors import DiskFullError, size_text
from ...core.io import disk_full_error, free_bytes, is_disk_full
from ...core.layout import RunLayout
from .kernel import kernel_died, last_words
from .reports import set_report_aside

__all__ = ["what_failed", "remove_leftovers", "failure_message"]


def failure_message(err: Exception, report: Path) -> str:
    cell = getattr(err, "exec_count", None) or getattr(err, "cell_index", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell {cell} of " if cell is not None else ""
    return f"{ename}: {evalue} (in {where}{report})"


#: less free space than this when a kernel died: it died on the full disk
_FULL_DISK_BYTES = 2**20


def what_failed(layout: RunLayout, step: str, err: Exception, manifest: dict[str, Any]) -> tuple[
        str, DiskFullError | None, str, str | None]:
    """What a failed step's record says: (error, a DiskFullError when the disk was full, the error's name, what
    was done to a truncated report). Removes what the step left half-written, which gives its space back."""
    report = layout.step_report(step)
    free_then = free_bytes(layout.run_dir)
    written = report.stat().st_size if report.is_file() else None
    aside = set_report_aside(report)
    leftovers = remove_leftovers(layout, step, manifest)  # {path: bytes}: the space they took is free again
    died = kernel_died(err)
    words = last_words(layout.kernel_log(step.split("_", 1)[1])) if died else ""
    full_disk = is_disk_full(err) or (died and ((free_then is not None and free_then < _FULL_DISK_BYTES)
                                                or "no space left" in words.lower()))
    full = None
    if full_disk and died:
        target = max(leftovers, key=leftovers.get) if leftovers else report
        doing = f"writing {target.name}" if leftovers else "while it ran"
        removed = (f"; what it left half-written was removed ({size_text(sum(leftovers.values()))})" if leftovers
                   else "")
        note = f"The kernel died on the full disk (a library crashed {doing}){removed}."
        full = disk_full_error(target, needed=leftovers.get(target) or None, cause=err, note=note)
    elif full_disk:  # the runner's own write (papermill saving the report) failed
        full = disk_full_error(report, needed=written, cause=err)
    if full is not None:
        error = str(full)
    elif died:
        log = layout.kernel_log(step.split("_", 1)[1])
        error = (f"the kernel died while running {report.name} (the system stopped it for memory, or a library "
                 "crashed)" + (f"; its last words ({log}): {words}" if words else ""))
    else:
        error = failure_message(err, report)
    if aside:
        error += f" ({aside})"
    ename = "DiskFullError" if full is not None else ("DeadKernelError" if died else getattr(err, "ename",
                                                                                          type(err).__name__))
    return error, full, ename, aside


def remove_leftovers(layout: RunLayout, step: str, manifest: dict[str, Any]) -> dict[Path, int]:
    """Remove the temporary files a failed or killed run of ``step`` left and return them with their sizes; the
    manifest's ``leftovers`` lists those that could not be removed (the run summary shows them)."""
    removed, kept = layout.remove_leftovers(step)
    leftovers = manifest.setdefault("leftovers", {})
    if kept:
        leftovers[step] = kept
    else:
        leftovers.pop(step, None)
    if not leftovers:
        manifest.pop("leftovers")
    return removed
