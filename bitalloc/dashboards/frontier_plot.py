"""The frontier plot: perplexity against average bits for every source of allocations, and
predicted against measured loss increase."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bitalloc.dashboards import data
from bitalloc.dashboards.style import (
    CALIBRATION_PREFIX,
    CHOSEN_TRACE,
    FP16_TRACE,
    FRONTIER_TRACE,
    GROUP_COLOURS,
    PARETO_TRACE,
    PREDICTED_TRACE,
    SAMPLER_COLOUR,
    SEARCH_CALIBRATION,
    SEARCH_PREFIX,
    UNIFORM_TRACE,
    apply_layout,
)
from bitalloc.search.study import pareto_front

if TYPE_CHECKING:
    from bitalloc.allocation import Allocation


def _group_colours(groups: Sequence[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    seeds = [g for g in groups if g != "sampler"]
    for i, g in enumerate(seeds):
        colours[g] = GROUP_COLOURS[i % len(GROUP_COLOURS)]
    colours["sampler"] = SAMPLER_COLOUR
    return colours


def frontier_figure(
    *,
    frontier: Mapping[str, Any] | None = None,
    study: Any = None,
    allocation: Allocation | None = None,
) -> go.Figure:
    """Perplexity against average bits (log axis) for the solver frontier (measured, and as
    predicted), every search trial, the search's Pareto front, uniform baselines, the chosen
    allocation and fp16; below it, predicted against measured loss increase wherever both are
    known.

    The predicted frontier is drawn as perplexity (fp16 x exp(predicted loss)) when the fp16
    perplexity is known; otherwise as predicted loss increase on its own axis (the left one
    when nothing measured shares the plot, else a second axis on the right).
    """
    fp16 = data.fp16_perplexity(allocation=allocation, frontier=frontier, study=study)
    points = data.frontier_points(frontier) if frontier is not None else []
    measured = data.measured_frontier_points(points)
    predicted = data.predicted_frontier_points(points)
    trials = data.study_points(study) if study is not None else []
    chosen = allocation.measured if allocation is not None else None
    baselines = data.uniform_baselines(allocation=allocation, study=study)
    anything_measured = bool(trials or measured or baselines or chosen is not None)
    # Where the predictions go: "perplexity" (the left axis, through fp16), "loss" (the left
    # axis, in nats, when no perplexity is drawn) or "secondary" (a right axis, in nats).
    predicted_axis = (
        None
        if not predicted
        else "perplexity"
        if fp16 is not None
        else "secondary"
        if anything_measured
        else "loss"
    )

    # (predicted, measured loss increase, label, trace) for the lower panel.
    calibration: list[tuple[float, float, str, str]] = []
    if fp16 is not None:
        for p in measured:
            pred = data.finite_float(p.get("predicted_loss"))
            if pred is not None:
                meas = data.measured_loss_increase(p["perplexity"], fp16)
                calibration.append((pred, meas, f"budget {p.get('budget')}", FRONTIER_TRACE))
        for t in trials:
            if t.predicted_loss is not None:
                meas = data.measured_loss_increase(t.perplexity, fp16)
                calibration.append(
                    (t.predicted_loss, meas, f"trial {t.number}", SEARCH_CALIBRATION)
                )
    if chosen is not None:
        pred = data.finite_float(chosen.predicted_loss_increase)
        meas = data.finite_float(chosen.measured_loss_increase)
        if pred is not None and meas is not None:
            calibration.append((pred, meas, "chosen", CHOSEN_TRACE))
    two_panels = bool(calibration)
    top: dict[str, Any] = {"secondary_y": predicted_axis == "secondary"}
    fig = make_subplots(
        rows=2 if two_panels else 1,
        cols=1,
        specs=[[top], [{}]] if two_panels else [[top]],
        row_heights=[0.64, 0.36] if two_panels else None,
        vertical_spacing=0.12,
        subplot_titles=(
            ("Perplexity against average bits", "Predicted against measured loss increase")
            if two_panels
            else ("Perplexity against average bits",)
        ),
    )
    xs: list[float] = []

    groups = list(dict.fromkeys(data.source_group(t.source) for t in trials))
    colours = _group_colours(groups)
    # Sampled trials first so that the (fewer) seeds are drawn on top of them.
    for group in sorted(groups, key=lambda g: g != "sampler"):
        members = [t for t in trials if data.source_group(t.source) == group]
        xs += [t.avg_bits for t in members]
        fig.add_trace(
            go.Scatter(
                name=SEARCH_PREFIX + group,
                x=[t.avg_bits for t in members],
                y=[t.perplexity for t in members],
                text=[f"trial {t.number} ({t.source})" for t in members],
                mode="markers",
                marker={"color": colours[group], "size": 6, "opacity": 0.7},
                hovertemplate="%{text}<br>%{x:.3f} bits, ppl %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if trials:
        front = [trials[i] for i in pareto_front([(t.avg_bits, t.perplexity) for t in trials])]
        fig.add_trace(
            go.Scatter(
                name=PARETO_TRACE,
                x=[t.avg_bits for t in front],
                y=[t.perplexity for t in front],
                text=[f"trial {t.number}" for t in front],
                mode="lines+markers",
                line={"shape": "hv", "color": "#000", "width": 1.5},
                marker={"size": 7, "symbol": "circle-open"},
                hovertemplate="%{text}<br>%{x:.3f} bits, ppl %{y:.3f}<extra>Pareto</extra>",
            ),
            row=1,
            col=1,
        )
    if measured:
        xs += [p["avg_bits"] for p in measured]
        fig.add_trace(
            go.Scatter(
                name=FRONTIER_TRACE,
                x=[p["avg_bits"] for p in measured],
                y=[p["perplexity"] for p in measured],
                text=[f"budget {p.get('budget')}" for p in measured],
                mode="lines+markers",
                line={"color": "#1f77b4", "width": 2},
                marker={"size": 8, "symbol": "diamond"},
                hovertemplate="%{text}<br>%{x:.3f} bits, ppl %{y:.3f}<extra>solver</extra>",
            ),
            row=1,
            col=1,
        )
    if predicted_axis is not None:
        xs += [p["avg_bits"] for p in predicted]
        through = fp16 if predicted_axis == "perplexity" else None
        _add_predicted(fig, predicted, through, secondary=predicted_axis == "secondary")
    if baselines:
        names = sorted(baselines, key=lambda n: baselines[n][0])
        xs += [baselines[n][0] for n in names]
        fig.add_trace(
            go.Scatter(
                name=UNIFORM_TRACE,
                x=[baselines[n][0] for n in names],
                y=[baselines[n][1] for n in names],
                text=names,
                mode="markers+text",
                textposition="top center",
                marker={"size": 9, "symbol": "square", "color": "#8c564b"},
                hovertemplate="uniform %{text}<br>%{x:.3f} bits, ppl %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if allocation is not None and chosen is not None:
        xs.append(allocation.avg_bits)
        fig.add_trace(
            go.Scatter(
                name=CHOSEN_TRACE,
                x=[allocation.avg_bits],
                y=[chosen.perplexity],
                mode="markers",
                marker={"size": 16, "symbol": "star", "color": "#ffbf00", "line": {"width": 1}},
                hovertemplate="chosen: %{x:.3f} bits, ppl %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if fp16 is not None:
        span = (min(xs), max(xs)) if xs else (2.0, 16.0)
        fig.add_trace(
            go.Scatter(
                name=FP16_TRACE,
                x=list(span),
                y=[fp16, fp16],
                mode="lines",
                line={"dash": "dash", "color": "#2ca02c"},
                hovertemplate=f"fp16 perplexity {fp16:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    budget = _budget(allocation=allocation, study=study)
    if budget is not None:
        fig.add_vline(
            x=budget,
            line={"dash": "dot", "color": "#d62728"},
            annotation_text=f"budget {budget:g}",
            annotation_position="top right",
            row=1,
            col=1,
        )
    fig.update_xaxes(title_text="average bits per weight", row=1, col=1)
    if predicted_axis == "loss":
        fig.update_yaxes(title_text=_PREDICTED_LOSS_AXIS, row=1, col=1)
    else:
        fig.update_yaxes(title_text="perplexity", type="log", row=1, col=1, secondary_y=False)
    if predicted_axis == "secondary":
        fig.update_yaxes(title_text=_PREDICTED_LOSS_AXIS, row=1, col=1, secondary_y=True)
    if two_panels:
        _calibration_panel(fig, calibration)
    if not anything_measured:
        fig.add_annotation(
            text=(
                "nothing measured yet: the curve is the solver's prediction"
                if predicted
                else "nothing measured yet: no trial, frontier point or baseline has a perplexity"
            ),
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=1.0 if predicted else 0.5,
            yanchor="bottom" if predicted else "middle",
        )
    return apply_layout(fig, 760 if two_panels else 520)


_PREDICTED_LOSS_AXIS = "predicted loss increase (nats/token)"


def _add_predicted(
    fig: go.Figure, points: Sequence[Mapping[str, Any]], fp16: float | None, *, secondary: bool
) -> None:
    """The solver's predicted frontier: perplexity ``fp16 * exp(predicted loss)`` when ``fp16``
    is given, else the predicted loss increase itself (nats/token)."""
    loss = [float(p["predicted_loss"]) for p in points]
    if fp16 is not None:
        ys = [fp16 * math.exp(v) for v in loss]
        hover = "%{x:.3f} bits, predicted ppl %{y:.3f} (loss +%{customdata:.4f} nats/token)"
    else:
        ys = loss
        hover = "%{x:.3f} bits, predicted loss +%{customdata:.4f} nats/token"
    # secondary_y may only be passed to a figure that has a secondary axis.
    where: dict[str, Any] = {"row": 1, "col": 1, **({"secondary_y": True} if secondary else {})}
    fig.add_trace(
        go.Scatter(
            name=PREDICTED_TRACE,
            x=[p["avg_bits"] for p in points],
            y=ys,
            customdata=loss,
            text=[f"budget {p.get('budget')}" for p in points],
            mode="lines+markers",
            line={"color": "#1f77b4", "width": 1.5, "dash": "dash"},
            marker={"size": 7, "symbol": "diamond-open"},
            hovertemplate="%{text}<br>" + hover + "<extra>predicted</extra>",
        ),
        **where,
    )


def _calibration_panel(fig: go.Figure, calibration: list[tuple[float, float, str, str]]) -> None:
    styles = {
        FRONTIER_TRACE: {"color": "#1f77b4", "symbol": "diamond", "size": 8},
        SEARCH_CALIBRATION: {"color": "#7f7f7f", "symbol": "circle", "size": 6},
        CHOSEN_TRACE: {"color": "#ffbf00", "symbol": "star", "size": 14},
    }
    for kind, style in styles.items():
        rows = [c for c in calibration if c[3] == kind]
        if not rows:
            continue
        fig.add_trace(
            go.Scatter(
                name=CALIBRATION_PREFIX + kind,
                x=[r[0] for r in rows],
                y=[r[1] for r in rows],
                text=[r[2] for r in rows],
                mode="markers",
                marker=style,
                showlegend=False,
                hovertemplate="%{text}<br>predicted %{x:.4f}, measured %{y:.4f} nats/token"
                "<extra></extra>",
            ),
            row=2,
            col=1,
        )
    values = [v for c in calibration for v in c[:2]]
    lo, hi = min(0.0, *values), max(values)
    fig.add_trace(
        go.Scatter(
            name="predicted = measured",
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            line={"dash": "dot", "color": "#999"},
            showlegend=False,
            hoverinfo="skip",
        ),
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="predicted loss increase (nats/token)", row=2, col=1)
    fig.update_yaxes(title_text="measured (ln ppl - ln fp16)", row=2, col=1)


def _budget(*, allocation: Allocation | None, study: Any) -> float | None:
    if study is not None:
        budget = data.finite_float(data.search_settings(study).get("budget"))
        if budget is not None:
            return budget
    return allocation.target_bits if allocation is not None else None
