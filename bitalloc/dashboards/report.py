"""A self-contained HTML report of a search: sensitivity heatmap, bits per layer, frontier and
search history, each drawn only when its input is given.

The file embeds plotly.js once (no CDN, nothing fetched), so it opens offline and can be
attached to an issue or archived beside the run.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitalloc.dashboards import data, figures
from bitalloc.dashboards.rundir import load_run
from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

    from bitalloc.allocation import Allocation
    from bitalloc.planning import Frontier
    from bitalloc.sensitivity import Profile

__all__ = ["PLOT_IDS", "build_report", "load_run", "report_plots", "write_report"]

#: Wrapper element id of each plot (``<div class="bitalloc-plot" id=...>``), in page order.
PLOT_IDS = {
    "heatmap": "plot-heatmap",
    "bits": "plot-bits",
    "frontier": "plot-frontier",
    "history": "plot-history",
}
PLOT_CLASS = "bitalloc-plot"

_PLOT_TITLES = {
    "heatmap": "Sensitivity per unit",
    "bits": "Bits per layer of the chosen allocation",
    "frontier": "Quality against size",
    "history": "Search history",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { padding: 16px 28px 8px; background: #fff; border-bottom: 1px solid #ddd; }
header h1 { font-size: 1.5em; margin: 0 0 8px; }
table.bitalloc-summary { border-collapse: collapse; font-size: 0.95em; }
table.bitalloc-summary th { text-align: left; padding: 2px 16px 2px 0; color: #555;
                            font-weight: 600; vertical-align: top; }
table.bitalloc-summary td { padding: 2px 0; }
section { margin: 14px 28px; padding: 8px 12px; background: #fff; border: 1px solid #e3e3e3;
          border-radius: 4px; }
section h2 { font-size: 1.1em; margin: 4px 0; }
"""


