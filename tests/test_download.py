"""Tests of scgpt_protocol.model.download, with gdown mocked (no network)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import gdown
import pytest

from scgpt_protocol.core.errors import ChecksumMismatchError, DownloadError
from scgpt_protocol.core.io import sha256_file
from scgpt_protocol.model.download import KNOWN_CHECKPOINTS, default_cache_dir, download_checkpoint

FILES = ("args.json", "vocab.json", "best_model.pt")
FOLDER_ID = KNOWN_CHECKPOINTS["whole-human"].drive_folder_id


def make_fake(
    contents: dict[str, bytes] | None = None, calls: list[dict[str, object]] | None = None
) -> Callable[..., list[str]]:
    """Return a stand-in for gdown.download_folder writing ``contents`` into a subfolder."""
    contents = contents if contents is not None else {f: f"fake {f}".encode() for f in FILES}

    def fake(*, id: str, output: str, quiet: bool = False, **_: object) -> list[str]:
        if calls is not None:
            calls.append({"id": id, "output": output, "quiet": quiet})
        sub = Path(output) / "scGPT_human"
        sub.mkdir(parents=True)
        for fname, data in contents.items():
            (sub / fname).write_bytes(data)
        return [str(sub / f) for f in contents]

    return fake


def offline(**_: object) -> list[str]:
    raise ConnectionError("network is unreachable")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCGPT_PROTOCOL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(gdown, "download_folder", offline)


def test_first_download_writes_files_and_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(gdown, "download_folder", make_fake(calls=calls))
    folder = download_checkpoint(cache_dir=tmp_path / "cache", quiet=True)

    assert folder == tmp_path / "cache" / "whole-human"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "checksums.json"])
    assert (folder / "vocab.json").read_bytes() == b"fake vocab.json"
    record = json.loads((folder / "checksums.json").read_text())
    assert record["source_id"] == FOLDER_ID
    assert record["recorded"]
    for fname in FILES:
        assert record["sha256"][fname] == hashlib.sha256(f"fake {fname}".encode()).hexdigest()
    assert calls[0]["id"] == FOLDER_ID and calls[0]["quiet"] is True
    assert Path(str(calls[0]["output"])).parent == tmp_path / "cache"
    assert leftovers(tmp_path / "cache") == ["whole-human"]  # temp folder removed


def test_second_call_uses_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    first = download_checkpoint(cache_dir=tmp_path)
    monkeypatch.setattr(gdown, "download_folder", offline)
    assert download_checkpoint(cache_dir=tmp_path) == first


def test_env_var_overrides_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCGPT_PROTOCOL_CACHE", str(tmp_path / "env_cache"))
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    assert default_cache_dir() == tmp_path / "env_cache"
    folder = download_checkpoint()
    assert folder == tmp_path / "env_cache" / "whole-human"
    assert (folder / "best_model.pt").is_file()
    assert not (tmp_path / "xdg").exists()


def test_default_cache_dir_uses_xdg(tmp_path: Path) -> None:
    assert default_cache_dir() == tmp_path / "xdg" / "scgpt_protocol"


def test_corrupted_file_raises_and_keeps_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    folder = download_checkpoint(cache_dir=tmp_path)
    expected = sha256_file(folder / "best_model.pt")
    (folder / "best_model.pt").write_bytes(b"corrupted")
    monkeypatch.setattr(gdown, "download_folder", offline)

    with pytest.raises(ChecksumMismatchError) as err:
        download_checkpoint(cache_dir=tmp_path)
    message = str(err.value)
    assert "best_model.pt" in message
    assert expected in message
    assert hashlib.sha256(b"corrupted").hexdigest() in message
    assert "force=True" in message
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "checksums.json"])
    assert (folder / "best_model.pt").read_bytes() == b"corrupted"


def test_offline_with_empty_cache_raises_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        download_checkpoint(cache_dir=cache)
    message = str(err.value)
    assert f"gdown --folder {FOLDER_ID}" in message
    assert "network is unreachable" in message
    assert "whole-human" in message
    assert isinstance(err.value.__cause__, ConnectionError)
    assert leftovers(cache) == []


def test_offline_with_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(**_: object) -> list[str]:
        raise OSError("name resolution failed")

    monkeypatch.setattr(gdown, "download_folder", fail)
    with pytest.raises(DownloadError, match="name resolution failed"):
        download_checkpoint(cache_dir=tmp_path)
    assert leftovers(tmp_path) == []


def test_offline_with_valid_cache_returns_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    folder = download_checkpoint(cache_dir=tmp_path)
    monkeypatch.setattr(gdown, "download_folder", offline)
    assert download_checkpoint(cache_dir=tmp_path) == folder
    assert (folder / "args.json").read_bytes() == b"fake args.json"


def test_gdown_returning_none_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdown, "download_folder", lambda **_: None)
    with pytest.raises(DownloadError, match="returned None") as err:
        download_checkpoint(cache_dir=tmp_path)
    assert f"gdown --folder {FOLDER_ID}" in str(err.value)
    assert leftovers(tmp_path) == []


def test_download_missing_model_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = {"args.json": b"{}", "vocab.json": b"{}"}
    monkeypatch.setattr(gdown, "download_folder", make_fake(partial))
    with pytest.raises(DownloadError, match="missing or empty best_model.pt") as err:
        download_checkpoint(cache_dir=tmp_path)
    assert "args.json" in str(err.value) and "vocab.json" in str(err.value)
    assert leftovers(tmp_path) == []


def test_force_redownloads_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    folder = download_checkpoint(cache_dir=tmp_path)
    new = {f: f"new {f}".encode() for f in FILES}
    monkeypatch.setattr(gdown, "download_folder", make_fake(new))

    assert download_checkpoint(cache_dir=tmp_path, force=True) == folder
    assert (folder / "best_model.pt").read_bytes() == b"new best_model.pt"
    record = json.loads((folder / "checksums.json").read_text())
    assert record["sha256"]["best_model.pt"] == hashlib.sha256(b"new best_model.pt").hexdigest()
    assert leftovers(tmp_path) == ["whole-human"]
    monkeypatch.setattr(gdown, "download_folder", offline)
    assert download_checkpoint(cache_dir=tmp_path) == folder  # new checksums verify


def test_failed_force_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdown, "download_folder", make_fake())
    folder = download_checkpoint(cache_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    for broken in (offline, make_fake({"args.json": b"new", "vocab.json": b"new"})):
        monkeypatch.setattr(gdown, "download_folder", broken)
        with pytest.raises(DownloadError):
            download_checkpoint(cache_dir=tmp_path, force=True)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert leftovers(tmp_path) == ["whole-human"]


def test_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'whole-human'"):
        download_checkpoint("mouse-brain", cache_dir=tmp_path)
    assert leftovers(tmp_path) == []


def test_hand_copied_files_get_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "whole-human"
    folder.mkdir()
    for fname in FILES:
        (folder / fname).write_bytes(f"copied {fname}".encode())

    with caplog.at_level("INFO", logger="scgpt_protocol.model.download"):
        assert download_checkpoint(cache_dir=tmp_path) == folder
    assert "recorded checksums" in caplog.text
    record = json.loads((folder / "checksums.json").read_text())
    assert record["sha256"] == {f: sha256_file(folder / f) for f in FILES}
    (folder / "vocab.json").write_bytes(b"edited")
    with pytest.raises(ChecksumMismatchError, match="vocab.json"):
        download_checkpoint(cache_dir=tmp_path)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 10_000  # spans several chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
