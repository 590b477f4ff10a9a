"""Two processes writing the same output at once: whoever renames last wins, whole. The file is
never a mix of the two or truncated, a reader never sees a partial file, and neither writer's
temporary is left behind. (Profiles, allocations and every other output are written by these
two functions.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bitalloc.fileio import read_json

N = 20_000  # numbers per document: about 140 kB of JSON, 160 kB of bytes

_WRITER = """
import sys
from bitalloc.fileio import write_atomic, write_json_atomic

target, seed, kind, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()  # both writers start together
for _ in range(10):
    if kind == "json":
        write_json_atomic(target, {"seed": seed, "values": [seed] * n})
    else:
        write_atomic(target, lambda h: h.write(bytes([seed]) * (8 * n)))
"""


def _whole(target, kind) -> int:
    if kind == "json":
        doc = read_json(target, "test")  # raises on a truncated or mixed file
        seed = doc["seed"]
        assert doc["values"] == [seed] * N, "a mix of the two writers' documents"
        return seed
    blob = target.read_bytes()
    assert len(blob) == 8 * N and blob == bytes([blob[0]]) * (8 * N), "truncated or mixed"
    return blob[0]


@pytest.mark.parametrize("kind", ["json", "bytes"])
def test_two_writers_of_one_file_leave_one_writers_whole_file(tmp_path, kind):
    target = tmp_path / f"out.{kind}"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), str(seed), kind, str(N)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        for w in writers:
            w.stdin.write("go\n")
            w.stdin.flush()
        seen = set()
        deadline = time.monotonic() + 60
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            if target.exists():
                seen.add(_whole(target, kind))  # every read while both write is whole
        for w in writers:
            assert w.wait(timeout=60) == 0
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert _whole(target, kind) in (1, 2) and seen <= {1, 2}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left
