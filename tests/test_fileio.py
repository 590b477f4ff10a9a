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


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    import stat

    from bitalloc import fileio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    write_json_atomic(tmp_path / "a.json", {"v": 1})
    assert events == ["fsync file", "rename", "fsync dir"]


def test_a_directory_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    import errno
    import stat

    from bitalloc import fileio

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    write_json_atomic(tmp_path / "a.json", {"v": 2})
    assert read_json(tmp_path / "a.json", "test") == {"v": 2}


_SLOW_WRITER = """
import sys, time
from bitalloc.fileio import write_atomic

def write(handle):
    handle.write(b"x" * 1_000_000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)

write_atomic(sys.argv[1], write)
"""


def _start_writer(target):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_kill_9_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import signal

    target = tmp_path / "big.bin"
    write_atomic(target, lambda h: h.write(b"old"))
    proc = _start_writer(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = _temporaries(tmp_path)
    assert len(orphans) == 1 and str(proc.pid) in orphans[0]
    assert target.read_bytes() == b"old"  # the killed write never replaced the file
    write_atomic(target, lambda h: h.write(b"new"))
    assert _temporaries(tmp_path) == [] and target.read_bytes() == b"new"


def test_a_live_writers_temporary_and_other_targets_temporaries_are_kept(tmp_path):
    target = tmp_path / "a.json"
    other = tmp_path / ".a.json.x.json.999999999.abcdefgh.tmp"  # a temporary of "a.json.x.json"
    other.write_bytes(b"")
    proc = _start_writer(target)
    try:
        live = [n for n in _temporaries(tmp_path) if str(proc.pid) in n]
        assert len(live) == 1
        write_json_atomic(target, {"v": 1})
        assert live[0] in _temporaries(tmp_path) and other.name in _temporaries(tmp_path)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_an_os_error_while_writing_is_the_projects_error(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(BitallocError, match="cannot write .*dir.json"):
        write_json_atomic(tmp_path / "dir.json", {"v": 1})
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"[" * 50_000_000, "nested too deeply"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "Infinity is not a JSON number"),
        (b'{"a": 1e400}', "overflows"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"a": 1, "a": 2}', "'a' appears twice"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_malformed_json_is_the_projects_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(BitallocError, match=match):
        read_json(path, "allocation")


def test_a_top_level_that_is_not_an_object_is_refused(tmp_path):
    from bitalloc.fileio import read_json_object

    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(BitallocError, match="holds a JSON array, not an object"):
        read_json_object(tmp_path / "list.json", "allocation")


def test_file_kinds_are_recognised():
    from bitalloc.fileio import file_kind, wrong_kind_error

    assert file_kind({"format": "bitalloc.problem", "objective": []}) == "solver problem file"
    assert file_kind({"units": [], "avg_bits": 3, "total_bits": 1, "budget": 3}) == "allocation"
    assert file_kind({"units": [], "formats": [], "loss": []}) == "profile"
    assert file_kind({"format": "bitalloc-packed"}) == "packed model manifest"
    assert file_kind({"storage": "s", "study": "x", "status": "running"}).startswith("measured")
    assert file_kind([1]) is None and file_kind({"x": 1}) is None
    error = wrong_kind_error("p.json", {"units": [], "formats": [], "loss": []}, "allocation")
    assert str(error) == (
        "p.json is a profile, not an allocation; give the path of an allocation file"
    )
    assert wrong_kind_error("a.json", {"x": 1}, "allocation") is None


def test_temporaries_named_without_a_pid_are_removed_once_an_hour_old(tmp_path):
    import time

    old = tmp_path / ".a.json.abcdefgh.tmp"  # the name an earlier version gave its temporaries
    fresh = tmp_path / ".a.json.ijklmnop.tmp"
    for p in (old, fresh):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    write_json_atomic(tmp_path / "a.json", {"v": 1})
    assert not old.exists() and fresh.exists()
