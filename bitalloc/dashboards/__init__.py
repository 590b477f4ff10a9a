"""Looking at searches: a self-contained HTML report (:func:`build_report`,
:func:`write_report`, inputs from a run directory with :func:`load_run`) and the live
optuna-dashboard (:func:`run_dashboard`).

Names are imported on first use, so that registering the CLI subcommands imports neither
plotly nor torch.
"""

from __future__ import annotations

from bitalloc.lazy import lazy_exports

_EXPORTS = {
    "PLOT_IDS": "bitalloc.dashboards.report",
    "build_report": "bitalloc.dashboards.report",
    "write_report": "bitalloc.dashboards.report",
    "dashboard_url": "bitalloc.dashboards.launcher",
    "run_dashboard": "bitalloc.dashboards.launcher",
    "load_run": "bitalloc.dashboards.rundir",
    "load_study": "bitalloc.dashboards.rundir",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("bitalloc.dashboards", globals(), _EXPORTS)
