"""Shared look of the report's figures: trace names (asserted by the tests), colours and the
common layout."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

#: Trace names, shared with the tests.
FRONTIER_TRACE = "solver frontier (measured)"
PREDICTED_TRACE = "solver frontier (predicted)"
PARETO_TRACE = "search Pareto front"
UNIFORM_TRACE = "uniform baselines"
CHOSEN_TRACE = "chosen allocation"
FP16_TRACE = "fp16 (unquantized)"
LAYER_TRACE = "layer average"
HISTORY_TRACE = "trials"
BEST_TRACE = "best within budget"
SEARCH_PREFIX = "search: "
CALIBRATION_PREFIX = "loss increase: "
SEARCH_CALIBRATION = "search trials"

ROLE_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "triangle-down", "cross", "x")
GROUP_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692")
SAMPLER_COLOUR = "#9a9a9a"


def apply_layout(fig: go.Figure, height: int, **extra: Any) -> go.Figure:
    """Size, template, margins and a horizontal legend above the plot, shared by all."""
    fig.update_layout(
        height=height,
        template="plotly_white",
        margin={"l": 70, "r": 30, "t": 60, "b": 50},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        **extra,
    )
    return fig
