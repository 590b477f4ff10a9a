"""Run a search on the tiny test model in a separate process (killed by the tests).

Usage: python driver.py RUN_DIR TRIALS [--resume] [--eval-tokens N] [--workers N]
[--storage URL]. Text files and the profile cache live in RUN_DIR's parent.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

if __package__:
    from ..conftest import TEXT, ByteTokenizer, make_tiny_llama
else:
    # Run as a script: the repository root goes on the path, never tests/ itself, whose
    # folders (tests/kernels) would shadow installed packages of the same name (transformers
    # imports the `kernels` package when it is installed).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.conftest import TEXT, ByteTokenizer, make_tiny_llama

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"


def run(run_dir: Path, trials: int, **kw):
    """The search of these tests (tiny model, byte tokens, 64-token windows)."""
    from bitalloc.search import search

    base = run_dir.parent
    (base / "cal.txt").write_text(TEXT)
    (base / "eval.txt").write_text(TEXT[::-1] * 4)
    kw.setdefault("eval_tokens", 256)
    kw.setdefault("progress", False)
    return search(
        make_tiny_llama(),
        4.5,
        tokenizer=ByteTokenizer(),
        calibration=base / "cal.txt",
        evaluation=base / "eval.txt",
        formats=FORMATS,
        calibration_tokens=256,
        seq_len=64,
        trials=trials,
        run_dir=run_dir,
        **kw,
    )


if __name__ == "__main__":
    # A shell without job control starts background commands with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN; the interrupt test needs Ctrl-C to raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("trials", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--storage", default=None)
    a = p.parse_args()
    result = run(
        a.run_dir,
        a.trials,
        resume=a.resume,
        eval_tokens=a.eval_tokens,
        workers=a.workers,
        storage=a.storage,
    )
    print(result.summary())
