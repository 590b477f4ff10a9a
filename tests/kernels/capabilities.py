"""Which CPU capabilities torch can run here, and running code under one of them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAPABILITIES = ("default", "avx2", "avx512")

# torch dispatches to AVX512 kernels only with all four of these.
_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def offered(capability: str) -> bool:
    """Whether this CPU runs ``capability`` (torch falls back below what the CPU lacks)."""
    if capability == "default":
        return True
    flags = _cpu_flags()
    return ("avx2" in flags) if capability == "avx2" else flags >= _AVX512_FLAGS


def run_under(capability: str, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` in the repository with ``ATEN_CPU_CAPABILITY=capability``."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
