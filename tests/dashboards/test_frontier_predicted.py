"""The frontier plot when some or all of the solver's points carry only a prediction: the
predicted curve is drawn (and named so), on the perplexity axis through the fp16 perplexity when
one is known, otherwise in nats on an axis of its own; the report header counts both kinds."""

from __future__ import annotations

import copy
import math

import pytest

from bitalloc.dashboards import build_report, figures
from bitalloc.dashboards import data as ddata
from tests.dashboards.synthetic import FP16_PPL, make_allocation, make_frontier
from tests.dashboards.test_report import plot_data, trace


def predicted_only(*, fp16: float | None = None, budgets: int = 5) -> dict:
    """A frontier as `bitalloc frontier` writes it before any measurement: every point has a
    predicted loss and no perplexity; the last point is all-fp16 (predicted loss exactly 0)."""
    points = []
    for k in range(budgets):
        last = k == budgets - 1
        points.append(
            {
                # Written in decreasing budget order: the plot sorts by average bits.
                "budget": 6.0 - k if not last else 16.0,
                "avg_bits": (6.0 - k - 0.02) if not last else 16.0,
                "predicted_loss": 0.0 if last else 0.05 * 2.0**k,
                "perplexity": None,
                "status": "optimal",
                "gap": 0.0,
                "solve_ms": 1.0,
                "formats": {},
            }
        )
    return {"method": "lagrangian", "ties": [], "fp16_perplexity": fp16, "points": points}


def by_bits(frontier: dict) -> list[dict]:
    return sorted(frontier["points"], key=lambda p: p["avg_bits"])


def test_predicted_only_frontier_draws_the_predicted_curve():
    frontier = predicted_only()
    html = build_report(frontier=frontier)
    traces = plot_data(html, "frontier")
    curve = trace(traces, figures.PREDICTED_TRACE)
    expected = by_bits(frontier)
    assert curve["x"] == [p["avg_bits"] for p in expected]
    # No fp16 perplexity to convert through: the curve is the predicted loss increase itself,
    # the all-fp16 point (prediction 0.0) included.
    assert curve["y"] == [p["predicted_loss"] for p in expected]
    assert curve["y"][-1] == 0.0
    assert "predicted" in curve["name"]
    assert not any(t["name"] == figures.FRONTIER_TRACE for t in traces)
    header = html[: html.index("</header>")]
    assert "5 budgets (0 measured, 5 predicted)" in header
    fig = figures.frontier_figure(frontier=frontier)
    assert fig.layout.yaxis.title.text == "predicted loss increase (nats/token)"
    assert fig.layout.yaxis.type != "log"
    assert "the curve is the solver's prediction" in fig.layout.annotations[-1].text


def test_predicted_curve_goes_through_a_known_fp16_perplexity():
    frontier = predicted_only(fp16=FP16_PPL)
    curve = trace(plot_data(build_report(frontier=frontier), "frontier"), figures.PREDICTED_TRACE)
    expected = by_bits(frontier)
    assert curve["y"] == pytest.approx(
        [FP16_PPL * math.exp(p["predicted_loss"]) for p in expected], rel=1e-12
    )
    assert curve["customdata"] == [p["predicted_loss"] for p in expected]
    # fp16 from a measured allocation instead of the frontier works the same way.
    fig = figures.frontier_figure(frontier=predicted_only(), allocation=make_allocation())
    assert fig.layout.yaxis.type == "log"
    assert list(trace(fig, figures.PREDICTED_TRACE).y) == pytest.approx(curve["y"], rel=1e-12)


def test_partly_measured_frontier_draws_both_curves():
    frontier = make_frontier()  # four budgets, the last not measured
    fig = figures.frontier_figure(frontier=frontier)
    measured = trace(fig, figures.FRONTIER_TRACE)
    predicted = trace(fig, figures.PREDICTED_TRACE)
    assert len(measured.x) == 3
    assert list(predicted.x) == [p["avg_bits"] for p in by_bits(frontier)]


def test_predictions_without_fp16_beside_measurements_get_a_second_axis():
    frontier = copy.deepcopy(make_frontier())
    frontier["fp16_perplexity"] = None
    fig = figures.frontier_figure(frontier=frontier)
    assert trace(fig, figures.FRONTIER_TRACE).yaxis == "y"
    predicted = trace(fig, figures.PREDICTED_TRACE)
    assert predicted.yaxis == "y2"
    assert list(predicted.y) == [p["predicted_loss"] for p in by_bits(frontier)]
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis2.title.text == "predicted loss increase (nats/token)"


def test_point_counts_follow_the_plot():
    frontier = predicted_only(budgets=3)
    frontier["points"][0]["perplexity"] = 15.0
    frontier["points"][1]["perplexity"] = 0.0  # not a perplexity: neither drawn nor counted
    frontier["points"][1]["predicted_loss"] = float("nan")
    pts = ddata.frontier_points(frontier)
    assert [p["perplexity"] for p in ddata.measured_frontier_points(pts)] == [15.0]
    assert [p["budget"] for p in ddata.predicted_frontier_points(pts)] == [6.0, 16.0]
    header = build_report(frontier=frontier)
    assert "3 budgets (1 measured, 2 predicted)" in header
