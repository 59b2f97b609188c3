"""Typed errors for bad input.

Every message says what was found, what was expected and how to fix it. Each class also derives
from the builtin a caller would catch (``ValueError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

__all__ = ["ScGPTProtocolError", "CheckpointError", "CheckpointNotFoundError", "DownloadError",
    "ChecksumMismatchError", "InputDataError", "GeneMatchError", "ArtifactError", "format_keys"]


def format_keys(keys: object, limit: int = 10) -> str:
    """Names (columns, layers, weights, options) listed for a message.

    ``['a', 'b', ... (+3 more)]``, or ``none``: the one way every message of the package lists keys, so that
    long lists stay readable.
    """
    names = [str(k) for k in keys]  # type: ignore[attr-defined]
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}, ... (+{len(names) - limit} more)]" if len(names) > limit else f"[{shown}]"


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


__all__ += ["DiskFullError"]


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class DiskFullError(ScGPTProtocolError, OSError):
    """A write failed because the disk (or the user's quota) is full.

    ``path`` is the file that could not be written, ``needed`` a lower bound of the bytes it needs (what
    was written before the failure, or the size of the tensors for ``torch.save``; None if unknown) and
    ``free`` the bytes free on that file system when it failed. Nothing half-written is left at ``path``.
    """

    def __init__(self, path: object, *, needed: int | None = None, free: int | None = None,
                 cause: BaseException | None = None, note: str = "") -> None:
        import errno

        self.path, self.needed, self.free = str(path), needed, free
        first_line = str(cause).splitlines()[0][:300] if cause is not None and str(cause) else ""
        detail = f" ({type(cause).__name__}: {first_line})" if cause is not None else ""
        self.message = (
            f"no space left to write {self.path}{detail}: it needs at least {_size(needed)} and "
            f"{_size(free)} {'is' if free is not None else 'may be'} free on that file system. Free some space "
            f"(or use a run_dir on a larger disk) and run the step again.{(' ' + note) if note else ''}"
        )
        super().__init__(errno.ENOSPC, self.message, self.path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # pickles with its keyword arguments (OSError's default would not)
        return (_rebuild_disk_full, (self.path, self.needed, self.free, self.message))


def _rebuild_disk_full(path: str, needed: int | None, free: int | None, message: str) -> DiskFullError:
    err = DiskFullError(path, needed=needed, free=free)
    err.message = message
    return err


class DamagedFileError(ScGPTProtocolError, ValueError):
    """A record the package wrote (or reads) is not valid JSON: a damaged or foreign file."""


class ArtifactError(ScGPTProtocolError, OSError):
    """A result artifact (``export/vars.h5``, ``export/obs.duckdb``) could not be written."""
