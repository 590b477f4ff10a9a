import json
import subprocess
import sys

import pytest

from bitalloc.cli import main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["allocate", "--model", "/no/such/model", "--avg-bits", "3"], "does not exist"),
        (["eval", "--allocation", "/no/such.json"], "does not exist"),
        (["allocate", "--avg-bits", "3", "--formats", "int7-g9"], "unsupported code width"),
        (["profile", "--method", "magic", "--out", "p.json"], "unknown profiler 'magic'"),
        (["allocate", "--avg-bits", "3", "--profiler", "magic"], "unknown profiler 'magic'"),
        (["search", "--avg-bits", "3", "--storage", "nonsense"], "neither an RDB URL"),
        (["search", "--avg-bits", "3", "--resume", "--run-dir", "/no/such/run"], "does not exist"),
        (
            ["search", "--avg-bits", "3", "--workers", "1", "--ray-address", "127.0.0.1:9"],
            "cannot reach Ray at '127.0.0.1:9'",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    result = _run(*args)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bitalloc")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_budget_is_a_usage_error(capsys):
    assert main(["allocate", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--avg-bits" in err and "--kv-avg-bits" in err and "--memory" in err


@pytest.mark.slow
def test_cli_budget_out_of_range_on_default_model(capsys):
    assert main(["allocate", "--avg-bits", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "choose a budget between 2.2" in err and "16.0000" in err


@pytest.mark.slow
def test_cli_allocate_verify_writes_json(tmp_path, isolated_cache):
    out = tmp_path / "alloc.json"
    code = main(
        [
            "allocate",
            "--avg-bits",
            "3.25",
            "--formats",
            "int2-g64,int3-g128,int4-g128",
            "--calibration-tokens",
            "1024",
            "--eval-tokens",
            "1024",
            "--verify",
            "--repair-budget",
            "6",
            "--repair-tokens",
            "1024",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    repair = doc["repair"]
    assert 2 <= repair["evaluations"] <= 6 and repair["tokens"] == 1024
    assert repair["measured_after"] <= repair["measured_before"]
    assert doc["budget"] == 3.25 and doc["avg_bits"] <= 3.25
    assert len(doc["units"]) == 210
    assert {"name", "format", "bits_per_weight", "numel"} <= doc["units"][0].keys()
    measured = doc["measured"]
    assert measured["perplexity"] > 1
    assert {"fp16", "int4-g128", "int2-g64", "int3-g128"} <= measured["baselines"].keys()
    profile_out = tmp_path / "p.json"
    assert (
        main(
            [
                "profile",
                "--tokens",
                "512",
                "--formats",
                "int2-g64,int3-g128,int4-g128",
                "--quiet",
                "--out",
                str(profile_out),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "allocate",
                "--avg-bits",
                "3.5",
                "--formats",
                "int2-g64,int3-g128,int4-g128",
                "--profile",
                str(profile_out),
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_cli_profilers_interactions_and_combined_allocation(tmp_path, isolated_cache, capsys):
    """profile --method output (every unit) and measured with interaction terms (two layers),
    then allocate from the first with the second's interaction terms."""
    formats = ["--formats", "int2-g128,int3-g128,int4-g128", "--quiet"]
    table = tmp_path / "output.safetensors"
    assert (
        main(["profile", "--method", "output", "--tokens", "512", *formats, "--out", str(table)])
        == 0
    )
    terms = tmp_path / "measured.json"
    code = main(
        [
            "profile",
            "--method",
            "measured",
            "--units",
            r"layers\.2[89]\.",
            "--tokens",
            "512",
            "--interactions",
            "neighbours",
            "--interaction-formats",
            "int2-g128",
            *formats,
            "--out",
            str(terms),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "14 units x 3 formats" in out and "interaction terms: 7 pairs at int2-g128" in out
    alloc = tmp_path / "alloc.json"
    code = main(
        [
            "allocate",
            "--avg-bits",
            "3.25",
            "--profile",
            str(table),
            "--interactions-from",
            str(terms),
            "--quiet",
            "--out",
            str(alloc),
        ]
    )
    assert code == 0
    doc = json.loads(alloc.read_text())
    assert doc["solver"]["method"] == "qp" and doc["avg_bits"] <= 3.25
    assert doc["profile"]["method"] == "output"
    # A profile of two layers cannot allocate the whole model: a clear error, not a crash.
    assert main(["allocate", "--avg-bits", "3.25", "--profile", str(terms), "--quiet"]) == 2
    assert "do not match this model's units" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("150MiB", 150 * 2**20),
        ("1.5 GiB", 1.5 * 2**30),
        ("200MB", 2e8),
        ("2e8", 2e8),
        ("64kb", 64e3),
    ],
)
def test_memory_sizes_parse_with_units(text, expected):
    from bitalloc.cliargs import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1MiB", "5XB", "MiB", "nan", "inf"])
def test_bad_memory_sizes_say_what_to_write(text):
    from bitalloc.cliargs import parse_size
    from bitalloc.errors import BitallocError

    with pytest.raises(BitallocError, match="e.g. 150MiB"):
        parse_size(text)
