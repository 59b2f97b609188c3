"""Download the released scGPT checkpoints once, then use a verified local cache.

A checkpoint lives in ``<cache>/<name>/`` with its three files (``args.json``, ``vocab.json``,
``best_model.pt``) and a ``checksums.json`` holding the sha256 of each file, recorded when the
files first arrived. Later calls check the files against it and never touch the network, so a
cached checkpoint works offline. A download goes to a temporary folder inside the cache and
replaces the cached files only once it is complete, so a failed download never damages a cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ChecksumMismatchError, DownloadError
from ..core.io import atomic_write, read_json, sha256_file, utc_now

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "KNOWN_CHECKPOINTS", "default_cache_dir", "download_checkpoint"]

CHECKSUMS_FILE = "checksums.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a released checkpoint is published and which files make it up."""

    drive_folder_id: str
    description: str
    files: tuple[str, ...] = ("args.json", "vocab.json", "best_model.pt")


KNOWN_CHECKPOINTS: dict[str, CheckpointInfo] = {
    "whole-human": CheckpointInfo(
        drive_folder_id="1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y",
        description="scGPT pretrained on 33 million human cells (whole-human, ~196 MB)",
    ),
}


def default_cache_dir() -> Path:
    """Return the cache root: ``$SCGPT_PROTOCOL_CACHE``, else ``$XDG_CACHE_HOME/scgpt_protocol``.

    Returns
    -------
    Path
        The cache root, ``~/.cache/scgpt_protocol`` when neither variable is set.
    """
    if os.environ.get("SCGPT_PROTOCOL_CACHE"):
        return Path(os.environ["SCGPT_PROTOCOL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "scgpt_protocol"


def download_checkpoint(
    name: str = "whole-human",
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Return the folder of a released checkpoint, downloading it on first use.

    Parameters
    ----------
    name : str
        A key of :data:`KNOWN_CHECKPOINTS`.
    cache_dir : str or Path, optional
        Cache root; defaults to :func:`default_cache_dir`.
    force : bool
        Download again even when a cache exists; the cached files are replaced only once the
        new download is complete.
    quiet : bool
        Silence gdown's progress output.

    Returns
    -------
    Path
        ``<cache>/<name>/``, holding the checkpoint files and ``checksums.json``.

    Raises
    ------
    ValueError
        ``name`` is not a known checkpoint.
    ChecksumMismatchError
        A cached file no longer matches the sha256 recorded for it.
    DownloadError
        The download failed or did not contain every expected file.
    """
    if name not in KNOWN_CHECKPOINTS:
        known = ", ".join(repr(k) for k in sorted(KNOWN_CHECKPOINTS))
        raise ValueError(f"unknown checkpoint {name!r}; known checkpoints: {known}")
    info = KNOWN_CHECKPOINTS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name

    if not force and all((target / f).is_file() for f in info.files):
        if (target / CHECKSUMS_FILE).is_file():
            _verify(target, info)
            logger.info("using cached checkpoint %r at %s", name, target)
        else:
            hashes = {f: sha256_file(target / f) for f in info.files}
            _write_checksums(target, hashes, info, origin="existing files")
            logger.info("recorded checksums of the existing files of %r in %s", name, target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=root))
    try:
        found = _fetch(name, info, tmp, quiet)
        hashes = {f: sha256_file(p) for f, p in found.items()}
        _write_checksums(tmp, hashes, info, origin="download")
        target.mkdir(exist_ok=True)
        for fname, path in found.items():
            os.replace(path, target / fname)
        os.replace(tmp / CHECKSUMS_FILE, target / CHECKSUMS_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloaded checkpoint %r to %s", name, target)
    return target


def _fetch(name: str, info: CheckpointInfo, tmp: Path, quiet: bool) -> dict[str, Path]:
    """Download the Drive folder into ``tmp``; return the path of each expected file."""
    folder_id = info.drive_folder_id
    fix = (
        f"To fix: check the internet connection and retry, or download the folder by hand with "
        f"`gdown --folder {folder_id}` and put {', '.join(info.files)} in {tmp.parent / name}/, "
        f"or pass that folder to load_model directly."
    )
    logger.info("downloading checkpoint %r from Google Drive folder %s", name, folder_id)
    try:
        import gdown

        result = gdown.download_folder(id=folder_id, output=str(tmp), quiet=quiet)
    except Exception as exc:
        raise DownloadError(
            f"download of {name!r} from Google Drive folder {folder_id} failed: "
            f"{type(exc).__name__}: {exc}. {fix}"
        ) from exc
    if result is None:
        raise DownloadError(
            f"download of {name!r} from Google Drive folder {folder_id} failed: "
            f"gdown returned None (quota exceeded or folder not reachable). {fix}"
        )
    found: dict[str, Path] = {}
    for fname in info.files:
        matches = sorted(tmp.rglob(fname), key=lambda p: (len(p.parts), str(p)))
        matches = [p for p in matches if p.is_file() and p.stat().st_size > 0]
        if matches:
            found[fname] = matches[0]
    missing = [f for f in info.files if f not in found]
    if missing:
        got = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) or ["nothing"]
        raise DownloadError(
            f"download of {name!r} from Google Drive folder {folder_id} is incomplete: "
            f"missing or empty {', '.join(missing)}; found {', '.join(got)}. {fix}"
        )
    return found


def _write_checksums(
    folder: Path, hashes: dict[str, str], info: CheckpointInfo, origin: str
) -> None:
    """Write ``checksums.json`` into ``folder`` through a temporary file."""
    record = {
        "source_id": info.drive_folder_id,
        "origin": origin,
        "recorded": utc_now(),
        "sha256": hashes,
    }
    atomic_write(folder / CHECKSUMS_FILE,
                 lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))


def _verify(target: Path, info: CheckpointInfo) -> None:
    """Check every cached file against ``checksums.json``; raise on the first mismatch."""
    fix = "To fix: re-download with download_checkpoint(..., force=True)."
    try:
        recorded = read_json(target / CHECKSUMS_FILE, error=ChecksumMismatchError, damaged_hint=fix)["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError(f"'sha256' is a {type(recorded).__name__}, not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise ChecksumMismatchError(
            f"{target / CHECKSUMS_FILE} is unreadable ({exc}); expected a JSON object with a "
            f"'sha256' mapping. {fix}"
        ) from exc
    for fname in info.files:
        expected = recorded.get(fname)
        found = sha256_file(target / fname)
        if found != expected:
            raise ChecksumMismatchError(
                f"{target / fname} has sha256 {found}, expected {expected} (recorded in "
                f"{CHECKSUMS_FILE}); the file changed or is corrupted. {fix}"
            )
