"""``bitalloc apply`` and ``bitalloc generate``. Each command runs in a subprocess as a user runs
it (``apply`` in the refusal test, ``generate`` after every ``apply``); the other runs and bad
input go through ``main()`` in process, which is what the command runs: a new interpreter costs
10-20 s of imports on 2 cores."""

import shutil
import subprocess
import sys

import pytest

from bitalloc.cli import main
from bitalloc.models import load_model
from tests.allocations import cycling_allocation
from tests.hfdirs import tiny_model_dir


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "bitalloc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _apply(allocation, model, out):
    return _run("apply", "--allocation", str(allocation), "--model", str(model), "--out", str(out))


def test_apply_then_generate_without_the_source_model(tmp_path, capsys):
    source = tiny_model_dir(tmp_path / "source")
    alloc = cycling_allocation(
        load_model(source).model, ("int3-g32", "int4-g32", "int8-g64", "fp16")
    )
    alloc.save(tmp_path / "alloc.json")
    out = tmp_path / "packed"
    # In process; the generate below runs as a process of its own, so it reads only the files.
    args = ["--allocation", str(tmp_path / "alloc.json"), "--model", str(source), "--out", str(out)]
    assert main(["apply", *args]) == 0
    stdout = capsys.readouterr().out
    assert f"predicted {alloc.data.total_bits // 8:,} (ratio 1.0000)" in stdout
    assert f"wrote {out}" in stdout
    assert {"bitalloc_packed.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".pth") for p in out.iterdir())
    shutil.rmtree(source)  # the packed model must not need the full-precision weights

    result = _run("generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith("5 tokens in ") and "tokens/s) on cpu" in stats
    assert "unpack-matmul" in stats and "fp16-as-float32 " in stats

    forced = main(
        [
            "generate",
            "--model",
            str(out),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--cpu-path",
            "unpack-matmul",
            "--sample",
            "--seed",
            "1",
        ]
    )
    assert forced == 0
    stats = capsys.readouterr().err.strip().splitlines()[-1]
    assert stats.startswith("3 tokens in ") and "int4pack" not in stats


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "{tmp}", "--prompt", "x"], "holds no packed model"),
        (["apply", "--allocation", "{tmp}/none.json", "--out", "{tmp}/o"], "does not exist"),
        (
            ["generate", "--model", "{tmp}", "--prompt", "x", "--max-new-tokens", "0"],
            "--max-new-tokens must be at least 1",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message, capsys):
    # In process (main() is what the command runs): the other tests here run the commands as
    # processes already, and these fail before anything is loaded.
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bitalloc")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_apply_refuses_an_allocation_for_another_model(tmp_path, tiny_model):
    source = tiny_model_dir(tmp_path / "source", hidden=32, intermediate=64)
    cycling_allocation(tiny_model, ("int4-g32",)).save(tmp_path / "alloc.json")
    result = _apply(tmp_path / "alloc.json", source, tmp_path / "o")
    assert result.returncode == 2 and "unit shapes differ" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_default_model_apply_and_generate(tmp_path, default_model, reuse_default_model, capsys):
    """The embedded model, every integer width among its units: exact bytes and text out.

    ``apply`` runs in process on a copy of the session's model (a process of its own would load
    the model again); ``generate`` runs as a process, from the packed files alone."""
    formats = ("int3-g128", "int4-g64", "int2-g64", "int5-g32", "int6-g128", "int8-g64", "fp16")
    alloc = cycling_allocation(default_model.model, formats)
    alloc.save(tmp_path / "alloc.json")
    out = tmp_path / "packed"
    assert main(["apply", "--allocation", str(tmp_path / "alloc.json"), "--out", str(out)]) == 0
    assert "(ratio 1.0000)" in capsys.readouterr().out
    result = _run(
        "generate",
        "--model",
        str(out),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr.strip().splitlines()[-1].startswith("8 tokens in ")
