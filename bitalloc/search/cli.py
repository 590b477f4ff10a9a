"""``bitalloc search``: the command-line face of :func:`bitalloc.search.search`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bitalloc.cliconfig import (
    COMMON,
    add_config_arguments,
    config_file_arguments,
    config_from_args,
    given_data,
    search_config_from_args,
)
from bitalloc.errors import BitallocError

if TYPE_CHECKING:
    from bitalloc.config import AllocateConfig, SearchConfig
    from bitalloc.search.run import SearchResult

#: What the search says differently from ``bitalloc allocate`` about the options they share.
SEARCH_HELP = {
    "avg_bits": {"help": "budget: average bits per weight"},
    "solver": {"help": "solver for the seed allocations"},
    "profiler": {"help": "profiler for the seeds (default fisher)"},
    "profiler_options": {"help": "repeatable"},
    "profile": {"help": "reuse a saved profile"},
    "calibration_tokens": {"help": "(default per profiler)"},
    "eval_tokens": {"help": "evaluation tokens per trial (default 4096)"},
    "workers": {"help": "Ray actors evaluating trials in parallel (default 0: in this process)"},
    "ray_address": {"help": "Ray cluster for the workers (default $RAY_ADDRESS, else a local Ray)"},
}


def add_search_parser(sub: Any) -> None:
    """Register the ``search`` subcommand on ``sub`` (an argparse subparsers object)."""
    s = sub.add_parser(
        "search",
        help="measured multi-objective search (avg bits, perplexity) in a resumable Optuna study",
    )
    add_config_arguments(s, (*COMMON, "avg_bits"), SEARCH_HELP)
    add_config_arguments(
        s,
        ("trials", "sampler", "storage", "study", "run_dir", "resume", "space", "radius"),
    )
    add_config_arguments(
        s,
        ("solver", "profiler", "profiler_options", "profile", "calibration_tokens"),
        SEARCH_HELP,
    )
    add_config_arguments(s, ("eval_tokens", "workers", "ray_address"), SEARCH_HELP)
    add_config_arguments(s, ("seed", "use_cache"))
    config_file_arguments(s)
    s.set_defaults(handler=run_search_command)


def run_search(config: AllocateConfig, search_config: SearchConfig) -> SearchResult:
    """Run :func:`bitalloc.search.search` on the two configs (the one place the command line
    calls it)."""
    from bitalloc.search import search

    return search(config.model, config, search_config)


def run_search_command(args: argparse.Namespace) -> None:
    """Run the search the arguments describe and print its summary."""
    import optuna

    from bitalloc.cliconfig import save_config

    if args.config is None and "avg_bits" not in given_data(args, ("target",)).get("target", {}):
        raise BitallocError("the following arguments are required: --avg-bits")
    config = config_from_args(args)  # every option checked before anything is loaded
    search_config = search_config_from_args(args)
    save_config(
        args.save_config,
        {**config.to_json_dict(), "search": search_config.model_dump(mode="json")},
    )
    # One line per trial from Optuna would bury the progress bar; the study keeps everything.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = run_search(config, search_config)
    print(result.summary())
    print(f"wrote {result.run_dir}/search.json" + (", best.json" if result.best else ""))
