"""One writer per run folder: an OS file lock in ``run_dir`` (:func:`hold_run_dir`).

The headless runner holds it for the whole run and each notebook's set-up cell for its step
(:meth:`~scgpt_protocol.core.layout.RunLayout.hold`). A second runner or notebook on the same folder stops at once
with :class:`~scgpt_protocol.core.errors.RunDirInUse`, naming the holder. The operating system releases the lock
when the last process holding it ends, ``kill -9`` included, so a lock is never left stuck: the next holder takes
it over and says so. The processes a holder starts (the kernels of a headless run, the torchrun processes of 02)
inherit its lock: they share its token through an environment variable and its descriptor, so the folder stays
held while any of them runs. Reading a run (reports, ``scgpt-protocol list``) takes no lock.

Two files: ``.scgpt-protocol.lock`` (empty, what the OS locks) and ``.scgpt-protocol.lock.json`` (who holds it,
removed on release). On a file system without OS locks (some network mounts) the record alone is the claim,
created exclusively; a claim left by a process that ended on another host must then be removed by hand.
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

__all__ = ["LOCK_FILE", "RECORD_FILE", "RunLock", "hold_run_dir", "held_lock", "inherit_env", "describe_holder"]

#: the file the OS locks in every run folder (empty; it stays there)
LOCK_FILE = ".scgpt-protocol.lock"
#: who holds the run folder (pid, host, step, since when); removed when the holder releases it
RECORD_FILE = ".scgpt-protocol.lock.json"
#: set by a holder for the processes it starts: ``<lock path>\t<token>\t<descriptor they inherit>``
INHERITED_ENV = "SCGPT_PROTOCOL_RUN_LOCK"
#: errors that mean "this folder cannot be written", as opposed to "someone else holds it"
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}

_HELD: dict[str, RunLock] = {}  # this process's locks by lock path (a notebook's lock outlives its cell)


@dataclass
class RunLock:
    """A held run-folder lock. ``release()`` gives it back (so does the end of every process that holds it)."""

    path: Path
    fd: int | None  # the locked descriptor; None: inherited from the process that started this one
    record: dict[str, Any] = field(default_factory=dict)
    took_over: dict[str, Any] | None = None  # the record of a holder that ended without releasing it
    share_fd: int | None = None  # the descriptor the processes this one starts inherit (holds the OS lock)
    os_lock: bool = True  # False: no OS locks on this file system, the record is the claim

    @property
    def inherited(self) -> bool:
        return self.fd is None

    @property
    def record_path(self) -> Path:
        return self.path.with_name(RECORD_FILE)

    def update(self, **values: Any) -> None:
        """Change what the lock says about its holder (e.g. the step in progress)."""
        self.record.update(values)
        if not self.inherited:
            _write_record(self.record_path, self.record, exclusive=False)

    def release(self) -> None:
        """Give the folder back: the record is removed and the OS lock released (idempotent)."""
        from filelock import unlock_descriptor

        _HELD.pop(str(self.path), None)
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.record_path.unlink(missing_ok=True)  # released on purpose: nothing to take over
        except OSError:
            pass
        if self.os_lock:
            try:
                unlock_descriptor(fd)
            except OSError:
                pass
        os.close(fd)

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_lock(run_dir: str | Path) -> RunLock | None:
    """The lock this process holds on ``run_dir``, or None."""
    return _HELD.get(str(_lock_path(run_dir)))


def hold_run_dir(run_dir: str | Path, *, step: str, holder: str) -> RunLock:
    """Take ``run_dir``'s lock for ``step`` (``holder``: ``"scgpt-protocol run"``, ``"notebook"`` ...).

    Taking it again in the same process updates the step. A process started by the holder (a headless run's
    kernel, 02's torchrun processes) shares its lock. Raises :class:`~scgpt_protocol.core.errors.RunDirInUse` when
    another process holds it, and :class:`~scgpt_protocol.core.errors.RunDirError` when the folder cannot be
    written.
    """
    path = _lock_path(run_dir)
    mine = _HELD.get(str(path))
    if mine is not None:
        mine.update(step=step)
        return mine
    inherited = _inherited(path)
    if inherited is not None:
        record, share_fd = inherited
        lock = RunLock(path, None, {**record, "step": step}, share_fd=share_fd)
        _HELD[str(path)] = lock
        return lock
    _make_folder(path.parent)
    fd = _open_lock_file(path)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "holder": holder, "step": step,
              "since": _now(), "token": uuid.uuid4().hex}
    try:
        os_lock, previous = _claim(fd, path, record)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(path, fd, record, took_over=previous or None, share_fd=fd, os_lock=os_lock)
    if previous:
        logger.warning("took over the lock of %s: %s ended without giving it back (nothing else holds it).",
                       path.parent, describe_holder(previous))
    _HELD[str(path)] = lock
    return lock


def release_others(run_dir: str | Path, holder: str) -> None:
    """Release the locks this process holds as ``holder`` on folders other than ``run_dir`` (a notebook whose
    set-up cell runs again with another run_dir gives the old folder back)."""
    keep = str(_lock_path(run_dir))
    for key, lock in list(_HELD.items()):
        if key != keep and lock.record.get("holder") == holder:
            lock.release()


def describe_holder(record: dict[str, Any]) -> str:
    """``pid 123 on host x (scgpt-protocol run, step 02_finetune, since 2026-...)`` from a lock record."""
    if not record:
        return "another process (its record could not be read)"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} ({record.get('holder', '?')}, "
            f"step {record.get('step', '?')}, since {record.get('since', '?')})")


def inherit_env(lock: RunLock) -> dict[str, str]:
    """The environment entry that lets the processes a holder starts share its lock (give them
    :func:`shared_fds` too, so that the OS lock lasts while they run)."""
    fd = "" if lock.share_fd is None else str(lock.share_fd)
    return {INHERITED_ENV: f"{lock.path}\t{lock.record.get('token', '')}\t{fd}"}


def shared_fds(lock: RunLock | None) -> tuple[int, ...]:
    """``pass_fds`` for a child process: the descriptor that holds the OS lock (none on Windows)."""
    if lock is None or lock.share_fd is None or os.name == "nt" or not lock.os_lock:
        return ()
    return (lock.share_fd,)


def _lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / LOCK_FILE


def _now() -> str:
    from .io import utc_now

    return utc_now()


def _inherited(path: Path) -> tuple[dict[str, Any], int | None] | None:
    """The holder's record (and the inherited descriptor) when this process was started by the holder of
    ``path``."""
    where, _, rest = os.environ.get(INHERITED_ENV, "").partition("\t")
    token, _, fd = rest.partition("\t")
    if not token or Path(where) != path:
        return None
    record = _read_record(path.with_name(RECORD_FILE))
    if record.get("token") != token:
        return None
    share_fd = int(fd) if fd.isdigit() and _same_file(int(fd), path) else None
    return record, share_fd


def _not_writable(run_dir: Path, err: OSError) -> RunDirError:
    what = ("is on a read-only file system" if err.errno == errno.EROFS
            else f"is not writable by this user ({err.strerror or err})")
    msg = (f"run_dir {run_dir} {what}. A run writes all its files there: choose a run_dir on a writable disk "
           "(run: --run-dir; notebooks: run_dir in the parameters cell), or make this one writable.")
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


def _claim(fd: int, path: Path, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Lock ``fd`` without waiting and write the holder's record; (OS lock used, the record of a holder that
    ended without releasing). Raises RunDirInUse naming the holder."""
    from filelock import lock_descriptor, unlock_descriptor

    record_path = path.with_name(RECORD_FILE)
    try:
        got = lock_descriptor(fd, blocking=False)
    except OSError as err:  # no OS locks on this file system (some network mounts): the record is the claim
        logger.warning("%s: this file system has no file locks (%s); the holder's record is the claim.", path, err)
        return False, _claim_by_record(record_path, record)
    if got and not _same_file(fd, path):  # the lock file was replaced while it was opened (nothing deletes it)
        unlock_descriptor(fd)
        got = False
    if not got:
        raise RunDirInUse(_in_use(path.parent, _read_record(record_path)))
    previous = _read_record(record_path)  # read with the lock held: a record here is a holder's that ended
    _write_record(record_path, record, exclusive=False)
    return True, previous


def _claim_by_record(record_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Without OS locks: create the record exclusively; a record of a process that ended on this host is taken
    over (returned), any other stops the caller."""
    if _write_record(record_path, record, exclusive=True):
        return {}
    previous = _read_record(record_path)
    if _alive_or_elsewhere(previous):
        raise RunDirInUse(_in_use(record_path.parent, previous) + (
            " This file system has no file locks: if that process is gone (another host, or it crashed), "
            f"delete {record_path} and run again."))
    record_path.unlink(missing_ok=True)  # its process ended on this host
    if _write_record(record_path, record, exclusive=True):
        return previous
    raise RunDirInUse(_in_use(record_path.parent, _read_record(record_path)))


def _in_use(run_dir: Path, holder: dict[str, Any]) -> str:
    return (f"run_dir {run_dir} is in use by {describe_holder(holder)}: one run or notebook writes a run folder "
            "at a time. Wait for it to finish, or stop it (shut down that notebook's kernel, or stop that run; a "
            "process that ended gives the folder back by itself), or choose another run_dir.")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _alive_or_elsewhere(record: dict[str, Any]) -> bool:
    """Whether a record's process may still run: alive on this host, or on another host (which cannot be
    checked from here). An unreadable record counts as alive."""
    if not record or record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    return True


def _read_record(path: Path) -> dict[str, Any]:
    from .io import read_json

    value = read_json(path, default={}, lenient=True)  # absent, unreadable or half-written: no record
    return value if isinstance(value, dict) else {}


def _write_record(path: Path, record: dict[str, Any], *, exclusive: bool) -> bool:
    """Write the holder's record: ``exclusive`` creates it only if absent (False when it exists); otherwise it
    replaces the record atomically. A full disk only loses the description (the lock holds)."""
    data = json.dumps(record).encode()
    try:
        if exclusive:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return True
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if exclusive and err.errno in _NOT_WRITABLE:
            raise _not_writable(path.parent, err) from None
        logger.warning("could not record the run folder's holder in %s: %s", path, err)
        return not exclusive
