"""One writer per run folder: an OS file lock in ``run_dir`` (:func:`hold_run_dir`).

The headless runner holds it for the whole run and each notebook's set-up cell for its step
(:meth:`~scgpt_protocol.core.layout.RunLayout.hold`). A second runner or notebook on the same folder stops at once
with :class:`~scgpt_protocol.core.errors.RunDirInUse`, naming the holder. The operating system releases the lock
when its process ends, ``kill -9`` included, so a lock is never left stuck: the next holder takes it over and says
so. The kernels of a headless run inherit the runner's lock (an environment variable carries its token), so the
notebooks it executes do not lock themselves out. Reading a run (reports, ``scgpt-protocol list``) takes no lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunDirError, RunDirInUse

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunLock", "hold_run_dir", "held_lock"]

#: the lock file in every run folder (it stays there; what it holds says who has the folder)
LOCK_FILE = ".scgpt-protocol.lock"
#: set by the runner for the kernels it starts: ``<lock path>\t<token>``
INHERITED_ENV = "SCGPT_PROTOCOL_RUN_LOCK"
#: errors that mean "this folder cannot be written", as opposed to "someone else holds it"
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}

_HELD: dict[str, RunLock] = {}  # this process's locks by lock path (a notebook's lock outlives its cell)


@dataclass
class RunLock:
    """A held run-folder lock. ``release()`` gives it back (also when its process ends)."""

    path: Path
    fd: int | None  # None: inherited from the runner that started this kernel
    record: dict[str, Any] = field(default_factory=dict)
    took_over: dict[str, Any] | None = None  # the record of a holder that ended without releasing it

    @property
    def inherited(self) -> bool:
        return self.fd is None

    def update(self, **values: Any) -> None:
        """Change what the lock says about its holder (e.g. the step in progress)."""
        self.record.update(values)
        if self.fd is not None:
            _write_record(self.fd, self.record)

    def release(self) -> None:
        """Give the folder back: the record is emptied and the OS lock released (idempotent)."""
        from filelock import unlock_descriptor

        _HELD.pop(str(self.path), None)
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: released on purpose, nothing to take over
        except OSError:
            pass
        try:
            unlock_descriptor(fd)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_lock(run_dir: str | Path) -> RunLock | None:
    """The lock this process holds on ``run_dir``, or None."""
    return _HELD.get(str(Path(run_dir) / LOCK_FILE))


def hold_run_dir(run_dir: str | Path, *, step: str, holder: str) -> RunLock:
    """Take ``run_dir``'s lock for ``step`` (``holder``: ``"scgpt-protocol run"``, ``"notebook"`` ...).

    Taking it again in the same process updates the step. A kernel started by a headless run shares the runner's
    lock. Raises :class:`~scgpt_protocol.core.errors.RunDirInUse` when another process holds it, and
    :class:`~scgpt_protocol.core.errors.RunDirError` when the folder cannot be written.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    mine = _HELD.get(str(path))
    if mine is not None:
        mine.update(step=step)
        return mine
    inherited = _inherited(path)
    if inherited is not None:
        lock = RunLock(path, None, {**inherited, "step": step})
        _HELD[str(path)] = lock
        return lock
    _make_folder(run_dir)
    fd = _open_lock_file(path)
    try:
        previous = _read_record(path)
        _acquire(fd, path, previous)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "holder": holder, "step": step,
                  "since": _now(), "token": uuid.uuid4().hex}
        _write_record(fd, record)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(path, fd, record, took_over=previous or None)
    if previous:
        logger.warning("took over the lock of %s: %s ended without giving it back (nothing else holds it).",
                       run_dir, describe_holder(previous))
    _HELD[str(path)] = lock
    return lock


def describe_holder(record: dict[str, Any]) -> str:
    """``pid 123 on host x (scgpt-protocol run, step 02_finetune, since 2026-...)`` from a lock record."""
    if not record:
        return "another process (it left no record)"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} ({record.get('holder', '?')}, "
            f"step {record.get('step', '?')}, since {record.get('since', '?')})")


def inherit_env(lock: RunLock) -> dict[str, str]:
    """The environment entry that lets the kernels a runner starts share its lock."""
    return {INHERITED_ENV: f"{lock.path}\t{lock.record.get('token', '')}"}


def _now() -> str:
    from .io import utc_now

    return utc_now()


def _inherited(path: Path) -> dict[str, Any] | None:
    """The runner's record when this process is a kernel of the headless run that holds ``path``."""
    value = os.environ.get(INHERITED_ENV, "")
    where, _, token = value.partition("\t")
    if not token or Path(where) != path:
        return None
    record = _read_record(path)
    return record if record.get("token") == token else None


def _not_writable(run_dir: Path, err: OSError) -> RunDirError:
    what = ("is on a read-only file system" if err.errno == errno.EROFS
            else f"is not writable by this user ({err.strerror or err})")
    msg = (f"run_dir {run_dir} {what}. A run writes all its files "
           "there: choose a run_dir on a writable disk (run: --run-dir; notebooks: run_dir in the parameters cell), "
           "or make this one writable.")
    return RunDirError(err.errno or errno.EACCES, msg, str(run_dir))


def _make_folder(run_dir: Path) -> None:
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            what = "is a file" if folder == run_dir else f"lies inside {folder}, which is a file"
            msg = f"run_dir {run_dir} {what}, not a folder. Choose a run_dir that is a folder (or does not exist yet)."
            raise RunDirInUse(msg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _NOT_WRITABLE:
            raise _not_writable(run_dir, err) from None
        raise


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno in _NOT_WRITABLE:
            raise _not_writable(path.parent, err) from None
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            from .io import disk_full_error

            raise disk_full_error(path, needed=None, cause=err) from None
        raise


def _acquire(fd: int, path: Path, previous: dict[str, Any]) -> None:
    """Lock ``fd`` without waiting, or raise RunDirInUse naming the holder."""
    from filelock import lock_descriptor, unlock_descriptor

    try:
        got = lock_descriptor(fd, blocking=False)
    except OSError as err:  # no OS locks on this file system (some network mounts): the record decides
        logger.warning("%s: file locks are not supported here (%s); checking the holder's record instead.",
                       path, err)
        got = not _alive_here(previous)
    if got and _same_file(fd, path):
        return
    if got:  # the lock file was replaced while it was opened (nothing deletes it; be safe anyway)
        unlock_descriptor(fd)
    holder = _read_record(path)
    msg = (f"run_dir {path.parent} is in use by {describe_holder(holder)}: one run or notebook writes a run folder "
           "at a time. Wait for it to finish, or stop it (shut down that notebook's kernel, or stop that run; a "
           "process that ended gives the folder back by itself), or choose another run_dir.")
    raise RunDirInUse(msg)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _alive_here(record: dict[str, Any]) -> bool:
    """Whether a record's process runs on this host (without OS locks, another host's holder is assumed alive)."""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def _read_record(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
    except OSError as err:  # a full disk: the lock holds, only its description is missing
        logger.warning("could not record the run folder's holder in its lock file: %s", err)
