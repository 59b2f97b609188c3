"""Typed errors for bad input.

Every message says what was found, what was expected and how to fix it. Each class also derives
from the builtin a caller would catch (``ValueError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

__all__ = [
    "ScGPTProtocolError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DownloadError",
    "ChecksumMismatchError",
    "InputDataError",
    "GeneMatchError",
    "ArtifactError",
    "format_keys",
]


def format_keys(keys: object, limit: int = 10) -> str:
    """Names (columns, layers, weights, options) for a message: ``['a', 'b', ... (+3 more)]``, or ``none``.

    The one way every message of the package lists keys, so that long lists stay readable.
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


class ArtifactError(ScGPTProtocolError, OSError):
    """A result artifact (``export/vars.h5``, ``export/obs.duckdb``) could not be written."""
