"""tasks.atomic: the one atomic-write helper (store, weights, plots, the online run's files)."""

import os
import stat

import pytest

from tasks.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second é")
    assert target.read_bytes() == "second é".encode()
    assert os.listdir(target.parent) == ["out.json"]


def test_error_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_temp_is_beside_target_hidden_and_keeps_suffix(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"


def test_fsync_policy(tmp_path, monkeypatch):
    synced: list[bool] = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_bytes_atomic(tmp_path / "a", b"x")
    assert synced == [False, True]  # the file before the rename, then its directory
    synced.clear()
    write_bytes_atomic(tmp_path / "b", b"x", durable=False)
    assert synced == []


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
