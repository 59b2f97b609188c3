"""Typed errors for bad input.

Every message says what was found, what was expected and how to fix it. Each class also derives
from the builtin a caller would catch (``ValueError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

__all__ = ["ScGPTProtocolError", "CheckpointError", "CheckpointNotFoundError", "DownloadError",
    "ChecksumMismatchError", "InputDataError", "GeneMatchError", "ArtifactError", "format_keys", "shown",
    "RunDirInUse", "RunDirError"]

#: the most characters of one value a message shows (:func:`shown`)
SHOWN_CHARS = 200


def format_keys(keys: object, limit: int = 10) -> str:
    """Names (columns, layers, weights, options) listed for a message.

    ``['a', 'b', ... (+3 more)]``, or ``none``: the one way every message of the package lists keys, so that
    long lists stay readable.
    """
    names = [str(k) for k in keys]  # type: ignore[attr-defined]
    if not names:
        return "none"
    listed = ", ".join(shown(n, 100) for n in names[:limit])
    return f"[{listed}, ... (+{len(names) - limit} more)]" if len(names) > limit else f"[{listed}]"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: a 10 MB parameter value is shown by its
    start, its end and its length, never whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:max(limit - 40, 20)]}...{text[-20:]} ({len(text):,} characters in all)"


class ScGPTProtocolError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(ScGPTProtocolError, ValueError):
    """A checkpoint folder exists but its content is not a usable scGPT checkpoint."""


class CheckpointNotFoundError(ScGPTProtocolError, FileNotFoundError):
    """A checkpoint folder or one of its files is missing."""


class DownloadError(ScGPTProtocolError, OSError):
    """A checkpoint could not be downloaded (offline, quota, incomplete folder)."""


class ChecksumMismatchError(ScGPTProtocolError, ValueError):
    """A cached file no longer has the sha256 recorded when it was downloaded."""


class InputDataError(ScGPTProtocolError, ValueError):
    """The expression data cannot be used as given (negative or NaN values, wrong shape...)."""


class GeneMatchError(InputDataError):
    """Too few of the data's genes are in the checkpoint's vocabulary."""


__all__ += ["DiskFullError", "size_text"]


def size_text(n: int | None) -> str:
    """``2.4 MiB``: a number of bytes as a message shows it."""
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _space_story(needed: int | None, free: int | None) -> str:
    """How much space a write needs, how much is free and how much is missing, in words."""
    if free is None:
        return f"it needs at least {size_text(needed)} and the free space on that file system is unknown."
    if needed is None:
        return f"{size_text(free)} is free on that file system, less than it needs."
    if needed > free:
        return (f"it needs at least {size_text(needed)} and {size_text(free)} is free on that file system: at least "
                f"{size_text(needed - free)} is missing.")
    # the write failed though the space looks free now: a quota, or other writers filled the disk meanwhile
    return (f"the write failed after {size_text(needed)} of it had been written, though {size_text(free)} is free "
            "now that the partial file is removed: a quota, or other files written at the same time, may have "
            f"filled it. Check the quota (or what else writes there), free at least {size_text(needed)} more.")


class DiskFullError(ScGPTProtocolError, OSError):
    """A write failed because the disk (or the user's quota) is full.

    ``path`` is the file that could not be written, ``needed`` a lower bound of the bytes it needs (what
    was written before the failure, or the size of the tensors for ``torch.save``; None if unknown) and
    ``free`` the bytes free on that file system when it failed. Nothing half-written is left at ``path``.
    """

    def __init__(self, path: object, *, needed: int | None = None, free: int | None = None,
                 cause: BaseException | None = None, note: str = "") -> None:
        import errno

        self.path, self.needed, self.free, self.note = str(path), needed, free, note
        first_line = str(cause).splitlines()[0][:300] if cause is not None and str(cause) else ""
        detail = f" ({type(cause).__name__}: {first_line})" if cause is not None else ""
        self.message = (f"no space left to write {self.path}{detail}: {_space_story(needed, free)} Free some space "
                        f"(or use a run_dir on a larger disk) and run the step again.{(' ' + note) if note else ''}")
        super().__init__(errno.ENOSPC, self.message, self.path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # pickles with its keyword arguments (OSError's default would not)
        return (_rebuild_disk_full, (self.path, self.needed, self.free, self.message, self.note))


def _rebuild_disk_full(path: str, needed: int | None, free: int | None, message: str,
                       note: str = "") -> DiskFullError:
    err = DiskFullError(path, needed=needed, free=free, note=note)
    err.message = message
    return err


class RunDirInUse(ScGPTProtocolError, FileExistsError):
    """``run_dir`` is being written by another run or notebook (its lock is held), or holds a finished run or
    files of something else."""


class RunDirError(ScGPTProtocolError, OSError):
    """``run_dir`` cannot be used: it is not writable (a read-only file system, no permission). ``errno`` and
    ``filename`` are those of the failed write; the message says what to do."""

    def __init__(self, code: int, message: str, path: str) -> None:
        super().__init__(code, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.errno, self.message, self.filename))


class DamagedFileError(ScGPTProtocolError, ValueError):
    """A record the package wrote (or reads) is not valid JSON: a damaged or foreign file."""


class ArtifactError(ScGPTProtocolError, OSError):
    """A result artifact (``export/vars.h5``, ``export/obs.duckdb``) could not be written."""
