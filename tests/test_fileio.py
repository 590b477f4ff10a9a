"""Atomic writes: all or nothing, with ordinary file modes."""

from __future__ import annotations

import os

import pytest

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json, write_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})

    def boom(handle):
        handle.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert read_json(target, "test") == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_new_files_are_0644_and_replaced_files_keep_their_mode(tmp_path):
    target = tmp_path / "report.html"
    write_atomic(target, lambda h: h.write(b"<html></html>"))
    assert target.stat().st_mode & 0o777 == 0o644
    os.chmod(target, 0o600)
    write_atomic(target, lambda h: h.write(b"<html>2</html>"))
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_bytes() == b"<html>2</html>"


def test_read_json_errors(tmp_path):
    with pytest.raises(BitallocError, match="does not exist"):
        read_json(tmp_path / "missing.json", "allocation")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BitallocError, match="not valid JSON"):
        read_json(tmp_path / "bad.json", "allocation")
