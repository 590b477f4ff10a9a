import json
import math
import subprocess
import sys

import pytest

from bitalloc.cli import main
from tests.conftest import DEFAULT_MODEL_FORMATS, DEFAULT_MODEL_TOKENS


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
def test_bad_input_is_one_line_without_traceback(args, message, capsys):
    # In process: main() is what the command runs (a new interpreter per case cost 5-10 s);
    # the test below runs one case as its own process.
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bitalloc")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err


def test_bad_input_from_the_command_line_exits_2_with_one_line():
    result = _run("allocate", "--model", "/no/such/model", "--avg-bits", "3")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bitalloc")]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_budget_is_a_usage_error(capsys):
    assert main(["allocate", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--avg-bits" in err and "--kv-avg-bits" in err and "--memory" in err


@pytest.mark.slow
def test_cli_budget_out_of_range_on_default_model(capsys, reuse_default_model):
    assert main(["allocate", "--avg-bits", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "choose a budget between 2.2" in err and "16.0000" in err


@pytest.mark.slow
def test_cli_allocate_verify_writes_json(tmp_path, shared_cache, reuse_default_model):
    out = tmp_path / "alloc.json"
    code = main(
        [
            "allocate",
            "--avg-bits",
            "3.25",
            "--formats",
            DEFAULT_MODEL_FORMATS,
            "--calibration-tokens",
            str(DEFAULT_MODEL_TOKENS),
            "--eval-tokens",
            "512",
            "--verify",
            "--repair-budget",
            "6",
            "--repair-tokens",
            "512",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    repair = doc["repair"]
    assert 2 <= repair["evaluations"] <= 6 and repair["tokens"] == 512
    assert repair["measured_after"] <= repair["measured_before"]
    assert doc["budget"]["avg_bits"] == 3.25 and doc["avg_bits"] <= 3.25
    assert len(doc["units"]) == 210
    assert {"name", "format", "bits_per_weight", "numel"} <= doc["units"][0].keys()
    measured = doc["measured"]
    assert measured["perplexity"] > 1
    assert measured["eval_tokens"] == 511  # one window of 512: --eval-tokens reached verify
    assert {"fp16", "int4-g128", "int2-g64", "int3-g128"} <= measured["baselines"].keys()
    profile_out = tmp_path / "p.json"
    assert (
        main(
            [
                "profile",
                "--tokens",
                str(DEFAULT_MODEL_TOKENS),
                "--formats",
                DEFAULT_MODEL_FORMATS,
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
                DEFAULT_MODEL_FORMATS,
                "--profile",
                str(profile_out),
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_cli_profilers_interactions_and_combined_allocation(
    tmp_path, isolated_cache, capsys, reuse_default_model
):
    """profile --method output (every unit) and measured with interaction terms (q and k of
    two layers: two neighbour pairs), then allocate from the first with the second's
    interaction terms.

    Two formats, plain-MSE clipping, 128-token windows and few measured units keep it to the
    quantizing that the output profile needs (every unit under every format): weighted clipping
    would gather an importance over 8192 tokens for each unit set, and every measurement
    replays the model's head (interaction terms on 1024 tokens whatever --tokens says). What
    the profilers and the clipping compute is tested on the tiny model."""
    formats = ["--formats", "int2-g128,int4-g128", "--clipping", "mse", "--quiet"]
    formats += ["--seq-len", "128"]
    table = tmp_path / "output.safetensors"
    assert (
        main(["profile", "--method", "output", "--tokens", "128", *formats, "--out", str(table)])
        == 0
    )
    terms = tmp_path / "measured.json"
    code = main(
        [
            "profile",
            "--method",
            "measured",
            "--units",
            r"layers\.2[89]\.self_attn\.[qk]_proj",
            "--tokens",
            "128",
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
    assert "4 units x 2 formats" in out and "interaction terms: 2 pairs at int2-g128" in out
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
            "--clipping",
            "mse",
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
    args = ["allocate", "--avg-bits", "3.25", "--profile", str(terms), "--clipping", "mse"]
    assert main([*args, "--quiet"]) == 2
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


# --- usage errors are one line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["allocate", "--avg-bits", "abc"], "argument --avg-bits: invalid float value: 'abc'"),
        (["profile"], "the following arguments are required: --out"),
        (["search", "--avg-bits", "3", "--sampler", "cma"], "argument --sampler: invalid choice"),
        (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    ],
)
def test_usage_error_is_one_line_without_usage_block(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitalloc: error: ")
    assert message in err and "usage:" not in err and "--help" in err


def test_help_still_prints_usage(capsys):
    assert main(["solve", "--help"]) == 0
    assert "usage: bitalloc solve" in capsys.readouterr().out


# --- output paths are checked before any work -----------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive entry point fail the test: an output check must come first."""
    import bitalloc.allocator
    import bitalloc.dashboards.cli
    import bitalloc.models
    import bitalloc.search.run

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    for module, name in [
        (bitalloc.allocator, "allocate"),
        (bitalloc.allocator, "prepare"),
        (bitalloc.allocator, "profile_model"),
        (bitalloc.models, "load_model"),
        (bitalloc.search.run, "prepare_and_profile"),
        (bitalloc.dashboards.cli, "_gather_inputs"),
    ]:
        monkeypatch.setattr(module, name, forbidden)


def _bad_outputs(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    under_file = str(afile / "x.json")
    profile = ["--profile", str(tmp_path / "p.json")]
    return [
        (["allocate", "--avg-bits", "3", "--out", str(tmp_path)], "is a directory"),
        (["allocate", "--avg-bits", "3", "--out", under_file], "is a file, so no directory"),
        (["profile", "--out", str(tmp_path)], "is a directory"),
        (["profile", "--out", under_file], "is a file"),
        (["solve", *profile, "--avg-bits", "3", "--out", str(tmp_path)], "is a directory"),
        (["frontier", *profile, "--out", under_file], "is a file"),
        (["report", "--out", str(tmp_path), "--run-dir", str(full)], "is a directory"),
        (["apply", "--allocation", "a.json", "--out", str(full)], "is not empty"),
        (["apply", "--allocation", "a.json", "--out", str(afile)], "is a file"),
        (["search", "--avg-bits", "3", "--run-dir", str(afile)], "is a file"),
        (["search", "--avg-bits", "3", "--run-dir", str(afile / "run")], "is a file"),
    ]


def test_bad_output_paths_fail_before_any_work(tmp_path, no_work, capsys):
    for args, message in _bad_outputs(tmp_path):
        assert main([*args, *(["--quiet"] if args[0] in ("allocate", "profile") else [])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bitalloc: error: "), (args, err)
        assert message in err and "Traceback" not in err, (args, err)
    # Nothing was written in the non-empty directory.
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_unwritable_output_directory_fails_before_any_work(tmp_path, no_work, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("")  # root ignores permissions: then there is nothing to test
            pytest.skip("this user can write in a read-only directory")
        except PermissionError:
            pass
        assert main(["allocate", "--avg-bits", "3", "--out", str(locked / "a.json")]) == 2
        err = capsys.readouterr().err
        assert "cannot write in" in err and err.count("\n") == 1
        assert main(["apply", "--allocation", "a.json", "--out", str(locked / "packed")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_unwritable_file_system_is_refused(tmp_path, monkeypatch):
    """The probe really creates a file, so any refusal (permissions, read-only mounts, quotas)
    is caught, whoever runs the command."""
    import tempfile

    from bitalloc.errors import BitallocError
    from bitalloc.outputs import check_output_dir, check_output_file

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(BitallocError, match="cannot write in .*Read-only file system"):
        check_output_file(tmp_path / "new" / "deeper" / "a.json", "--out")
    with pytest.raises(BitallocError, match="cannot write in"):
        check_output_dir(tmp_path, "--out", must_be_empty=False)


def test_good_output_paths_pass_and_create_nothing(tmp_path):
    from bitalloc.outputs import check_output_dir, check_output_file

    existing = tmp_path / "old.json"
    existing.write_text("{}")
    check_output_file(existing, "--out")  # replaced atomically later
    check_output_file(tmp_path / "a" / "b" / "c.json", "--out")
    check_output_dir(tmp_path / "new" / "packed", "--out")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "bitalloc_packed.json").write_text("{}")
    from bitalloc.packed_cli import replaceable_packed_dir

    check_output_dir(packed, "--out", may_replace=replaceable_packed_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "packed"]
    assert [p.name for p in packed.iterdir()] == ["bitalloc_packed.json"]


# --- what the summaries say -----------------------------------------------------------------


def test_tokens_line_says_scored_and_read():
    from bitalloc.cliprint import tokens_line

    assert tokens_line(4088, 512) == "4,088 scored tokens (8 windows of 512 = 4,096 read)"
    assert tokens_line(1023, 1024) == "1,023 scored tokens (1 window of 1024 = 1,024 read)"
    assert tokens_line(100, 64) == "100 scored tokens (64-token windows)"


def _repair(action: str, predicted: float = 0.10, measured: float = 0.16):
    from bitalloc.allocation import Repair, RepairRound

    rounds = [
        RepairRound(avg_bits=3.2, predicted=0.1, measured=0.2, groups_measured=["a"], action="x"),
        RepairRound(
            avg_bits=3.2, predicted=predicted, measured=measured, groups_measured=[], action=action
        ),
    ]
    return Repair(
        tokens=2048,
        tolerance=0.1,
        budget=24,
        evaluations=24,
        predicted_before=0.1,
        measured_before=0.2,
        predicted_after=0.12,
        measured_after=0.16,
        changed=True,
        groups="unit",
        groups_measured=16,
        rounds=rounds,
        wall_time_s=902.0,
    )


def test_repair_summary_says_when_the_budget_ran_out():
    from bitalloc.cliprint import repair_line

    spent = repair_line(_repair("budget spent"))
    assert "allocation changed" in spent
    assert "budget of 24 evaluations ran out" in spent and "within 10%" in spent
    assert "last predicted 0.1000, measured 0.1600, +0.0600 nats/token apart (+60%)" in spent
    agreed = repair_line(_repair("agrees", 0.15, 0.16))
    assert "ran out" not in agreed and agreed.endswith("allocation changed")


def test_repair_summary_says_what_was_returned_and_why():
    from bitalloc.cliprint import repair_line

    record = _repair("agrees").model_copy(
        update={
            "chosen": "uniform int3-g128",
            "reason": "uniform int3-g128 measured perplexity 20.000 on the evaluation split",
            "regime": "the loss increase is 5.20 nats/token",
        }
    )
    text = repair_line(record)
    assert "returned uniform int3-g128: uniform int3-g128 measured perplexity 20.000" in text
    assert "profile outside its regime: the loss increase is 5.20 nats/token" in text
    assert "left no room to measure them" in text
    refined = record.rounds[0].model_copy(update={"action": "refined"})
    text = repair_line(record.model_copy(update={"rounds": [refined, *record.rounds[1:]]}))
    assert "measured the units that matter under their formats' neighbours" in text


def test_eval_labels_the_stored_repair_as_recorded(tmp_path, monkeypatch, capsys):
    """`bitalloc eval` measures again but never repairs: the stored repair line is history."""
    from types import SimpleNamespace

    import bitalloc.allocator
    from bitalloc.allocation import Measured
    from tests.allocations import cycling_allocation
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    alloc = cycling_allocation(model, ["int4-g32", "int8-g32"]).with_repair(_repair("agrees"))
    alloc.save(tmp_path / "a.json")
    measured = Measured(
        perplexity=12.0,
        baselines={"fp16": 11.0},
        baseline_avg_bits={"fp16": 16.0},
        eval_tokens=4088,
        seq_len=512,
        measured_loss_increase=math.log(12.0 / 11.0),
        predicted_loss_increase=0.05,
    )
    prepared = SimpleNamespace(model=model)
    monkeypatch.setattr(bitalloc.allocator, "prepare", lambda *a, **k: prepared)
    monkeypatch.setattr(bitalloc.allocator, "measure", lambda *a, **k: measured)
    assert main(["eval", "--allocation", str(tmp_path / "a.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "recorded at allocation time: verify and repair (24 evaluations" in out
    assert "perplexity on 4,088 scored tokens (8 windows of 512 = 4,096 read)" in out


def test_quiet_silences_library_progress_bars_and_restores_them():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from bitalloc.cliprint import quiet_libraries

    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with quiet_libraries(True):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with quiet_libraries(False):
        assert hf_logging.is_progress_bar_enabled()