def _frontier_dict(frontier: Frontier | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if frontier is None:
        return None
    if hasattr(frontier, "to_json"):
        return frontier.to_json()
    if isinstance(frontier, Mapping):
        return dict(frontier)
    raise BitallocError(
        f"frontier must be a Frontier or its JSON dict, got {type(frontier).__name__}"
    )


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_rows(
    *,
    profile: Profile | None = None,
    allocation: Allocation | None = None,
    frontier: Mapping[str, Any] | None = None,
    study: optuna.Study | None = None,
) -> list[tuple[str, str]]:
    """The report header as (label, text) rows: model, budget, avg bits, measured perplexity,
    trials, and what each input is."""
    settings = data.search_settings(study) if study is not None else {}
    rows: list[tuple[str, str]] = []
    model = (
        (allocation.data.model if allocation is not None else None)
        or settings.get("model")
        or (profile.metadata.get("model") if profile is not None else None)
    )
    if model:
        rows.append(("model", str(model)))
    budget = data.finite_float(settings.get("budget"))
    if budget is None and allocation is not None:
        budget = allocation.target_bits
    if budget is not None:
        rows.append(("budget", f"{budget:g} bits per weight"))
    if allocation is not None:
        d = allocation.data
        rows.append(
            (
                "allocation",
                f"{d.avg_bits:.4f} avg bits, {d.bytes / 2**20:.2f} MiB for {d.numel:,} weights "
                f"in {len(d.units)} units; predicted loss {_fmt(d.predicted_loss)}",
            )
        )
        m = d.measured
        if m is not None:
            fp16 = m.baselines.get("fp16")
            rows.append(
                (
                    "measured perplexity",
                    f"{m.perplexity:.4f} on {m.eval_tokens:,} tokens "
                    f"(fp16 {_fmt(fp16)}; loss increase measured {m.measured_loss_increase:.4f}, "
                    f"predicted {m.predicted_loss_increase:.4f} nats/token)",
                )
            )
    fp16 = data.fp16_perplexity(allocation=allocation, frontier=frontier, study=study)
    if fp16 is not None and (allocation is None or allocation.measured is None):
        rows.append(("fp16 perplexity", f"{fp16:.4f}"))
    if study is not None:
        counts = data.trial_counts(study)
        points = data.study_points(study)
        extra = [f"{counts.failed} failed"] if counts.failed else []
        extra += [f"{counts.running} running"] if counts.running else []
        extra += [f"{counts.other} other"] if counts.other else []
        text = f"{counts.complete} finished trials" + (f" ({', '.join(extra)})" if extra else "")
        within = data.within_budget(points, budget)
        if within:
            best = min(within, key=lambda p: p.perplexity)
            text += (
                f"; best within budget: trial {best.number}, perplexity {best.perplexity:.4f} "
                f"at {best.avg_bits:.4f} bits"
            )
        rows.append(("search", f"study {study.study_name!r}: {text}"))
    if profile is not None:
        rows.append(
            (
                "profile",
                f"{profile.metadata.get('method', 'unknown method')}: {len(profile.units)} units "
                f"x {len(profile.formats)} formats",
            )
        )
    if frontier is not None:
        pts = data.frontier_points(frontier)
        # Counted by the same rules the frontier plot draws by.
        n_measured = len(data.measured_frontier_points(pts))
        n_predicted = len(data.predicted_frontier_points(pts))
        rows.append(
            (
                "frontier",
                f"{len(pts)} budgets ({n_measured} measured, {n_predicted} predicted), solver "
                f"{frontier.get('method', 'unknown')}",
            )
        )
    return rows


def report_plots(
    *,
    profile: Profile | None = None,
    allocation: Allocation | None = None,
    frontier: Frontier | Mapping[str, Any] | None = None,
    study: optuna.Study | None = None,
) -> list[str]:
    """Keys (of :data:`PLOT_IDS`) of the plots these inputs give, in page order: heatmap
    (profile), bits (allocation), frontier (frontier, study, or a measured allocation),
    history (study)."""
    measured = allocation is not None and allocation.measured is not None
    wanted = {
        "heatmap": profile is not None,
        "bits": allocation is not None,
        "frontier": frontier is not None or study is not None or measured,
        "history": study is not None,
    }
    return [key for key in PLOT_IDS if wanted[key]]


def report_figures(
    *,
    profile: Profile | None = None,
    allocation: Allocation | None = None,
    frontier: Mapping[str, Any] | None = None,
    study: optuna.Study | None = None,
) -> dict[str, go.Figure]:
    """The report's figures keyed like :data:`PLOT_IDS` (see :func:`report_plots`)."""
    build = {
        "heatmap": lambda: figures.heatmap_figure(profile),
        "bits": lambda: figures.bits_figure(allocation),
        "frontier": lambda: figures.frontier_figure(
            frontier=frontier, study=study, allocation=allocation
        ),
        "history": lambda: figures.history_figure(study),
    }
    keys = report_plots(profile=profile, allocation=allocation, frontier=frontier, study=study)
    return {key: build[key]() for key in keys}


def build_report(
    *,
    profile: Profile | None = None,
    allocation: Allocation | None = None,
    frontier: Frontier | Mapping[str, Any] | None = None,
    study: optuna.Study | None = None,
    title: str = "bitalloc report",
) -> str:
    """One self-contained HTML page (plotly.js inlined once) with a summary header and the
    plots whose inputs are given; see :func:`report_figures`. Raises :class:`BitallocError`
    when no input is given."""
    frontier_json = _frontier_dict(frontier)
    if profile is None and allocation is None and frontier_json is None and study is None:
        raise BitallocError(
            "nothing to report: give at least one of a profile, an allocation, a frontier or "
            "a study (e.g. --run-dir of a `bitalloc search` run)"
        )
    inputs = {
        "profile": profile,
        "allocation": allocation,
        "frontier": frontier_json,
        "study": study,
    }
    rows = summary_rows(**inputs)
    figs = report_figures(**inputs)
    sections = []
    for i, (key, fig) in enumerate(figs.items()):
        plot_id = PLOT_IDS[key]
        height = fig.layout.height
        body = fig.to_html(
            full_html=False,
            # The first figure carries plotly.js; the others reuse it.
            include_plotlyjs=i == 0,
            div_id=f"{plot_id}-figure",
            default_height=f"{height}px" if height else "100%",
            config={"displaylogo": False, "responsive": True},
        )
        sections.append(
            f"<section>\n<h2>{html.escape(_PLOT_TITLES[key])}</h2>\n"
            f'<div class="{PLOT_CLASS}" id="{plot_id}">\n{body}\n</div>\n</section>'
        )
    table = "\n".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(text)}</td></tr>"
        for label, text in rows
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{html.escape(title)}</h1>\n"
        f'<table class="bitalloc-summary">\n{table}\n</table>\n</header>\n'
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_report(path: str | os.PathLike[str], **inputs: Any) -> Path:
    """Build the report (see :func:`build_report`) and write it atomically to ``path``."""
    text = build_report(**inputs).encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(text))
