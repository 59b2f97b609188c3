"""Files: atomic writes that never leave half a file and name a full disk (:class:`DiskFullError`),
JSON records read with one failure policy, sha256 of a file, JSON-safe values, UTC timestamps, and the
versions of the packages a run used."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import DamagedFileError, DiskFullError, size_text

__all__ = ["sha256_file", "atomic_write", "disk_full_error", "is_disk_full", "read_json", "utc_stamp", "utc_now",
           "short_record", "free_bytes", "SpaceGuard"]

_CHUNK_SIZE = 1 << 20
#: ``read_json(default=REQUIRED)``: a missing file is an error
REQUIRED: Any = object()


def read_json(path: str | Path, *, default: Any = REQUIRED, lenient: bool = False, missing_hint: str = "",
              error: type[Exception] = DamagedFileError, damaged_hint: str = "") -> Any:
    """A JSON record, with one failure policy for every reader of the package.

    Parameters
    ----------
    path
        The file.
    default
        Returned when the file does not exist; when not given, a missing file raises ``FileNotFoundError``
        whose message ends with ``missing_hint`` (e.g. which step writes it).
    lenient
        Also return ``default`` when the file cannot be read or is not valid JSON (a summary that must never
        fail). Otherwise such a file raises ``error`` naming it, with ``damaged_hint``.
    error
        The exception class of a damaged file (:class:`~scgpt_protocol.core.errors.DamagedFileError`, or e.g.
        ``CheckpointError`` for a checkpoint's own files).

    Raises
    ------
    FileNotFoundError
        No file and no ``default``.
    DamagedFileError
        (or ``error``) The file is not valid UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        if default is not REQUIRED:
            return default
        raise FileNotFoundError(f"{path} does not exist" + (f": {missing_hint}" if missing_hint else "."))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if lenient:
            return None if default is REQUIRED else default
        msg = (f"{path} is not valid JSON ({type(err).__name__}: {err}); "
               + (damaged_hint or "the file is damaged: delete it and run the step that writes it again."))
        raise error(msg) from None


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (``2026-12-06T04:54:52+00:00``): the time of a record."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """The current UTC time for a file or folder name (``20261206T045452Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks.

    Parameters
    ----------
    path : str or Path
        File to hash.

    Returns
    -------
    str
        Lower-case hexadecimal digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_safe(obj: Any, *, h5ad: bool = False) -> Any:
    """Numbers and containers as plain Python values: the one conversion for JSON files and ``AnnData.uns``.

    ``h5ad=False`` (JSON, the default): NaN and inf become ``None``. ``h5ad=True`` (``AnnData.uns`` written
    to ``.h5ad``): ``None`` becomes the string ``'None'`` (anndata cannot write ``None`` inside a list) and
    NaN / inf stay floats (HDF5 stores them). Mappings become dicts with string keys, sequences, arrays
    and Series become lists, paths and anything else strings.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, h5ad=h5ad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, pd.Index, pd.Series)):
        return [json_safe(v, h5ad=h5ad) for v in (obj.tolist() if hasattr(obj, "tolist") else obj)]
    if obj is None:
        return "None" if h5ad else None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if h5ad or math.isfinite(value) else None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        if pd.isna(obj):
            return "None" if h5ad else None
    except (TypeError, ValueError):
        pass
    return str(obj)


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: how a full disk reads when the error carries no errno (HDF5 through h5py, C libraries)
_DISK_FULL_TEXT = ("no space left on device", "errno = 28", "disk quota exceeded", "errno = 122")
#: torch.save's zip writer: "[enforce fail at inline_container.cc:...] ... file write failed" (a path) or
#: "... unexpected pos N vs M" (the bytes it wrote are not all there)
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is a full disk or an exceeded quota.

    Recognises ``OSError`` with errno ENOSPC / EDQUOT, h5py's ``OSError`` that gives the errno only in its
    text, and torch.save's ``RuntimeError: [enforce fail at inline_container.cc:...] ... file write failed``.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(err).lower()
        if isinstance(err, (OSError, RuntimeError)) and any(t in text for t in _DISK_FULL_TEXT):
            return True
        torch_writer = isinstance(err, RuntimeError) and "inline_container" in text
        if torch_writer and any(t in text for t in _TORCH_WRITE_FAILED):
            return True
        err = err.__cause__ or err.__context__
    return False


#: the most characters of one text value a record (manifest, parameters) keeps whole
RECORD_CHARS = 1024


def short_record(value: Any, limit: int = RECORD_CHARS) -> Any:
    """``value`` (a mapping, list or scalar) with every text longer than ``limit`` characters shortened to its
    start, its length and its sha256: a run's records stay readable whatever a parameter holds, and two
    shortened values are still equal only when the texts were."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{value[:120]}... ({len(value):,} characters, sha256 {digest})"
    if isinstance(value, dict):
        return {short_record(k, limit): short_record(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [short_record(v, limit) for v in value]
    return value


def free_bytes(path: Path) -> int | None:
    """Bytes free on the file system of ``path`` (or of its nearest existing parent); None if unknown."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def disk_full_error(path: str | Path, *, needed: int | None, cause: BaseException | None = None,
                    note: str = "") -> Any:
    """A :class:`~scgpt_protocol.core.errors.DiskFullError` for ``path``: the space needed and the space free."""

    path = Path(path)
    return DiskFullError(path, needed=needed, free=free_bytes(path.parent), cause=cause, note=note)


#: the space a step's long write leaves free for the files that follow it (reports, figures, records)
SPACE_RESERVE = 4 * 2**20


class SpaceGuard:
    """Stops a long streaming write before the disk is full, where a library might crash on the full disk
    rather than raise (HDF5 can take the Python process down with it).

    ``check(total)``, called before each block is written with the file's projected final size, raises
    :class:`~scgpt_protocol.core.errors.DiskFullError` naming ``path`` when that size plus ``reserve`` does not fit
    in the space free plus what ``tmp`` (the partial file) holds already.
    """

    def __init__(self, path: str | Path, tmp: str | Path, *, reserve: int = SPACE_RESERVE, what: str = "") -> None:
        self.path, self.tmp, self.reserve, self.what = Path(path), Path(tmp), reserve, what

    def check(self, total: int) -> None:
        free = free_bytes(self.tmp.parent)
        if free is None:
            return
        held = self.tmp.stat().st_size if self.tmp.is_file() else 0
        if total + self.reserve <= free + held:
            return
        note = (f"Stopped before the disk was full: {self.what or self.path.name} needs about {size_text(total)}, "
                f"and {size_text(self.reserve)} stays free for the step's reports and figures.")
        raise DiskFullError(self.path, needed=total + self.reserve, free=free + held, note=note)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets and returns)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, size_hint: int | None = None,
                 fresh: bool = False, sidecars: Sequence[str] = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader never sees half a file, and a failed write leaves nothing behind. The file gets the mode
    a plain ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    A full disk (or quota) raises :class:`~scgpt_protocol.core.errors.DiskFullError` naming ``path``, the
    space needed (at least what was written before the failure, or ``size_hint``) and the space free.
    The one atomic write of the package: files, figures, HDF5 and DuckDB artifacts all go through it.

    ``fresh``: ``write`` gets a path that does not exist yet (for writers that refuse an existing empty
    file, such as DuckDB); ``sidecars``: suffixes of files the writer leaves beside ``tmp`` (DuckDB's
    ``.wal``), removed in every case.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    if fresh:
        os.unlink(tmp)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        written = Path(tmp).stat().st_size if Path(tmp).is_file() else 0
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, DiskFullError) and is_disk_full(err):
            needed = max(written, size_hint or 0) or None
            note = f"Nothing half-written was left (the old {path.name} is untouched)." if path.exists() else \
                "Nothing half-written was left."
            raise disk_full_error(path, needed=needed, cause=err, note=note) from err
        raise
    finally:
        for suffix in sidecars:
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return path
_VERSIONS = ("scgpt-protocol", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn", "peft", "papermill")


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for name in _VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
