"""The ``bitalloc report`` and ``bitalloc dashboard`` subcommands.

``add_report_parser`` / ``add_dashboard_parser`` add them to the main parser's subparsers;
``report_command`` / ``dashboard_command`` handle the parsed ``args`` and raise
:class:`BitallocError` on bad input, like the other handlers (``bitalloc.cli.main`` turns it
into one line and exit status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitalloc.dashboards.launcher import DEFAULT_HOST, DEFAULT_PORT, run_dashboard
from bitalloc.dashboards.rundir import (
    BEST_FILE,
    DEFAULT_RUN_DIR,
    FRONTIER_FILE,
    PROFILE_FILE,
    SEARCH_FILE,
    load_frontier,
    load_run,
    load_study,
    study_location,
)
from bitalloc.errors import BitallocError
from bitalloc.search.storage import STUDY_DB


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help=f"run directory of `bitalloc search` (default {DEFAULT_RUN_DIR})",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="the search's Optuna storage (sqlite:///FILE, postgresql://..., journal:FILE); "
        f"default: the one named by the run's {SEARCH_FILE}, else its {STUDY_DB}",
    )
    p.add_argument(
        "--study",
        default=None,
        metavar="NAME",
        help="study name (default: the run's study, or the only study in the storage)",
    )


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report (sensitivity, bits per layer, frontier, "
        "search history)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    _study_options(p)
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help=f"profile (overrides the run's {PROFILE_FILE})",
    )
    p.add_argument(
        "--allocation",
        default=None,
        metavar="FILE",
        help=f"allocation JSON (overrides the run's {BEST_FILE})",
    )
    p.add_argument(
        "--frontier",
        default=None,
        metavar="FILE",
        help=f"frontier JSON from `bitalloc frontier --out` (overrides the run's {FRONTIER_FILE})",
    )
    p.add_argument("--title", default="bitalloc report", help="page title")
    return p


def add_dashboard_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dashboard`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "dashboard", help="serve a search's study live with optuna-dashboard (Ctrl-C to stop)"
    )
    _study_options(p)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; the dashboard "
        "has no login)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    return p


def _gather_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    from bitalloc.allocation import Allocation
    from bitalloc.sensitivity import Profile

    run_dir = Path(args.run_dir) if args.run_dir is not None else DEFAULT_RUN_DIR
    inputs: dict[str, Any] = {}
    # A --run-dir the user named must exist; the default one is only used when it does, so
    # that `bitalloc report --profile FILE` works anywhere.
    if args.run_dir is not None or run_dir.is_dir():
        inputs = load_run(run_dir, storage=args.storage, study_name=args.study)
    elif args.storage:
        inputs["study"] = load_study(args.storage, args.study)
    elif args.study:
        raise BitallocError(
            f"--study {args.study!r}: {run_dir} does not exist; pass the search's --run-dir or "
            "--storage URL"
        )
    if args.profile:
        inputs["profile"] = Profile.load(args.profile)
    if args.allocation:
        inputs["allocation"] = Allocation.load(args.allocation)
    if args.frontier:
        inputs["frontier"] = load_frontier(args.frontier)
    return inputs, run_dir


def report_command(args: argparse.Namespace) -> None:
    """Handle ``bitalloc report``: gather the inputs and write the HTML report."""
    from bitalloc.dashboards.report import report_plots, write_report

    out = Path(args.out)
    if out.is_dir():
        raise BitallocError(f"--out {out} is a directory; give a file name such as report.html")
    inputs, run_dir = _gather_inputs(args)
    if not inputs:
        where = f"{run_dir} holds" if run_dir.is_dir() else f"{run_dir} does not exist, so found"
        raise BitallocError(
            f"nothing to report: {where} none of {PROFILE_FILE}, {BEST_FILE}, "
            f"{FRONTIER_FILE} or a study; pass --run-dir, --storage, --profile, --allocation or "
            "--frontier"
        )
    try:
        write_report(out, title=args.title, **inputs)
    except OSError as exc:
        raise BitallocError(f"cannot write {out}: {exc.strerror or exc}") from None
    plots = ", ".join(report_plots(**inputs))
    study = inputs.get("study")
    extra = f" (study {study.study_name!r})" if study is not None else ""
    print(f"wrote {out}: {plots}{extra}")


def dashboard_command(args: argparse.Namespace) -> None:
    """Handle ``bitalloc dashboard``: find the study and serve it until interrupted."""
    if args.storage:
        url, name = args.storage, args.study
    else:
        run_dir = Path(args.run_dir) if args.run_dir is not None else DEFAULT_RUN_DIR
        if not run_dir.is_dir():
            raise BitallocError(
                f"run directory {run_dir} does not exist; pass the --run-dir of a "
                "`bitalloc search` run or --storage URL"
            )
        location = study_location(run_dir, study_name=args.study)
        if location is None:
            raise BitallocError(
                f"{run_dir} holds no study (no {SEARCH_FILE} or {STUDY_DB}); pass --storage URL "
                "or run `bitalloc search` first"
            )
        url, name = location
    run_dashboard(url, host=args.host, port=args.port, study_name=name)
