"""The HTML report: which plots appear, the numbers they show, the run directory, the CLI, and
the page rendered by headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re

import optuna
import pytest

from bitalloc.cli import main
from bitalloc.dashboards import build_report, figures, load_run, write_report
from bitalloc.dashboards import data as ddata
from bitalloc.dashboards.report import PLOT_IDS
from bitalloc.errors import BitallocError
from bitalloc.fileio import write_json_atomic
from bitalloc.search.storage import default_storage_url, open_storage
from bitalloc.search.study import pareto_front
from tests.dashboards import browser
from tests.dashboards.synthetic import (
    BUDGET,
    FORMATS,
    FP16_PPL,
    LAYERS,
    MODEL,
    ROLES,
    STUDY,
    make_allocation,
    make_frontier,
    make_profile,
    make_study,
    make_units,
    trial_values,
)

N_TRIALS = 24


@pytest.fixture(scope="module")
def profile():
    return make_profile()


@pytest.fixture(scope="module")
def allocation(profile):
    return make_allocation(profile)


@pytest.fixture(scope="module")
def frontier():
    return make_frontier()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, profile, allocation, frontier):
    """A complete run directory as `bitalloc search` leaves it."""
    run = tmp_path_factory.mktemp("run") / "bitalloc"
    make_study(run, n_trials=N_TRIALS)
    profile.save(run / "profile.safetensors")
    allocation.save(run / "best.json")
    write_json_atomic(run / "frontier.json", frontier)
    return run


@pytest.fixture(scope="module")
def study(run_dir):
    return optuna.load_study(study_name=STUDY, storage=default_storage_url(run_dir))


@pytest.fixture(scope="module")
def full_html(profile, allocation, frontier, study):
    return build_report(profile=profile, allocation=allocation, frontier=frontier, study=study)


def plot_data(html: str, key: str) -> list[dict]:
    """The traces handed to ``Plotly.newPlot`` for one plot of the report."""
    marker = f'Plotly.newPlot(                        "{PLOT_IDS[key]}-figure",'
    start = html.find(marker)
    if start < 0:  # plotly's whitespace is not a contract: fall back to a pattern
        match = re.search(r'Plotly\.newPlot\(\s*"' + PLOT_IDS[key] + r'-figure",', html)
        assert match, f"no Plotly.newPlot call for {key}"
        start, marker = match.start(), match.group(0)
    text = html[start + len(marker) :].lstrip()
    traces, _ = json.JSONDecoder().raw_decode(text)
    return traces


def trace(fig_or_traces, name: str):
    items = fig_or_traces.data if hasattr(fig_or_traces, "data") else fig_or_traces
    found = [t for t in items if (t.name if hasattr(t, "name") else t.get("name")) == name]
    assert found, f"no trace {name!r}"
    return found[0]


# --- the page ----------------------------------------------------------------------------------
def test_every_plot_is_present_and_the_page_is_self_contained(full_html):
    for plot_id in PLOT_IDS.values():
        assert f'<div class="bitalloc-plot" id="{plot_id}">' in full_html
    # plotly.js is inlined exactly once and nothing is loaded from elsewhere.
    assert full_html.count("window.PlotlyConfig") == 1
    assert len(re.findall(r"\* plotly\.js v\d", full_html)) == 1
    assert not re.search(r"<script[^>]*\bsrc=", full_html)
    assert "<link" not in full_html
    assert full_html.count("Plotly.newPlot(") == len(PLOT_IDS)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"profile"}, {"heatmap"}),
        ({"allocation"}, {"bits"}),
        ({"measured_allocation"}, {"bits", "frontier"}),
        ({"frontier"}, {"frontier"}),
        ({"study"}, {"frontier", "history"}),
        ({"profile", "frontier"}, {"heatmap", "frontier"}),
    ],
)
def test_each_plot_appears_only_with_its_input(given, expected, profile, frontier, study):
    inputs = {
        "profile": profile,
        "allocation": make_allocation(profile, measured=False),
        "measured_allocation": make_allocation(profile),
        "frontier": frontier,
        "study": study,
    }
    kwargs = {k: inputs[k] for k in given}
    if "measured_allocation" in kwargs:
        kwargs["allocation"] = kwargs.pop("measured_allocation")
    html = build_report(**kwargs)
    present = {key for key, plot_id in PLOT_IDS.items() if f'id="{plot_id}"' in html}
    assert present == expected
    # Whatever the first plot is, it carries plotly.js, and only it.
    assert html.count("window.PlotlyConfig") == 1


def test_a_study_without_finished_trials_still_renders(tmp_path):
    study = make_study(tmp_path / "run", n_trials=0)
    html = build_report(study=study)
    assert 'id="plot-frontier"' in html and 'id="plot-history"' in html
    assert "no finished trials yet" in html
    assert "0 finished trials (1 failed, 1 running)" in html


def test_no_input_is_an_error():
    with pytest.raises(BitallocError, match="nothing to report"):
        build_report()


def test_header_summarises_the_inputs(full_html, allocation):
    header = full_html[: full_html.index("</header>")]
    assert MODEL in header
    assert f"{BUDGET:g} bits per weight" in header
    assert f"{allocation.avg_bits:.4f} avg bits" in header
    assert "14.0000" in header  # measured perplexity
    assert f"{N_TRIALS} finished trials (1 failed, 1 running)" in header
    assert f"study &#x27;{STUDY}&#x27;" in header
    assert "21 units x 5 formats" in header
    assert "4 budgets (3 measured, 4 predicted)" in header


def test_user_text_is_escaped(profile):
    html = build_report(profile=profile.with_metadata(method="<script>x</script>"), title="<b>")
    assert "<script>x</script>" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html
    assert "<title>&lt;b&gt;</title>" in html


# --- a. heatmap --------------------------------------------------------------------------------
def test_heatmap_values_are_the_profiles(full_html, profile):
    traces = plot_data(full_html, "heatmap")
    assert [t["name"] for t in traces] == list(FORMATS)
    units = make_units()
    for t in traces:
        j = FORMATS.index(t["name"])
        assert t["x"] == list(ROLES)
        assert t["y"] == [str(layer) for layer in range(LAYERS)]
        for i, unit in enumerate(units):
            cell = t["customdata"][unit.layer][ROLES.index(unit.role)]
            assert cell == pytest.approx(profile.loss[i, j], rel=1e-12, abs=0)
    # The lowest-bit integer format is shown first; the dropdown offers every format.
    assert [t["visible"] for t in traces] == [f == "int2-g128" for f in FORMATS]
    fig = figures.heatmap_figure(profile)
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == list(FORMATS)
    assert menu.active == 0


def test_heatmap_log_scale_survives_zeros(profile):
    fig = figures.heatmap_figure(profile, default_format="fp16")
    fp16 = trace(fig, "fp16")
    assert fp16.visible is True
    assert all(v == 0.0 for row in fp16.customdata for v in row)
    assert all(math.isfinite(v) for row in fp16.z for v in row)
    # Elsewhere the colours are log10 of the values: unit 2 is layer 0's v, unit 7 layer 1's q.
    int2 = trace(fig, "int2-g128")
    assert 10 ** int2.z[0][ROLES.index("v")] == pytest.approx(profile.loss[2, 0])
    assert 10 ** int2.z[1][ROLES.index("q")] == pytest.approx(profile.loss[7, 0])


def test_default_heatmap_format():
    assert ddata.default_heatmap_format(["fp16", "int4-g128", "int2-g32", "int2-g128"]) == (
        "int2-g128"
    )
    assert ddata.default_heatmap_format(["fp16"]) == "fp16"


def test_units_placed_from_names_without_unit_info(profile):
    bare = make_profile()
    bare = type(bare)(bare.units, bare.formats, bare.loss, {"method": "x"})
    assert ddata.unit_positions(bare) == ddata.unit_positions(profile)


# --- b. bits per layer -------------------------------------------------------------------------
def test_bits_per_layer_are_the_allocations(full_html, allocation):
    traces = plot_data(full_html, "bits")
    bars = trace(traces, figures.LAYER_TRACE)
    expected = []
    for layer in range(LAYERS):
        units = [u for u in allocation.data.units if u.layer == layer]
        bits = sum(u.bits_per_weight * u.numel for u in units)
        expected.append(bits / sum(u.numel for u in units))
    assert bars["y"] == pytest.approx(expected, rel=1e-12)
    assert bars["x"] == [0, 1, 2]
    for role in ROLES:
        markers = trace(traces, role)
        assert markers["y"] == [u.bits_per_weight for u in allocation.data.units if u.role == role]
    fig = figures.bits_figure(allocation)
    assert BUDGET in [shape.y0 for shape in fig.layout.shapes]


# --- c. frontier -------------------------------------------------------------------------------
def brute_pareto(points):
    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)

    return sorted({p for p in points if not dominated(p)})


def test_pareto_front_of_a_hand_made_set():
    points = [(3, 10), (2, 20), (4, 9), (3, 11), (5, 9), (2, 20), (1, 50), (4.5, 8)]
    assert pareto_front(points) == [6, 1, 0, 2, 7]
    assert pareto_front([]) == []
    assert [points[i] for i in pareto_front(points)] == brute_pareto(points)


def test_best_within_budget_of_a_hand_made_history():
    pts = [
        ddata.TrialPoint(0, 4.0, 10.0, "sampler"),  # over budget: ignored
        ddata.TrialPoint(1, 3.0, 30.0, "sampler"),
        ddata.TrialPoint(2, 3.5, 20.0, "sampler"),  # exactly at the budget counts
        ddata.TrialPoint(3, 2.5, 25.0, "sampler"),
        ddata.TrialPoint(4, 3.6, 5.0, "sampler"),
    ]
    assert ddata.best_within_budget(pts, 3.5) == [(1, 30.0), (2, 20.0), (3, 20.0), (4, 20.0)]
    assert ddata.best_within_budget(pts, None)[-1] == (4, 5.0)


def test_frontier_plot_shows_every_source(full_html, frontier, study):
    traces = plot_data(full_html, "frontier")
    names = {t["name"] for t in traces}
    assert {
        "search: sampler",
        "search: seed: lagrangian",
        "search: seed: ilp",
        figures.PARETO_TRACE,
        figures.FRONTIER_TRACE,
        figures.UNIFORM_TRACE,
        figures.CHOSEN_TRACE,
        figures.FP16_TRACE,
    } <= names
    rows = trial_values(N_TRIALS)
    searched = [t for t in traces if t["name"].startswith(figures.SEARCH_PREFIX)]
    assert sum(len(t["x"]) for t in searched) == N_TRIALS  # FAIL/RUNNING trials left out
    pareto = trace(traces, figures.PARETO_TRACE)
    assert list(zip(pareto["x"], pareto["y"])) == brute_pareto([(b, p) for b, p, _ in rows])
    solver = trace(traces, figures.FRONTIER_TRACE)
    measured = [p for p in frontier["points"] if p["perplexity"] is not None]
    assert solver["y"] == [p["perplexity"] for p in measured]
    uniform = trace(traces, figures.UNIFORM_TRACE)
    assert sorted(uniform["text"]) == ["int3-g128", "int4-g128"]
    assert trace(traces, figures.FP16_TRACE)["y"] == [FP16_PPL, FP16_PPL]
    calib = trace(traces, figures.CALIBRATION_PREFIX + figures.FRONTIER_TRACE)
    assert calib["x"] == [p["predicted_loss"] for p in measured]
    assert calib["y"] == pytest.approx([math.log(p["perplexity"] / FP16_PPL) for p in measured])
    fig = figures.frontier_figure(frontier=frontier, study=study)
    assert fig.layout.yaxis.type == "log"


def test_frontier_object_is_accepted(frontier):
    class FakeFrontier:
        def to_json(self):
            return frontier

    html = build_report(frontier=FakeFrontier())
    assert 'id="plot-frontier"' in html
    with pytest.raises(BitallocError, match="no list of points"):
        build_report(frontier={"points": None})


# --- d. history --------------------------------------------------------------------------------
def test_history_best_so_far_within_budget(study):
    fig = figures.history_figure(study)
    trials = trace(fig, figures.HISTORY_TRACE)
    rows = trial_values(N_TRIALS)
    assert list(trials.x) == list(range(N_TRIALS))
    assert list(trials.marker.color) == [b for b, _, _ in rows]
    best = trace(fig, figures.BEST_TRACE)
    assert list(best.y) == sorted(best.y, reverse=True)
    assert best.y[-1] == min(p for b, p, _ in rows if b <= BUDGET)
    assert best.x[-1] == N_TRIALS - 1


def test_counts_and_points_ignore_unfinished_trials(study):
    counts = ddata.trial_counts(study)
    assert (counts.complete, counts.failed, counts.running, counts.total) == (N_TRIALS, 1, 1, 26)
    assert len(ddata.study_points(study)) == N_TRIALS
    assert ddata.source_group("seed:ilp@3.25") == "seed: ilp"


# --- run directory -----------------------------------------------------------------------------
def test_load_run_finds_everything(run_dir, profile, allocation, frontier):
    inputs = load_run(run_dir)
    assert set(inputs) == {"profile", "allocation", "frontier", "study"}
    assert inputs["profile"].units == profile.units
    assert inputs["allocation"].formats == allocation.formats
    assert inputs["frontier"] == frontier
    assert inputs["study"].study_name == STUDY


def test_load_run_follows_search_json(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    make_study(elsewhere, name="other", n_trials=3)
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(
        run / "search.json",
        {"storage": default_storage_url(elsewhere), "study": "other", "budget": 3.5},
    )
    inputs = load_run(run)
    assert set(inputs) == {"study"}
    assert inputs["study"].study_name == "other"
    assert len(inputs["study"].trials) == 5


def test_load_run_errors(tmp_path):
    with pytest.raises(BitallocError, match="run directory .* does not exist"):
        load_run(tmp_path / "missing")
    run = tmp_path / "run"
    run.mkdir()
    assert load_run(run) == {}
    # A storage that is not there is an error, and reading it creates nothing.
    missing = tmp_path / "nowhere" / "study.db"
    with pytest.raises(BitallocError, match="does not exist"):
        load_run(run, storage=f"sqlite:///{missing}")
    assert not missing.exists() and not missing.parent.exists()
    (run / "study.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(BitallocError, match="cannot open storage"):
        load_run(run)
    with pytest.raises(BitallocError, match="none.log does not exist"):
        load_run(run, storage="journal:" + str(tmp_path / "none.log"))
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(BitallocError, match="--study 'x'.*--storage"):
        load_run(bare, study_name="x")


def test_load_run_needs_a_name_among_several_studies(tmp_path):
    run = tmp_path / "run"
    make_study(run, name="a", n_trials=2)
    make_study(run, name="b", n_trials=2)
    with pytest.raises(BitallocError, match=r"2 studies \(a, b\); choose one with --study"):
        load_run(run)
    assert load_run(run, study_name="b")["study"].study_name == "b"
    with pytest.raises(BitallocError, match="no study 'c'"):
        load_run(run, study_name="c")
    empty = tmp_path / "empty"
    empty.mkdir()
    open_storage(default_storage_url(empty))  # creates the schema, holds no study
    with pytest.raises(BitallocError, match="holds no study"):
        load_run(empty)


# --- writing -----------------------------------------------------------------------------------
def test_write_report_is_atomic(tmp_path, profile, monkeypatch):
    out = tmp_path / "report.html"
    assert write_report(out, profile=profile) == out
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    out.write_text("previous report")

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", interrupted)
    # fileio turns the operating-system error into the project's own, naming the cause.
    with pytest.raises(BitallocError, match="disk full"):
        write_report(out, profile=profile)
    assert out.read_text() == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# --- command line ------------------------------------------------------------------------------
def test_cli_report_from_a_run_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--out", str(out), "--run-dir", str(run_dir)]) == 0
    assert "heatmap, bits, frontier, history" in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert all(f'id="{plot_id}"' in html for plot_id in PLOT_IDS.values())


def test_cli_report_explicit_files_override(run_dir, tmp_path, frontier, capsys, monkeypatch):
    changed = json.loads(json.dumps(frontier))
    changed["points"][0]["perplexity"] = 99.5
    path = tmp_path / "f.json"
    write_json_atomic(path, changed)
    out = tmp_path / "r.html"
    args = ["report", "--out", str(out), "--run-dir", str(run_dir), "--frontier", str(path)]
    assert main(args) == 0
    assert trace(plot_data(out.read_text(), "frontier"), figures.FRONTIER_TRACE)["y"][0] == 99.5
    # Without a run directory (the default one absent), files alone are enough.
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--out", "only.html", "--frontier", str(path)]) == 0
    assert "frontier" in capsys.readouterr().out


def test_cli_report_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--out", "r.html"]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err and "runs/bitalloc does not exist" in err
    assert main(["report", "--out", "r.html", "--run-dir", "nope"]) == 2
    assert "run directory nope does not exist" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path), "--run-dir", "nope"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# --- in a browser ------------------------------------------------------------------------------
def test_report_renders_in_chromium(tmp_path, full_html):
    browser.require_chromium()
    page = tmp_path / "report.html"
    page.write_text(full_html, encoding="utf-8")
    shot = browser.ARTIFACTS / "report.png"
    dom = browser.render(page.as_uri(), screenshot=shot, budget_ms=3000)
    starts = sorted((dom.index(f'id="{plot_id}"'), key) for key, plot_id in PLOT_IDS.items())
    for n, (start, key) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(dom)
        wrapper = dom[start:end]
        assert "js-plotly-plot" in wrapper, f"plotly did not render {key}"
        assert 'class="main-svg"' in wrapper, f"{key} has no SVG"
    browser.assert_nontrivial_png(shot, min_bytes=60_000)
