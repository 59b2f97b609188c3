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
]


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
