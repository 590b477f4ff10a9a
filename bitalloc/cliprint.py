"""What the command line prints beside tables (measured quality, repair, token counts), the
checks of its output paths before any work, and the switch that quiets other libraries' bars.
Kept apart from :mod:`bitalloc.cli`, which builds the parser and runs the commands."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from bitalloc.outputs import check_output_dir, check_output_file


def print_measured(alloc, *, recorded_repair: bool = False) -> None:
    """The measured quality; ``recorded_repair`` labels the repair line as history (read from
    the allocation file) rather than something this command just ran."""
    r = alloc.data.repair
    if r is not None:
        print(("\nrecorded at allocation time: " if recorded_repair else "\n") + repair_line(r))
    m = alloc.measured
    print(f"\nperplexity on {tokens_line(m.eval_tokens, m.seq_len)}:")
    print(f"  {'allocation':<12} {alloc.avg_bits:6.3f} bits  ppl {m.perplexity:9.3f}")
    for name, ppl in m.baselines.items():
        print(f"  {name:<12} {m.baseline_avg_bits[name]:6.3f} bits  ppl {ppl:9.3f}")
    for name, ppl in m.kv_baselines.items():
        bits = m.kv_baseline_avg_bits[name]
        print(f"  weights+{name:<8} KV {bits:6.3f} bits/element  ppl {ppl:9.3f}")
    print(
        f"  loss increase: predicted {m.predicted_loss_increase:.4f}, "
        f"measured {m.measured_loss_increase:.4f} nats/token"
    )


def repair_line(r) -> str:
    """One summary of a :class:`~bitalloc.allocation.Repair` record; when the evaluation
    budget ran out before prediction and measurement agreed, it says so and how far apart
    they still were."""
    head = (
        f"verify and repair ({r.evaluations} evaluations on {r.tokens} calibration tokens, "
        f"{r.wall_time_s:.0f} s): loss increase predicted {r.predicted_before:.4f} / "
        f"measured {r.measured_before:.4f} before, predicted {r.predicted_after:.4f} / "
        f"measured {r.measured_after:.4f} after; "
        + ("allocation changed" if r.changed else "allocation kept")
    )
    if r.regime:
        refined = any(round_.action == "refined" for round_ in r.rounds)
        then = (
            "repair measured the units that matter under their formats' neighbours"
            if refined
            else "the repair budget left no room to measure them (raise --repair-budget)"
        )
        head += f"\n  profile outside its regime: {r.regime}; {then}"
    if r.reason:
        head += f"\n  returned {r.chosen}: {r.reason}"
    last = r.rounds[-1] if r.rounds else None
    if last is None or last.action != "budget spent":
        return head
    # The last round compares the allocation then current with its own (corrected) prediction.
    gap = last.measured - last.predicted
    relative = f" ({gap / last.predicted:+.0%})" if last.predicted > 0 else ""
    return (
        f"{head}\n  the repair budget of {r.budget} evaluations ran out before prediction and "
        f"measurement agreed within {r.tolerance:.0%}: last predicted {last.predicted:.4f}, "
        f"measured {last.measured:.4f}, {gap:+.4f} nats/token apart{relative} "
        "(raise --repair-budget to continue)"
    )


def tokens_line(scored: int, seq_len: int) -> str:
    """What a perplexity was measured on: the tokens scored (every token of a window but its
    first, which is only context) and the tokens read, e.g. ``4,088 scored tokens (8 windows
    of 512 = 4,096 read)``."""
    if seq_len < 2 or scored % (seq_len - 1):
        return f"{scored:,} scored tokens ({seq_len}-token windows)"
    windows = scored // (seq_len - 1)
    plural = "s" if windows != 1 else ""
    return (
        f"{scored:,} scored tokens ({windows} window{plural} of {seq_len} = "
        f"{windows * seq_len:,} read)"
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Check every output path of the parsed command before any work (loading a model,
    profiling) starts; raises :class:`BitallocError` naming the path and the fix."""
    command = args.command
    if command in ("allocate", "profile", "solve", "frontier"):
        example = {"profile": "profile.json", "frontier": "frontier.json"}.get(command, "out.json")
        check_output_file(args.out, "--out", example=example)
    elif command == "report":
        check_output_file(args.out, "--out", example="report.html")
    elif command == "apply":
        from bitalloc.packed_cli import replaceable_packed_dir

        check_output_dir(args.out, "--out", may_replace=replaceable_packed_dir)
    elif command == "export":
        from bitalloc.export import export_format
        from bitalloc.export.base import check_export_path

        directory = export_format(args.out, args.format) != "gguf"
        check_export_path(args.out, force=args.force, directory=directory)
    elif command == "search":
        from bitalloc.search.storage import default_run_dir

        run_dir = args.run_dir if args.run_dir is not None else default_run_dir(args.study)
        # A run directory is reused on --resume and holds the study itself: never "empty".
        check_output_dir(run_dir, "--run-dir", must_be_empty=False)


@contextlib.contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """With ``quiet``, silence the progress bars that transformers and huggingface_hub draw on
    their own (``Loading weights``, downloads) for the duration; bitalloc's own bars follow
    each command's ``progress`` argument."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    hub_was_on = not are_progress_bars_disabled()
    hf_was_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        # transformers' switch also flips huggingface_hub's, so the hub's state goes last.
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if hub_was_on:
            enable_progress_bars()
        else:
            disable_progress_bars()
