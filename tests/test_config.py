"""AllocateConfig / SearchConfig: defaults, flat keywords, checks, files and the derived CLI.

Fast: no model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bitalloc.cli import build_parser
from bitalloc.cliconfig import (
    GIVEN,
    OPTION_FIELDS,
    _ConfigAction,
    config_from_args,
    flag_names,
    search_config_from_args,
)
from bitalloc.config import (
    FLAT_FIELDS,
    SEARCH_FLAT_FIELDS,
    SEARCH_SHARED,
    AllocateConfig,
    SearchConfig,
    search_flat,
    split_search_flat,
)
from bitalloc.errors import BitallocError, ConfigError

#: allocate()'s keyword defaults before the config existed (bitalloc/allocator.py at cdd3020);
#: scale_folding's False is the config's None.
OLD_ALLOCATE_DEFAULTS = {
    "model": None,
    "avg_bits": None,
    "profiler": "fisher",
    "solver": None,
    "ties": None,
    "max_bytes": None,
    "solver_options": {},
    "profiler_options": {},
    "formats": None,
    # Added after the config: clipping weighted by the calibration importance (issue 18).
    "clipping": "weighted",
    "calibration": None,
    "evaluation": None,
    "verify": False,
    "repair": True,
    "repair_budget": 24,
    "repair_tolerance": 0.1,
    "repair_tokens": 2048,
    "repair_groups": "unit",
    "profile": None,
    "interactions": None,
    "interactions_from": None,
    "workers": 0,
    "ray_address": None,
    "calibration_tokens": None,
    "eval_tokens": 4096,
    "seq_len": 512,
    "use_cache": True,
    "progress": True,
    "policy": None,
    "scale_folding": False,
    "kv_avg_bits": None,
    "memory_bytes": None,
    "context_len": None,
    "batch_size": 1,
    "kv_formats": None,
    "kv_profiler": "kl",
    "kv_tokens": None,
    # Added with engine targets (issue 19).
    "target": "bitalloc",
    "max_file_bytes": None,
    "imatrix": None,
}
OLD_SEARCH_DEFAULTS = {
    "trials": 40,
    "sampler": "nsga2",
    "storage": None,
    "study": "bitalloc",
    "run_dir": None,
    "resume": False,
    "space": "near",
    "radius": 1,
    "seed": 0,
}

#: One non-default value per allocate() keyword (a valid config all together, bar the KV and
#: memory keywords that exclude each other, which ``KV_VALUES`` covers).
VALUES = {
    "model": "some/dir",
    "avg_bits": 3.25,
    "clipping": "mse",
    "profiler": "hessian",
    "solver": "rl",
    "ties": ("qkv", "gateup"),
    "max_bytes": 1e6,
    "solver_options": {"time_limit": 30, "nested": [1, 2]},
    "profiler_options": {"max_probes": 32},
    "formats": ("int2-g64", "int4-g128"),
    "calibration": ("a.txt", "b.txt"),
    "evaluation": ("c.txt",),
    "verify": True,
    "repair": False,
    "repair_budget": 6,
    "repair_tolerance": 0.2,
    "repair_tokens": 1024,
    "repair_groups": "layer",
    "profile": None,
    "interactions": (("a", "b"), ("c", "d")),
    "interactions_from": "terms.json",
    "workers": 2,
    "ray_address": "127.0.0.1:6379",
    "calibration_tokens": 512,
    "eval_tokens": None,
    "seq_len": 64,
    "use_cache": False,
    "progress": False,
    "policy": "policy.zip",
    "scale_folding": 0.3,
}
KV_VALUES = {
    "kv_avg_bits": 4.0,
    "context_len": 128,
    "batch_size": 2,
    "kv_formats": ("K4V4", "K8V8"),
    "kv_profiler": "loss",
    "kv_tokens": 256,
}


# --- defaults and flat keywords ------------------------------------------------------------


def test_defaults_are_what_allocate_and_search_used():
    flat = AllocateConfig.from_flat(avg_bits=3.0).to_flat()
    assert flat == {**OLD_ALLOCATE_DEFAULTS, "avg_bits": 3.0}
    assert SearchConfig().model_dump() == OLD_SEARCH_DEFAULTS
    # The command line's defaults are the same: a bare `allocate --avg-bits 3` is that config.
    args = build_parser().parse_args(["allocate", "--avg-bits", "3"])
    assert config_from_args(args) == AllocateConfig.from_flat(avg_bits=3.0)


def test_every_flat_name_maps_to_a_field_and_round_trips():
    assert set(FLAT_FIELDS) == set(OLD_ALLOCATE_DEFAULTS)
    assert len(set(FLAT_FIELDS.values())) == len(FLAT_FIELDS)  # one keyword per field
    for name, (section, field) in FLAT_FIELDS.items():
        owner = AllocateConfig if not section else AllocateConfig.model_fields[section].annotation
        assert field in owner.model_fields, name
    config = AllocateConfig.from_flat(**VALUES)
    flat = config.to_flat()
    assert {k: flat[k] for k in VALUES} == VALUES
    assert AllocateConfig.from_flat(**flat) == config
    kv = AllocateConfig.from_flat(**{**VALUES, "solver": "qp", "policy": None, **KV_VALUES})
    assert {k: kv.to_flat()[k] for k in KV_VALUES} == KV_VALUES
    memory = AllocateConfig.from_flat(memory_bytes=2e8, context_len=64)
    assert memory.kv.memory_bytes == 2e8 and memory.to_flat()["memory_bytes"] == 2e8


def test_flat_values_are_normalised():
    from bitalloc.formats import parse_format

    config = AllocateConfig.from_flat(
        avg_bits=3,
        formats="int2-g64, int4-g128",
        ties="qkv",
        kv_avg_bits=4.0,
        kv_formats="K4V4,K8V8",
        calibration=Path("/data/cal.txt"),
        evaluation=[Path("e1.txt"), "e2.txt"],
        interactions=[["a", "b"]],
        interactions_from=Path("p.json"),
        scale_folding=True,
    )
    assert config.target.formats == ("int2-g64", "int4-g128")
    assert config.target.ties == ("qkv",)
    assert config.kv.formats == ("K4V4", "K8V8")
    assert config.data.calibration == ("/data/cal.txt",)
    assert config.data.evaluation == ("e1.txt", "e2.txt")
    assert config.profile.interactions == (("a", "b"),)
    assert config.profile.interactions_from == "p.json"
    assert config.profile.scale_folding == 0.5
    assert config.target.avg_bits == 3.0
    objects = AllocateConfig.from_flat(avg_bits=3, formats=[parse_format("int3-g128")])
    assert objects.target.formats == ("int3-g128",)
    assert AllocateConfig.from_flat(avg_bits=3, scale_folding=False).profile.scale_folding is None


def test_with_flat_puts_keywords_on_top():
    base = AllocateConfig.from_flat(avg_bits=3.0, seq_len=64, formats="int4-g128")
    moved = base.with_flat(avg_bits=4.0, verify=True)
    assert moved.target.avg_bits == 4.0 and moved.verify.enabled
    assert moved.data.seq_len == 64 and moved.target.formats == ("int4-g128",)
    assert base.target.avg_bits == 3.0  # frozen: the original is unchanged
    with pytest.raises(ConfigError):
        base.target.avg_bits = 5.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "suggestion"),
    [
        ({"avg_bit": 3}, "did you mean avg_bits"),
        ({"avg_bits": 3, "kv_format": "K4V4"}, "did you mean kv_formats"),
        ({"avg_bits": 3, "solver_option": {}}, "did you mean solver_options"),
    ],
)
def test_unknown_keyword_suggests_the_right_one(kw, suggestion):
    with pytest.raises(ConfigError, match=suggestion) as err:
        AllocateConfig.from_flat(**kw)
    assert "\n" not in str(err.value)


# --- the rules between options: the messages allocate() gave -------------------------------

# Each message is the one the run-time check said (kv/allocate.kv_request,
# allocator.prepare_and_profile, rl/options, repair.verify_and_repair, folding.check_alpha,
# kv/plan.check_context_batch, kv/profiler.KVProfiler, cliargs.check_profiler), in full.
RULES = [
    (
        {"context_len": 64, "avg_bits": 3},
        "context_len sizes the KV cache; pass kv_avg_bits= (a KV budget) or memory_bytes= (one "
        "weights + KV budget) with it",
    ),
    (
        {"avg_bits": 3, "context_len": 64, "kv_formats": "K4V4"},
        "context_len, kv_formats sizes the KV cache; pass kv_avg_bits=",
    ),
    ({"avg_bits": 3, "batch_size": 2}, "batch_size sizes the KV cache"),
    (
        {"avg_bits": 4.0, "memory_bytes": 1e6, "context_len": 64},
        "memory_bytes is one budget for weights and KV cache and decides their split itself; "
        "pass it alone, or pass avg_bits (weights) and kv_avg_bits (KV cache) instead",
    ),
    ({"memory_bytes": 1e6, "max_bytes": 1e5, "context_len": 64}, "pass it alone"),
    (
        {"memory_bytes": 1e6},
        "a memory budget needs the context the KV cache must hold: pass context_len= (tokens) "
        "and batch_size= (sequences, default 1)",
    ),
    (
        {"kv_avg_bits": 4.0, "solver": "rl"},
        "the rl solver allocates weight matrices only (its embedding reads weights); choose "
        "lagrangian, dp, ilp or qp for the KV cache",
    ),
    (
        {"memory_bytes": 1e6, "context_len": 64, "kv_profiler": "proxy"},
        "a joint memory budget adds weight and KV losses, so the KV profile must be in nats: use "
        "kv_profiler in ('kl', 'loss'), not 'proxy'",
    ),
    (
        {"kv_avg_bits": 4.0, "batch_size": 0},
        "batch_size must be a positive integer (tokens / sequences), got 0",
    ),
    (
        {"kv_avg_bits": 4.0, "context_len": 0},
        "context_len must be a positive integer (tokens / sequences), got 0",
    ),
    ({"kv_avg_bits": 4.0, "kv_tokens": 0}, "calibration tokens must be a positive integer, got 0"),
    (
        {},
        "pass avg_bits (--avg-bits), the budget in average bits per weight (e.g. 3.25), a file "
        "size (max_file_bytes, --file-size, with --target gguf or ct), or a KV cache budget: "
        "kv_avg_bits (--kv-avg-bits) or memory_bytes (--memory)",
    ),
    ({"max_file_bytes": 1e6}, "with it"),
    ({"avg_bits": 4, "target": "gguf", "formats": "int4-g128"}, "cannot be stored in a GGUF"),
    ({"avg_bits": 4, "target": "vllm"}, "target"),
    ({"avg_bits": 4, "imatrix": "i.gguf", "clipping": "mse"}, "leave --clipping at weighted"),
    ({"avg_bits": 4, "imatrix": "i.gguf", "scale_folding": 0.5}, "use one or the other"),
    ({"max_bytes": 1e6}, "pass avg_bits (--avg-bits)"),
    (
        {"avg_bits": 3, "profiler": "magic"},
        "unknown profiler 'magic'; choose one of ['fisher', 'hessian', 'kfac', 'kl', "
        "'measured', 'output']",
    ),
    (
        {"avg_bits": 3, "profile": "p.json", "interactions": "neighbours"},
        "interactions are measured while profiling; with a saved profile pass "
        "interactions_from=<profile holding them> instead",
    ),
    (
        {"avg_bits": 3, "policy": "p.zip"},
        "policy= applies an RL policy; use solver='rl', not 'lagrangian'",
    ),
    (
        {"avg_bits": 3, "policy": "p.zip", "solver": "dp"},
        "policy= applies an RL policy; use solver='rl', not 'dp'",
    ),
    (
        {"avg_bits": 3, "policy": "p.zip", "interactions": "neighbours"},
        "use solver='rl', not 'qp'",
    ),
    (
        {"avg_bits": 3, "repair_budget": 1},
        "the repair budget must allow >= 2 evaluations, not 1",
    ),
    (
        {"avg_bits": 3, "repair_tolerance": -0.5},
        "the repair tolerance must be >= 0, not -0.5",
    ),
    (
        {"avg_bits": 3, "scale_folding": 1.5},
        "scale_folding: alpha must be in (0, 1) (migration strength; 0.5 is the usual "
        "choice), got 1.5",
    ),
    ({"avg_bits": 3, "scale_folding": "0.5"}, "alpha must be a number in (0, 1), got '0.5'"),
]


@pytest.mark.parametrize(("kw", "message"), RULES)
def test_every_rule_raises_the_message_allocate_gave(kw, message):
    with pytest.raises(ConfigError) as err:
        AllocateConfig.from_flat(**kw)
    assert message in str(err.value)
    assert isinstance(err.value, BitallocError) and "\n" not in str(err.value)


def test_a_saved_profile_skips_the_profiler_check():
    config = AllocateConfig.from_flat(avg_bits=3, profile="p.json", profiler="whatever")
    assert config.profile.profile == "p.json"
    # A KV-only budget needs no weight budget.
    assert AllocateConfig.from_flat(kv_avg_bits=4.0).target.avg_bits is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"avg_bits": -1}, "avg_bits: must be > 0, got -1"),
        ({"avg_bits": float("nan")}, "avg_bits: must be > 0, got nan"),
        ({"avg_bits": "3"}, "avg_bits: input should be a valid number, got '3'"),
        ({"avg_bits": 3, "seq_len": 0}, "seq_len: must be > 0, got 0"),
        ({"avg_bits": 3, "seq_len": True}, "seq_len: input should be a valid integer"),
        ({"avg_bits": 3, "workers": -1}, "workers: must be >= 0"),
        ({"avg_bits": 3, "repair_groups": "row"}, "repair_groups: input should be 'unit' or"),
        ({"avg_bits": 3, "formats": "int7-g9"}, "formats: unsupported code width"),
        ({"avg_bits": 3, "ties": "qkv,up"}, "ties: unknown tie kind(s) ['up']"),
        ({"kv_avg_bits": 3, "kv_formats": "K3V4"}, "kv_formats: unsupported key width 3"),
        ({"avg_bits": 3, "kv_profiler": "magic"}, "kv_profiler: input should be 'kl', 'loss'"),
    ],
)
def test_field_problems_are_one_line_config_errors_naming_the_keyword(kw, message):
    with pytest.raises(ConfigError) as err:
        AllocateConfig.from_flat(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "pydantic" not in str(err.value)


def test_several_problems_are_named_in_one_line():
    with pytest.raises(ConfigError) as err:
        AllocateConfig.from_flat(avg_bits=-1, seq_len=0, eval_tokens=-5)
    text = str(err.value)
    assert "avg_bits: must be > 0" in text and "seq_len: must be > 0" in text
    assert "eval_tokens: must be > 0" in text and "\n" not in text


def test_building_a_section_directly_raises_config_error():
    from bitalloc.config import TargetConfig

    with pytest.raises(ConfigError, match="avg_bits: must be > 0, got -2"):
        TargetConfig(avg_bits=-2)
    with pytest.raises(ConfigError, match="target.avg_bit: not an option; did you mean avg_bits"):
        AllocateConfig.build({"target": {"avg_bit": 3}})


# --- files -----------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    config = AllocateConfig.from_flat(**VALUES)
    path = config.save(tmp_path / "c.json")
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["target"]["formats"] == ["int2-g64", "int4-g128"]
    assert AllocateConfig.load(path) == config
    assert AllocateConfig.from_json(path.read_text()) == config
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_loading_the_config_an_allocation_recorded(tmp_path):
    config = AllocateConfig.from_flat(avg_bits=3.5, formats="int3-g128,int4-g128", verify=True)
    allocation = {"units": [], "avg_bits": 3.4, "total_bits": 1.0, "budget": 3.5}
    (tmp_path / "a.json").write_text(json.dumps({**allocation, "config": config.to_json_dict()}))
    assert AllocateConfig.load(tmp_path / "a.json") == config
    (tmp_path / "old.json").write_text(json.dumps(allocation))
    with pytest.raises(ConfigError, match="predates recorded configs; pass the options again"):
        AllocateConfig.load(tmp_path / "old.json")
    (tmp_path / "none.json").write_text(json.dumps({**allocation, "config": None}))
    with pytest.raises(ConfigError, match="predates recorded configs"):
        AllocateConfig.load(tmp_path / "none.json")


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_other_versions_are_refused(tmp_path, version):
    data = AllocateConfig.from_flat(avg_bits=3).to_json_dict()
    if version is None:
        del data["version"]
    else:
        data["version"] = version
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="reads version 1"):
        AllocateConfig.load(tmp_path / "c.json")


def test_files_are_parsed_strictly(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"version": 1, "version": 1, "target": {"avg_bits": 3}}')
    with pytest.raises(BitallocError, match="appears twice"):
        AllocateConfig.load(path)
    path.write_text('{"version": 1, "target": {"avg_bits": NaN}}')
    with pytest.raises(BitallocError, match="not a JSON number"):
        AllocateConfig.load(path)
    path.write_text('{"version": 1, "target": {"avg_bits": 3, "colour": 1}}')
    with pytest.raises(ConfigError, match="target.colour: not an option"):
        AllocateConfig.load(path)
    with pytest.raises(BitallocError, match="does not exist"):
        AllocateConfig.load(tmp_path / "missing.json")


def test_non_json_options_cannot_be_saved():
    for value in (print, float("nan")):
        config = AllocateConfig.from_flat(avg_bits=3, solver_options={"x": value})
        with pytest.raises(ConfigError, match="not JSON"):
            config.to_json_dict()


# --- search -----------------------------------------------------------------------------------


def test_search_keywords_split_and_join():
    kw = {"model": "m", "avg_bits": 3.0, "trials": 8, "sampler": "tpe", "profiler": "kl"}
    config, search = split_search_flat(**kw, eval_tokens=1024, seed=3)
    assert config.target.avg_bits == 3.0 and config.data.eval_tokens == 1024
    assert search.trials == 8 and search.sampler == "tpe" and search.seed == 3
    flat = search_flat(config, search)
    assert set(flat) == set(SEARCH_SHARED) | set(SEARCH_FLAT_FIELDS)
    assert flat["trials"] == 8 and flat["profiler"] == "kl" and flat["model"] == "m"
    with pytest.raises(ConfigError, match="did you mean trials"):
        split_search_flat(avg_bits=3.0, trails=4)
    with pytest.raises(ConfigError, match="does not use verify"):
        search_flat(config.with_flat(verify=True), search)
    with pytest.raises(ConfigError, match="trials: trials must be >= 1, not 0"):
        SearchConfig.from_flat(trials=0)
    with pytest.raises(ConfigError, match="sampler: sampler 'cma' is not one of nsga2, tpe"):
        SearchConfig.from_flat(sampler="cma")


# --- the command line ------------------------------------------------------------------------

FULL_ALLOCATE = [
    "allocate", "--model", "some/dir", "--formats", "int2-g64,int4-g128", "--clipping", "mse",
    "--calibration", "a.txt", "b.txt", "--evaluation", "c.txt", "--seq-len", "64", "--quiet",
    "--avg-bits", "3.25", "--max-bytes", "1e6", "--profiler", "hessian",
    "--profiler-option", "max_probes=32", "--workers", "2", "--ray-address", "127.0.0.1:6379",
    "--interactions", "neighbours", "--interactions-from", "terms.json", "--solver", "qp",
    "--tie", "qkv,gateup", "--option", "time_limit=30", "--option", 'nested=[1, 2]',
    "--calibration-tokens", "512", "--eval-tokens", "1024", "--verify", "--no-repair",
    "--repair-budget", "6", "--repair-tolerance", "0.2", "--repair-groups", "layer",
    "--repair-tokens", "1024", "--scale-folding", "0.3", "--no-cache",
]  # fmt: skip


def test_a_full_flag_list_builds_the_expected_config():
    args = build_parser().parse_args(FULL_ALLOCATE)
    expected = {
        **VALUES,
        "solver": "qp",
        "policy": None,
        "interactions": "neighbours",
        "eval_tokens": 1024,
        "solver_options": {"time_limit": 30, "nested": [1, 2]},
    }
    assert config_from_args(args) == AllocateConfig.from_flat(**expected)
    kv = build_parser().parse_args(
        ["allocate", "--memory", "150MiB", "--context-len", "256", "--batch-size", "2",
         "--kv-formats", "K4V4,K8V8", "--kv-profiler", "loss", "--kv-tokens", "512"]
    )  # fmt: skip
    config = config_from_args(kv)
    assert config.kv.memory_bytes == 150 * 2**20 and config.kv.context_len == 256
    assert config.kv.formats == ("K4V4", "K8V8") and config.kv.tokens == 512
    folded = build_parser().parse_args(["allocate", "--avg-bits", "3", "--scale-folding"])
    assert config_from_args(folded).profile.scale_folding == 0.5


def test_cli_problems_name_the_flag():
    parser = build_parser()
    cases = [
        (["allocate", "--avg-bits", "-1"], "--avg-bits: must be > 0, got -1"),
        (["allocate", "--avg-bits", "3", "--seq-len", "0"], "--seq-len: must be > 0, got 0"),
        (["allocate", "--avg-bits", "3", "--formats", "int7-g9"], "--formats: unsupported code"),
        (["allocate", "--avg-bits", "3", "--scale-folding", "1.5"], "--scale-folding: alpha"),
        (["allocate", "--avg-bits", "3", "--workers", "-2"], "--workers: must be >= 0"),
        (["allocate", "--memory", "0"], "e.g. 150MiB"),
        (["allocate", "--avg-bits", "3", "--option", "novalue"], "write KEY=VALUE"),
    ]
    for argv, message in cases:
        with pytest.raises(BitallocError) as err:
            config_from_args(parser.parse_args(argv))
        assert message in str(err.value) and "\n" not in str(err.value), argv


def test_config_file_then_flags_on_top(tmp_path):
    base = AllocateConfig.from_flat(
        avg_bits=3.0,
        seq_len=64,
        formats="int3-g128,int4-g128",
        verify=True,
        solver_options={"time_limit": 10, "backend": "highs"},
    )
    base.save(tmp_path / "c.json")
    argv = ["allocate", "--config", str(tmp_path / "c.json"), "--avg-bits", "4"]
    argv += ["--seq-len", "512", "--option", "time_limit=30", "--no-repair"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.target.avg_bits == 4.0 and config.data.seq_len == 512  # the flags win,
    assert config.target.formats == ("int3-g128", "int4-g128") and config.verify.enabled
    assert config.solve.options == {"time_limit": 30, "backend": "highs"}  # options merge
    assert not config.verify.repair
    # Without flags the file comes back as it was; a flag at its default value still wins.
    same = build_parser().parse_args(["allocate", "--config", str(tmp_path / "c.json")])
    assert config_from_args(same) == base
    again = ["allocate", "--config", str(tmp_path / "c.json"), "--seq-len", "512"]
    assert config_from_args(build_parser().parse_args(again)).data.seq_len == 512


def test_save_config_writes_the_resolved_config(tmp_path, monkeypatch, capsys):
    import bitalloc.cli

    seen = []

    def fake_run_allocate(config):
        seen.append(config)
        raise BitallocError("stop here")

    monkeypatch.setattr(bitalloc.cli, "run_allocate", fake_run_allocate)
    out = tmp_path / "saved.json"
    argv = ["allocate", "--avg-bits", "3.5", "--seq-len", "128", "--save-config", str(out)]
    assert bitalloc.cli.main([*argv, "--quiet"]) == 2
    assert "stop here" in capsys.readouterr().err
    saved = AllocateConfig.load(out)
    assert saved == seen[0] == AllocateConfig.from_flat(avg_bits=3.5, seq_len=128, progress=False)
    # --config of the saved file runs the same allocation.
    assert bitalloc.cli.main(["allocate", "--config", str(out)]) == 2
    assert seen[1] == saved
    # A bad option stops before allocate is reached (and before the config is written).
    assert bitalloc.cli.main(["allocate", "--avg-bits", "-3", "--save-config", str(out)]) == 2
    assert "--avg-bits: must be > 0, got -3" in capsys.readouterr().err and len(seen) == 2
    assert AllocateConfig.load(out) == saved


def test_search_flags_and_config_file(tmp_path):
    parser = build_parser()
    argv = ["search", "--avg-bits", "3", "--trials", "8", "--sampler", "tpe", "--resume"]
    argv += ["--space", "full", "--radius", "2", "--seed", "5", "--study", "s1"]
    argv += ["--eval-tokens", "1024", "--solver", "dp", "--no-cache"]
    args = parser.parse_args(argv)
    config, search = config_from_args(args), search_config_from_args(args)
    assert config.target.avg_bits == 3.0 and config.solve.solver == "dp"
    assert not config.profile.use_cache and config.data.eval_tokens == 1024
    assert search == SearchConfig(
        trials=8, sampler="tpe", resume=True, space="full", radius=2, seed=5, study="s1"
    )
    (tmp_path / "s.json").write_text(
        json.dumps({**config.to_json_dict(), "search": search.model_dump(mode="json")})
    )
    again = parser.parse_args(["search", "--config", str(tmp_path / "s.json"), "--trials", "9"])
    assert config_from_args(again) == config
    assert search_config_from_args(again) == search.model_copy(update={"trials": 9})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_config_option_is_in_allocate_help(capsys):
    parser = build_parser()
    help_text = _subparsers(parser)["allocate"].format_help()
    flags = {flag for (section, _), flag in flag_names().items() if section != "search"}
    assert flags and all(flag in help_text for flag in flags), flags - set(help_text.split())
    search_help = _subparsers(parser)["search"].format_help()
    for name in (*SEARCH_FLAT_FIELDS, *SEARCH_SHARED):
        extra = _field_extra(name)
        assert extra["flag"] in search_help, name


def _field_extra(name):
    from bitalloc.cliconfig import option_spec

    return option_spec(name)


def test_no_config_flag_is_defined_by_hand():
    """Every option of every subcommand whose flag or destination is a config option's comes
    from the config's definition (so no flag is defined twice)."""
    config_flags = set(flag_names().values())
    config_dests = {_field_extra(name)["dest"] for name in OPTION_FIELDS if _has_flag(name)}
    # Options that look like config flags but mean something else on their subcommand.
    other_meaning = {("generate", "--model"), ("generate", "--seed")}
    other_meaning |= {("report", f) for f in ("--run-dir", "--storage", "--study", "--profile")}
    other_meaning |= {("dashboard", f) for f in ("--run-dir", "--storage", "--study")}
    checked = 0
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            names = set(action.option_strings)
            if names & config_flags or action.dest in config_dests:
                if any((command, n) in other_meaning for n in names):
                    continue
                assert isinstance(action, _ConfigAction), (command, action.option_strings)
                checked += 1
    assert checked > 80


def _has_flag(name):
    from bitalloc.cliconfig import field_info

    return "flag" in (field_info(name).json_schema_extra or {})


def test_only_given_flags_are_recorded():
    args = build_parser().parse_args(["allocate", "--avg-bits", "3", "--quiet", "--tie", "qkv"])
    given = getattr(args, GIVEN)
    assert set(given) == {"avg_bits", "quiet", "tie"}
    # The namespace still holds every default, for the code that reads it directly.
    assert args.seq_len == 512 and args.option == [] and args.no_cache is False
