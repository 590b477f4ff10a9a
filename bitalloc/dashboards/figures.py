"""The report's Plotly figures, one builder per plot (the frontier's lives in
:mod:`bitalloc.dashboards.frontier_plot`); the numbers come from :mod:`bitalloc.dashboards.data`.

Figures are built from Python lists, not NumPy arrays: Plotly encodes arrays as base64 typed
arrays, and plain JSON numbers keep the HTML readable and checkable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from bitalloc.dashboards import data
from bitalloc.dashboards.frontier_plot import frontier_figure
from bitalloc.dashboards.style import (
    BEST_TRACE,
    CALIBRATION_PREFIX,
    CHOSEN_TRACE,
    FP16_TRACE,
    FRONTIER_TRACE,
    HISTORY_TRACE,
    LAYER_TRACE,
    PARETO_TRACE,
    PREDICTED_TRACE,
    ROLE_SYMBOLS,
    SEARCH_PREFIX,
    UNIFORM_TRACE,
    apply_layout,
)

if TYPE_CHECKING:
    from bitalloc.allocation import Allocation
    from bitalloc.sensitivity import Profile

__all__ = [
    "BEST_TRACE",
    "CALIBRATION_PREFIX",
    "CHOSEN_TRACE",
    "FP16_TRACE",
    "FRONTIER_TRACE",
    "HISTORY_TRACE",
    "LAYER_TRACE",
    "PARETO_TRACE",
    "PREDICTED_TRACE",
    "SEARCH_PREFIX",
    "UNIFORM_TRACE",
    "bits_figure",
    "frontier_figure",
    "heatmap_figure",
    "history_figure",
]


# --- a. sensitivity heatmap --------------------------------------------------------------------
def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    # Plotly has no logarithmic colour scale: the heatmap shows log10 values, and the colour
    # bar is labelled with the values themselves at 1-2-5 steps.
    vals = []
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for mantissa in (1, 2, 5):
            v = decade + math.log10(mantissa)
            if lo - 1e-9 <= v <= hi + 1e-9:
                vals.append(v)
    if len(vals) < 2:
        vals = [lo, hi] if hi > lo else [lo]
    return vals, [f"{10**v:.2g}" for v in vals]


def heatmap_figure(profile: Profile, default_format: str | None = None) -> go.Figure:
    """Predicted loss increase per layer (rows) and role (columns), one trace per format,
    with a dropdown to pick the format (default: :func:`data.default_heatmap_format`)."""
    formats = list(profile.formats)
    default = default_format or data.default_heatmap_format(formats)
    if default not in formats:
        default = data.default_heatmap_format(formats)
    fig = go.Figure()
    titles = []
    for fmt in formats:
        grid = data.sensitivity_grid(profile, fmt)
        positive = [v for row in grid.values for v in row if v is not None and v > 0]
        # Zero and negative sensitivities have no logarithm: they are drawn a decade below the
        # smallest positive value of the format (their hover text shows the true value).
        floor = min(positive) / 10 if positive else 1e-12
        z = [[None if v is None else math.log10(max(v, floor)) for v in row] for row in grid.values]
        finite = [v for row in z for v in row if v is not None]
        lo, hi = (min(finite), max(finite)) if finite else (-12.0, -11.0)
        tickvals, ticktext = _log_ticks(lo, hi)
        text = [
            [
                "" if v is None else f"{', '.join(names)}<br>{fmt}: {v:.4g} nats/token"
                for v, names in zip(row, name_row)
            ]
            for row, name_row in zip(grid.values, grid.names)
        ]
        fig.add_trace(
            go.Heatmap(
                name=fmt,
                x=grid.roles,
                y=grid.layers,
                z=z,
                customdata=grid.values,
                text=text,
                hovertemplate="layer %{y}, %{x}<br>%{text}<extra></extra>",
                colorscale="Viridis",
                zmin=lo,
                zmax=hi if hi > lo else lo + 1,
                colorbar={
                    "title": {"text": "predicted<br>loss increase"},
                    "tickvals": tickvals,
                    "ticktext": ticktext,
                },
                visible=fmt == default,
                xgap=1,
                ygap=1,
            )
        )
        titles.append(f"Predicted loss increase per unit under {fmt} (log colour scale)")
    buttons = [
        {
            "label": fmt,
            "method": "update",
            "args": [{"visible": [f == fmt for f in formats]}, {"title.text": titles[i]}],
        }
        for i, fmt in enumerate(formats)
    ]
    rows = len(data.sensitivity_grid(profile, default).layers)
    apply_layout(
        fig,
        max(340, min(900, 120 + 22 * rows)),
        title={"text": titles[formats.index(default)]},
        updatemenus=[
            {
                "buttons": buttons,
                "active": formats.index(default),
                "direction": "down",
                # Just above the plot area, below the mode bar in the top-right corner.
                "x": 1.0,
                "xanchor": "right",
                "y": 1.01,
                "yanchor": "bottom",
            }
        ],
    )
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    fig.update_xaxes(title_text="role", type="category")
    return fig


# --- b. bits per layer -------------------------------------------------------------------------
def _layer_x(labels: Sequence[str]) -> dict[str, float]:
    # Numbered layers sit at their number; units outside the blocks one step after the last.
    numbered = [int(x) for x in labels if x != data.OTHER_LAYER]
    after = (max(numbered) + 1) if numbered else 0
    return {x: float(after if x == data.OTHER_LAYER else int(x)) for x in labels}


def bits_figure(allocation: Allocation) -> go.Figure:
    """Average bits per layer (bars), each role's bits per weight (markers, format in the hover
    text) and the budget as a horizontal line."""
    layers = data.layer_bits(allocation)
    xs = _layer_x([lb.layer for lb in layers])
    roles = data.role_order(allocation)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            name=LAYER_TRACE,
            x=[xs[lb.layer] for lb in layers],
            y=[lb.avg_bits for lb in layers],
            text=[
                "<br>".join(f"{u.role}: {u.format} ({u.bits_per_weight:.3f})" for u in lb.units)
                for lb in layers
            ],
            textposition="none",
            hovertemplate="layer %{x}: %{y:.3f} bits/weight<br>%{text}<extra></extra>",
            marker={"color": "rgba(99, 110, 250, 0.45)"},
            width=0.85,
        )
    )
    # Roles are spread across the bar's width so that equal values do not hide each other.
    spread = 0.7 / max(len(roles), 1)
    for k, role in enumerate(roles):
        offset = (k - (len(roles) - 1) / 2) * spread
        units = [(lb.layer, u) for lb in layers for u in lb.units if u.role == role]
        fig.add_trace(
            go.Scatter(
                name=role,
                x=[xs[layer] + offset for layer, _ in units],
                y=[u.bits_per_weight for _, u in units],
                text=[f"{u.name}<br>{u.format}" for _, u in units],
                mode="markers",
                marker={"symbol": ROLE_SYMBOLS[k % len(ROLE_SYMBOLS)], "size": 7},
                hovertemplate="%{text}<br>%{y:.3f} bits/weight<extra>%{fullData.name}</extra>",
            )
        )
    d = allocation.data
    fig.add_hline(
        y=allocation.target_bits,
        line={"dash": "dash", "color": "#d62728"},
        annotation_text=f"budget {allocation.target_bits:g}",
        annotation_position="top left",
    )
    fig.add_hline(
        y=d.avg_bits,
        line={"dash": "dot", "color": "#444"},
        annotation_text=f"achieved {d.avg_bits:.3f}",
        annotation_position="bottom right",
    )
    ticks = sorted(xs.items(), key=lambda kv: kv[1])
    apply_layout(
        fig,
        420,
        title={"text": f"Bits per layer ({len(d.units)} units, {d.avg_bits:.3f} bits/weight)"},
        bargap=0.1,
    )
    fig.update_xaxes(
        title_text="layer",
        tickvals=[v for _, v in ticks],
        ticktext=[k for k, _ in ticks],
    )
    fig.update_yaxes(title_text="bits per weight", rangemode="tozero")
    return fig


# --- d. search history -------------------------------------------------------------------------
def history_figure(study: Any) -> go.Figure:
    """Perplexity of every finished trial by trial number (colour: average bits) with the best
    perplexity so far among trials within the search's budget."""
    trials = data.study_points(study)
    budget = data.finite_float(data.search_settings(study).get("budget"))
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            name=HISTORY_TRACE,
            x=[t.number for t in trials],
            y=[t.perplexity for t in trials],
            text=[f"{t.source}, {t.avg_bits:.3f} bits" for t in trials],
            mode="markers",
            marker={
                "color": [t.avg_bits for t in trials],
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": "avg bits"}},
                "size": 7,
                "showscale": bool(trials),
            },
            hovertemplate="trial %{x}: ppl %{y:.3f}<br>%{text}<extra></extra>",
        )
    )
    steps = data.best_within_budget(trials, budget)
    label = BEST_TRACE if budget is not None else "best so far"
    if steps:
        last = trials[-1].number
        xs = [n for n, _ in steps] + ([last] if steps[-1][0] != last else [])
        ys = [b for _, b in steps] + ([steps[-1][1]] if steps[-1][0] != last else [])
        fig.add_trace(
            go.Scatter(
                name=label,
                x=xs,
                y=ys,
                mode="lines",
                line={"shape": "hv", "color": "#d62728", "width": 2},
                hovertemplate="best so far: ppl %{y:.3f}<extra></extra>",
            )
        )
    where = f" (budget {budget:g} bits)" if budget is not None else ""
    title = f"Search history: {len(trials)} finished trials{where}"
    if not trials:
        fig.add_annotation(
            text="no finished trials yet",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
    apply_layout(fig, 400, title={"text": title})
    fig.update_xaxes(title_text="trial number")
    fig.update_yaxes(title_text="perplexity", type="log")
    return fig
