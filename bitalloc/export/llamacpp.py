"""llama.cpp's own tools (quantize, imatrix, perplexity, bench), found or built once and run.

llama.cpp is not a Python dependency: its tools are built with cmake from the llama.cpp source
vendored in the PyPI sdist of ``llama-cpp-python`` (``python -m bitalloc.export.llamacpp
build``; about 25 minutes on 2 cores), into the cache outside the repository
(``$BITALLOC_CACHE_DIR/llama.cpp/build-<version>/bin``). :func:`find_llama_cpp` finds them
there or in ``$BITALLOC_LLAMA_CPP`` (a directory holding the tools); the benchmarks use them to
make llama.cpp's own preset files and to run exported files, and the tests that need them are
skipped, with that reason, where none is built.

Every run passes ``--no-repack``: on CPUs with AMX tiles, llama.cpp's AMX path crashes where
the kernel does not grant the tile state (these sandboxes); the reference CPU path it falls
back to computes the same model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.models import cache_root

#: The tools the benchmarks and tests run.
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
#: The llama-cpp-python sdist whose vendored llama.cpp is built.
SDIST_VERSION = "0.3.36"
ENV = "BITALLOC_LLAMA_CPP"


@dataclass(frozen=True)
class LlamaCpp:
    """A directory holding llama.cpp's built tools."""

    bin: Path

    def tool(self, name: str) -> Path:
        """The path of tool ``name`` (``llama-quantize``, ...)."""
        path = self.bin / name
        if not path.is_file():
            raise BitallocError(f"llama.cpp tool {name} is not in {self.bin}; rebuild the tools")
        return path

    def run(self, name: str, *args: str, timeout: float = 3600) -> str:
        """Run tool ``name`` with ``args``; its combined output, or :class:`BitallocError` with
        the output's tail when it fails."""
        proc = subprocess.run(
            [str(self.tool(name)), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-5:])
            raise BitallocError(f"{name} failed (exit {proc.returncode}): {tail}")
        return output

    def quantize(
        self,
        source: Path,
        out: Path,
        preset: str,
        *,
        imatrix: Path | None = None,
        threads: int = 2,
        extra: tuple[str, ...] = (),
    ) -> Path:
        """``llama-quantize`` ``source`` to ``out`` with ``preset`` (``Q4_K_M``, ...)."""
        args = ["--allow-requantize", *extra]
        if imatrix is not None:
            args += ["--imatrix", str(imatrix)]
        self.run("llama-quantize", *args, str(source), str(out), preset, str(threads))
        return out

    def perplexity(
        self,
        model: Path,
        text: Path,
        *,
        ctx: int = 512,
        chunks: int | None = None,
        threads: int = 2,
    ) -> float:
        """``llama-perplexity``'s final estimate on ``text`` in windows of ``ctx`` tokens."""
        args = ["-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        output = self.run("llama-perplexity", *args, "--no-repack")
        # The running estimate after each chunk ("[1]8.63,[2]10.07,...") goes to stdout; its
        # last value is the final estimate, whose own log line can be lost at exit.
        running = re.findall(r"\[\d+\]([0-9]+\.[0-9]+)", output)
        if not running:
            raise BitallocError(f"llama-perplexity printed no estimate: {output[-300:]}")
        return float(running[-1])

    def decode_speed(self, model: Path, *, tokens: int = 64, threads: int = 2) -> float:
        """Batch-1 decode speed (tokens per second) that ``llama-bench`` measures."""
        output = self.run(
            "llama-bench",
            "-m",
            str(model),
            "-p",
            "0",
            "-n",
            str(tokens),
            "-t",
            str(threads),
            "-r",
            "3",
            "-o",
            "csv",
            "--repack",
            "0",
        )
        rows = [line for line in output.splitlines() if line.count(",") > 10]
        header = [c.strip('"') for c in rows[0].split(",")]
        values = [c.strip('"') for c in rows[-1].split(",")]
        return float(values[header.index("avg_ts")])


def find_llama_cpp() -> LlamaCpp | None:
    """llama.cpp's tools from ``$BITALLOC_LLAMA_CPP`` or the cache, None when none is built."""
    candidates = []
    if os.environ.get(ENV):
        given = Path(os.environ[ENV])
        candidates += [given, given / "bin"]
    candidates += sorted((cache_root() / "llama.cpp").glob("build-*/bin"), reverse=True)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in TOOLS):
            return LlamaCpp(directory)
    return None


def missing_reason() -> str:
    """Why :func:`find_llama_cpp` found nothing, and how to fix it."""
    return (
        f"llama.cpp's tools are not built: run `python -m bitalloc.export.llamacpp build` "
        f"(about 25 minutes on 2 cores; cached in {cache_root() / 'llama.cpp'}) or set {ENV} to "
        "a directory holding llama-quantize, llama-imatrix, llama-perplexity and llama-bench"
    )


def build_llama_cpp(*, jobs: int = 2, sdist: Path | None = None) -> LlamaCpp:
    """Build the tools from the llama.cpp vendored in llama-cpp-python's sdist (downloaded
    from the package registry unless ``sdist`` is given) into the cache; return them."""
    found = find_llama_cpp()
    if found is not None:
        return found
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BitallocError(f"building llama.cpp needs {tool} on PATH")
    root = cache_root() / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if sdist is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={SDIST_VERSION}",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        shutil.unpack_archive(str(sdist), tmp)
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = root / f"build-{SDIST_VERSION}"
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ],
            check=True,
        )
        subprocess.run(
            ["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], check=True
        )
    found = find_llama_cpp()
    if found is None:
        raise BitallocError(f"the llama.cpp build in {root} did not produce {', '.join(TOOLS)}")
    return found


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m bitalloc.export.llamacpp build")
    print(build_llama_cpp().bin)
