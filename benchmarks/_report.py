"""Shared by the benchmark scripts: where the numbers were taken, and writing a section."""

from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path


def cpu_description() -> str:
    """CPU model and core count, e.g. ``AMD EPYC, 2 cores``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write_section(path: str | Path, start: str, end: str, section: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers (or append the section),
    writing the file atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        pattern = re.escape(start) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's peak
    across the exec that starts a spawned child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
